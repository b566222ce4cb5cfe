"""Task-level Mixture-of-Experts for multilingual MT, as a fairseq plugin.

    moe/          the MoE core in plain torch, no fairseq: routing, dispatch, experts, losses,
                  the MoE layer, merged task experts, routing statistics, and which pairs a
                  task-routed sub-network serves
    distributed/  expert parallelism (each rank holds E/W experts, all-to-all) and the per-rank
                  checkpoint files it writes
    integration/  the fairseq side: config, layers, model, task, criterion, safe checkpoint
                  loading and the Trainer hooks; integration/plugin.py is what
                  `--user-dir user_dir` imports (it registers everything)
    deploy/       a checkpoint -> one task's pruned sub-network, parameter counts, export to a
                  stock fairseq transformer, CTranslate2 or an Argos Translate package
    serve/, cli/  taskmoe-serve and the taskmoe-* console commands
    hub.py        the Python API on a checkpoint (public: `fairseq_taskmoe.hub`)
    ct2.py        the Python API on an exported CTranslate2 model (public: `fairseq_taskmoe.ct2`)
    atomic.py, langid.py  utilities: atomic file writes, language detection (off-target rates)

Dependencies point one way: moe <- distributed, integration, deploy <- serve <- cli (and hub,
ct2). moe imports nothing else of this package; nothing but serve/ and cli/ imports serve/, and
nothing but cli/ imports cli/. Between the middle three: integration builds on distributed (sharded expert FFNs, the
checkpoint files its Trainer hooks write), distributed/checkpoints.py reads files through
integration/compat.py (the allow-list of fairseq's pickled types), deploy reads the options of
integration/config.py; integration imports nothing of deploy. The subpackages' __init__ files
import nothing, so `fairseq_taskmoe.moe.pairs` loads neither torch nor fairseq.
tests/test_layout.py checks these directions.
"""

__version__ = "0.1.0"
