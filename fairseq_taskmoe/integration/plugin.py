"""Everything fairseq needs from this package: registers the model, task and criterion, lets
fairseq load checkpoints with current torch, adds expert parallelism to fairseq's Trainer, and
has distributed ranks destroy their process group when training ends.
Imported by `--user-dir user_dir`."""

from .compat import allow_fairseq_checkpoint_types
from . import criterion, model, task  # noqa: F401  (registration side effects)
from . import teardown, trainer_patch

allow_fairseq_checkpoint_types()
trainer_patch.install()
teardown.install()
