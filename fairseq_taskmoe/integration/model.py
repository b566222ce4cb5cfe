"""The task_moe transformer: fairseq's transformer with every `--moe-freq`-th FFN an MoE layer.

Per-row language ids enter through `net_input` (`src_lang_idx`, `tgt_lang_idx`, supplied by the
translation_task_moe task), travel in `encoder_out["task_ids"]` (kept through beam-search
reordering) and reach every MoE layer. Each layer's MoEStats are returned in the decoder's extra
output as `moe_stats`: a list of (layer name, stats), encoder layers first.
Axis legend: T time, B batch, C channels.
"""

import logging
from dataclasses import fields
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
    base_architecture,
)
from torch import Tensor

from ..moe.moe_layer import MoELayer
from ..moe.routing import TASK_ROUTING_KINDS, TaskIds
from .config import MODEL_NAME, MoEConfig
from .lang_tags import LangTagReader, build_tag_reader
from .layers import TaskMoEDecoderLayer, TaskMoEEncoderLayer

logger = logging.getLogger(__name__)

DEFAULT_MAX_POSITIONS = 1024  # as fairseq's transformer
# transformer options our layers do not implement, with their "off" value: refused, not ignored
UNSUPPORTED_OPTIONS = {
    "encoder_layerdrop": 0, "decoder_layerdrop": 0, "encoder_layers_to_keep": None,
    "decoder_layers_to_keep": None, "checkpoint_activations": False,
    "offload_activations": False, "cross_self_attention": False, "scale_attn": False,
    "scale_fc": False, "scale_heads": False, "scale_resids": False, "quant_noise_pq": 0,
}


def _moe_layer_names(layers, prefix: str) -> List[str]:
    return [f"{prefix}{i}" for i, layer in enumerate(layers) if isinstance(layer.ffn, MoELayer)]


def _uses_task_ids(layers) -> bool:
    return any(isinstance(layer.ffn, MoELayer) and layer.ffn.kind in TASK_ROUTING_KINDS
               for layer in layers)


class TaskMoEEncoder(TransformerEncoderBase):
    def __init__(self, cfg: TransformerConfig, moe: MoEConfig, dictionary, embed_tokens,
                 tag_reader: Optional[LangTagReader] = None):
        super().__init__(cfg, dictionary, embed_tokens)
        self.layers = nn.ModuleList(  # replaces the dense layers built by the base class
            TaskMoEEncoderLayer(cfg, moe, i) for i in range(cfg.encoder.layers)
        )
        self.num_langs = len(moe.langs)
        self.moe_layer_names = _moe_layer_names(self.layers, "enc")
        self.tag_reader = tag_reader  # reads ids from language tags when a batch has none

    def task_ids(self, src_tokens: Tensor, src_lang_idx: Optional[Tensor],
                 tgt_lang_idx: Optional[Tensor]) -> Optional[TaskIds]:
        """The rows' TaskIds: as given, else (for sides not given) read from the source's
        language tag. None when there is nothing to read them from."""
        if src_lang_idx is not None and tgt_lang_idx is not None:
            return TaskIds(src_lang_idx, tgt_lang_idx, self.num_langs)
        if self.tag_reader is None:
            return None
        return self.tag_reader.read(src_tokens, src_lang=src_lang_idx, tgt_lang=tgt_lang_idx)

    def forward(
        self,
        src_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
        src_lang_idx: Optional[Tensor] = None,
        tgt_lang_idx: Optional[Tensor] = None,
    ):
        """src_tokens: [B, T]; src_lang_idx, tgt_lang_idx: [B] indices into --langs."""
        pad_mask = src_tokens.eq(self.padding_idx)  # [B, T]
        has_pads = bool(pad_mask.any())
        x, encoder_embedding = self.forward_embedding(src_tokens, token_embeddings)
        x = x * (1 - pad_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)  # [T, B, C]
        task_ids = self.task_ids(src_tokens, src_lang_idx, tgt_lang_idx)

        encoder_states = [x] if return_all_hiddens else []
        moe_stats = []
        for layer in self.layers:
            x, stats = layer(x, pad_mask if has_pads else None, task_ids)
            if stats is not None:
                moe_stats.append(stats)
            if return_all_hiddens:
                encoder_states.append(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)

        src_lengths = pad_mask.logical_not().sum(dim=1, dtype=torch.int32).reshape(-1, 1)
        return {
            "encoder_out": [x],  # [T, B, C]
            "encoder_padding_mask": [pad_mask],  # [B, T]
            "encoder_embedding": [encoder_embedding],  # [B, T, C]
            "encoder_states": encoder_states,
            "fc_results": [],
            "src_tokens": [],
            "src_lengths": [src_lengths],
            "task_ids": [task_ids] if task_ids is not None else [],
            "moe_stats": list(zip(self.moe_layer_names, moe_stats)),
        }

    def reorder_encoder_out(self, encoder_out: Dict[str, List], new_order: Tensor):
        """The base class rebuilds the dict with fixed keys: keep the task ids (beam search)."""
        reordered = super().reorder_encoder_out(encoder_out, new_order)
        reordered["task_ids"] = [ids.index_select(new_order) for ids in encoder_out["task_ids"]]
        return reordered


class TaskMoEDecoder(TransformerDecoderBase):
    def __init__(self, cfg: TransformerConfig, moe: MoEConfig, dictionary, embed_tokens,
                 no_encoder_attn=False):
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        self.layers = nn.ModuleList(  # replaces the dense layers built by the base class
            TaskMoEDecoderLayer(cfg, moe, i, no_encoder_attn) for i in range(cfg.decoder.layers)
        )
        self.moe_layer_names = _moe_layer_names(self.layers, "dec")

    def extract_features_scriptable(
        self,
        prev_output_tokens: Tensor,
        encoder_out: Optional[Dict[str, List]],
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        """prev_output_tokens: [B, T] -> features [B, T, C] and extras (attn, moe_stats)."""
        if alignment_layer is None:
            alignment_layer = self.num_layers - 1
        enc, enc_pad_mask, task_ids = None, None, None
        if encoder_out is not None:
            enc = encoder_out["encoder_out"][0] if encoder_out["encoder_out"] else None
            if encoder_out["encoder_padding_mask"]:
                enc_pad_mask = encoder_out["encoder_padding_mask"][0]
            task_ids = encoder_out["task_ids"][0] if encoder_out.get("task_ids") else None

        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(prev_output_tokens,
                                             incremental_state=incremental_state)
        if incremental_state is not None:  # one new token per step
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]
        x = self.embed_scale * self.embed_tokens(prev_output_tokens.contiguous())
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x = x + positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x).transpose(0, 1)  # [T, B, C]

        pad_mask = prev_output_tokens.eq(self.padding_idx)  # [B, T]
        pad_mask = pad_mask if pad_mask.any() else None
        attn, moe_stats = None, []
        inner_states: List[Optional[Tensor]] = [x]
        for idx, layer in enumerate(self.layers):
            causal_mask = None
            if incremental_state is None and not full_context_alignment:
                causal_mask = self.buffered_future_mask(x)
            x, layer_attn, stats = layer(
                x, enc, enc_pad_mask, incremental_state, causal_mask, pad_mask, task_ids,
                need_attn=idx == alignment_layer,
            )
            inner_states.append(x)
            if stats is not None:
                moe_stats.append(stats)
            if layer_attn is not None and idx == alignment_layer:
                attn = layer_attn.float().to(x)
        if attn is not None:
            if alignment_heads is not None:
                attn = attn[:alignment_heads]
            attn = attn.mean(dim=0)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)  # [B, T, C]
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        extra = {"attn": [attn], "inner_states": inner_states}
        if moe_stats:
            extra["moe_stats"] = list(zip(self.moe_layer_names, moe_stats))
        return x, extra


LANGS_STATE = "_extra_state"  # state-dict key of the model's extra state (torch convention)


@register_model(MODEL_NAME)
class TaskMoETransformerModel(TransformerModel):
    """Transformer whose every --moe-freq-th FFN is a mixture of experts routed by token,
    sentence, target language or language pair (Kudugunta et al. 2021).

    The language list travels in the state dict (the model's extra state, `_extra_state`:
    {"moe_langs": "en,de,fr"}), so that loading weights trained with another --langs order
    (resume, fine-tune, generation) is refused instead of silently permuting the rows of the
    task gates. A dict, not a tensor: fairseq's EMA averages every tensor of the state dict."""

    def __init__(self, args, encoder, decoder):
        super().__init__(args, encoder, decoder)
        self.langs = args.moe_langs.split(",")
        self.needs_task_ids = _uses_task_ids(encoder.layers) or _uses_task_ids(decoder.layers)
        if not self.needs_task_ids:
            encoder.tag_reader = None  # nothing routes on ids: never fail on a missing tag

    def get_extra_state(self):
        return {"moe_langs": ",".join(self.langs)}

    def set_extra_state(self, state):
        trained = state.get("moe_langs") if isinstance(state, dict) else None
        if trained is not None and trained.split(",") != self.langs:
            now = ",".join(self.langs)
            message = (f"these weights were trained with --langs {trained}, but this run has "
                       f"--langs {now}. Pass --langs {trained}: the language order fixes the "
                       "rows of the task gates, and another order would silently permute them")
            logger.error(message)  # fairseq's trainer re-raises load errors with its own text
            raise ValueError(message)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        if LANGS_STATE not in state_dict:  # written before the list was stored: accept
            state_dict = dict(state_dict)
            state_dict[LANGS_STATE] = self.get_extra_state()
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg,
                                       args=args)

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, MoEConfig(), delete_default=True)

    @classmethod
    def build_model(cls, args, task):
        task_moe_base(args)
        for name in ("max_source_positions", "max_target_positions"):
            if getattr(args, name, None) is None:
                setattr(args, name, DEFAULT_MAX_POSITIONS)
        moe = configure_moe(args, task)
        cfg = TransformerConfig.from_namespace(args)
        src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
        encoder_embed = cls.build_embedding(args, src_dict, cfg.encoder.embed_dim,
                                            cfg.encoder.embed_path)
        if cfg.share_all_embeddings:
            if src_dict != tgt_dict:
                raise ValueError("--share-all-embeddings requires a joined dictionary")
            decoder_embed = encoder_embed
            args.share_decoder_input_output_embed = True
            cfg.share_decoder_input_output_embed = True
        else:
            decoder_embed = cls.build_embedding(args, tgt_dict, cfg.decoder.embed_dim,
                                                cfg.decoder.embed_path)
        encoder = TaskMoEEncoder(cfg, moe, src_dict, encoder_embed,
                                 tag_reader=build_tag_reader(args, src_dict, moe.langs))
        decoder = TaskMoEDecoder(cfg, moe, tgt_dict, decoder_embed,
                                 no_encoder_attn=cfg.no_cross_attention)
        return cls(args, encoder, decoder)

    def forward(
        self,
        src_tokens,
        src_lengths,
        prev_output_tokens,
        src_lang_idx: Optional[Tensor] = None,
        tgt_lang_idx: Optional[Tensor] = None,
        return_all_hiddens: bool = True,
        features_only: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        if (src_lang_idx is None or tgt_lang_idx is None) and self.needs_task_ids:
            # no ids from the task: read them from the language tags, the decoder's prefix
            # included (the encoder alone, as in generation, sees only the source tag)
            reader = self.encoder.tag_reader
            if reader is not None:
                ids = reader.read(src_tokens, prev_output_tokens, src_lang_idx, tgt_lang_idx)
                src_lang_idx, tgt_lang_idx = ids.src_lang, ids.tgt_lang
        encoder_out = self.encoder(src_tokens, src_lengths=src_lengths,
                                   return_all_hiddens=return_all_hiddens,
                                   src_lang_idx=src_lang_idx, tgt_lang_idx=tgt_lang_idx)
        x, extra = self.decoder(prev_output_tokens, encoder_out=encoder_out,
                                features_only=features_only, alignment_layer=alignment_layer,
                                alignment_heads=alignment_heads, src_lengths=src_lengths,
                                return_all_hiddens=return_all_hiddens)
        extra["moe_stats"] = encoder_out["moe_stats"] + extra.get("moe_stats", [])
        return x, extra


def configure_moe(args, task) -> MoEConfig:
    """Fix the language list (hence task ids) in the model args and check the set-up."""
    task_langs = list(getattr(task, "langs", None) or [])
    recorded = getattr(args, "moe_langs", None)
    if recorded and task_langs and recorded.split(",") != task_langs:
        raise ValueError(
            f"this task_moe model was trained with --langs {recorded}, but the task has "
            f"--langs {','.join(task_langs)}. Pass --langs {recorded} (language ids must match "
            "the ones the gates were trained with)."
        )
    if not recorded:
        if not task_langs:
            raise ValueError("--arch task_moe needs --task translation_task_moe with --langs")
        args.moe_langs = ",".join(task_langs)
        # the pairs trained on: lang_pair routing of the others is zero-shot (moe_unseen_pairs)
        args.moe_trained_pairs = ",".join(getattr(task, "lang_pairs", None) or [])
    unsupported = [f"--{name.replace('_', '-')}" for name, off in UNSUPPORTED_OPTIONS.items()
                   if getattr(args, name, off) not in (off, None)]
    if unsupported:
        raise ValueError(f"--arch task_moe does not support {', '.join(unsupported)} (its layers "
                         "are rebuilt by the plugin); leave them at their defaults")
    moe = MoEConfig.from_namespace(args)
    moe.validate()
    uses_task_ids = {moe.encoder_moe_routing, moe.decoder_moe_routing} & set(TASK_ROUTING_KINDS)
    if moe.moe_freq > 0 and uses_task_ids and not getattr(task, "provides_task_ids", False):
        raise ValueError(
            f"--encoder-moe-routing/--decoder-moe-routing {'/'.join(sorted(uses_task_ids))} "
            f"routes on language ids, which task {type(task).__name__} does not provide per "
            "row. Use --task translation_task_moe."
        )
    return moe


def _fill_moe_defaults(args):
    for f in fields(MoEConfig):
        if getattr(args, f.name, None) is None:
            setattr(args, f.name, f.default)


@register_model_architecture(MODEL_NAME, "task_moe")
def task_moe_base(args):
    _fill_moe_defaults(args)
    base_architecture(args)


@register_model_architecture(MODEL_NAME, "moe_transformer")
def moe_transformer(args):
    """The project's design name for the same model: `--arch moe_transformer` == `task_moe`."""
    task_moe_base(args)


def _default_sizes(args, embed_dim: int, ffn_dim: int, layers: int, heads: int):
    """Set encoder and decoder sizes unless given on the command line."""
    for side in ("encoder", "decoder"):
        for name, value in (("embed_dim", embed_dim), ("ffn_embed_dim", ffn_dim),
                            ("layers", layers), ("attention_heads", heads)):
            setattr(args, f"{side}_{name}", getattr(args, f"{side}_{name}", value))


@register_model_architecture(MODEL_NAME, "task_moe_small")
def task_moe_small(args):
    """The demo size: d=128, 4+4 layers (MoE in layers 1 and 3 of each side), 8 experts of
    FFN dim 512, shared embeddings."""
    _default_sizes(args, embed_dim=128, ffn_dim=512, layers=4, heads=4)
    args.share_all_embeddings = getattr(args, "share_all_embeddings", True)
    task_moe_base(args)


@register_model_architecture(MODEL_NAME, "task_moe_tiny")
def task_moe_tiny(args):
    """For tests: d=32, 2+2 layers, 4 experts."""
    _default_sizes(args, embed_dim=32, ffn_dim=64, layers=2, heads=2)
    args.moe_expert_count = getattr(args, "moe_expert_count", 4)
    task_moe_base(args)
