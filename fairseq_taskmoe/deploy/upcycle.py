"""Upcycle a dense transformer into a task-MoE: checkpoint dict -> checkpoint dict.

No model is built. The input is a stock fairseq `transformer` (any of its architectures) trained
with `translation_multi_simple_epoch`, or the plugin's own `task_moe` with `--moe-freq 0`. The
output is a `task_moe` checkpoint for `translation_task_moe` with every `--moe-freq`-th FFN an MoE
layer, which computes the dense model's function at step 0:

- the MoE layer replaces only the FFN sub-block (moe_layer.py: no residual or layer norm of its
  own; the transformer layer keeps the dense layer's residual and norm placement), and its output
  is `sum_i w_i * expert_i(x)` over the k experts of the token's (task's) route;
- with k > 1 the kept gate weights are renormalised to sum to 1 (routing.top_k_route), so k
  copies of the dense FFN give `(sum_i w_i) * FFN(x) = FFN(x)` whatever the gate says. With k = 1
  the weight is the raw gate probability (Switch), which only a saturated gate makes exactly 1.

Constructions, per MoE layer (F: the dense FFN width, f: `--moe-expert-ffn-dim`, P = F / f):

- copies (f = F): every expert is the dense FFN. Task-routed gates (a learned logit table, one
  row per task) send each task to its own group of k consecutive experts, the k logits equal (0)
  and the others `-gate_margin` below, so the weights are exactly 1/k each and the route can
  still be learned; tasks are spread over the groups so that each task's experts specialise
  when training continues. Token- and sentence-routed gates get a fresh random gate, as a new
  model would (any gate is exact with k > 1; different tokens then reach different experts).
  Top-1 is exact for task routing only, with saturated rows (weight exactly 1, which also fixes
  the routes: a saturated softmax passes no gradient); a learned top-1 gate is refused.
- split (f < F, MoEfication): the dense FFN's hidden units are cut into P contiguous pieces of
  f units; expert e holds piece e mod P, with fc2 scaled by P and the whole fc2 bias. A task's
  route of k consecutive experts holds every piece k / P times, each with weight 1/k, so the
  pieces sum to `sum_j W2_j h_j + b2`, the dense FFN. That needs every piece to run for every
  token: task routing with k and E multiples of P. Token / sentence routing picks experts per
  token, so a split is refused there, as are widths that do not divide F or exceed it.

Exactness is checked, not assumed: every task id's route is read back through the model's own
functions (task_logit_table with the lang_pair mixing of untrained pairs, top_k_route) and its
per-piece weights summed. The float result differs from the dense model only by the rounding of
a different summation order (a merged route is one FFN of k*f units, task_merge.py).

Symmetry breaking (`noise`, `reinit_fraction`, Drop-Upcycling) perturbs the experts of token- and
sentence-routed layers (task-routed ones too with `perturb_task_routed`); seeded; the step-0
function is then no longer the dense one, and the report says so.

Axis legend: C model dim, F dense FFN inner dim, f expert inner dim, E experts, P pieces.
"""

import argparse
import copy
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..integration.config import MODEL_NAME, MoEConfig
from ..moe.routing import (ROUTING_KINDS, TASK_ROUTING_KINDS, num_task_ids, task_logit_table,
                           top_k_route, unseen_pair_mixing)
from .pruning import count_parameters

SIDES = ("encoder", "decoder")
MOE_ARCH = "task_moe"
MOE_TASK = "translation_task_moe"
STOCK_MODEL = "transformer"  # fairseq's model name; its architectures all map
MULTILINGUAL_TASKS = ("translation_multi_simple_epoch", MOE_TASK)
SATURATED_MARGIN = 1.0e4  # exp(-1e4) is 0 in fp32: the top-1 expert's probability is exactly 1
# transformer options the task_moe layers do not implement (integration/model.py,
# UNSUPPORTED_OPTIONS; tests/test_upcycle.py checks the two lists agree). Training-time ones
# leave the function unchanged and are switched off in the output; the others are refused.
TRAINING_ONLY_OPTIONS = {"encoder_layerdrop": 0, "decoder_layerdrop": 0,
                         "checkpoint_activations": False, "offload_activations": False}
STRUCTURAL_OPTIONS = {"encoder_layers_to_keep": None, "decoder_layers_to_keep": None,
                      "cross_self_attention": False, "scale_attn": False, "scale_fc": False,
                      "scale_heads": False, "scale_resids": False, "quant_noise_pq": 0,
                      "merge_src_tgt_embed": False}
_FFN_PARAMS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
_EXPERT_KEY = "{layer}.ffn.experts.experts.{e}.{p}"


class UpcycleError(ValueError):
    """Input or options that cannot give an exact upcycle; the message names what and the fix."""


@dataclass
class UpcycleOptions:
    """The MoE to build, spelled as fairseq-train's flags (`moe_freq` is `--moe-freq`)."""

    moe_freq: int = MoEConfig.moe_freq
    moe_expert_count: int = MoEConfig.moe_expert_count
    moe_top_k: int = MoEConfig.moe_top_k
    encoder_moe_routing: str = "target"
    decoder_moe_routing: str = "target"
    moe_expert_ffn_dim: Optional[int] = None
    moe_unseen_pairs: str = "target_mean"
    langs: Optional[List[str]] = None  # None: the dense checkpoint's
    lang_pairs: Optional[List[str]] = None  # None: the dense checkpoint's
    gate_margin: float = 1.0
    noise: float = 0.0
    reinit_fraction: float = 0.0
    perturb_task_routed: bool = False
    seed: int = 1


@dataclass
class LayerReport:
    name: str
    routing: str
    dense_dim: int
    expert_dim: int
    pieces: int  # 1: copies; P > 1: the dense FFN split into P pieces
    routes: Dict[str, List[int]] = field(default_factory=dict)  # task -> experts (task routing)
    perturbed: bool = False


@dataclass
class UpcycleReport:
    source_kind: str  # "transformer" (stock) or "task_moe" (--moe-freq 0)
    source_arch: str
    source_updates: Optional[int]
    langs: List[str]
    lang_pairs: List[str]
    layers: List[LayerReport]
    exact: bool  # the step-0 function is the dense one for every task checked
    inexact: List[str] = field(default_factory=list)  # tasks (or reasons) where it is not
    notes: List[str] = field(default_factory=list)
    model_flags: List[str] = field(default_factory=list)  # fairseq-train flags of this model
    task_flags: List[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0


# --- reading the dense checkpoint ------------------------------------------------------------

def _cfg_namespaces(state: dict) -> Tuple[argparse.Namespace, argparse.Namespace]:
    """(model args, task args) of a fairseq checkpoint, or UpcycleError."""
    if not isinstance(state, dict) or "model" not in state:
        raise UpcycleError("not a fairseq checkpoint (no model weights)")
    cfg = state.get("cfg")
    if cfg is not None:
        model = cfg.get("model") if hasattr(cfg, "get") else getattr(cfg, "model", None)
        task = cfg.get("task") if hasattr(cfg, "get") else getattr(cfg, "task", None)
    else:
        model = task = state.get("args")
    # fairseq-train writes namespaces; taskmoe-export (and other tools) plain dicts of the same
    model, task = (argparse.Namespace(**dict(c)) if hasattr(c, "keys") else c
                   for c in (model, task))
    if not isinstance(model, argparse.Namespace) or not all(
            hasattr(model, f"{side}_{name}") for side in SIDES
            for name in ("layers", "ffn_embed_dim")):
        raise UpcycleError(
            f"the checkpoint's model configuration ({type(model).__name__}) is not the flat "
            "set of options fairseq-train writes for --arch transformer / task_moe "
            "(encoder_layers, encoder_ffn_embed_dim, ...): written by fairseq-hydra-train?")
    if not isinstance(task, argparse.Namespace):
        task = model
    return model, task


def _source_kind(args: argparse.Namespace) -> str:
    """'task_moe' or 'transformer', or UpcycleError naming the architecture."""
    arch = getattr(args, "arch", None) or getattr(args, "_name", None)
    if getattr(args, "moe_langs", None) is not None:
        if getattr(args, "moe_pruned_layout", None):
            raise UpcycleError("this task-MoE checkpoint was pruned by taskmoe-prune; upcycle the "
                               "dense checkpoint it came from")
        freq = getattr(args, "moe_freq", 0)
        if freq:
            raise UpcycleError(
                f"this checkpoint is already a task-MoE (--arch {arch}, --moe-freq {freq}): "
                "taskmoe-upcycle takes a dense model (fairseq's transformer, or task_moe with "
                "--moe-freq 0); continue training it instead")
        return "task_moe"
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    model = ARCH_MODEL_NAME_REGISTRY.get(arch)
    if model != STOCK_MODEL:
        raise UpcycleError(
            f"architecture {arch or 'unknown'} (model {model or 'unknown'}) cannot be mapped: "
            "taskmoe-upcycle maps fairseq's transformer (--arch transformer, "
            "transformer_wmt_en_de, transformer_iwslt_de_en, ... : model transformer) and the "
            f"plugin's task_moe with --moe-freq 0; model {model or arch} has other layers")
    return "transformer"


def _check_mappable(args, task) -> List[str]:
    """Problems that stop the mapping (raised together), and notes on options switched off."""
    problems, notes = [], []
    task_name = getattr(task, "_name", None) or getattr(task, "task", None)
    if task_name not in MULTILINGUAL_TASKS:
        problems.append(
            f"task {task_name}: the task-MoE routes on the languages of "
            "translation_multi_simple_epoch (--langs, language tokens); upcycle a model trained "
            "with --task translation_multi_simple_epoch (or translation_task_moe)")
    if getattr(task, "lang_tok_replacing_bos_eos", False):
        problems.append("--lang-tok-replacing-bos-eos: not supported by translation_task_moe")
    for name, off in STRUCTURAL_OPTIONS.items():
        value = getattr(args, name, off)
        if value not in (off, None):
            problems.append(f"--{name.replace('_', '-')} {value}: the task_moe layers do not "
                            "implement it")
    for name, off in TRAINING_ONLY_OPTIONS.items():
        value = getattr(args, name, off)
        if value not in (off, None):
            notes.append(f"--{name.replace('_', '-')} {value} is training-time only and not "
                         "implemented by task_moe layers: off in the output (same function)")
    if problems:
        raise UpcycleError("cannot map this checkpoint to task_moe: " + "; ".join(problems))
    return notes


def _dense_langs(args, task) -> List[str]:
    langs = getattr(task, "langs", None) or getattr(args, "langs", None)
    if getattr(args, "moe_langs", None):
        langs = args.moe_langs
    if isinstance(langs, str):
        langs = langs.split(",")
    if langs:
        return [l.strip() for l in langs if l.strip()]
    lang_dict = getattr(task, "lang_dict", None)
    if lang_dict and os.path.isfile(lang_dict):
        with open(lang_dict) as f:
            return [line.strip() for line in f if line.strip()]
    raise UpcycleError(
        "the checkpoint records no --langs" + (f" (its --lang-dict {lang_dict} is not readable)"
                                               if lang_dict else "") +
        ": pass --langs with the dense model's languages in its order")


def _as_pairs(value) -> List[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [p.strip() for p in items if p.strip()]


def _resolve_languages(args, task, options: UpcycleOptions) -> Tuple[List[str], List[str]]:
    dense = _dense_langs(args, task)
    langs = dense if options.langs is None else list(options.langs)
    missing = [l for l in langs if l not in dense]
    if missing:
        raise UpcycleError(
            f"the dense checkpoint's dictionaries lack {', '.join(missing)}: it was trained with "
            f"--langs {','.join(dense)}, the languages whose tokens (__xx__) its embeddings hold")
    if langs != dense:
        raise UpcycleError(
            f"--langs {','.join(langs)} differs from the dense model's --langs {','.join(dense)}: "
            "the list (and its order) fixes the ids of the language tokens in the dictionary, "
            f"hence the embedding rows; pass --langs {','.join(dense)} (or leave it out)")
    pairs = _as_pairs(task.lang_pairs if options.lang_pairs is None else options.lang_pairs)
    if not pairs:
        raise UpcycleError("no language pairs: pass --lang-pairs (e.g. en-de,de-en)")
    for pair in pairs:
        src, sep, tgt = pair.partition("-")
        if not sep or not src or not tgt:
            raise UpcycleError(f"bad language pair {pair!r}: write it as SRC-TGT, e.g. en-de")
        lacking = [l for l in (src, tgt) if l not in dense]
        if lacking:
            raise UpcycleError(
                f"pair {pair}: the dense checkpoint's dictionaries lack {', '.join(lacking)} "
                f"(its languages: {', '.join(dense)})")
    return langs, pairs


def _dense_ffn(model: Dict[str, Tensor], kind: str, side: str, index: int, args):
    """The dense FFN of one layer {fc1.weight, ...}, or UpcycleError naming what is missing."""
    prefix = f"{side}.layers.{index}." + ("ffn." if kind == "task_moe" else "")
    ffn = {p: model.get(prefix + p) for p in _FFN_PARAMS}
    lacking = [prefix + p for p, v in ffn.items() if v is None]
    if lacking:
        raise UpcycleError(f"{side} layer {index} has no dense FFN in the checkpoint (missing "
                           f"{', '.join(lacking)}); is it a {kind} checkpoint?")
    width = getattr(args, f"{side}_ffn_embed_dim", None)
    if ffn["fc1.weight"].size(0) != width or ffn["fc2.weight"].size(1) != width:
        raise UpcycleError(f"{prefix}fc1.weight is {tuple(ffn['fc1.weight'].shape)}, but "
                           f"--{side}-ffn-embed-dim is {width}")
    return prefix, ffn


# --- what is exact -----------------------------------------------------------------------------

def exact_widths(dense_dim: int, kind: str, top_k: int, experts: int) -> List[int]:
    """The expert widths that upcycle exactly: F (copies), and for task routing F / P where P
    divides both k and E (each route holds every piece k / P times)."""
    if kind not in TASK_ROUTING_KINDS:
        return [dense_dim] if top_k > 1 else []
    return [dense_dim // p for p in range(1, dense_dim + 1)
            if dense_dim % p == 0 and top_k % p == 0 and experts % p == 0]


def _pieces(side: str, kind: str, dense_dim: int, options: UpcycleOptions) -> int:
    """P for this side, or UpcycleError saying which options are exact."""
    E, k = options.moe_expert_count, options.moe_top_k
    f = options.moe_expert_ffn_dim or dense_dim
    where = f"{side} MoE layers ({kind} routing, dense FFN dim {dense_dim})"
    if kind not in TASK_ROUTING_KINDS and k == 1:
        raise UpcycleError(
            f"no exact upcycle for the {where} with --moe-top-k 1: top-1 weighs the expert by "
            "its raw gate probability (Switch), which a gate reading the input keeps below 1, "
            "so the output would be p * FFN(x). Exact: --moe-top-k 2 or more (the kept weights "
            f"are renormalised to sum to 1), or route the {side} by target / lang_pair")
    widths = exact_widths(dense_dim, kind, k, E)
    ok = ", ".join(f"{w} ({'copies' if w == dense_dim else f'{dense_dim // w} pieces'})"
                   for w in widths)
    if f > dense_dim or dense_dim % f:
        raise UpcycleError(
            f"no exact upcycle for the {where} with --moe-expert-ffn-dim {f}: experts start as "
            "the dense FFN (copies) or as pieces of it, so their width must be the dense width "
            f"or divide it. Exact here: --moe-expert-ffn-dim {ok}")
    P = dense_dim // f
    if P > 1 and kind not in TASK_ROUTING_KINDS:
        raise UpcycleError(
            f"no exact upcycle for the {where} with --moe-expert-ffn-dim {f}: split into {P} "
            "pieces, the FFN is whole only if every piece runs for every token with weight 1, "
            f"but {kind} routing picks each token's experts from the input. Exact: "
            f"--moe-expert-ffn-dim {dense_dim} (copies) with --moe-top-k 2 or more, or route "
            f"the {side} by target / lang_pair to split it")
    if P > 1 and (k % P or E % P):
        raise UpcycleError(
            f"no exact upcycle for the {where} with --moe-expert-ffn-dim {f}: split into {P} "
            f"pieces, each task's {k} experts (--moe-top-k) must hold every piece equally "
            f"often, so --moe-top-k and --moe-expert-count ({E}) must be multiples of {P}. "
            f"Exact with these --moe-top-k / --moe-expert-count: --moe-expert-ffn-dim {ok}")
    return P


def _task_names(kind: str, langs: Sequence[str]) -> Dict[int, str]:
    L = len(langs)
    if kind == "target":
        return {t: langs[t] for t in range(L)}
    return {s * L + t: f"{langs[s]}-{langs[t]}" for s in range(L) for t in range(L) if s != t}


def task_routes(kind: str, langs: Sequence[str], pairs: Sequence[str], experts: int,
                top_k: int) -> Dict[int, List[int]]:
    """task id -> its k experts: consecutive groups, the tasks of the training pairs first (in
    their order), so that as many of them as possible get experts of their own."""
    L = len(langs)
    split = [p.split("-") for p in pairs]
    if kind == "target":
        first = [langs.index(t) for _, t in split]
    else:
        first = [langs.index(s) * L + langs.index(t) for s, t in split]
    order = list(dict.fromkeys(first + list(range(num_task_ids(kind, L)))))
    return {task: [(n * top_k + i) % experts for i in range(top_k)]
            for n, task in enumerate(order)}


def gate_table(routes: Dict[int, List[int]], experts: int, margin: float) -> Tensor:
    """[tasks, E] fp32 logits: 0 on each task's route, -margin elsewhere."""
    table = torch.full((len(routes), experts), -float(margin), dtype=torch.float32)
    for task, route in routes.items():
        table[task, route] = 0.0
    return table


def _route(table: Tensor, task: int, top_k: int):
    """One task's decision, read as the model and the pruner read it: a [1, E] row of the
    (mixed) logit table through top_k_route (task_merge.MergedTaskFFNs.route)."""
    decision = top_k_route(table[task : task + 1], top_k)
    return decision.expert_indices[0].tolist(), decision.expert_weights[0].double().tolist()


def piece_map(table: Tensor, top_k: int, experts: int, pieces: int) -> List[int]:
    """Which piece of the dense FFN each expert holds. A route's k experts must hold every
    piece k / P times; `e mod P` does that for every route of k consecutive experts. When the
    routes are disjoint groups, pieces follow the order in which top_k_route lists a group's
    experts (equal logits: the order of ties), so that a task's merged FFN (its experts
    concatenated in that order, task_merge.py) is the dense FFN with its units in their own
    order: for k = P the very same weights, and bit-identical outputs."""
    pieces_of = [e % pieces for e in range(experts)]
    if pieces == 1 or experts % top_k:
        return pieces_of
    ordered: Dict[int, int] = {}
    for task in range(table.size(0)):
        indices, _ = _route(table, task, top_k)
        for i, e in enumerate(indices):
            if ordered.setdefault(e, i % pieces) != i % pieces:
                return pieces_of  # tie orders disagree between tasks: keep e mod P
    return [ordered.get(e, pieces_of[e]) for e in range(experts)]


def read_routes(table: Tensor, mixing: Optional[Tensor], top_k: int, pieces_of: Sequence[int],
                names: Dict[int, str]) -> Tuple[Dict[str, List[int]], List[str]]:
    """Each task's experts as the model reads them (its gate row, or for a lang_pair never
    trained the rows `mixing` borrows), and the tasks whose route does not sum every piece of
    the dense FFN with total weight 1 (each expert's fc2 is scaled by the number of pieces)."""
    mixed = task_logit_table(table, mixing)
    pieces = max(pieces_of) + 1
    routes, bad = {}, []
    for task, name in names.items():
        cover = [0.0] * pieces
        experts, weights = _route(mixed, task, top_k)
        for e, w in zip(experts, weights):
            cover[pieces_of[e]] += w * pieces
        if any(abs(c - 1.0) > 1e-6 for c in cover):
            bad.append(name)
        routes[name] = sorted(experts)
    return routes, bad


# --- building the experts ----------------------------------------------------------------------

def _expert_units(ffn: Dict[str, Tensor], pieces_of: Sequence[int]) -> List[Dict[str, Tensor]]:
    """One expert per entry of pieces_of: that piece of the dense FFN's hidden units (the
    whole FFN when there is one piece), fc2 scaled by the number of pieces P."""
    pieces = max(pieces_of) + 1
    F = ffn["fc1.weight"].size(0)
    f = F // pieces
    units = []
    for j in pieces_of:
        rows = slice(j * f, (j + 1) * f)
        fc2 = ffn["fc2.weight"][:, rows]
        units.append({
            "fc1.weight": ffn["fc1.weight"][rows].clone(),
            "fc1.bias": ffn["fc1.bias"][rows].clone(),
            "fc2.weight": fc2.clone() if pieces == 1 else (fc2.double() * pieces).to(fc2.dtype),
            "fc2.bias": ffn["fc2.bias"].clone(),
        })
    return units


def _perturb(unit: Dict[str, Tensor], noise: float, reinit_fraction: float,
             generator: torch.Generator):
    """In place: Gaussian noise of std `noise` x the tensor's own std on both weight matrices;
    then Drop-Upcycling: a random `reinit_fraction` of the hidden units get fresh fc1 rows, fc1
    biases and fc2 columns, drawn from normals with the mean and std of the tensors they
    replace (Nakamura et al. 2025)."""
    def normal(shape, like: Tensor):
        std = like.float().std().item() if like.numel() > 1 else 0.0
        mean = like.float().mean().item()
        return (torch.randn(shape, generator=generator) * std + mean).to(like.dtype)

    if noise > 0:
        for name in ("fc1.weight", "fc2.weight"):
            w = unit[name]
            scale = noise * w.float().std().item()
            w += (torch.randn(w.shape, generator=generator) * scale).to(w.dtype)
    if reinit_fraction > 0:
        f = unit["fc1.weight"].size(0)
        count = int(round(reinit_fraction * f))
        if count:
            units = torch.randperm(f, generator=generator)[:count]
            w1, b1, w2 = unit["fc1.weight"], unit["fc1.bias"], unit["fc2.weight"]
            w1[units] = normal((count, w1.size(1)), w1)
            b1[units] = normal((count,), b1)
            w2[:, units] = normal((w2.size(0), count), w2)


# --- the fairseq-train flags of the result -------------------------------------------------------

# options that shape the model (and must be given again to fairseq-train --finetune-from-model);
# dropout and friends are the new run's to choose, training-only options are off
_NOT_STRUCTURAL = {"dropout", "attention_dropout", "activation_dropout", "relu_dropout",
                   "adaptive_softmax_dropout", "encoder_embed_path", "decoder_embed_path",
                   "quant_noise_pq_block_size", "quant_noise_scalar",
                   *TRAINING_ONLY_OPTIONS, *STRUCTURAL_OPTIONS}


def architecture_flags(args: argparse.Namespace) -> List[str]:
    """`--arch task_moe` plus every architecture option whose value differs from what
    `--arch task_moe` (fairseq's base_architecture) would choose, as fairseq-train flags."""
    from fairseq.models.transformer.transformer_legacy import base_architecture

    probe = argparse.Namespace()
    base_architecture(probe)
    names = [n for n in vars(probe) if n not in _NOT_STRUCTURAL]
    names += ["max_source_positions", "max_target_positions"]
    chosen: Dict[str, object] = {}
    for name in names:  # base_architecture's order: a value before the defaults derived from it
        probe = argparse.Namespace(**chosen)
        base_architecture(probe)
        default = getattr(probe, name, 1024)  # max_*_positions: the plugin's default, 1024
        if hasattr(args, name) and getattr(args, name) != default:
            chosen[name] = getattr(args, name)
    if chosen.get("share_all_embeddings"):  # implies it (the model sets it when built)
        chosen.pop("share_decoder_input_output_embed", None)
    flags = ["--arch", MOE_ARCH]
    for name in names:
        if name not in chosen:
            continue
        value, flag = chosen[name], "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def moe_flags(options: UpcycleOptions) -> List[str]:
    flags = ["--moe-freq", str(options.moe_freq), "--moe-expert-count",
             str(options.moe_expert_count), "--moe-top-k", str(options.moe_top_k),
             "--encoder-moe-routing", options.encoder_moe_routing,
             "--decoder-moe-routing", options.decoder_moe_routing]
    if options.moe_expert_ffn_dim:
        flags += ["--moe-expert-ffn-dim", str(options.moe_expert_ffn_dim)]
    if options.moe_unseen_pairs != MoEConfig.moe_unseen_pairs:
        flags += ["--moe-unseen-pairs", options.moe_unseen_pairs]
    return flags


def task_flags(task, langs: Sequence[str], pairs: Sequence[str]) -> List[str]:
    flags = ["--task", MOE_TASK, "--langs", ",".join(langs), "--lang-pairs", ",".join(pairs)]
    if getattr(task, "encoder_langtok", None):
        flags += ["--encoder-langtok", task.encoder_langtok]
    if getattr(task, "decoder_langtok", False):
        flags.append("--decoder-langtok")
    style = getattr(task, "lang_tok_style", None)
    if style and style != "multilingual":
        flags += ["--lang-tok-style", style]
    return flags


# --- the whole checkpoint ------------------------------------------------------------------------

def _validate_options(options: UpcycleOptions):
    problems = []
    for side in SIDES:
        kind = getattr(options, f"{side}_moe_routing")
        if kind not in ROUTING_KINDS:
            problems.append(f"--{side}-moe-routing {kind}: choose one of "
                            f"{', '.join(ROUTING_KINDS)}")
    if options.moe_freq < 1:
        problems.append(f"--moe-freq must be >= 1 (every N-th FFN becomes an MoE layer), got "
                        f"{options.moe_freq}")
    if options.moe_expert_count < 1:
        problems.append(f"--moe-expert-count must be >= 1, got {options.moe_expert_count}")
    elif not 1 <= options.moe_top_k <= options.moe_expert_count:
        problems.append(f"--moe-top-k must be between 1 and --moe-expert-count "
                        f"({options.moe_expert_count}), got {options.moe_top_k}")
    if options.moe_expert_ffn_dim is not None and options.moe_expert_ffn_dim < 1:
        problems.append(f"--moe-expert-ffn-dim must be >= 1, got {options.moe_expert_ffn_dim}")
    if not options.gate_margin > 0 or not math.isfinite(options.gate_margin):
        problems.append(f"--gate-margin must be a positive number, got {options.gate_margin}")
    if options.noise < 0 or not math.isfinite(options.noise):
        problems.append(f"--noise must be >= 0, got {options.noise}")
    if not 0 <= options.reinit_fraction <= 1:
        problems.append(f"--reinit-fraction must be between 0 and 1, got "
                        f"{options.reinit_fraction}")
    if problems:
        raise UpcycleError("; ".join(problems))


def _moe_args(args, kind: str, options: UpcycleOptions, langs, pairs) -> argparse.Namespace:
    new = copy.deepcopy(args)
    for name, off in TRAINING_ONLY_OPTIONS.items():
        if hasattr(new, name):
            setattr(new, name, off)
    new.arch = new._name = MOE_ARCH
    new.task = MOE_TASK
    values = {"moe_freq": options.moe_freq, "moe_expert_count": options.moe_expert_count,
              "moe_expert_ffn_dim": options.moe_expert_ffn_dim, "moe_top_k": options.moe_top_k,
              "encoder_moe_routing": options.encoder_moe_routing,
              "decoder_moe_routing": options.decoder_moe_routing,
              "moe_unseen_pairs": options.moe_unseen_pairs,
              "moe_langs": ",".join(langs), "moe_trained_pairs": ",".join(pairs),
              "moe_pruned_layout": None}
    for f in MoEConfig.__dataclass_fields__.values():  # every MoE option explicit
        setattr(new, f.name, values.get(f.name, getattr(args, f.name, f.default)
                                        if kind == "task_moe" else f.default))
    new.lang_pairs = ",".join(pairs)
    return new


def _task_args(task, model_args, pairs) -> argparse.Namespace:
    new = copy.deepcopy(task)
    new._name = new.task = MOE_TASK
    new.lang_pairs = list(pairs)
    new.arch = model_args.arch
    return new


def upcycle_checkpoint(state: dict, options: UpcycleOptions) -> Tuple[dict, UpcycleReport]:
    """Return (task-MoE checkpoint dict, report). The input dict is not modified."""
    _validate_options(options)
    args, task = _cfg_namespaces(state)
    source = _source_kind(args)
    notes = _check_mappable(args, task)
    langs, pairs = _resolve_languages(args, task, options)
    moe = MoEConfig(moe_freq=options.moe_freq, moe_expert_count=options.moe_expert_count,
                    moe_expert_ffn_dim=options.moe_expert_ffn_dim, moe_top_k=options.moe_top_k,
                    encoder_moe_routing=options.encoder_moe_routing,
                    decoder_moe_routing=options.decoder_moe_routing,
                    moe_unseen_pairs=options.moe_unseen_pairs, moe_langs=",".join(langs),
                    moe_trained_pairs=",".join(pairs))
    layers = {side: [i for i in range(getattr(args, f"{side}_layers")) if moe.is_moe_layer(i)]
              for side in SIDES}
    if not any(layers.values()):
        raise UpcycleError(
            f"--moe-freq {options.moe_freq} makes no layer an MoE layer (encoder "
            f"{args.encoder_layers} and decoder {args.decoder_layers} layers; layer i is MoE "
            "when (i + 1) % N == 0)")
    E, k = options.moe_expert_count, options.moe_top_k
    perturbing = options.noise > 0 or options.reinit_fraction > 0
    if perturbing and not options.perturb_task_routed and not any(
            getattr(options, f"{s}_moe_routing") not in TASK_ROUTING_KINDS and layers[s]
            for s in SIDES):
        raise UpcycleError(
            "--noise / --reinit-fraction break the symmetry of experts whose routing is learned "
            "(token, sentence), and this model has no such MoE layer; add "
            "--perturb-task-routed to perturb task-routed experts too (step 0 is then not exact)")

    # per side: pieces, routes and gate table, and what is exact (checked before any weight work)
    plan, inexact = {}, []
    for side in SIDES:
        if not layers[side]:
            continue
        routing = getattr(options, f"{side}_moe_routing")
        P = _pieces(side, routing, getattr(args, f"{side}_ffn_embed_dim"), options)
        routes = table = None
        if routing in TASK_ROUTING_KINDS:
            table = gate_table(task_routes(routing, langs, pairs, E, k), E,
                               SATURATED_MARGIN if k == 1 else options.gate_margin)
            mixing = moe.pair_mixing() if routing == "lang_pair" else None
            pieces_of = piece_map(table, k, E, P)
            routes, bad = read_routes(table, mixing, k, pieces_of, _task_names(routing, langs))
            for name in bad:
                why = f"{name} ({side}, {routing} routing"
                if routing == "lang_pair" and name not in pairs:  # borrowed rows (target_mean)
                    why += (": a pair outside --lang-pairs, routed by the mean of the rows of "
                            "the pairs into its target; --moe-unseen-pairs own_row reads its own "
                            "row, which is exact")
                inexact.append(why + ")")
        else:
            pieces_of = [0] * E
        plan[side] = (routing, P, pieces_of, routes, table)
    if k == 1 and plan:
        notes.append("--moe-top-k 1: each task's expert has gate probability exactly 1 (saturated "
                     "logits), which also fixes the routes (no gradient reaches the gate)")

    generator = torch.Generator().manual_seed(options.seed)
    model = state["model"]
    new_model: Dict[str, Tensor] = {}
    ffn_of = {}
    for side in SIDES:
        for index in range(getattr(args, f"{side}_layers")):
            prefix, ffn = _dense_ffn(model, source, side, index, args)
            ffn_of[f"{side}.layers.{index}"] = (prefix, ffn)
    dense_ffn_keys = {prefix + p for prefix, _ in ffn_of.values() for p in _FFN_PARAMS}
    for key, value in model.items():  # embeddings, attention, norms: unchanged
        if key not in dense_ffn_keys and key != "_extra_state":
            new_model[key] = value
    reports = []
    for name, (prefix, ffn) in ffn_of.items():
        side, index = name.split(".")[0], int(name.split(".")[-1])
        if index not in layers[side]:
            for p in _FFN_PARAMS:
                new_model[f"{name}.ffn.{p}"] = ffn[p]
            continue
        routing, P, pieces_of, routes, table = plan[side]
        F = ffn["fc1.weight"].size(0)
        report = LayerReport(name, routing, F, F // P, P)
        units = _expert_units(ffn, pieces_of)
        if table is not None:
            new_model[f"{name}.ffn.router.wg.weight"] = table.clone()
            report.routes = routes
        else:  # a learned gate on the input, initialised as a new model's (nn.Linear default)
            C = ffn["fc1.weight"].size(1)
            bound = 1.0 / math.sqrt(C)
            new_model[f"{name}.ffn.router.wg.weight"] = (
                torch.rand((E, C), generator=generator) * 2 * bound - bound)
        if perturbing and (routing not in TASK_ROUTING_KINDS or options.perturb_task_routed):
            for unit in units:
                _perturb(unit, options.noise, options.reinit_fraction, generator)
            report.perturbed = True
        for e, unit in enumerate(units):
            for p in _FFN_PARAMS:
                new_model[_EXPERT_KEY.format(layer=name, e=e, p=p)] = unit[p]
        reports.append(report)
    new_model["_extra_state"] = {"moe_langs": ",".join(langs)}

    perturbed = [r.name for r in reports if r.perturbed]
    if perturbed:
        inexact.append(f"experts perturbed by --noise / --reinit-fraction in "
                       f"{', '.join(perturbed)}")
    new_args = _moe_args(args, source, options, langs, pairs)
    new_task = _task_args(task, new_args, pairs)
    history = (state.get("optimizer_history") or [{}])[-1]
    out = {"task_state": state.get("task_state") or {}}  # fairseq's keys; nothing else kept
    if state.get("cfg") is not None:
        out["cfg"] = dict(state["cfg"])
        out["cfg"]["model"], out["cfg"]["task"] = new_args, new_task
        out["args"] = None
    else:  # a legacy checkpoint: one namespace, converted by fairseq on load
        out["cfg"], out["args"] = None, new_args
    out["model"] = new_model
    out["criterion"] = None
    # a fresh start for fairseq-train --finetune-from-model (or --restore-file): no optimizer
    # state, update 0, epoch 1
    out["optimizer_history"] = [{"criterion_name": history.get("criterion_name",
                                                               "CrossEntropyCriterion"),
                                 "optimizer_name": history.get("optimizer_name", "none"),
                                 "lr_scheduler_state": {"best": None}, "num_updates": 0}]
    out["last_optimizer_state"] = None
    out["extra_state"] = {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0,
                                             "shuffle": True, "version": 2}}
    report = UpcycleReport(
        source_kind=source, source_arch=str(getattr(args, "arch", None)),
        source_updates=history.get("num_updates"), langs=langs, lang_pairs=pairs,
        layers=reports, exact=not inexact, inexact=inexact, notes=notes,
        model_flags=architecture_flags(new_args) + moe_flags(options),
        task_flags=task_flags(task, langs, pairs),
        params_before=count_parameters(model), params_after=count_parameters(new_model))
    out["taskmoe_upcycle"] = {
        "source_arch": report.source_arch, "source_kind": source,
        "source_updates": report.source_updates, "exact": report.exact,
        "options": {k: (list(v) if isinstance(v, (list, tuple)) else v)
                    for k, v in vars(options).items()}}
    return out, report
