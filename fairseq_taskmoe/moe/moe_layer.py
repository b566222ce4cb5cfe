"""An MoE FFN: router + dispatch + experts. Auxiliary losses and statistics travel by return value.

Axis legend: T time, B batch, N routed (non-pad) tokens, C channels, E experts (or pruned FFNs),
P language pairs.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import dispatch as D
from .experts import ExpertFFNs
from .losses import load_balancing_loss, router_z_loss, task_balancing_loss
from .routing import (TASK_ROUTING_KINDS, FrozenTaskRouting, RoutingDecision, TaskGate, TaskIds,
                      _task_ids_or_fail)
from .task_merge import MergedTaskFFNs


@dataclass
class MoEStats:
    """What one MoE layer reports for one forward pass.

    balance_loss, z_loss: scalars (0 for frozen routing); expert_counts [E]: kept assignments per
    expert; dropped: assignments over capacity; assignments: N * K;
    counts_by_pair [P, E]: kept assignments per (language pair id, expert), when ids are known.
    """

    balance_loss: Tensor
    z_loss: Tensor
    expert_counts: Tensor
    dropped: Tensor
    assignments: int
    counts_by_pair: Optional[Tensor] = None


def _routed(x: Tensor, pad_mask: Optional[Tensor]) -> Tensor:
    """[T, B] bool: the positions that are routed (not pads)."""
    if pad_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return ~pad_mask.t()


class MoELayer(nn.Module):
    """Replaces a transformer FFN. `router` is a learned gate (routing.Router) or, in a pruned
    model, a routing.FrozenTaskRouting; `experts` holds the FFNs the router's indices refer to.

    capacity_factor applies to token routing in training only; eval_capacity_factor (None:
    dropless) to token routing in eval. Task and sentence routing are always dropless.

    Inference (eval mode, no autograd) of a task-routed layer runs each task's k experts merged
    into one FFN (task_merge.py), as the pruned model does; the decision is still computed when
    statistics are wanted (full forward passes), and costs no dispatch.
    """

    def __init__(self, router: nn.Module, experts: ExpertFFNs, capacity_factor: Optional[float],
                 eval_capacity_factor: Optional[float] = None, balance_scope: str = "tokens"):
        super().__init__()
        self.router = router
        self.experts = experts
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.balance_scope = balance_scope  # "tokens" or "tasks" (task-routed layers only)
        self.merged = MergedTaskFFNs() if isinstance(router, TaskGate) else None

    @property
    def kind(self) -> str:
        return self.router.kind

    def train(self, mode: bool = True):
        """Every switch of mode (fairseq makes one around each validation batch and each
        training step) drops the merged FFNs: weights may have changed in between through
        `p.data`, which no version counter sees (task_merge.py)."""
        if self.merged is not None:
            self.merged.clear()
        return super().train(mode)

    def _capacity(self, decision: RoutingDecision) -> Optional[int]:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.kind != "token" or factor is None or factor <= 0:
            return None
        N, K = decision.expert_indices.shape
        return D.expert_capacity(N, K, len(self.experts), factor)

    def forward(
        self,
        x: Tensor,
        pad_mask: Optional[Tensor] = None,
        task_ids: Optional[TaskIds] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
    ):
        """x: [T, B, C]; pad_mask: [B, T] bool, True at pads. Returns ([T, B, C], MoEStats).

        Pads are not routed: they get a zero FFN output and count in no statistic or loss.
        Stats are None in incremental decoding, where nothing consumes them.
        """
        frozen = isinstance(self.router, FrozenTaskRouting)
        if frozen and self.router.single_ffn(len(self.experts)):
            return self._single_ffn(x, pad_mask, task_ids, incremental_state)
        if self._merged_inference():
            return self._merged_tasks(x, pad_mask, task_ids, incremental_state)
        T, B, C = x.shape
        routed = _routed(x, pad_mask)  # [T, B]
        tokens = x.reshape(T * B, C) if pad_mask is None else x[routed]  # [N, C], same order
        decision = self.router(x, routed, task_ids=task_ids, incremental_state=incremental_state)
        plan = D.make_plan(decision.expert_indices, len(self.experts), self._capacity(decision))
        expert_out = self.experts(D.dispatch(tokens, plan), plan.group_sizes())  # [A, C]
        combined = D.combine(expert_out, decision.expert_weights, plan, tokens.size(0))  # [N, C]
        if pad_mask is None:
            out = combined.view(T, B, C)
        else:
            out = combined.new_zeros(T, B, C)  # combined's dtype: bf16 under CPU autocast
            out[routed] = combined
        if incremental_state is not None:
            return out, None
        return out, self._stats(decision, plan, routed, task_ids)

    def _merged_inference(self) -> bool:
        return (self.merged is not None and not self.training and not torch.is_grad_enabled()
                and type(self.experts) is ExpertFFNs)  # not sharded: every expert is here

    def _merged_tasks(self, x, pad_mask, task_ids, incremental_state):
        """Inference of a task-routed layer: each row through its task's merged FFN."""
        task_of_row = _task_ids_or_fail(task_ids, "task-routed MoE layer").for_routing(self.kind)
        out = self.merged.forward(self.router, self.experts, x, task_of_row)
        if pad_mask is not None:  # as in the general path, pads get a zero FFN output
            out = out.masked_fill(pad_mask.t().unsqueeze(-1), 0.0)
        if incremental_state is not None:
            return out, None
        routed = _routed(x, pad_mask)  # only statistics need it
        decision = self.router(x, routed, task_ids=task_ids)
        return out, self._stats(decision, None, routed, task_ids)

    def _single_ffn(self, x, pad_mask, task_ids, incremental_state):
        """A pruned layer with one FFN and one slot: the FFN on every position, scaled per row by
        its frozen weight, no dispatch (the same values as the general path, which scales each
        expert output by its weight; merged experts have weight 1, an unmerged top-1 expert its
        gate probability)."""
        ids, _ = self.router.check_served(task_ids)  # [B]
        out = self.experts.experts[0](x)
        if not self.router.merged:  # merged: the weights are inside the FFN, every slot's is 1
            out = out * self.router.slot_weights[ids, 0].to(out.dtype).view(1, -1, 1)
        if pad_mask is not None:  # as in the general path, pads get a zero FFN output
            out = out.masked_fill(pad_mask.t().unsqueeze(-1), 0.0)
        if incremental_state is not None:
            return out, None
        routed = int(x.shape[0] * x.shape[1] - (pad_mask.sum() if pad_mask is not None else 0))
        zero = torch.zeros((), device=x.device)
        return out, MoEStats(zero, zero, expert_counts=torch.tensor([routed], device=x.device),
                             dropped=torch.zeros((), dtype=torch.long, device=x.device),
                             assignments=routed)

    def _stats(self, decision, plan: Optional[D.DispatchPlan], routed, task_ids) -> MoEStats:
        """plan None: every assignment of the decision was kept (dropless, undispatched)."""
        E = len(self.experts)
        if plan is None:
            N, K = decision.expert_indices.shape
            experts = decision.expert_indices.reshape(-1)  # [A], token-major
            token_index = torch.arange(N, device=experts.device).repeat_interleave(K)  # [A]
            expert_counts = torch.bincount(experts, minlength=E)
            dropped = experts.new_zeros(())
        else:
            token_index, expert_counts, dropped = plan.token_index, plan.expert_counts, plan.dropped
            experts = torch.repeat_interleave(
                torch.arange(E, device=routed.device), plan.expert_counts)  # [A]
        counts_by_pair = None
        by_task = self.balance_scope == "tasks" and self.kind in TASK_ROUTING_KINDS
        rows = None  # [N] the batch row of every routed token, when something needs it
        if by_task or (task_ids is not None and task_ids.complete):
            rows = torch.arange(routed.size(1), device=routed.device).expand_as(routed)[routed]
        if task_ids is not None and task_ids.complete:
            P = task_ids.num_langs ** 2
            pair = task_ids.for_routing("lang_pair")[rows][token_index]  # [A]
            counts_by_pair = torch.bincount(pair * E + experts, minlength=P * E).view(P, E)
        if by_task:
            balance = task_balancing_loss(decision, task_ids.for_routing(self.kind)[rows], E)
        else:
            balance = load_balancing_loss(decision, E)
        return MoEStats(
            balance_loss=balance,
            z_loss=router_z_loss(decision),
            expert_counts=expert_counts,
            dropped=dropped,
            assignments=decision.expert_indices.numel(),
            counts_by_pair=counts_by_pair,
        )
