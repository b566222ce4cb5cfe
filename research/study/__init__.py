"""The routing quality study (issue 7): train and evaluate every model of the paper's Table 1 on
Multi30k, resumably, one results JSON per run.

    .venv/bin/python -m research.study --list     # the runs and how far each got
    .venv/bin/python -m research.study            # everything (hours on 2 cores; make study)
    .venv/bin/python -m research.study --only dense,target_target
    .venv/bin/python -m research.study.report     # results/study/*.json -> docs/results.md

Every model shares the backbone and training recipe in SHARED_FLAGS (d=256, 3+3 layers, FFN 1024;
MoE models: 8 experts of FFN dim 512, top-2, in the middle layer of each side) and the same
budget of --max-update updates of at most 4096 tokens; only the routing and balance-loss flags of
VARIANTS differ. Trained on the six en<->{de,fr,cs} directions of the full Multi30k training set;
evaluated with beam 5 on test_2016_flickr in all 12 directions (the six de/fr/cs<->de/fr/cs ones
are zero-shot): detokenized sacreBLEU and chrF, plus the share of hypotheses in the wrong language
(fairseq_taskmoe.langid, whose own accuracy on the references is measured and recorded).
Task-routed models are also pruned per trained direction (taskmoe-prune) and re-evaluated;
lang_pair routing is evaluated on the zero-shot directions under both moe_unseen_pairs policies
(the checkpoint's own, the other by --model-overrides). Training runs with --disable-validation
(a validation pass at every 200-update save would cost more than it tells); test BLEU is the
measure.

Smoke test of the machinery (minutes; never into results/ or docs/):

    OMP_NUM_THREADS=1 .venv/bin/python -m research.study --work /tmp/s/work --results /tmp/s/res \\
        --img-dir /tmp/s/img --only dense-s1,target_target --max-update 40 --save-interval 10 \\
        --train-size 2000 --directions en-de,de-en,de-fr --max-len-b 30

On LoHelp (--corpus lohelp; the corpus of `make lohelp`, docs/corpus-lohelp.md): English and
14 languages, trained on the 28 en<->X directions with temperature sampling over the pairs,
dense, token / token, target / target and lang-pair / lang-pair, one seed each, preset lohelp
(grid.PRESETS: the same backbone, 800 updates: the three runs side by side and their evaluation
fit one 3-hour session on 2 cores), folders
work/study-lohelp, results/study-lohelp, docs/img/study-lohelp. Each direction translates a
seeded sample of at most --test-cap (200) of its pair's test paragraphs, full and pruned alike;
BLEU uses sacreBLEU's zh and ja-mecab tokenizers for Chinese and Japanese, chrF everywhere;
off-target rates by py3langid restricted to the corpus's languages (fairseq_taskmoe.langid.
detector_for); no zero-shot directions (research.pivot_eval compares them through the service).
corpus.py says how.

    .venv/bin/python -m research.study --corpus lohelp --only dense,token_token,target_target
    .venv/bin/python -m research.study.report --corpus lohelp   # -> docs/results-many.md

Resuming: a run whose results JSON exists is skipped; fairseq-train resumes from the run's
checkpoint_last.pt (saved every 200 updates); every evaluation step is skipped when its output
file exists. Kill it at any point and start the same command again.

Work files (checkpoints, logs, generations) go under --work (default work/study/, git-ignored);
results JSONs under --results (default results/study/), heatmaps under --img-dir (default
docs/img/).

Modules: grid (the runs, their flags and fairseq-train command), corpus (Multi30k or LoHelp:
languages, directions, references, capped test sets, BLEU tokenizers), training, evaluation,
runner (arguments and the driver; `python -m research.study`), report/ (docs/results.md and
docs/results-many.md), heatmap and routing_stats (expert usage per pair of one checkpoint).
"""
