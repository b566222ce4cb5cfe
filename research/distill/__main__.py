"""`python -m research.distill`: the distillation baseline (research/distill/__init__.py)."""

import sys

from research.distill.runner import main

if __name__ == "__main__":
    sys.exit(main())
