"""`python -m research.study`: the study runner (research/study/__init__.py says what it does)."""

import sys

from research.study.runner import main

if __name__ == "__main__":
    sys.exit(main())
