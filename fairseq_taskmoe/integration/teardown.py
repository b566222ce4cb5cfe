"""fairseq-train's distributed ranks destroy their process group when training ends.

fairseq 0.12's `distributed_utils.distributed_main` runs training, waits at a final barrier
and returns; the process then exits with the process group still alive. Under current torch
that is a race: gloo's worker threads can still hold finished work objects (and their tensors)
when the interpreter is torn down, and releasing them then aborts the process (SIGABRT,
"terminate called without an active exception"), seen here on CPU ranks that had trained to
the end. torch's shutdown docs ask every process to call `destroy_process_group()` once
communication is over (pytorch/pytorch#122358; #179291 describes this gloo abort).

So `install()` wraps `distributed_main`: after fairseq's own final barrier, on a normal
return only, it destroys the process group. After an exception it does nothing, so a failing
rank neither blocks on peers nor hides the error. fairseq's `call_main` looks the function up
in its module at call time, so the wrapper is what `fairseq-train` runs (with
`--distributed-no-spawn`; GPU ranks spawned by torch.multiprocessing unpickle fairseq's own
function and keep fairseq's behaviour).
"""

import functools

import torch.distributed as dist
from fairseq.distributed import utils as distributed_utils


def _destroying(distributed_main):
    @functools.wraps(distributed_main)
    def wrapped(*args, **kwargs):
        distributed_main(*args, **kwargs)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    wrapped.destroys_process_group = True
    return wrapped


def fairseq_expectations():
    """What this module relies on in fairseq (fairseq_guard.py): distributed_main, which
    call_main looks up in its module when it runs (so the wrapper is what runs)."""
    from .fairseq_guard import Expect

    return [
        Expect(distributed_utils, "distributed_utils", "distributed_main", "function",
               ("i", "main", "cfg", "kwargs")),
        Expect(distributed_utils.call_main, "distributed_utils.call_main", "", "uses",
               ("distributed_main",)),
    ]


def install():
    """Make fairseq's distributed ranks destroy their process group after training."""
    from .fairseq_guard import require

    require(fairseq_expectations(), "teardown")
    if not getattr(distributed_utils.distributed_main, "destroys_process_group", False):
        distributed_utils.distributed_main = _destroying(distributed_utils.distributed_main)
