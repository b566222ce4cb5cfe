"""Eval-time merged FFNs of a task-routed layer: what taskmoe-prune writes, built in memory.

Axis legend: T time, B batch, C channels, E experts, K top-k.

In eval mode a task gate's decision depends on the task id alone, so the k experts a task uses can
be merged into one FFN of width k*F (experts.merge_ffns, the very function the pruner uses, on the
very same decision), and a batch of that task costs one GEMM pair per token, as in the pruned
model, instead of a dispatch, k narrower GEMM pairs and a weighted combine. The full model in eval
then computes with the pruned model's weights, bit for bit.

When the cache is valid. Entries live between two `train()` / `eval()` calls of their layer
(MoELayer.train clears them): fairseq switches modes around every validation batch and every
training step, and its own optimizers (its CPU Adam, the fp16 optimizers' fp32 -> fp16 copy)
write weights through `p.data`, which bumps no version counter, so no stamp could see those
updates. Within one mode, entries are also keyed by the identity and version of every tensor
they were built from (the gate's logit table and the k experts' weights), so an in-place update
under `torch.no_grad()`, `load_state_dict` or `.to()` rebuilds them on next use.

Memory: at most `capacity` merged FFNs per layer (default E // k, i.e. the layer's expert
weights once over), least recently used dropped first; a forward whose batch mixes more tasks
keeps all of its own (evicting only other tasks'), so a mixed batch never rebuilds what it is
using. Training never builds any (the merged path is inference only) and drops them all.
"""

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

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

    def __init__(self, capacity: Optional[int] = None):
        self.capacity = capacity  # None: as many as the layer's experts hold (E // k), see ffn
        self._routes: Dict[int, Tuple[Tuple, List[int], List[float]]] = {}
        self._ffns: "OrderedDict[int, Tuple[Tuple, Dict[str, Tensor]]]" = OrderedDict()

    def clear(self):
        self._routes.clear()
        self._ffns.clear()

    def __len__(self):
        return len(self._ffns)

    def _make_room(self, limit: int, keep: Sequence[int]):
        """Drop least recently used FFNs until at most `limit` remain, never one in `keep`."""
        for task in [t for t in self._ffns if t not in keep]:
            if len(self._ffns) <= limit:
                break
            del self._ffns[task]

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

    def ffn(self, gate: TaskGate, experts: ExpertFFNs, task: int,
            keep: Sequence[int] = ()) -> Dict[str, Tensor]:
        """`task`'s merged FFN; `keep`: tasks of the same forward, never evicted for it."""
        indices, weights = self.route(gate, task)
        units = [experts.experts[e].params() for e in indices]
        stamp = (tuple(indices), tuple(weights),
                 _stamp(t for unit in units for t in unit.values()))
        cached = self._ffns.get(task)
        if cached is None or cached[0] != stamp:
            limit = self.capacity or max(1, len(experts) // max(1, gate.top_k))
            self._ffns.pop(task, None)
            self._make_room(limit - 1, keep)
            with torch.no_grad():
                cached = (stamp, merge_ffns(units, weights))
            self._ffns[task] = cached
        self._ffns.move_to_end(task)
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
            y = apply(x.index_select(1, rows), self.ffn(gate, experts, task, keep=tasks))
            out = y.new_empty(x.shape) if out is None else out  # y's dtype (autocast)
            out.index_copy_(1, rows, y)
        return out
