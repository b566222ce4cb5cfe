"""Sequence-level distillation baseline (issue 10): is task-MoE really "beyond distillation" here?

    .venv/bin/python -m research.study --only token_token-s1      # the teacher (and its row)
    .venv/bin/python -m research.study --only target_target-s1    # the pruned task-MoE to beat
    .venv/bin/python -m research.distill                          # this recipe (hours on 2 cores)
    .venv/bin/python -m research.study.report                     # docs/results.md

The teacher is the study's token-routed MoE (token / token, seed 1). The student is a dense model
of the study's backbone (SHARED_FLAGS with --moe-freq 0: d=256, 3+3 layers, FFN 1024), which is
exactly the size of one pruned task-MoE sub-network of the study (its merged MoE layer is the
top-2 experts, 2 x 512 = 1024 wide), trained with the study's recipe and budget on the teacher's
translations. Steps, each skipped when its output exists (kill it at any point and start the
same command again):

  1. teacher   beam search (--beam, default 5) over the training source side of the 6 trained
               directions with fairseq-generate --gen-subset train, in --shards chunks per
               direction. fairseq-generate 0.12 parses --num-shards/--shard-id but ignores them
               (it shards its batches by --distributed-world-size/--distributed-rank, which it
               never uses to start a process group), so the chunks are made with those two.
               Every chunk is <work>/teacher/<pair>/chunk-<i>-of-<K>.tsv (id, score, pieces),
               written atomically; a killed run resumes at the next missing chunk. Decoding
               seconds are summed over chunks in <work>/teacher/decode.json. After the last chunk
               of a direction every training sentence must have exactly one hypothesis.
  2. binarize  the hypotheses (SentencePiece pieces; a leading target-language tag is stripped)
               become the new targets, the original sources unchanged (re-binarized and checked
               byte-identical), with fairseq-preprocess and the study's dictionary
               (<study data>/bin/dict.<lang>.txt). valid/test of all 12 directions (the zero-shot
               ones included: the study's prepare_data copies), the dictionaries and the test
               references are copied from the study data. -> <work>/data/bin (/.done last)
  3. init      (--init teacher, the default) the student starts from the teacher: every
               non-expert weight is copied (embeddings, attention, layer norms, the dense FFNs);
               each MoE layer's FFN becomes merge_ffns([expert_a, expert_b], [0.5, 0.5]), one
               1024-wide FFN computing exactly 0.5 * (expert_a(x) + expert_b(x)), where a and b
               are the two experts the teacher's router sends most (token, expert) assignments
               to in that layer on the validation set (fairseq_taskmoe.moe.analysis; experts 0
               and 1 if it yields no counts); the routers are dropped. Written as a fairseq
               checkpoint with a fresh optimizer history, which
               `fairseq-train --finetune-from-model` loads (checked here by loading it with
               fairseq). --init random skips this.
  4. train     fairseq-train with the study's exact recipe and budget (research.study.grid's
               train_command: SHARED_FLAGS, --moe-freq 0, --max-update, --seed), resumable
               from checkpoint_last.pt, progress shown (research.study.training).
  5. evaluate  research.study.evaluation: 12 directions, beam 5, BLEU/chrF/off-target.
  6. speed     decode speed of the student and the pruned task-MoE (target / target seed 1,
               pruned for --speed-pair with taskmoe-prune, timed) measured in one sitting on
               the same test set, alternating --speed-rounds times. Waits (skipped, retried on
               the next run) while that task-MoE is not trained.
  7. report    results/study/<run>.json in the study's schema (variant "distilled") plus the
               "distillation", "speed" and "cost" blocks: teacher decoding + student training
               seconds against the pruning seconds (measured here and recorded by the study's
               task-routed runs). Rewritten on every run (cheap), so a later speed step lands.

Smoke test (a tiny teacher first; minutes, never into results/ or docs/):

    OMP_NUM_THREADS=1 .venv/bin/python -m research.study --work /tmp/d/work --results /tmp/d/res \\
        --img-dir /tmp/d/img --only token_token-s1,target_target-s1 --max-update 20 \\
        --save-interval 10 --train-size 500 --directions en-de,de-en --max-len-b 20
    OMP_NUM_THREADS=1 .venv/bin/python -m research.distill --study-work /tmp/d/work \\
        --work /tmp/d/distill --results /tmp/d/res --train-size 500 --directions en-de,de-en \\
        --max-len-b 20 --shards 2 --max-update 20 --save-interval 10
"""
# Modules: config (runs, steps, arguments), teacher, binarize, student (init, train, evaluate),
# speed, report, runner (the driver; `python -m research.distill`). The text above is --help.
