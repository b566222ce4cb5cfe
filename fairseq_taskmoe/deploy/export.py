"""Serve one pruned pair without the plugin: a task-MoE checkpoint -> fairseq's own `transformer`
or a CTranslate2 model.

A checkpoint pruned for one pair, with its experts merged, is a dense transformer whose FFNs
differ in width from layer to layer: each task-routed MoE layer became one FFN holding the k
experts the task uses (k x the expert width), the dense layers kept theirs. Three steps:

1. `extract_dense(state, pair)`: full or pruned checkpoint dict -> `DenseExport`, the weights in
   fairseq `transformer` naming (`encoder.layers.{i}.fc1.weight`, ...) with each layer's own
   FFN width. A full checkpoint is pruned on the way (`pruning.prune_checkpoint`, merged).
   Refused: MoE layers that are token- or sentence-routed (their route depends on the input, so
   pruning keeps them whole and there is no single FFN), layers pruned with `--no-merge` (k FFNs
   per task), and a pair the checkpoint does not serve.
2. `to_fairseq_transformer(dense)`: a checkpoint of fairseq's `transformer` model for task
   `translation_multi_simple_epoch` (same --langs, --lang-pairs and language-token flags), which
   stock `fairseq-generate` loads without `--user-dir` and with `torch.load(weights_only=True)`:
   plain dicts, lists, strings, numbers and tensors only; no optimizer state.
   fairseq's transformer has one FFN width per side, so narrower FFNs are zero-padded to the
   widest of their side. That is exact: a padded unit has zero fc1 row and bias, so its
   activation is act(0) = 0 (true of every fairseq activation, and checked), and its fc2 column
   is zero. The cost: a layer padded from F to F_max carries (F_max - F) x (2C + 1) zero
   parameters and computes with them, i.e. its FFN GEMMs grow by F_max / F (x2 for a dense layer
   next to a merged top-2 MoE layer of the same expert width). Not padded when the widths agree
   (e.g. top-2 experts of half the FFN width).
3. `to_ctranslate2(dense, output_dir, data_dir)`: CTranslate2's own `FairseqConverter` run on
   that fairseq model, then each layer's zero padding cut off again, so CTranslate2 (which reads
   every layer's FFN size from its weights) computes with the true per-layer widths.
   `language_convention(dense)` is what a CTranslate2 user must add around the SentencePiece
   pieces (fairseq's --encoder-langtok / --decoder-langtok as tokens), written next to the model.
   (argos.py packages the same model for Argos Translate, with the source token in the model's
   config instead.)

Axis legend: C model dim, F FFN inner dim.
"""

import argparse
import copy
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..atomic import current_umask
from ..integration.config import MoEConfig
from ..moe.pairs import served_pairs, serves
from ..moe.routing import TASK_ROUTING_KINDS, TaskIds
from .pruning import model_args, parse_pairs, prune_checkpoint

STOCK_MODEL = "transformer"  # fairseq's own model (and architecture) name
STOCK_TASK = "translation_multi_simple_epoch"
CONVENTION_FILE = "taskmoe_export.json"  # written next to a CTranslate2 model
SIDES = ("encoder", "decoder")

_FFN_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.ffn\.(.+)$")
_EXPERT_KEY = re.compile(r"^experts\.experts\.(\d+)\.(fc[12]\.(?:weight|bias))$")
_FFN_PARAMS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
# cfg sections that name training components (possibly the plugin's): not needed to serve
_TRAINING_SECTIONS = ("criterion", "optimizer", "lr_scheduler")


class ExportError(ValueError):
    """A checkpoint that cannot be exported dense; the message names the layers and why."""


@dataclass
class DenseExport:
    """One language pair of a task-MoE checkpoint as a dense transformer.

    model: state dict in fairseq `transformer` naming, every FFN at its own width
    (`{side}.layers.{i}.fc1.weight` [F_i, C], `fc2.weight` [C, F_i]); args: the source model's
    namespace (task-MoE options included); task: the source task's options (a dict);
    ffn_dims: {"encoder": [F_0, F_1, ...], "decoder": [...]}; served: what the export serves
    (pairs.served_pairs of its layers for this one pair: ["*-de"] with target routing, ["en-de"]
    when a layer is lang_pair-routed, even if the pruned input served more pairs).
    """

    model: Dict[str, Tensor]
    args: argparse.Namespace
    task: dict
    pair: Tuple[str, str]
    served: List[str]
    ffn_dims: Dict[str, List[int]]
    num_updates: Optional[int] = None
    cfg_sections: dict = field(default_factory=dict)  # plain cfg sections kept (common, ...)
    layers: List[str] = field(default_factory=list)  # one line per layer, for the CLI report


def _task_options(state: dict) -> dict:
    cfg = state.get("cfg")
    task = cfg.get("task") if isinstance(cfg, dict) else getattr(cfg, "task", None)
    if task is None:
        task = state.get("args")
    if task is None:
        raise ExportError("the checkpoint records no task configuration (cfg.task)")
    return dict(vars(task)) if isinstance(task, argparse.Namespace) else dict(task)


def _moe_layers(args, moe: MoEConfig) -> Dict[str, str]:
    """{"encoder.layers.1": routing kind, ...} for every MoE layer."""
    out = {}
    for side in SIDES:
        kind = moe.encoder_moe_routing if side == "encoder" else moe.decoder_moe_routing
        for index in range(getattr(args, f"{side}_layers")):
            if moe.is_moe_layer(index):
                out[f"{side}.layers.{index}"] = kind
    return out


def _refuse_input_routed(names: List[str], moe_layers: Dict[str, str], moe: MoEConfig,
                         pair: str):
    sides = [side for side in SIDES if any(n.startswith(side) for n in names)]
    raise ExportError(
        f"cannot export {pair} as a dense transformer: MoE layer(s) "
        f"{', '.join(f'{n} ({moe_layers[n]}-routed)' for n in names)} route on the input, so "
        f"pruning keeps them whole (this {moe.encoder_moe_routing}/{moe.decoder_moe_routing} "
        f"model keeps its {' and '.join(sides)} MoE whole, {moe.moe_expert_count} experts per "
        "layer) and they have no single dense FFN. Only target- and lang_pair-routed MoE layers "
        "export; serve this checkpoint with the plugin (fairseq-generate --user-dir user_dir)"
    )


def extract_dense(state: dict, pair: str) -> DenseExport:
    """Full or pruned task-MoE checkpoint dict + 'SRC-TGT' -> DenseExport. Input not modified."""
    args = model_args(state)
    moe = MoEConfig.from_namespace(args)
    pairs = parse_pairs(pair, moe.langs)
    if len(pairs) != 1 or "*" in pair:
        raise ExportError(f"--lang-pair takes one pair, e.g. en-de; got {pair!r}")
    src, tgt = pairs[0]
    pair = f"{src}-{tgt}"
    moe_layers = _moe_layers(args, moe)
    layout = moe.pruned_layout()
    if not layout:  # a full checkpoint: prune (and merge) on the way
        input_routed = [n for n, kind in moe_layers.items() if kind not in TASK_ROUTING_KINDS]
        if input_routed:
            _refuse_input_routed(input_routed, moe_layers, moe, pair)
        if moe_layers:
            state, _ = prune_checkpoint(state, pair, merge=True)
            args = model_args(state)
            layout = MoEConfig.from_namespace(args).pruned_layout()
    else:
        kept_whole = [n for n in moe_layers if n not in layout.get("layers", {})]
        if kept_whole:
            _refuse_input_routed(kept_whole, moe_layers, moe, pair)
    pruned_for = layout.get("served_pairs", ["*-*"]) if layout else ["*-*"]
    if not serves(pruned_for, src, tgt):
        raise ExportError(f"this pruned checkpoint serves only {', '.join(pruned_for)}, not "
                          f"{pair}; export from the full checkpoint, or prune it for {pair}")
    # the export holds this pair's FFNs only, whatever else the pruned checkpoint served
    served = served_pairs(moe_layers.values(), [(src, tgt)])
    task_ids = TaskIds(torch.tensor([moe.langs.index(src)]), torch.tensor([moe.langs.index(tgt)]),
                       len(moe.langs))

    ffn_params: Dict[str, Dict[str, Tensor]] = {}  # "encoder.layers.1" -> ffn state
    model: Dict[str, Tensor] = {}
    for key, value in state["model"].items():
        m = _FFN_KEY.match(key)
        if m:
            ffn_params.setdefault(f"{m.group(1)}.layers.{m.group(2)}", {})[m.group(3)] = value
        elif key.startswith(("encoder.", "decoder.")):
            model[key] = value
        # else: plugin bookkeeping (the stored --langs list), not part of fairseq's transformer

    ffn_dims = {side: [] for side in SIDES}
    not_merged, report = [], []
    for side in SIDES:
        for index in range(getattr(args, f"{side}_layers")):
            name = f"{side}.layers.{index}"
            params = ffn_params.get(name, {})
            if name in moe_layers:
                info = layout["layers"][name]
                if not info.get("merged", layout.get("merged", True)) or info["slots"] != 1:
                    not_merged.append(name)
                    continue
                ffn, unit = _merged_ffn(name, params, moe_layers[name], task_ids, pair)
                report.append(f"{name}: merged FFN {unit} of the pruned MoE layer "
                              f"({moe_layers[name]}-routed), width {ffn['fc1.weight'].size(0)}")
            else:
                ffn = params
                if any(p not in ffn for p in _FFN_PARAMS):
                    raise ExportError(f"{name}: no dense FFN ({name}.ffn.fc1.weight ...) in the "
                                      "checkpoint")
                report.append(f"{name}: dense FFN, width {ffn['fc1.weight'].size(0)}")
            for p in _FFN_PARAMS:
                model[f"{name}.{p}"] = ffn[p]
            ffn_dims[side].append(ffn["fc1.weight"].size(0))
    if not_merged:
        raise ExportError(
            f"cannot export {pair} as a dense transformer: MoE layer(s) {', '.join(not_merged)} "
            "were pruned without merging (taskmoe-prune --no-merge, or several tasks sharing "
            "experts), so a task still uses k separate FFNs with gate weights. Export from the "
            f"full checkpoint (it is pruned for {pair} and merged on the way), or prune it again "
            "for this one pair without --no-merge"
        )
    history = state.get("optimizer_history") or [{}]
    return DenseExport(model=model, args=args, task=_task_options(state), pair=(src, tgt),
                       served=list(served), ffn_dims=ffn_dims,
                       num_updates=history[-1].get("num_updates"),
                       cfg_sections=_serving_cfg_sections(state), layers=report)


def _merged_ffn(name: str, params: Dict[str, Tensor], kind: str, task_ids: TaskIds, pair: str):
    """The one FFN a pruned, merged layer uses for this task: one slot, weight exactly 1."""
    tid = int(task_ids.for_routing(kind)[0])
    indices, weights = params["router.slot_indices"][tid], params["router.slot_weights"][tid]
    if indices.numel() != 1 or int(indices[0]) < 0 or float(weights[0]) != 1.0:
        raise ExportError(
            f"{name}: the pruned routing table gives {pair} slots {indices.tolist()} with weights "
            f"{weights.tolist()}, not one merged FFN of weight 1; export from the full checkpoint")
    unit = int(indices[0])
    ffn = {}
    for key, value in params.items():
        m = _EXPERT_KEY.match(key)
        if m and int(m.group(1)) == unit:
            ffn[m.group(2)] = value
    if len(ffn) != len(_FFN_PARAMS):
        raise ExportError(f"{name}: merged FFN {unit} is incomplete in the checkpoint")
    return ffn, unit


def _serving_cfg_sections(state: dict) -> dict:
    """The source checkpoint's plain cfg sections (common, generation, ...), minus the training
    components and the --user-dir: fairseq fills defaults for anything missing."""
    cfg = state.get("cfg")
    sections = {}
    if isinstance(cfg, dict):
        for name, section in cfg.items():
            if name in ("model", "task", "_name") or not isinstance(section, dict):
                continue
            if name in _TRAINING_SECTIONS:
                sections[name] = None
                continue
            section = copy.deepcopy(section)
            if name == "common":
                section["user_dir"] = None
            try:
                sections[name] = _plain(section, f"cfg.{name}")
            except ExportError:
                continue  # not needed to serve; fairseq fills defaults
    return sections


# --- fairseq's transformer ------------------------------------------------------------------

def _stock_arg_names() -> List[str]:
    """The options of fairseq's `transformer` model (its argparse flags, as attribute names)."""
    from fairseq.models.transformer import TransformerModel

    parser = argparse.ArgumentParser(add_help=False)
    TransformerModel.add_args(parser)
    return [a.dest for a in parser._actions]


def _plain(obj, where: str):
    """obj itself if it is built of what torch.load(weights_only=True) accepts (no tensors)."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    raise ExportError(f"cannot store {where} ({type(obj).__name__}) in a weights-only checkpoint")


def stock_model_options(dense: DenseExport, widths: Dict[str, int]) -> dict:
    """cfg.model of the exported checkpoint: fairseq transformer options, FFN widths `widths`."""
    args = dense.args
    options = {name: getattr(args, name) for name in _stock_arg_names() if hasattr(args, name)}
    options.update(_name=STOCK_MODEL, arch=STOCK_MODEL,
                   encoder_ffn_embed_dim=widths["encoder"], decoder_ffn_embed_dim=widths["decoder"])
    return _plain(options, "cfg.model")


def stock_task_options(dense: DenseExport) -> dict:
    """cfg.task: the source task's options under fairseq's own task name (the plugin's moe_*
    options and any value that is not plain data left out: fairseq fills defaults)."""
    options = {}
    for key, value in dense.task.items():
        try:
            if not key.startswith("moe_"):
                options[key] = _plain(value, key)
        except ExportError:
            continue
    options.update(_name=STOCK_TASK, task=STOCK_TASK, arch=STOCK_MODEL, user_dir=None,
                   source_lang=dense.pair[0], target_lang=dense.pair[1])
    return _plain(options, "cfg.task")


def padded_ffns(dense: DenseExport) -> Tuple[Dict[str, Tensor], Dict[str, int]]:
    """The state dict with each side's FFNs zero-padded to that side's widest (exact, see the
    module docstring), and the widths."""
    from fairseq import utils

    widths = {side: max(dims) for side, dims in dense.ffn_dims.items()}
    activation = getattr(dense.args, "activation_fn", "relu") or "relu"
    if any(d != widths[s] for s, dims in dense.ffn_dims.items() for d in dims):
        if float(utils.get_activation_fn(activation)(torch.zeros(1))[0]) != 0.0:
            raise ExportError(f"activation {activation} is not 0 at 0: the FFN widths "
                              f"{dense.ffn_dims} cannot be zero-padded to one width per side")
    model = dict(dense.model)
    for side in SIDES:
        for index, dim in enumerate(dense.ffn_dims[side]):
            extra = widths[side] - dim
            if extra == 0:
                continue
            p = f"{side}.layers.{index}."
            w1, b1, w2 = model[p + "fc1.weight"], model[p + "fc1.bias"], model[p + "fc2.weight"]
            model[p + "fc1.weight"] = torch.cat([w1, w1.new_zeros(extra, w1.size(1))], 0)  # [F, C]
            model[p + "fc1.bias"] = torch.cat([b1, b1.new_zeros(extra)], 0)  # [F]
            model[p + "fc2.weight"] = torch.cat([w2, w2.new_zeros(w2.size(0), extra)], 1)  # [C, F]
    return model, widths


def to_fairseq_transformer(dense: DenseExport) -> dict:
    """A checkpoint dict of fairseq's `transformer` that loads with weights_only=True."""
    model, widths = padded_ffns(dense)
    cfg = {"_name": None, **dense.cfg_sections}
    cfg["model"] = stock_model_options(dense, widths)
    cfg["task"] = stock_task_options(dense)
    return {
        "args": None,
        "cfg": cfg,
        "model": {k: v.contiguous() for k, v in model.items()},
        "criterion": None,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "none",
                               "lr_scheduler_state": {"best": None},
                               "num_updates": int(dense.num_updates or 0)}],
        "task_state": {},
        "extra_state": {"train_iterator": None},
        "last_optimizer_state": None,
        "taskmoe_export": _plain(export_info(dense, padded_to=widths), "taskmoe_export"),
    }


def export_info(dense: DenseExport, padded_to: Optional[Dict[str, int]] = None) -> dict:
    """What was exported, recorded in the fairseq checkpoint and next to a CTranslate2 model."""
    info = {"lang_pair": "-".join(dense.pair), "serves": dense.served,
            "ffn_dims": dense.ffn_dims, "num_updates": dense.num_updates,
            **language_convention(dense)}
    if padded_to is not None:
        info["ffn_padded_to"] = padded_to
    return info


def language_convention(dense: DenseExport) -> dict:
    """The language tokens fairseq's translation_multi_simple_epoch adds, as CTranslate2 input:
    source = source_prefix + pieces (CTranslate2 appends </s>), target_prefix = the forced first
    target token(s) (stripped from the output)."""
    from fairseq.data.multilingual.multilingual_utils import get_lang_tok

    from ..moe.pairs import language_tokens  # the one rule for the tokens of a pair

    task = dense.task
    style = task.get("lang_tok_style") or "multilingual"
    src, tgt = dense.pair
    tokens = {"lang_tok_format": get_lang_tok("{}", style),
              "encoder_langtok": task.get("encoder_langtok"),
              "decoder_langtok": bool(task.get("decoder_langtok"))}
    source_prefix, target_prefix = language_tokens(tokens, src, tgt)
    langs = task.get("langs")
    return {
        "source_lang": src, "target_lang": tgt,
        "langs": langs.split(",") if isinstance(langs, str) else list(langs or []),
        "lang_pairs": _as_list(task.get("lang_pairs")),
        "lang_tok_style": style, **tokens,
        "source_prefix": source_prefix, "target_prefix": target_prefix,
    }


def _as_list(value) -> List[str]:
    if value is None:
        return []
    return value.split(",") if isinstance(value, str) else list(value)


def fairseq_flags(dense: DenseExport) -> str:
    """The stock fairseq-generate task flags that serve the exported checkpoint."""
    conv = language_convention(dense)
    flags = [f"--task {STOCK_TASK}", f"--langs {','.join(conv['langs'])}",
             f"--lang-pairs {','.join(conv['lang_pairs'])}"]
    if conv["encoder_langtok"]:
        flags.append(f"--encoder-langtok {conv['encoder_langtok']}")
    if conv["decoder_langtok"]:
        flags.append("--decoder-langtok")
    return " ".join(flags)


# --- CTranslate2 ----------------------------------------------------------------------------

def _converter_class():
    from ctranslate2.converters.fairseq import FairseqConverter

    class PrunedPairConverter(FairseqConverter):
        """CTranslate2's fairseq converter, run on the padded `transformer` (built from an
        in-memory legacy checkpoint: its loader needs `args` as a namespace), then each layer's
        zero padding cut off so that CTranslate2 keeps the true per-layer FFN widths."""

        def __init__(self, dense: DenseExport, data_dir: str, source_bos: Optional[str] = None):
            data_dir = str(data_dir)
            model, widths = padded_ffns(dense)
            args = argparse.Namespace(**{**stock_task_options(dense),
                                         **stock_model_options(dense, widths)})
            args.data = data_dir
            buffer = io.BytesIO()
            torch.save({"args": args, "cfg": None, "model": model}, buffer)
            buffer.seek(0)
            # our own in-memory pickle (a Namespace), hence unsafe_deserialization
            super().__init__(buffer, data_dir, source_lang=dense.pair[0],
                             target_lang=dense.pair[1], unsafe_deserialization=True)
            self.ffn_dims = dense.ffn_dims
            self.source_bos = source_bos

        def _load(self):
            spec = super()._load()
            if self.source_bos is not None:  # CTranslate2 puts the token before every source
                spec.config.bos_token = self.source_bos
                spec.config.add_source_bos = True
            for side, layer_specs in (("encoder", spec.encoder.layer),
                                      ("decoder", spec.decoder.layer)):
                for index, (layer, dim) in enumerate(zip(layer_specs, self.ffn_dims[side])):
                    _unpad(layer.ffn, dim, f"{side}.layers.{index}")
            return spec

    return PrunedPairConverter


def _unpad(ffn_spec, dim: int, name: str):
    """Cut the FFN spec (numpy arrays: linear_0 [F, C] + [F], linear_1 [C, F]) to width dim."""
    w1, b1, w2 = ffn_spec.linear_0.weight, ffn_spec.linear_0.bias, ffn_spec.linear_1.weight
    if w1[dim:].any() or b1[dim:].any() or w2[:, dim:].any():
        raise RuntimeError(f"{name}: the FFN padding to cut off is not zero")
    ffn_spec.linear_0.weight = w1[:dim].copy()
    ffn_spec.linear_0.bias = b1[:dim].copy()
    ffn_spec.linear_1.weight = w2[:, :dim].copy()


def to_ctranslate2(dense: DenseExport, output_dir: str, data_dir: str,
                   quantization: Optional[str] = None, force: bool = False,
                   source_bos: Optional[str] = None) -> str:
    """Write a CTranslate2 model directory (CTranslate2's own writer) for this pair.
    source_bos: a token CTranslate2 itself adds before every source (its config's
    `add_source_bos` + `bos_token`; the decoder still starts with </s>), for callers that cannot
    add the source language token (Argos Translate)."""
    converter = _converter_class()(dense, data_dir, source_bos=source_bos)
    try:
        with torch.no_grad():
            return converter.convert(output_dir, quantization=quantization, force=force)
    except (ValueError, NotImplementedError) as err:  # its ConfigurationChecker raises these
        raise ExportError(f"CTranslate2's fairseq converter refused the model: {err}") from err


def ctranslate2_data_dir(dense: DenseExport, data: Optional[str] = None) -> str:
    """The fairseq data folder with the dictionaries CTranslate2's converter reads: `data`, else
    the one recorded in the checkpoint; ExportError naming what is missing."""
    where = "--data" if data else "the data folder recorded in the checkpoint"
    data = data or str(dense.task.get("data") or "").split(":")[0]
    if not data or not os.path.isdir(data):
        raise ExportError(f"{where} ({data or 'none'}) is not a folder: pass --data DIR, the "
                          "fairseq data folder with the dictionaries (dict.LANG.txt)")
    pairs = [p.split("-") for p in language_convention(dense)["lang_pairs"]]
    for lang in dict.fromkeys([*dense.pair, *(lang for pair in pairs for lang in pair)]):
        if not os.path.isfile(os.path.join(data, f"dict.{lang}.txt")):
            raise ExportError(f"{where} {data} has no dict.{lang}.txt: pass --data DIR, the "
                              "folder fairseq-preprocess wrote")
    return data


def write_ctranslate2(dense: DenseExport, output: str, data: Optional[str] = None,
                      quantization: Optional[str] = None, spm_model: Optional[str] = None,
                      source: str = ""):
    """A CTranslate2 model directory at `output`, as taskmoe-export writes it and
    taskmoe-serve caches it: converted into a temporary folder next to `output`, with the
    SentencePiece model and the language-token convention (CONVENTION_FILE) added, then renamed,
    so `output` appears complete or not at all (an existing one is replaced the same way).
    source: the input checkpoint's path, recorded."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError as err:
        raise ExportError("--format ctranslate2 needs CTranslate2: pip install ctranslate2") \
            from err
    data = ctranslate2_data_dir(dense, data)
    parent = os.path.dirname(os.path.abspath(output))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", dir=parent)
    old = None
    try:
        to_ctranslate2(dense, tmp, data, quantization=quantization, force=True)
        info = {"format": "taskmoe-export ctranslate2", "source_checkpoint": source,
                **export_info(dense), "quantization": quantization,
                "add_source_eos": True, "spm_model": None}
        if spm_model:
            shutil.copyfile(spm_model, os.path.join(tmp, "spm.model"))
            info["spm_model"] = "spm.model"
        with open(os.path.join(tmp, CONVENTION_FILE), "w") as f:
            json.dump(info, f, indent=2)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        if os.path.lexists(output):  # move the old one aside, then drop it
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old.", dir=parent)
            os.replace(output, os.path.join(old, "x"))
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(output):  # put the old one back
            os.replace(os.path.join(old, "x"), output)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
