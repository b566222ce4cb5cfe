"""The fairseq side: what plugs the MoE core into fairseq 0.12 (fairseq-fixed 0.12.3.1).

plugin.py (what `--user-dir user_dir` imports: registers model, task and criterion, allows
fairseq's checkpoint types, installs the hooks), config.py (the MoE options, one dataclass),
layers.py (transformer layers whose FFN is dense or MoE), model.py (task_moe_transformer and its
architectures), task.py (translation_task_moe: per-row language ids), criterion.py
(moe_label_smoothed_cross_entropy), lang_tags.py (language ids read from language tags),
compat.py (fairseq checkpoints under torch >= 2.6, loaded weights only), fairseq_guard.py (what
the patches rely on, checked before patching), trainer_patch.py (fairseq Trainer hooks for
sharded experts), teardown.py (ranks leave their process group when training ends).

Imports moe/ and distributed/; imported by deploy/ (config.py), distributed/checkpoints.py
(compat.py), serve/, cli/ and hub.py. This __init__ imports nothing: importing config.py does not
register the plugin; plugin.py does.
"""
