"""Print pockengine's OpInfo coverage as markdown (the "OpInfo coverage" section of docs/coverage.md).

    PYTHONPATH=. python scripts/opinfo_coverage.py [--samples 3] [--through trainer|graph] [--ops NAME ...]

Same as `python -m pockengine.autodiff.opinfo`; see that module for what each category means.
"""

from pockengine.autodiff.opinfo import main

if __name__ == "__main__":
    main()
