"""Expert parallelism: each of W ranks holds E/W experts of an MoE layer; tokens travel to the
rank of their expert and back by all-to-all.

Axis legend: A grouped (token, slot) assignments on this rank, R assignments this rank's experts
receive from all ranks, C channels, E experts, W ranks (world size), L = E / W local experts.

Which all-to-all, and why not fairscale's MOELayer: fairscale's `MOELayer` dispatches with a
dense [S, E, capacity] einsum (capacity 2S/E, `S % E == 0` asserted) and its autograd
`_AllToAll` exchanges equal splits only. Both drop or pad tokens, and task routing must stay
dropless: a batch of one task sends all its tokens to k experts, possibly all on one rank. So the
plugin keeps its own dispatch (`dispatch.make_plan`: tokens sorted by expert, any group size) and
`ShardedExpertFFNs` below takes exactly the `(grouped [A, C], group_sizes [E])` of the local
`ExpertFFNs`: `MoELayer` and routing are unchanged, and W = 1 keeps the local path untouched. The
exchange is `torch.distributed.all_to_all_single` with split sizes (variable sizes: counts
first, then tokens) in a small autograd Function, the same primitive fairscale's `_AllToAll`
(and fairseq's BASE layers) wrap; it runs on NCCL for GPUs and gloo for CPU processes.

Every rank must run every MoE layer the same number of times in the same order (training and
validation do; generation on several ranks does not). So only a model built to be trained shards
its experts (`expert_parallel_build`, entered by translation_task_moe when fairseq-train builds
the model): a model built to load a checkpoint into (fairseq-generate, -interactive, -validate,
the hub interface, in a process group or not) holds every expert and loads any checkpoint.
"""

import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from ..moe.experts import FeedForward


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this rank holds: the contiguous block [rank * L, (rank + 1) * L)."""

    rank: int
    world_size: int
    num_experts: int

    def __post_init__(self):
        if self.num_experts % self.world_size != 0:
            raise ValueError(
                f"expert parallelism needs --moe-expert-count divisible by the world size: "
                f"{self.num_experts} experts cannot be split over {self.world_size} ranks "
                f"(--distributed-world-size {self.world_size}). Use a multiple of "
                f"{self.world_size} experts, another world size, or --moe-expert-parallel off "
                "(every rank holds all experts)"
            )

    @property
    def local_count(self) -> int:
        return self.num_experts // self.world_size

    @property
    def local_experts(self) -> range:
        return range(self.rank * self.local_count, (self.rank + 1) * self.local_count)


class CommTimer:
    """Wall-clock seconds spent in all-to-all calls (forward and backward), read and reset by the
    trainer hook each step. With `synchronize` (GPUs) the device is synchronized around each call
    so that the time is the communication's, not just the launch's."""

    def __init__(self, synchronize: bool = False):
        self.seconds = 0.0
        self.synchronize = synchronize

    def pop(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def timed(self, fn, *args, device: Optional[torch.device] = None):
        sync = self.synchronize and device is not None and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn(*args)
        if sync:
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - start
        return out


def _exchange(x: Tensor, send: List[int], recv: List[int], group, timer: CommTimer) -> Tensor:
    """Rows x[sum(send[:d]) : sum(send[:d+1])] go to rank d; returns the rows received, ordered
    by source rank. x: [sum(send), C] -> [sum(recv), C]."""
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    timer.timed(dist.all_to_all_single, out, x.contiguous(), recv, send, group,
                device=x.device)
    return out


class AllToAllV(torch.autograd.Function):
    """Variable-size all-to-all with autograd: the gradient goes back the way the rows came."""

    @staticmethod
    def forward(ctx, x: Tensor, send: List[int], recv: List[int], group, timer: CommTimer):
        ctx.send, ctx.recv, ctx.group, ctx.timer = send, recv, group, timer
        return _exchange(x, send, recv, group, timer)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group, ctx.timer), None, None, None, None


class ShardedExpertFFNs(nn.Module):
    """The experts of one MoE layer spread over W ranks; a drop-in for experts.ExpertFFNs.

    Holds the L experts of `shard.local_experts` under their global indices (state-dict keys
    `experts.{e}.fc1.weight`, as in ExpertFFNs), so the union of all ranks' state dicts is the
    single-process one. Their parameters are marked `expert = True`: fairseq's legacy_ddp then
    does not average their gradients, and the gradient norm counts each of them once over all
    ranks (grad_norm_with_experts, installed in place of fairseq's clip_grad_norm_).

    Every expert is built, in order, and the non-local ones dropped at once: the random
    initialisation then consumes the RNG exactly as the single-process model does, so with the
    same seed the sharded model is the single-process model split over ranks, and parameters
    built after the experts stay identical on all ranks.
    """

    def __init__(self, embed_dim: int, ffn_dims: Sequence[int], activation, activation_dropout,
                 shard: ExpertShard, group=None, timer: Optional[CommTimer] = None):
        super().__init__()
        if len(ffn_dims) != shard.num_experts:
            raise ValueError(f"{len(ffn_dims)} expert sizes for {shard.num_experts} experts")
        self.shard = shard
        self.group = group
        self.timer = timer or CommTimer()  # read (and reset) by the trainer hook
        self.experts = nn.ModuleDict()
        for e, dim in enumerate(ffn_dims):
            ffn = FeedForward(embed_dim, dim, activation, activation_dropout)
            if e in shard.local_experts:
                for param in ffn.parameters():
                    param.expert = True
                self.experts[str(e)] = ffn

    def __len__(self):
        return self.shard.num_experts  # the router's E, not the local L

    def forward(self, grouped: Tensor, group_sizes: List[int]) -> Tensor:
        """grouped: [A, C] rows sorted by expert; group_sizes: [E] ints summing to A.
        Returns the experts' outputs [A, C] in the same row order."""
        W, L = self.shard.world_size, self.shard.local_count
        # 1. counts: what every rank sends to each of my local experts
        counts = torch.tensor(group_sizes, dtype=torch.long, device=grouped.device)  # [E]
        recv_counts = _exchange(counts, [L] * W, [L] * W, self.group, self.timer)  # [W * L]
        recv_counts = recv_counts.tolist()  # source-major: (s, j) at s * L + j
        send = [sum(group_sizes[d * L:(d + 1) * L]) for d in range(W)]  # [W]
        recv = [sum(recv_counts[s * L:(s + 1) * L]) for s in range(W)]  # [W]
        # 2. tokens to the rank of their expert
        received = AllToAllV.apply(grouped, send, recv, self.group, self.timer)  # [R, C]
        chunks = list(received.split(recv_counts))  # W * L chunks, source-major
        # 3. each local expert runs once on its tokens from all sources
        dtype = exchange_dtype(grouped)  # one dtype on every rank, whichever experts are idle
        outputs: List[Tensor] = [chunk.to(dtype) for chunk in chunks]  # empty ones stay empty
        for j, expert in enumerate(self.experts.values()):
            index = [s * L + j for s in range(W)]
            sizes = [recv_counts[i] for i in index]
            if sum(sizes) == 0:  # an expert without tokens costs nothing
                continue
            out = expert(torch.cat([chunks[i] for i in index])).to(dtype)  # [n_j, C]
            for i, piece in zip(index, out.split(sizes)):
                outputs[i] = piece
        # 4. outputs back to the ranks the tokens came from, in their original order
        return AllToAllV.apply(torch.cat(outputs), recv, send, self.group, self.timer)  # [A, C]


def exchange_dtype(grouped: Tensor) -> torch.dtype:
    """The dtype expert outputs travel back in. Under autocast an expert computes in the
    autocast dtype (fp16 / bf16), but a rank whose experts received no tokens computes nothing:
    left alone it would send float32 chunks while the others send fp16, and the all-to-all
    breaks (gloo: "Received data size doesn't match expected size"; NCCL: a hang or corrupt
    rows). So every rank decides it by the same rule: the autocast dtype when autocast is on for
    the tokens' device, else the tokens' own dtype (--fp16 without autocast: fp16 everywhere)."""
    device = grouped.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return grouped.dtype


_EXPERT_PARALLEL_BUILD: ContextVar[bool] = ContextVar("taskmoe_expert_parallel_build",
                                                      default=False)


@contextlib.contextmanager
def expert_parallel_build(enabled: bool = True):
    """Models built inside `with expert_parallel_build():` shard their experts over the process
    group (expert_shard); built anywhere else, they hold every expert. translation_task_moe
    enters it when fairseq builds a model to train it (fairseq-train's `task.build_model(cfg)`),
    not when fairseq builds one to load a checkpoint into (`checkpoint_utils.
    load_model_ensemble_and_task` passes `from_checkpoint=True`: fairseq-generate, -interactive,
    -validate, the hub interface), so inference in a multi-process job loads ordinary
    checkpoints as on one process."""
    token = _EXPERT_PARALLEL_BUILD.set(enabled)
    try:
        yield
    finally:
        _EXPERT_PARALLEL_BUILD.reset(token)


def grad_norm_with_experts(params: Sequence[Tensor], group=None) -> Tensor:
    """The L2 norm of the gradient of the whole model, sharded experts included: the same
    number on every rank, and non-finite on every rank when any rank's gradient is.

    Parameters marked `expert` (this rank's experts; fairseq's BASE layers mark theirs alike)
    are held by one rank each, so each rank adds the squares of its own experts' gradients and
    an all-reduce sums them over the ranks (`group`: the ranks the experts are sharded over,
    None = all); every other gradient is the same on all ranks after the data-parallel
    all-reduce and counts once. This is what the norm over a single process holding every
    expert computes (up to summation order), so --clip-norm clips sharded training as it clips
    replicated training, and an fp16 overflow in any expert is an overflow everywhere. Every
    rank must call it (the all-reduce), as the trainer does once per step."""
    params = [p for p in params if p is not None]
    with_grad = [p for p in params if getattr(p, "grad", None) is not None]
    device = (with_grad[0].grad.device if with_grad else
              params[0].device if params else torch.device("cpu"))

    def squares(grads) -> Tensor:  # fp32 sum of squares, as fairseq computes its norms
        total = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            total += torch.linalg.vector_norm(g.detach(), dtype=torch.float32).to(device) ** 2
        return total

    shared_sq = squares(p.grad for p in with_grad if not hasattr(p, "expert"))
    expert_sq = squares(p.grad for p in with_grad if hasattr(p, "expert"))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(expert_sq, group=group)  # each expert lives on one rank: a sum
    return (shared_sq + expert_sq).sqrt()


def expert_shard(num_experts: int, mode: str) -> Optional[ExpertShard]:
    """This process's shard of an E-expert layer, or None for the local path (mode "off", a
    build outside expert_parallel_build, no process group, or world size 1). Raises when E is
    not divisible by the world size."""
    if mode == "off" or not _EXPERT_PARALLEL_BUILD.get():
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    world_size = dist.get_world_size()
    if world_size == 1:
        return None
    return ExpertShard(dist.get_rank(), world_size, num_experts)


def sharded_layers(model: nn.Module):
    """(module name, ShardedExpertFFNs) for every expert-parallel layer of a model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ShardedExpertFFNs)]
