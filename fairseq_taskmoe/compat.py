"""Make fairseq 0.12 load its own checkpoints under torch >= 2.6.

torch 2.6 made `torch.load` default to `weights_only=True`; fairseq's checkpoint loader does not
pass `weights_only=False`, so `fairseq-generate` cannot read the argparse/omegaconf config that
`fairseq-train` pickled into the checkpoint. We give fairseq's checkpoint_utils module (only that
module) a `torch` whose `load` defaults to `weights_only=False`, i.e. fairseq's historical
behaviour: checkpoints are trusted pickles, as they always were in fairseq.
"""

import torch


class _TorchWithPickleLoad:
    """Forwards every attribute to torch, except `load`, which defaults to weights_only=False."""

    patched_by_taskmoe = True

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(f, *args, **kwargs)


def allow_fairseq_checkpoint_pickles():
    from fairseq import checkpoint_utils

    if not getattr(checkpoint_utils.torch, "patched_by_taskmoe", False):
        checkpoint_utils.torch = _TorchWithPickleLoad()


def load_checkpoint(path: str):
    """Read a fairseq checkpoint file on CPU (what taskmoe-prune reads)."""
    return torch.load(path, map_location="cpu", weights_only=False)
