"""The benchmarks: each a command of its own that measures its variants side by side in one run
(interleaved rounds, medians) and writes results/<name>.{json,md}; docs/benchmarks.md and the
guides quote them.

    inference        pruned task-MoE vs token-MoE vs dense (Figure 2); variants.py builds the models
    moe_layer        our MoE layer vs fairscale's MOELayer + Top2Gate
    export           one pair served five ways: full, pruned, stock fairseq, CTranslate2 (after
                     `make demo`)
    generate         fairseq-generate speed of several checkpoints
    train_speed      training words/s: dense, token-MoE, task-MoE
    expert_parallel  the same on W CPU processes with sharded experts (all-to-all share)
    ct2_batch        CTranslate2's gain from batching on one exported model
    engine_batches   two calls side by side, one batch or cut into engine batches (--engine-batch)
    serve            taskmoe-serve under load: batching on / off, token- vs task-MoE served
    ray_serve        the embedded server vs --engine ray with 1 and 2 replicas (CPU per part)
    (load.py: the harness both serving benchmarks use: start servers, send the load)

    .venv/bin/python -m research.bench.<name> --help
"""
