"""The upcycling study (issue 28): what continued training buys a dense model turned into a
task-MoE by taskmoe-upcycle, against the dense model trained on and a task-MoE from scratch, in
BLEU and in training compute, on Multi30k with the routing study's recipe.

    .venv/bin/python -m research.upcycle_study --list   # the rows and how far each got
    .venv/bin/python -m research.upcycle_study          # everything (make study-upcycle)
    .venv/bin/python -m research.upcycle_study.report   # -> docs/results-upcycle.md

Rows (plan.ROWS; M = --upcycle-updates, default 500; the dense run's length N is the study's
budget, 1,000 updates for the cpu preset):

- dense-s1: the study's own dense run (research.study, variant dense), reused from
  work/study/runs/dense-s1 when it is trained with its CPU seconds recorded, else trained with
  the same command (there when it has not started, else under --work);
- upcycled_target_target-s1, -s2: taskmoe-upcycle of the dense checkpoint into the study's
  target / target task-MoE (8 experts of 512, top-2: the dense FFN of 1,024 split in two pieces,
  exact at step 0), then fairseq-train --finetune-from-model for M updates;
- upcycled_token_token-s1: the same with token routing: copies of the dense FFN (token routing
  cannot split it exactly) behind a fresh gate, --noise 0.01 to break their symmetry;
- dense_continued-s1, -s2: the dense checkpoint, --finetune-from-model for M updates;
- scratch_target_target-s1: the study's target_target for N + M updates.

Every continued row has the same schedule (plan.continuation_schedule): the dense run's
inverse-sqrt schedule carried on from its rate at update N to its rate at N + M, linear,
re-warmed over 50 updates for the fresh Adam. Compute (plan.row_compute): training CPU seconds
read from /proc at every checkpoint save (research.study.training's ledger) and updates; a row
that starts from the dense checkpoint counts its pre-training once, an upcycled row the
taskmoe-upcycle command too. Evaluation (evaluation.py): every row's last checkpoint on the whole
test set of the trained directions (the study's beam-5 sacreBLEU), task-MoEs pruned per
direction and checked identical; the upcycled target / target checkpoint at step 0 against the
dense model's hypotheses, full and pruned; for the BLEU-vs-compute curves, every checkpoint kept
(each --curve-every updates) on a seeded sample of --curve-cap test sentences.

Resuming: each stage writes its file under --results (default results/upcycle/: <run>.json,
curve-<run>.json, step0-<run>.json, upcycle-<run>.json), atomically, and is skipped when it
exists; fairseq-train resumes from the run's checkpoint_last.pt; a curve point's checkpoint (a
hard link under the run's curve/ folder) is deleted once its point is written. Kill it at any
point and start the same command again. Work files under --work (default work/upcycle/; runs
that depend on M under m<M>/).

Smoke test of the machinery (minutes; never into results/ or docs/):

    OMP_NUM_THREADS=1 .venv/bin/python -m research.upcycle_study --work /tmp/u/work \\
        --results /tmp/u/res --study-work /tmp/u/study --train-size 2000 --dense-updates 40 \\
        --upcycle-updates 20 --curve-every 10 --curve-cap 50 --directions en-de,de-en \\
        --max-len-b 30

Modules: plan (rows, schedule, commands, compute accounting), folders (where every file is),
stages (each stage of a row), evaluation (scoring, the step-0 check, the test sample), runner
(arguments and the driver), report (the page), curves (the curves' reading and the figure),
goals (the issue's goals).
"""
