"""`python -m pockengine ...`: the `pockengine` command."""

import sys

from pockengine.cli import main

sys.exit(main())
