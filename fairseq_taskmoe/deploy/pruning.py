"""Extract the per-task sub-network of a task-MoE checkpoint: checkpoint dict -> checkpoint dict.

No model is built. For every task-routed MoE layer (target or lang_pair routing) the eval-mode
routing of each served task is read off the gate (`top_k_route`, the very function the model uses,
on the same fp32 logits), and only the experts it picks are kept, behind a frozen routing table
(routing.FrozenTaskRouting). Token- and sentence-routed layers depend on the input, so they are
kept whole.

With `merge=True` (default) the k experts a task uses are merged into one FFN, exactly:
`g1*FFN_a(x) + g2*FFN_b(x) = FFN_ab(x)` with fc1 = [W1_a; W1_b], b1 = [b1_a; b1_b],
fc2 = [g1*W2_a | g2*W2_b], b2 = g1*b2_a + g2*b2_b (the activation is element-wise). A layer then
costs one GEMM pair. Several served tasks get one merged FFN per distinct route, unless the
union of their experts, unmerged, is smaller (tasks sharing experts): each layer takes the
smaller of the two exact forms, so a pruned checkpoint is never larger than the unmerged union.
"""

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..integration.config import MODEL_NAME, MoEConfig
from ..moe.experts import merge_ffns
# the pair syntax, the untrained-route rule and PruningError are plain Python (moe/pairs.py), so
# that the server reads them without torch; imported here as the pruner's own
from ..moe.pairs import PruningError, parse_pairs, served_pairs, untrained_routes  # noqa: F401
from ..moe.routing import TASK_ROUTING_KINDS, TaskIds, num_task_ids, task_logit_table, top_k_route

_EXPERT_KEY = re.compile(r"^experts\.experts\.(\d+)\.(fc[12]\.(?:weight|bias))$")


@dataclass
class LayerReport:
    name: str
    routing: str
    action: str  # "pruned" or "kept whole"
    experts_before: int
    kept: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)  # task -> (expert, w)
    ffn_dims: List[int] = field(default_factory=list)
    form: str = ""  # pruned layers: "merged" (one FFN per distinct route) or "unmerged" (union)
    why: str = ""  # why that form


@dataclass
class PruneReport:
    served_pairs: List[str]
    merged: bool  # merging was allowed (not --no-merge); each layer's choice is in layers
    params_before: int
    params_after: int
    layers: List[LayerReport]
    warnings: List[str] = field(default_factory=list)


def model_args(state: dict):
    """The model's argparse namespace in a fairseq checkpoint, or PruningError."""
    if isinstance(state, dict) and isinstance(state.get("sharding"), dict):
        raise PruningError(
            "this is one file of a sharded checkpoint (P-shared.pt or P-rank-R.pt, written by "
            f"{state['sharding'].get('world_size', 'several')} expert-parallel ranks), not a "
            "whole model: give taskmoe-prune / taskmoe-export its prefix P (or any of its "
            "files), which they consolidate, or make one file of it with taskmoe-consolidate P")
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


def _ffn_params(units: Sequence[Dict[str, Tensor]]) -> int:
    return sum(t.numel() for unit in units for t in unit.values())


def _prune_layer(params: Dict[str, Tensor], task_ids: List[int], task_names: Dict, top_k: int,
                 num_tasks: int, merge: bool, report: LayerReport, mixing: Optional[Tensor]):
    """params: this layer's ffn state (keys relative to '...ffn.'). Returns (new params, layout).

    Two exact forms: merged, one FFN per *distinct* route (tasks routed alike share it), each
    task one slot of weight 1; unmerged, the union of the experts the tasks use, each task k
    slots with its frozen gate weights. Merged costs one GEMM pair per token instead of k, but
    with several tasks it can hold more parameters than the union (tasks sharing an expert each
    get a copy inside their merged FFN), so the smaller form is chosen (merged on ties)."""
    experts: Dict[int, Dict[str, Tensor]] = {}
    for key, value in params.items():
        m = _EXPERT_KEY.match(key)
        if m:
            experts.setdefault(int(m.group(1)), {})[m.group(2)] = value
    gate_logits = task_logit_table(params["router.wg.weight"], mixing)  # [P, E], as the model
    routes = {}
    for t in task_ids:
        decision = top_k_route(gate_logits[t : t + 1], top_k)  # same math as the model, fp32
        routes[t] = (decision.expert_indices[0].tolist(), decision.expert_weights[0])
        report.kept[task_names[t]] = [
            (e, float(w)) for e, w in zip(routes[t][0], routes[t][1].tolist())
        ]
    union = sorted({e for indices, _ in routes.values() for e in indices})
    union_units = [experts[e] for e in union]
    distinct: Dict[tuple, int] = {}  # route (experts, weights) -> merged unit
    merged_units: List[Dict[str, Tensor]] = []
    for indices, weights in routes.values():
        key = (tuple(indices), tuple(weights.tolist()))
        if key not in distinct:
            distinct[key] = len(merged_units)
            merged_units.append(merge_ffns([experts[e] for e in indices], weights.tolist()))
    merged_size, union_size = _ffn_params(merged_units), _ffn_params(union_units)
    use_merged = merge and merged_size <= union_size
    if not merge:
        report.form, report.why = "unmerged", "--no-merge"
    elif use_merged:
        report.form, report.why = "merged", f"{len(merged_units)} distinct route(s)"
    else:
        report.form = "unmerged"
        report.why = (f"merging {len(merged_units)} distinct routes would hold {merged_size:,} "
                      f"parameters, the union of {len(union)} experts {union_size:,}")
    slots = 1 if use_merged else top_k
    slot_indices = torch.full((num_tasks, slots), -1, dtype=torch.long)
    slot_weights = torch.zeros(num_tasks, slots)
    for t, (indices, weights) in routes.items():
        if use_merged:
            slot_indices[t, 0] = distinct[(tuple(indices), tuple(weights.tolist()))]
            slot_weights[t, 0] = 1.0  # the gate weights are inside the merged fc2
        else:
            slot_indices[t] = torch.tensor([union.index(e) for e in indices])
            slot_weights[t] = weights  # the full model's fp32 weights, bit for bit
    units = merged_units if use_merged else union_units
    new = {"router.slot_indices": slot_indices, "router.slot_weights": slot_weights}
    for u, unit in enumerate(units):
        for name, value in unit.items():
            new[f"experts.experts.{u}.{name}"] = value.clone()
    report.ffn_dims = [unit["fc1.weight"].size(0) for unit in units]
    return new, {"ffn_dims": report.ffn_dims, "slots": slots, "merged": use_merged}


def trained_pairs(state: dict) -> Optional[List[Tuple[str, str]]]:
    """The --lang-pairs the checkpoint was trained on (its task config), or None if unknown."""
    cfg = state.get("cfg")
    task = cfg.get("task") if isinstance(cfg, dict) else getattr(cfg, "task", None)
    if task is None and state.get("args") is not None:
        task = state["args"]
    spec = task.get("lang_pairs") if isinstance(task, dict) else getattr(task, "lang_pairs", None)
    if not spec:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [tuple(p.strip().split("-", 1)) for p in items if p.strip()]


def prune_checkpoint(state: dict, pair_spec: str, merge: bool = True,
                     allow_untrained: bool = False) -> Tuple[dict, PruneReport]:
    """Return (pruned checkpoint dict, report). The input dict is not modified.

    A pair whose route comes from a gate row that training never updated (lang_pair routing of
    a zero-shot pair, whose row keeps its random initialisation) is refused unless
    allow_untrained, in which case the report carries a warning."""
    args = model_args(state)
    if getattr(args, "moe_pruned_layout", None):
        raise PruningError("this checkpoint is already pruned; prune the full checkpoint instead")
    moe = MoEConfig.from_namespace(args)
    langs = moe.langs
    pairs = parse_pairs(pair_spec, langs)
    warnings = []
    trained = trained_pairs(state)
    task_kinds = {k for k in (moe.encoder_moe_routing, moe.decoder_moe_routing)
                  if k in TASK_ROUTING_KINDS} if moe.moe_freq > 0 else set()
    if trained is None:
        warnings.append("the checkpoint does not record its training --lang-pairs: whether each "
                        "route was trained is not checked")
    else:
        # checkpoints that do not record their trained pairs route every pair by its own row
        policy = moe.moe_unseen_pairs if moe.moe_trained_pairs else "own_row"
        untrained = untrained_routes(pairs, task_kinds, trained, policy)
        if untrained and not allow_untrained:
            raise PruningError(
                f"untrained route(s): {'; '.join(untrained)}. Their gate rows keep their random "
                f"initialisation, so the pruned experts would be arbitrary. Trained pairs: "
                f"{', '.join(f'{s}-{t}' for s, t in trained)}. Pass --allow-untrained-routes to "
                "prune them anyway")
        warnings += [f"untrained route kept on request: {u}" for u in untrained]
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
                num_task_ids(kind, len(langs)), merge, report,
                moe.pair_mixing() if kind == "lang_pair" else None)
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
    # what the checkpoint serves depends on its pruned layers only: token- and sentence-routed
    # layers are whole and serve any pair (pairs.served_pairs: the rule export and ct2 share)
    served = served_pairs([r.routing for r in reports if r.action == "pruned"], pairs)
    pruned = {k: v for k, v in state.items() if k not in ("model", "cfg", "args",
                                                         "last_optimizer_state")}
    extra = state.get("extra_state")
    if isinstance(extra, dict) and extra.get("ema") is not None:
        # EMA weights are a second copy of the full model; its gates may route differently, so
        # they cannot share this layout. The pruned model serves the main weights.
        pruned["extra_state"] = {k: v for k, v in extra.items() if k != "ema"}
        warnings.append("EMA weights (extra_state['ema']) dropped: the pruned checkpoint holds "
                        "the main weights only")
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
                         reports, warnings)
    return pruned, report


def count_parameters(model_state: Dict[str, Tensor]) -> int:
    """Parameters in a state dict: floating-point tensors, each stored tensor counted once (tied
    embeddings appear under several keys), pruned routing tables (bookkeeping) not counted."""
    seen = {}
    for key, value in model_state.items():
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and not key.endswith(("router.slot_weights", ".version"))):
            seen[(value.data_ptr(), tuple(value.shape))] = value.numel()
    return sum(seen.values())
