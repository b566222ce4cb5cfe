"""fairseq 0.12 checkpoints under torch >= 2.6, loaded safely (weights_only=True).

torch 2.6 made `torch.load` default to `weights_only=True`, which refuses any pickled class it
does not know. fairseq 0.12 pickles its model and task config into checkpoints as an
`argparse.Namespace`; everything else in them is plain containers, numbers, strings and tensors.
Checked with `torch.serialization.get_unsafe_globals_in_checkpoint` on checkpoints written by
this plugin with the adam, adafactor and sgd optimizers, inverse_sqrt, polynomial_decay and
fixed schedulers, and `--store-ema`: `argparse.Namespace` is the only global.

So we allow exactly that type (`torch.serialization.add_safe_globals`), process-wide. fairseq's
own loads then work unchanged and stay safe: `checkpoint_utils` (fairseq-train --restore-file,
fairseq-generate, the hub interface) and `distributed_utils.broadcast_object`, through which
rank 0 sends the checkpoint it loaded to the other ranks (a plain `torch.load` there). By then
fairseq has turned the config into an omegaconf DictConfig, so the bytes rank 1 receives also
hold omegaconf's container and node classes and fairseq's `_TensorPlaceholder` (the list
below, found the same way on such a broadcast); they are allow-listed too. Unpickling any of
these only sets fields: no code from the file runs.

Trust model: a checkpoint is data, and nothing in it is executed. A checkpoint that holds other
classes (written by another fairseq fork, say) is refused by torch with a message naming them.
If you trust its origin, `TASKMOE_TRUST_CHECKPOINTS=1` makes fairseq's checkpoint loader (and
taskmoe-prune) fully unpickle it (`weights_only=False`), which can run code from the file.
"""

import argparse
import os

import torch

TRUST_ENV = "TASKMOE_TRUST_CHECKPOINTS"


def safe_globals() -> list:
    """The classes fairseq checkpoints (and fairseq's broadcast of a loaded one) contain."""
    import collections
    import typing

    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

    from fairseq.distributed.utils import _TensorPlaceholder

    omegaconf_types = [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode,
                       StringNode, IntegerNode, FloatNode, BooleanNode]
    # broadcast_object sends tensors apart and leaves this index-only placeholder in their stead
    fairseq_types = [_TensorPlaceholder]
    # referenced by omegaconf's metadata (key/element types) and containers
    plain = [typing.Any, collections.defaultdict, dict, list, int, float, str, bool]
    return [argparse.Namespace, *omegaconf_types, *fairseq_types, *plain]


def trust_all_pickles() -> bool:
    return os.environ.get(TRUST_ENV, "") == "1"


class _TorchWithPickleLoad:
    """Forwards every attribute to torch, except `load`, which defaults to weights_only=False.
    Only installed when the user opts in with TASKMOE_TRUST_CHECKPOINTS=1."""

    patched_by_taskmoe = True

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(f, *args, **kwargs)


def fairseq_expectations():
    """What this module relies on in fairseq (fairseq_guard.py): the placeholder class that
    broadcast_object pickles, and the `torch` name checkpoint_utils loads with (replaced under
    TASKMOE_TRUST_CHECKPOINTS=1)."""
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    from .fairseq_guard import Expect

    return [
        Expect(distributed_utils, "distributed_utils", "_TensorPlaceholder", "attribute"),
        Expect(checkpoint_utils, "checkpoint_utils", "torch", "attribute"),
        Expect(checkpoint_utils.load_checkpoint_to_cpu, "checkpoint_utils.load_checkpoint_to_cpu",
               "", "uses", ("torch", "load")),
    ]


def allow_fairseq_checkpoint_types():
    """Let weights_only loading read fairseq checkpoints (see the module docstring)."""
    from .fairseq_guard import require

    require(fairseq_expectations(), "compat")
    torch.serialization.add_safe_globals(safe_globals())
    if trust_all_pickles():
        from fairseq import checkpoint_utils

        if not getattr(checkpoint_utils.torch, "patched_by_taskmoe", False):
            checkpoint_utils.torch = _TorchWithPickleLoad()


def load_checkpoint(path: str, mmap: bool = False):
    """Read a fairseq checkpoint file on CPU (what taskmoe-prune, -export and -consolidate
    read), weights only unless the user trusts checkpoints."""
    torch.serialization.add_safe_globals(safe_globals())
    return torch.load(path, map_location="cpu", weights_only=not trust_all_pickles(), mmap=mmap)
