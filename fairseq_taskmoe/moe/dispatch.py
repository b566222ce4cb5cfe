"""Dispatch and combine: group routed tokens by expert, and scatter expert outputs back.

Axis legend: N routed tokens, K top-k, A kept assignments (token, slot) pairs, C channels,
E experts.

Dispatch is dropless by default: every (token, expert) assignment is kept and tokens are sorted
into contiguous per-expert groups of any size, so an expert that receives no token costs nothing
and a single-task batch touches only k experts per layer. A capacity (token routing in training)
drops the assignments that exceed it, top-1 choices claiming capacity before top-2 (GShard).
"""

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class DispatchPlan:
    """token_index [A], slot_index [A]: kept assignments, sorted by expert;
    expert_counts [E]: how many of them each expert gets; dropped: assignments over capacity."""

    token_index: Tensor
    slot_index: Tensor
    expert_counts: Tensor
    dropped: Tensor

    def group_sizes(self) -> List[int]:
        return self.expert_counts.tolist()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Assignments one expert may take: factor x its fair share of the N x K assignments."""
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def make_plan(expert_indices: Tensor, num_experts: int, capacity: Optional[int] = None):
    """expert_indices: [N, K] -> DispatchPlan. capacity None means dropless."""
    N, K = expert_indices.shape
    # k-major order: all top-1 choices, then all top-2 choices (GShard priority)
    experts = expert_indices.t().reshape(-1)  # [K*N]
    tokens = torch.arange(N, device=experts.device).repeat(K)  # [K*N]
    slots = torch.arange(K, device=experts.device).repeat_interleave(N)  # [K*N]
    order = torch.sort(experts, stable=True).indices  # stable: k-major order kept in a group
    counts = torch.bincount(experts, minlength=num_experts)  # [E]
    dropped = experts.new_zeros(())
    if capacity is not None:
        # rank of each sorted assignment within its expert's group, from the group starts
        starts = counts.cumsum(0) - counts  # [E]
        rank = torch.arange(order.numel(), device=experts.device) - starts[experts[order]]
        keep = rank < capacity
        dropped = (~keep).sum()
        order, counts = order[keep], counts.clamp(max=capacity)
    return DispatchPlan(tokens[order], slots[order], counts, dropped)


def dispatch(x: Tensor, plan: DispatchPlan) -> Tensor:
    """x: [N, C] -> [A, C], rows grouped by expert in plan order."""
    return x.index_select(0, plan.token_index)


def combine(expert_out: Tensor, expert_weights: Tensor, plan: DispatchPlan, num_tokens: int):
    """expert_out: [A, C], expert_weights: [N, K] -> [N, C] = sum over kept slots of w * out."""
    weights = expert_weights[plan.token_index, plan.slot_index].to(expert_out.dtype)  # [A]
    out = expert_out.new_zeros(num_tokens, expert_out.size(-1))
    return out.index_add_(0, plan.token_index, expert_out * weights.unsqueeze(-1))
