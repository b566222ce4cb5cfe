"""Write docs/results.md from the study's results JSONs (research.study).

    .venv/bin/python -m research.study.report        # results/study -> docs/results.md
    .venv/bin/python -m research.study.report --results /tmp/r --out /tmp/results.md
    .venv/bin/python -m research.study.report --corpus lohelp   # -> docs/results-many.md

Every number in the page comes from a JSON; runs without one are listed as "not yet run", and the
"reading" section only states what the present data shows. Re-run it after every sitting.

Modules: stats (loading, statistics over seeds, formatting), sections, distillation, reading,
page (the sections in order, written atomically; `python -m research.study.report`), many
(the LoHelp study's page, docs/results-many.md).
"""
