"""Eval-time merged FFNs of a task-routed layer: what taskmoe-prune writes, built in memory.

Axis legend: T time, B batch, C channels, E experts, K top-k.

In eval mode a task gate's decision depends on the task id alone, so the k experts a task uses can
be merged into one FFN of width k*F (experts.merge_ffns, the very function the pruner uses, on the
very same decision), and a batch of that task costs one GEMM pair per token, as in the pruned
model, instead of a dispatch, k narrower GEMM pairs and a weighted combine. The full model in eval
then computes with the pruned model's weights, bit for bit.

Entries are keyed by the identity and version of every tensor they were built from (the gate's
logit table and the k experts' weights), so an optimizer step, load_state_dict or .to() rebuilds
them on next use; nothing has to remember to invalidate the cache. Memory: one k*F-wide FFN per
task seen, at most (number of tasks) x k/E of the layer's expert weights.
"""

from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .experts import ExpertFFNs, merge_ffns
from .routing import TaskGate, task_logit_table, top_k_route


def _stamp(tensors) -> Tuple:
    """Identity and version of each tensor. Inference tensors (a model built under
    torch.inference_mode) keep no version counter: only their identity is checked."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device)
                 for t in tensors)


class MergedTaskFFNs:
    """task id -> merged FFN weights for one layer (not an nn.Module: nothing here is state)."""

    def __init__(self):
        self._routes: Dict[int, Tuple[Tuple, List[int], List[float]]] = {}
        self._ffns: Dict[int, Tuple[Tuple, Dict[str, Tensor]]] = {}

    def clear(self):
        self._routes.clear()
        self._ffns.clear()

    def route(self, gate: TaskGate, task: int) -> Tuple[List[int], List[float]]:
        """The k experts and weights of `task`, read exactly as the pruner reads them."""
        stamp = _stamp([gate.wg.weight] + ([gate.mixing] if gate.mixing is not None else []))
        cached = self._routes.get(task)
        if cached is None or cached[0] != stamp:
            with torch.no_grad(), torch.autocast(device_type=gate.wg.weight.device.type,
                                                 enabled=False):
                table = task_logit_table(gate.wg.weight, gate.mixing)  # [P, E]
                decision = top_k_route(table[task : task + 1], gate.top_k)
            cached = (stamp, decision.expert_indices[0].tolist(),
                      decision.expert_weights[0].tolist())
            self._routes[task] = cached
        return cached[1], cached[2]

    def ffn(self, gate: TaskGate, experts: ExpertFFNs, task: int) -> Dict[str, Tensor]:
        indices, weights = self.route(gate, task)
        units = [experts.experts[e].params() for e in indices]
        stamp = (tuple(indices), tuple(weights),
                 _stamp(t for unit in units for t in unit.values()))
        cached = self._ffns.get(task)
        if cached is None or cached[0] != stamp:
            with torch.no_grad():
                cached = (stamp, merge_ffns(units, weights))
            self._ffns[task] = cached
        return cached[1]

    def forward(self, gate: TaskGate, experts: ExpertFFNs, x: Tensor, task_of_row: Tensor):
        """x: [T, B, C], task_of_row: [B] -> [T, B, C]: each row through its task's merged FFN."""
        apply = experts.experts[0].apply_params  # every expert computes alike
        tasks = task_of_row.unique().tolist()
        if len(tasks) == 1:  # the serving case: one FFN over the whole batch
            return apply(x, self.ffn(gate, experts, tasks[0]))
        out = None
        for task in tasks:
            rows = (task_of_row == task).nonzero().squeeze(1)
            y = apply(x.index_select(1, rows), self.ffn(gate, experts, task))
            out = y.new_empty(x.shape) if out is None else out  # y's dtype (autocast)
            out.index_copy_(1, rows, y)
        return out
