"""`python -m bench [options]` from the repository root: see bench/cli.py."""

import sys

from bench.cli import main

sys.exit(main())
