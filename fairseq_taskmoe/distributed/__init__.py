"""Expert parallelism, in torch.distributed: each of W ranks holds E/W experts of every MoE
layer, and the checkpoints such a run writes.

sharding.py (which rank holds which experts, the variable-size all-to-all, gradient norms over
sharded experts), checkpoints.py (per-rank expert files + one shared file, consolidation,
re-sharding on load; checkpoint dicts in and out, no model built).

Imports moe/ (and integration/compat.py to read checkpoint files safely); used by integration/
(layers, task, Trainer hooks), serve/ and cli/. This __init__ imports nothing.
"""
