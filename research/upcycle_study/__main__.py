"""`python -m research.upcycle_study`: the upcycling study (research/upcycle_study/__init__.py)."""

import sys

from research.upcycle_study.runner import main

if __name__ == "__main__":
    sys.exit(main())
