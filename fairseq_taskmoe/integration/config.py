"""MoE options of the task_moe architecture, in one dataclass: fairseq turns each field into a
command-line flag (`moe_top_k` -> `--moe-top-k`) with its help text."""

import json
from dataclasses import dataclass, field, fields
from typing import Dict, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..moe.routing import ROUTING_KINDS, UNSEEN_PAIR_POLICIES, unseen_pair_mixing

MODEL_NAME = "task_moe_transformer"  # the registered fairseq model; archs task_moe*
RoutingChoice = ChoiceEnum(list(ROUTING_KINDS))
BalanceScopeChoice = ChoiceEnum(["tokens", "tasks"])
UnseenPairChoice = ChoiceEnum(list(UNSEEN_PAIR_POLICIES))
ExpertParallelChoice = ChoiceEnum(["auto", "off"])


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
    moe_expert_parallel: ExpertParallelChoice = field(
        default="auto",
        metadata={"help": "auto: with world size W > 1 (--distributed-world-size) each rank "
                  "holds E/W experts of every MoE layer and tokens travel to their expert's "
                  "rank by all-to-all (needs --ddp-backend legacy_ddp and --moe-expert-count "
                  "divisible by W; checkpoints are written per rank, see taskmoe-consolidate); "
                  "off: every rank holds all experts (data parallelism over replicated experts). "
                  "Only the model fairseq-train builds with --task translation_task_moe is "
                  "sharded: a model loaded from a checkpoint (generation, validation, the hub "
                  "interface) holds all experts in any process group"},
    )
    moe_record_a2a_time: bool = field(
        default=False,
        metadata={"help": "with sharded experts, log a2a_share: the share of the training step "
                  "spent in expert all-to-all (rank 0's), and a2a_ms per step; on GPUs this "
                  "synchronizes the device around each all-to-all (slower)"},
    )
    moe_balance_scope: BalanceScopeChoice = field(
        default="tasks",
        metadata={"help": "what the load-balancing loss (--moe-gate-loss-wt) counts in "
                  "task-routed layers: tasks (default: each task present in the batch once) or "
                  "tokens (GShard: each token of the batch once, so tasks weigh by their token "
                  "counts, which flattens each task's gate row a little more: top-1 gate weight "
                  "0.56 against 0.59, at equal BLEU within seed noise for target / target "
                  "routing in docs/results.md). Token and sentence layers always count tokens"},
    )
    moe_unseen_pairs: UnseenPairChoice = field(
        default="target_mean",
        metadata={"help": "lang_pair routing of a pair never trained (zero-shot), whose own gate "
                  "row keeps its random initialisation: target_mean routes it by the mean "
                  "logits of the trained pairs into the same target language; own_row reads its "
                  "own (untrained) row. Can be changed at generation with --model-overrides"},
    )
    moe_trained_pairs: Optional[str] = field(
        default=None,
        metadata={"help": "set automatically: the task's --lang-pairs at training time "
                  "(do not set by hand)"},
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

    @property
    def trained_pairs(self):
        """[(src index, tgt index)] of the training --lang-pairs, [] when not recorded."""
        if not self.moe_trained_pairs:
            return []
        langs = self.langs
        pairs = [p.split("-") for p in self.moe_trained_pairs.split(",")]
        return [(langs.index(s), langs.index(t)) for s, t in pairs
                if s in langs and t in langs]

    def pair_mixing(self):
        """How lang_pair gates read their rows (routing.unseen_pair_mixing)."""
        return unseen_pair_mixing(len(self.langs), self.trained_pairs, self.moe_unseen_pairs)

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
