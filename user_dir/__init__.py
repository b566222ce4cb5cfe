# fairseq entry point: `--user-dir user_dir` registers task_moe, translation_task_moe and
# moe_label_smoothed_cross_entropy. The code lives in the fairseq_taskmoe package.
from fairseq_taskmoe.integration import plugin  # noqa: F401
