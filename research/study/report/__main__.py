"""`python -m research.study.report`: docs/results.md from results/study/*.json."""

import sys

from research.study.report.page import main

if __name__ == "__main__":
    sys.exit(main())
