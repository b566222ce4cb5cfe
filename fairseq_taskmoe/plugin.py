"""Everything fairseq needs from this package: registers the model, task and criterion, and
lets fairseq load checkpoints with current torch. Imported by `--user-dir user_dir`."""

from .compat import allow_fairseq_checkpoint_pickles
from . import criterion, model, task  # noqa: F401  (registration side effects)

allow_fairseq_checkpoint_pickles()
