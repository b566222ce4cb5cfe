"""MoE options of the task_moe architecture, in one dataclass: fairseq turns each field into a
command-line flag (`moe_top_k` -> `--moe-top-k`) with its help text."""

import json
from dataclasses import dataclass, field, fields
from typing import Dict, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from .routing import ROUTING_KINDS

MODEL_NAME = "task_moe_transformer"  # the registered fairseq model; archs task_moe*
RoutingChoice = ChoiceEnum(list(ROUTING_KINDS))


@dataclass
class MoEConfig(FairseqDataclass):
    moe_freq: int = field(
        default=2,
        metadata={"help": "every N-th FFN is an MoE layer, in encoder and decoder (layers with "
                  "(index + 1) %% N == 0, i.e. the 2nd, 4th, ... for N=2); 0 makes the model "
                  "dense"},
    )
    moe_expert_count: int = field(default=8, metadata={"help": "experts per MoE layer"})
    moe_expert_ffn_dim: Optional[int] = field(
        default=None, metadata={"help": "inner dim of each expert FFN (default: the FFN dim)"}
    )
    moe_top_k: int = field(default=2, metadata={"help": "experts each token/task is routed to"})
    encoder_moe_routing: RoutingChoice = field(
        default="target",
        metadata={"help": "what encoder MoE layers route on: token (GShard), sentence (mean of "
                  "the source sentence), target (target-language id), lang_pair (pair id). "
                  "target and lang_pair layers can be pruned to a per-task sub-network"},
    )
    decoder_moe_routing: RoutingChoice = field(
        default="target",
        metadata={"help": "what decoder MoE layers route on; sentence uses the mean of the "
                  "target prefix so generation routes as training did"},
    )
    moe_capacity_factor: float = field(
        default=1.25,
        metadata={"help": "token routing in training: each expert takes at most factor x "
                  "(tokens x k / experts) assignments, the overflow is dropped (the token keeps "
                  "its residual) and logged as moe_overflow; <= 0 means dropless. Task and "
                  "sentence routing are always dropless"},
    )
    moe_eval_capacity_factor: Optional[float] = field(
        default=None,
        metadata={"help": "token routing in validation/generation: capacity factor for "
                  "experiments; default dropless, so incremental decoding equals full decoding"},
    )
    moe_langs: Optional[str] = field(
        default=None,
        metadata={"help": "set automatically: the task's --langs at training time, which fixes "
                  "the task ids (do not set by hand)"},
    )
    moe_pruned_layout: Optional[str] = field(
        default=None,
        metadata={"help": "set by taskmoe-prune: JSON describing pruned MoE layers "
                  "(do not set by hand)"},
    )

    @classmethod
    def from_namespace(cls, args) -> "MoEConfig":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**values)

    @property
    def langs(self):
        return self.moe_langs.split(",") if self.moe_langs else []

    def pruned_layout(self) -> Dict[str, dict]:
        return json.loads(self.moe_pruned_layout) if self.moe_pruned_layout else {}

    def is_moe_layer(self, index: int) -> bool:
        return self.moe_freq > 0 and (index + 1) % self.moe_freq == 0

    def validate(self):
        problems = []
        if self.moe_expert_count < 1:
            problems.append(f"--moe-expert-count must be >= 1, got {self.moe_expert_count}")
        if not 1 <= self.moe_top_k <= self.moe_expert_count:
            problems.append(f"--moe-top-k must be between 1 and --moe-expert-count "
                            f"({self.moe_expert_count}), got {self.moe_top_k}")
        if self.moe_freq < 0:
            problems.append(f"--moe-freq must be >= 0, got {self.moe_freq}")
        if problems:
            raise ValueError("; ".join(problems))
