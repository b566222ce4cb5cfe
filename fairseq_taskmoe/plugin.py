"""Everything fairseq needs from this package: registers the model, task and criterion, lets
fairseq load checkpoints with current torch, and adds expert parallelism to fairseq's Trainer.
Imported by `--user-dir user_dir`."""

from .compat import allow_fairseq_checkpoint_types
from . import criterion, model, task, trainer_patch  # noqa: F401  (registration side effects)

allow_fairseq_checkpoint_types()
trainer_patch.install()
