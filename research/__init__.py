"""The research harness: the runs, measurements and reports behind docs/results.md and
docs/benchmarks.md. It is not part of the plugin: setup.cfg does not install it, it uses
fairseq_taskmoe as any user would, and it runs from the repository root.

    .venv/bin/python -m research.study --list      # the routing quality study (study/)
    .venv/bin/python -m research.study.report      # results/study/*.json -> docs/results.md
    .venv/bin/python -m research.distill           # the distillation baseline (distill/)
    .venv/bin/python -m research.bench.inference   # the benchmarks of docs/benchmarks.md (bench/)
    .venv/bin/python -m research.pivot_eval --help # pivot vs direct zero-shot, as served
    .venv/bin/python -m research.langid_eval       # the language detector on LoHelp

The Makefile runs the documented ones (`make study`, `make study-report`, `make distill`,
`make bench`). Long jobs are resumable: their state is under work/, their results under
results/; kill one at any point and start the same command again. common.py holds what the
commands share.
"""
