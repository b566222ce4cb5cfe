"""Extract the per-task sub-network of a task-MoE checkpoint: checkpoint dict -> checkpoint dict.

No model is built. For every task-routed MoE layer (target or lang_pair routing) the eval-mode
routing of each served task is read off the gate (`top_k_route`, the very function the model uses,
on the same fp32 logits), and only the experts it picks are kept, behind a frozen routing table
(routing.FrozenTaskRouting). Token- and sentence-routed layers depend on the input, so they are
kept whole.

With `merge=True` (default) the k experts a task uses are merged into one FFN, exactly:
`g1*FFN_a(x) + g2*FFN_b(x) = FFN_ab(x)` with fc1 = [W1_a; W1_b], b1 = [b1_a; b1_b],
fc2 = [g1*W2_a | g2*W2_b], b2 = g1*b2_a + g2*b2_b (the activation is element-wise). A layer then
costs one GEMM pair. Several served tasks with different routes get one merged FFN each.
"""

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .config import MODEL_NAME, MoEConfig
from .routing import TASK_ROUTING_KINDS, TaskIds, num_task_ids, top_k_route

_EXPERT_KEY = re.compile(r"^experts\.experts\.(\d+)\.(fc[12]\.(?:weight|bias))$")


class PruningError(ValueError):
    """Bad input to the pruner; the message names the problem and the fix."""


@dataclass
class LayerReport:
    name: str
    routing: str
    action: str  # "pruned" or "kept whole"
    experts_before: int
    kept: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)  # task -> (expert, w)
    ffn_dims: List[int] = field(default_factory=list)


@dataclass
class PruneReport:
    served_pairs: List[str]
    merged: bool
    params_before: int
    params_after: int
    layers: List[LayerReport]


def model_args(state: dict):
    """The model's argparse namespace in a fairseq checkpoint, or PruningError."""
    cfg = state.get("cfg") if isinstance(state, dict) else None
    args = cfg.get("model") if isinstance(cfg, dict) else getattr(cfg, "model", None)
    if args is None:
        args = state.get("args") if isinstance(state, dict) else None
    if args is None or getattr(args, "moe_langs", None) is None or "model" not in state:
        arch = getattr(args, "arch", None) or getattr(args, "_name", None)
        raise PruningError(
            f"not a task-MoE checkpoint (architecture: {arch or 'unknown'}): taskmoe-prune needs "
            f"a checkpoint trained with --arch task_moe* (model {MODEL_NAME}) and --task "
            "translation_task_moe"
        )
    return args


def parse_pairs(spec: str, langs: Sequence[str]) -> List[Tuple[str, str]]:
    """'en-de,en-fr' -> [('en','de'), ('en','fr')]; '*-de' -> every other language into de."""
    pairs = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        src, sep, tgt = item.partition("-")
        if not sep or not src or not tgt:
            raise PruningError(f"bad language pair {item!r}: write it as SRC-TGT, e.g. en-de")
        for lang in (src, tgt):
            if lang != "*" and lang not in langs:
                raise PruningError(
                    f"unknown language {lang!r} in {item!r}; this checkpoint knows "
                    f"{', '.join(langs)}"
                )
        if tgt == "*":
            raise PruningError(f"{item!r}: the target language must be given")
        if src == tgt:
            raise PruningError(f"{item!r}: source and target are the same language")
        sources = [l for l in langs if l != tgt] if src == "*" else [src]
        pairs += [(s, tgt) for s in sources if (s, tgt) not in pairs]
    if not pairs:
        raise PruningError("no language pair given: use e.g. --lang-pair en-de")
    return pairs


def _merge(experts: Sequence[Dict[str, Tensor]], weights: Sequence[float]) -> Dict[str, Tensor]:
    """One FFN equal to sum_k w_k * FFN_k (see module docstring). Computed in fp64."""
    dtype = experts[0]["fc1.weight"].dtype
    w = [torch.tensor(g, dtype=torch.float64) for g in weights]
    return {
        "fc1.weight": torch.cat([e["fc1.weight"] for e in experts], 0),
        "fc1.bias": torch.cat([e["fc1.bias"] for e in experts], 0),
        "fc2.weight": torch.cat([g * e["fc2.weight"].double() for g, e in zip(w, experts)],
                                1).to(dtype),
        "fc2.bias": sum(g * e["fc2.bias"].double() for g, e in zip(w, experts)).to(dtype),
    }


def _prune_layer(params: Dict[str, Tensor], task_ids: List[int], task_names: Dict, top_k: int,
                 num_tasks: int, merge: bool, report: LayerReport):
    """params: this layer's ffn state (keys relative to '...ffn.'). Returns (new params, layout)."""
    experts: Dict[int, Dict[str, Tensor]] = {}
    for key, value in params.items():
        m = _EXPERT_KEY.match(key)
        if m:
            experts.setdefault(int(m.group(1)), {})[m.group(2)] = value
    gate_logits = params["router.wg.weight"]  # [P, E]
    routes = {}
    for t in task_ids:
        decision = top_k_route(gate_logits[t : t + 1], top_k)  # same math as the model, fp32
        routes[t] = (decision.expert_indices[0].tolist(), decision.expert_weights[0])
        report.kept[task_names[t]] = [
            (e, float(w)) for e, w in zip(routes[t][0], routes[t][1].tolist())
        ]
    units: List[Dict[str, Tensor]] = []
    table: Dict[int, List[Tuple[int, float]]] = {}
    if merge:
        for t, (indices, weights) in routes.items():
            table[t] = [(len(units), 1.0)]
            units.append(_merge([experts[e] for e in indices], weights.tolist()))
    else:
        union = sorted({e for indices, _ in routes.values() for e in indices})
        units = [experts[e] for e in union]
        for t, (indices, weights) in routes.items():
            table[t] = [(union.index(e), w) for e, w in zip(indices, weights.tolist())]
    slots = len(next(iter(table.values())))
    slot_indices = torch.full((num_tasks, slots), -1, dtype=torch.long)
    slot_weights = torch.zeros(num_tasks, slots)
    for t, entries in table.items():
        slot_indices[t] = torch.tensor([u for u, _ in entries])
        # the full model's fp32 weights, bit for bit (merged units carry theirs inside fc2)
        slot_weights[t] = routes[t][1] if not merge else torch.ones(1)
    new = {"router.slot_indices": slot_indices, "router.slot_weights": slot_weights}
    for u, unit in enumerate(units):
        for name, value in unit.items():
            new[f"experts.experts.{u}.{name}"] = value.clone()
    report.ffn_dims = [unit["fc1.weight"].size(0) for unit in units]
    return new, {"ffn_dims": report.ffn_dims, "slots": slots}


def prune_checkpoint(state: dict, pair_spec: str, merge: bool = True) -> Tuple[dict, PruneReport]:
    """Return (pruned checkpoint dict, report). The input dict is not modified."""
    args = model_args(state)
    if getattr(args, "moe_pruned_layout", None):
        raise PruningError("this checkpoint is already pruned; prune the full checkpoint instead")
    moe = MoEConfig.from_namespace(args)
    langs = moe.langs
    pairs = parse_pairs(pair_spec, langs)
    ids = TaskIds(torch.tensor([langs.index(s) for s, _ in pairs]),
                  torch.tensor([langs.index(t) for _, t in pairs]), len(langs))
    model = state["model"]
    new_model = {k: v for k, v in model.items()}
    layout, reports = {}, []
    for side in ("encoder", "decoder"):
        kind = moe.encoder_moe_routing if side == "encoder" else moe.decoder_moe_routing
        for index in range(getattr(args, f"{side}_layers")):
            if not moe.is_moe_layer(index):
                continue
            name = f"{side}.layers.{index}"
            prefix = f"{name}.ffn."
            report = LayerReport(name, kind, "kept whole", moe.moe_expert_count)
            reports.append(report)
            if kind not in TASK_ROUTING_KINDS:
                continue
            params = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
            if "router.wg.weight" not in params:
                raise PruningError(f"checkpoint has no gate for {name} ({prefix}router.wg.weight)")
            task_of_pair = ids.for_routing(kind).tolist()
            task_names = {}
            for (s, t), tid in zip(pairs, task_of_pair):
                task_names.setdefault(tid, t if kind == "target" else f"{s}-{t}")
            new_params, layout[name] = _prune_layer(
                params, sorted(task_names), task_names, moe.moe_top_k,
                num_task_ids(kind, len(langs)), merge, report)
            for key in params:
                del new_model[prefix + key]
            new_model.update({prefix + k: v for k, v in new_params.items()})
            report.action = "pruned"
    if not layout:
        raise PruningError(
            "nothing to prune: no MoE layer of this checkpoint is task-routed (routing: encoder "
            f"{moe.encoder_moe_routing}, decoder {moe.decoder_moe_routing}, --moe-freq "
            f"{moe.moe_freq}); only target/lang_pair routed layers have a per-task sub-network"
        )
    task_kinds = {r.routing for r in reports}
    if task_kinds == {"target"}:  # any source language routes the same: serve '*-tgt'
        served = sorted({f"*-{t}" for _, t in pairs})
    else:
        served = [f"{s}-{t}" for s, t in pairs]
    pruned = {k: v for k, v in state.items() if k not in ("model", "cfg", "args",
                                                         "last_optimizer_state")}
    new_args = copy.deepcopy(args)
    new_args.moe_pruned_layout = json.dumps(
        {"served_pairs": served, "merged": merge, "layers": layout}, sort_keys=True)
    if state.get("cfg") is not None:
        pruned["cfg"] = copy.copy(state["cfg"])
        pruned["cfg"]["model"] = new_args
    pruned["args"] = None
    pruned["model"] = new_model
    pruned["last_optimizer_state"] = None  # optimizer state is for training the full model
    report = PruneReport(served, merge, count_parameters(model), count_parameters(new_model),
                         reports)
    return pruned, report


def count_parameters(model_state: Dict[str, Tensor]) -> int:
    """Parameters in a state dict: floating-point tensors, each stored tensor counted once (tied
    embeddings appear under several keys), pruned routing tables (bookkeeping) not counted."""
    seen = {}
    for key, value in model_state.items():
        if value.is_floating_point() and not key.endswith(("router.slot_weights", ".version")):
            seen[(value.data_ptr(), tuple(value.shape))] = value.numel()
    return sum(seen.values())
