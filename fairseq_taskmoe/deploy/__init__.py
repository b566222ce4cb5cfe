"""From a trained checkpoint to what is deployed: prune, merge, export; and from a dense
checkpoint to a task-MoE (upcycle). Checkpoint dicts in and out; no model is built.

pruning.py (a checkpoint -> one task's sub-network, its experts kept or merged), params.py
(parameters in total and active per token, from a state dict), export.py (a pruned pair -> a
stock fairseq transformer or a CTranslate2 model), argos.py (that CTranslate2 model as an Argos
Translate package), upcycle.py (a dense transformer -> a task-MoE computing the same function at
step 0). Which pairs a result serves is moe/pairs.py's rule.

Imports moe/ and integration/config.py (the MoE options a checkpoint's args carry); used by
serve/, cli/ (taskmoe-prune, taskmoe-export, taskmoe-upcycle) and scripts. This __init__
imports nothing.
"""
