"""Transformer layers whose FFN is either dense or an MoE layer.

They reuse fairseq's layer construction (attention, layer norms, dropout) and only replace the
FFN sub-block: `self.ffn` is an experts.FeedForward or a moe_layer.MoELayer, and `forward` returns
`(x, stats)` where stats is a MoEStats or None. Axis legend: T time, B batch, C channels.
"""

from typing import Dict, Optional

import torch.nn as nn
from fairseq import utils
from fairseq.models.transformer import TransformerConfig
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from fairseq.modules.fairseq_dropout import FairseqDropout
from torch import Tensor

from ..distributed.sharding import CommTimer, ShardedExpertFFNs, expert_shard
from ..moe.experts import ExpertFFNs, FeedForward
from ..moe.moe_layer import MoELayer
from ..moe.routing import FrozenTaskRouting, build_router, num_task_ids
from .config import MoEConfig


def build_ffn(cfg: TransformerConfig, moe: MoEConfig, side: str, index: int) -> nn.Module:
    """The FFN of layer `index` on `side` ("encoder"/"decoder"): dense, MoE (its experts sharded
    over the ranks when expert parallelism is on), or pruned MoE (never sharded: it serves)."""
    side_cfg = cfg.encoder if side == "encoder" else cfg.decoder
    embed_dim, ffn_dim = side_cfg.embed_dim, side_cfg.ffn_embed_dim
    activation = utils.get_activation_fn(cfg.activation_fn)
    activation_dropout = FairseqDropout(
        float(cfg.activation_dropout or cfg.relu_dropout or 0), module_name="ActivationDropout"
    )
    if not moe.is_moe_layer(index):
        return FeedForward(embed_dim, ffn_dim, activation, activation_dropout)
    kind = moe.encoder_moe_routing if side == "encoder" else moe.decoder_moe_routing
    layout = moe.pruned_layout()
    pruned = layout.get("layers", {}).get(f"{side}.layers.{index}")
    if pruned is not None:  # written by taskmoe-prune
        router = FrozenTaskRouting(kind, num_task_ids(kind, len(moe.langs)), pruned["slots"],
                                   served=", ".join(layout["served_pairs"]),
                                   merged=pruned.get("merged", False))
        ffn_dims = pruned["ffn_dims"]
    else:
        router = build_router(kind, embed_dim, moe.moe_expert_count, moe.moe_top_k,
                              len(moe.langs), causal=side == "decoder",
                              pair_mixing=moe.pair_mixing())
        ffn_dims = [moe.moe_expert_ffn_dim or ffn_dim] * moe.moe_expert_count
        shard = expert_shard(moe.moe_expert_count, moe.moe_expert_parallel)
        if shard is not None:  # expert parallelism: this rank's E/W experts (sharding.py)
            experts = ShardedExpertFFNs(embed_dim, ffn_dims, activation, activation_dropout,
                                        shard, timer=CommTimer(moe.moe_record_a2a_time))
            return MoELayer(router, experts, moe.moe_capacity_factor,
                            moe.moe_eval_capacity_factor, moe.moe_balance_scope)
    experts = ExpertFFNs(embed_dim, ffn_dims, activation, activation_dropout)
    return MoELayer(router, experts, moe.moe_capacity_factor, moe.moe_eval_capacity_factor,
                    moe.moe_balance_scope)


def run_ffn(ffn: nn.Module, x: Tensor, pad_mask, task_ids, incremental_state=None):
    if isinstance(ffn, MoELayer):
        return ffn(x, pad_mask, task_ids, incremental_state)
    return ffn(x), None


class TaskMoEEncoderLayer(TransformerEncoderLayerBase):
    def __init__(self, cfg: TransformerConfig, moe: MoEConfig, index: int):
        super().__init__(cfg)
        del self.fc1, self.fc2  # replaced by self.ffn
        self.ffn = build_ffn(cfg, moe, "encoder", index)

    def forward(self, x: Tensor, pad_mask: Optional[Tensor], task_ids=None):
        """x: [T, B, C]; pad_mask: [B, T] bool or None when the batch has no pads."""
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=pad_mask,
                              need_weights=False)
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x, stats = run_ffn(self.ffn, x, pad_mask, task_ids)
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x, stats


class TaskMoEDecoderLayer(TransformerDecoderLayerBase):
    def __init__(self, cfg: TransformerConfig, moe: MoEConfig, index: int, no_encoder_attn=False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        del self.fc1, self.fc2  # replaced by self.ffn
        self.ffn = build_ffn(cfg, moe, "decoder", index)

    def forward(
        self,
        x: Tensor,
        encoder_out: Optional[Tensor],
        encoder_padding_mask: Optional[Tensor],
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]],
        self_attn_mask: Optional[Tensor],
        self_attn_padding_mask: Optional[Tensor],
        task_ids=None,
        need_attn: bool = False,
    ):
        """x: [T, B, C]. Returns (x, encoder attention [H, B, T, S] or None, stats)."""
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=self_attn_padding_mask,
                              incremental_state=incremental_state, need_weights=False,
                              attn_mask=self_attn_mask)
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        attn = None
        if self.encoder_attn is not None and encoder_out is not None:
            residual = x
            if self.normalize_before:
                x = self.encoder_attn_layer_norm(x)
            x, attn = self.encoder_attn(query=x, key=encoder_out, value=encoder_out,
                                        key_padding_mask=encoder_padding_mask,
                                        incremental_state=incremental_state, static_kv=True,
                                        need_weights=need_attn,
                                        need_head_weights=need_attn)  # [H, B, T, S]
            x = self.residual_connection(self.dropout_module(x), residual)
            if not self.normalize_before:
                x = self.encoder_attn_layer_norm(x)

        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x, stats = run_ffn(self.ffn, x, self_attn_padding_mask, task_ids, incremental_state)
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x, attn, stats

