"""Gates: turn a layer's input (or a task id) into a routing decision.

Axis legend: T time, B batch, N routed (non-pad) tokens, C channels, E experts, K top-k,
P number of task ids.

Every gate returns router logits for each routed token ([N, E], fp32); `top_k_route` turns logits
into a `RoutingDecision`. Gates know nothing about dispatch or experts. Nothing here is random, so
routing in eval mode is a pure function of the gate's input: for task gates, of the task id alone,
which is what makes per-task pruning exact.
"""

import uuid
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .pairs import TASK_ROUTING_KINDS  # noqa: F401  (target, lang_pair; defined torch-free)

ROUTING_KINDS = ("token", "sentence", "target", "lang_pair")


@dataclass(frozen=True)
class RoutingDecision:
    """Which experts each routed token goes to, and with what weight.

    expert_indices: [N, K] long; expert_weights: [N, K] fp32 (sum to 1 when K > 1);
    router_logits: [N, E] fp32 (None for frozen routing, which has no router).
    """

    expert_indices: Tensor
    expert_weights: Tensor
    router_logits: Optional[Tensor] = None

    @property
    def router_probs(self) -> Tensor:
        return torch.softmax(self.router_logits, dim=-1)


@dataclass(frozen=True)
class TaskIds:
    """Per-row language ids of a batch; both task kinds are derived from them.

    src_lang, tgt_lang: [B] long, indices into the run's `--langs` list. The language-pair id is
    `src * L + tgt`, defined for every ordered pair, so zero-shot pairs have an id too.
    A side is None when it could not be known (ids read from language tags, see lang_tags.py,
    where the source carries only the target's tag); routing that needs it then fails clearly.
    `origin` says where the ids came from, for that error message.
    """

    src_lang: Optional[Tensor]
    tgt_lang: Optional[Tensor]
    num_langs: int
    origin: str = "the task"

    def num_tasks(self, kind: str) -> int:
        return num_task_ids(kind, self.num_langs)

    @property
    def complete(self) -> bool:
        return self.src_lang is not None and self.tgt_lang is not None

    def for_routing(self, kind: str) -> Tensor:
        if kind not in TASK_ROUTING_KINDS:
            raise ValueError(f"{kind!r} routing uses no task ids")
        missing = [name for name, ids in (("source", self.src_lang), ("target", self.tgt_lang))
                   if ids is None and (name == "target" or kind == "lang_pair")]
        if missing:
            raise RuntimeError(
                f"{kind} routing needs each row's {' and '.join(missing)} language, which "
                f"{self.origin} does not give. Pass src_lang_idx/tgt_lang_idx in net_input "
                "(--task translation_task_moe does), or tag the source with the language that is "
                "missing (--encoder-langtok tgt gives the target; the source language can only "
                "come from ids, or from --encoder-langtok src with --decoder-langtok in a full "
                "forward pass)")
        if kind == "target":
            return self.tgt_lang
        return self.src_lang * self.num_langs + self.tgt_lang

    def index_select(self, order: Tensor) -> "TaskIds":
        """Rows reordered (beam search) or expanded (one row per beam)."""
        def pick(ids):
            return None if ids is None else ids.index_select(0, order)
        return TaskIds(pick(self.src_lang), pick(self.tgt_lang), self.num_langs, self.origin)


def num_task_ids(kind: str, num_langs: int) -> int:
    return num_langs if kind == "target" else num_langs * num_langs


def top_k_route(logits: Tensor, k: int) -> RoutingDecision:
    """GShard top-k: softmax over all experts, keep the k largest.

    With k > 1 the kept weights are renormalised to sum to 1 (GShard top-2). With k = 1 the raw
    probability is kept (Switch), otherwise the gate would get no gradient. Renormalisation
    happens here, before any capacity limit drops assignments (GShard, Algorithm 2): a token
    whose second choice is dropped keeps its first expert at the renormalised weight, not 1.
    fairscale's Top2Gate renormalises after dropping instead.
    """
    logits = logits.float()  # gating math in fp32 whatever the model dtype
    probs = torch.softmax(logits, dim=-1)
    weights, indices = probs.topk(k, dim=-1)  # [N, K]
    if k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return RoutingDecision(indices, weights, logits)


class Router(nn.Module):
    """Base of the learned gates: `logits()` per routed token, then GShard top-k."""

    kind = ""

    def __init__(self, top_k: int):
        super().__init__()
        self.top_k = top_k

    def forward(self, x: Tensor, routed: Tensor, **context) -> RoutingDecision:
        """x: [T, B, C]; routed: [T, B] bool (non-pad). Returns the decision for the N routed.

        Autocast (--amp, torch.autocast) would recast the gate's matmul to fp16/bf16 despite the
        .float() inputs; the gate runs with autocast off so that routing is fp32 everywhere."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return top_k_route(self.logits(x, routed, **context), self.top_k)


class TokenGate(Router):
    """GShard gate on each token's representation."""

    kind = "token"

    def __init__(self, embed_dim: int, num_experts: int, top_k: int):
        super().__init__(top_k)
        self.wg = nn.Linear(embed_dim, num_experts, bias=False)

    def logits(self, x: Tensor, routed: Tensor, **unused) -> Tensor:
        return F.linear(x[routed].float(), self.wg.weight.float())  # [N, E]


class SentenceGate(Router):
    """Gate on the mean of the sentence's non-pad token representations.

    Encoder: the mean over the whole source sentence. Decoder (`causal=True`): the mean over the
    target prefix up to and including each position, so that generation, which sees only the
    prefix, routes exactly as training did. In incremental decoding the running sum and count are
    kept in the incremental state.
    """

    kind = "sentence"

    def __init__(self, embed_dim: int, num_experts: int, top_k: int, causal: bool):
        super().__init__(top_k)
        self.wg = nn.Linear(embed_dim, num_experts, bias=False)
        self.causal = causal
        self.state_key = f"sentence_gate.{uuid.uuid4().hex}"  # unique slot in incremental_state

    def logits(
        self,
        x: Tensor,
        routed: Tensor,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        **unused,
    ) -> Tensor:
        mask = routed.unsqueeze(-1).to(torch.float32)  # [T, B, 1]
        x = x.float() * mask
        if not self.causal:
            summary = x.sum(0, keepdim=True) / mask.sum(0, keepdim=True).clamp(min=1)  # [1, B, C]
            summary = summary.expand_as(x)
        elif incremental_state is None:
            summary = x.cumsum(0) / mask.cumsum(0).clamp(min=1)  # [T, B, C]
        else:
            summary = self._incremental_mean(x, mask, incremental_state)
        return F.linear(summary[routed], self.wg.weight.float())  # [N, E]

    def _incremental_mean(self, x, mask, incremental_state):
        saved = incremental_state.get(self.state_key)
        total = x.sum(0) if saved is None else saved["sum"] + x.sum(0)  # [B, C]
        count = mask.sum(0) if saved is None else saved["count"] + mask.sum(0)  # [B, 1]
        incremental_state[self.state_key] = {"sum": total, "count": count}
        # the (single) position of this step sees the prefix up to the current token
        return (total / count.clamp(min=1)).unsqueeze(0).expand_as(x)

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Called by fairseq's beam search for every module that defines it."""
        saved = incremental_state.get(self.state_key)
        if saved is not None:
            incremental_state[self.state_key] = {
                name: value.index_select(0, new_order) for name, value in saved.items()
            }


def _task_ids_or_fail(task_ids: Optional[TaskIds], what: str) -> TaskIds:
    if task_ids is None:
        raise RuntimeError(
            f"{what} got no task ids: use --task translation_task_moe, which gives every row its "
            "source and target language ids"
        )
    return task_ids


UNSEEN_PAIR_POLICIES = ("target_mean", "own_row")


def unseen_pair_mixing(num_langs: int, trained: Sequence[Tuple[int, int]],
                       policy: str) -> Optional[Tensor]:
    """How lang_pair routing reads the gate rows: [P, P] mixing matrix M (logits = M @ table),
    or None for "use each pair's own row".

    A pair never trained keeps the random initial logits of its row (its gradient is zero).
    "target_mean" routes such a pair by the mean logits of the trained pairs into its target
    language (zero-shot de-fr routes like the average of en-fr and cs-fr); a target no trained
    pair reaches keeps its own row. "own_row" is the plain table lookup.
    trained: (src, tgt) language indices of the training pairs.
    """
    if policy == "own_row" or not trained:
        return None
    if policy not in UNSEEN_PAIR_POLICIES:
        raise ValueError(f"unknown unseen-pair policy {policy!r}; choose one of "
                         f"{', '.join(UNSEEN_PAIR_POLICIES)}")
    L = num_langs
    mixing = torch.eye(L * L)
    trained_ids = {s * L + t for s, t in trained}
    for s in range(L):
        for t in range(L):
            into_t = [src * L + t for src, tgt in trained if tgt == t]
            if s * L + t not in trained_ids and into_t:
                mixing[s * L + t] = 0.0
                mixing[s * L + t, into_t] = 1.0 / len(into_t)
    return mixing


def task_logit_table(weight: Tensor, mixing: Optional[Tensor]) -> Tensor:
    """The task gate's logits for every task id: [P, E] fp32. Shared by the model and the
    pruner, so that a pruned route is read exactly as the model reads it."""
    table = weight.float()
    return table if mixing is None else mixing.to(table) @ table


class TaskGate(Router):
    """Gate on a task id (target language or language pair): `G = GATE(task_id)`.

    A learned logit table, i.e. a linear gate on the one-hot task id. Every token of a row gets
    the row's logits, so the whole row goes to the same k experts. For lang_pair routing,
    `mixing` (see unseen_pair_mixing) says how pairs never trained read the table; it is
    configuration, not state (a non-persistent buffer), so it can be changed at generation.
    """

    def __init__(self, kind: str, num_tasks: int, num_experts: int, top_k: int,
                 mixing: Optional[Tensor] = None):
        super().__init__(top_k)
        self.kind = kind
        self.wg = nn.Embedding(num_tasks, num_experts)
        nn.init.normal_(self.wg.weight, std=1.0)  # distinct logits per task: no ties at init
        self.register_buffer("mixing", mixing, persistent=False)

    def row_logits(self, task_ids: Optional[TaskIds]) -> Tensor:
        ids = _task_ids_or_fail(task_ids, "task-routed MoE layer").for_routing(self.kind)  # [B]
        return task_logit_table(self.wg.weight, self.mixing)[ids]  # [B, E]

    def logits(self, x: Tensor, routed: Tensor, task_ids: Optional[TaskIds] = None, **unused):
        logits = self.row_logits(task_ids)  # [B, E]
        return logits.unsqueeze(0).expand(routed.size(0), -1, -1)[routed]  # [N, E]

    def forward(self, x: Tensor, routed: Tensor, task_ids: Optional[TaskIds] = None,
                **unused) -> RoutingDecision:
        """The decision is made once per row ([B, E] softmax and top-k) and copied to the row's
        routed tokens: the same values as routing each token, B/N of the work."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            rows = top_k_route(self.row_logits(task_ids), self.top_k)  # [B, ...]
        row_of = torch.arange(routed.size(1), device=routed.device).expand_as(routed)[routed]
        return RoutingDecision(rows.expert_indices[row_of], rows.expert_weights[row_of],
                               rows.router_logits[row_of])  # [N, ...]


class FrozenTaskRouting(nn.Module):
    """The router of a pruned layer: a fixed table task id -> (FFN indices, weights).

    Buffers `slot_indices` [P, S] long (-1 for a task the layer does not serve) and `slot_weights`
    [P, S] fp32, where S is the number of FFNs one task uses after pruning (1 when its experts were
    merged). The pruner fills them from the full model's eval-mode decisions.
    """

    def __init__(self, kind: str, num_tasks: int, slots: int, served: str, merged: bool = False):
        super().__init__()
        self.kind = kind
        self.served = served  # human-readable, for the error below
        self.merged = merged  # one merged FFN per route: every slot weight is 1
        self.register_buffer("slot_indices", torch.full((num_tasks, slots), -1, dtype=torch.long))
        self.register_buffer("slot_weights", torch.zeros(num_tasks, slots))

    def single_ffn(self, num_ffns: int) -> bool:
        """True when the layer has one FFN and one slot per task: every served task uses that
        FFN, scaled by its frozen weight (1 for merged experts; the raw gate probability for an
        unmerged top-1 expert)."""
        return num_ffns == 1 and self.slot_indices.size(1) == 1

    def check_served(self, task_ids: Optional[TaskIds]):
        """The rows' task ids [B] and slot indices [B, S]; refuses a row whose task this layer
        does not serve."""
        ids = _task_ids_or_fail(task_ids, "pruned MoE layer").for_routing(self.kind)  # [B]
        indices = self.slot_indices[ids]  # [B, S]
        if (indices < 0).any():
            raise RuntimeError(
                f"this pruned checkpoint serves only {self.served}, but the batch asks for "
                "another task. Translate it with the full checkpoint, or prune for that task."
            )
        return ids, indices

    def forward(self, x: Tensor, routed: Tensor, task_ids: Optional[TaskIds] = None, **unused):
        ids, indices = self.check_served(task_ids)  # [B], [B, S]
        T = routed.size(0)
        indices = indices.unsqueeze(0).expand(T, -1, -1)[routed]  # [N, S]
        weights = self.slot_weights[ids].unsqueeze(0).expand(T, -1, -1)[routed]  # [N, S]
        return RoutingDecision(indices, weights, None)


def build_router(kind: str, embed_dim: int, num_experts: int, top_k: int, num_langs: int,
                 causal: bool, pair_mixing: Optional[Tensor] = None) -> Router:
    if kind == "token":
        return TokenGate(embed_dim, num_experts, top_k)
    if kind == "sentence":
        return SentenceGate(embed_dim, num_experts, top_k, causal)
    if kind in TASK_ROUTING_KINDS:
        mixing = pair_mixing if kind == "lang_pair" else None
        return TaskGate(kind, num_task_ids(kind, num_langs), num_experts, top_k, mixing)
    raise ValueError(f"unknown MoE routing {kind!r}; choose one of {', '.join(ROUTING_KINDS)}")
