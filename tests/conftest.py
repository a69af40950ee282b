"""Every program the tests compile is checked after each pass of the pipeline (`Graph.lint`)."""

import os

os.environ.setdefault("POCKENGINE_CHECK", "1")
