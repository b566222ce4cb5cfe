"""moe_label_smoothed_cross_entropy: label-smoothed CE + weighted router losses, with per-layer
expert-usage metrics in fairseq's normal logs.

loss = CE_sum + sample_size * (moe_gate_loss_wt * mean_layers(balance) + moe_z_loss_wt *
mean_layers(z)). The router losses are averaged over MoE layers (so the weight does not depend on
the depth) and scaled by sample_size so that, after fairseq divides the summed loss by
sample_size, their weight is exactly the flag's value.

Logged per MoE layer L (e.g. enc1, dec3): moe_top_share_L, the share of assignments taken by the
busiest expert (1/E is perfect balance, 1.0 total collapse), and moe_overflow_L, the share of
assignments dropped by the capacity limit (token routing in training only; 0 otherwise).
"""

from dataclasses import dataclass, field

import torch
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

CRITERION_NAME = "moe_label_smoothed_cross_entropy"


@dataclass
class MoELabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    moe_gate_loss_wt: float = field(
        default=0.01,
        metadata={"help": "weight of the GShard load-balancing loss (averaged over MoE layers)"},
    )
    moe_z_loss_wt: float = field(
        default=0.0,
        metadata={"help": "weight of the router z-loss (averaged over MoE layers); 0 disables"},
    )


@register_criterion(CRITERION_NAME, dataclass=MoELabelSmoothedCrossEntropyConfig)
class MoELabelSmoothedCrossEntropy(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, moe_gate_loss_wt=0.01,
                 moe_z_loss_wt=0.0, ignore_prefix_size=0, report_accuracy=False):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.gate_loss_wt = moe_gate_loss_wt
        self.z_loss_wt = moe_z_loss_wt

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        layer_stats = net_output[1].get("moe_stats", [])
        if layer_stats:
            balance = torch.stack([s.balance_loss for _, s in layer_stats]).mean()
            z_loss = torch.stack([s.z_loss for _, s in layer_stats]).mean()
            loss = loss + sample_size * (self.gate_loss_wt * balance + self.z_loss_wt * z_loss)
            logging_output.update(moe_balance_loss=balance.data, moe_z_loss=z_loss.data,
                                  moe_batches=1)
            for name, s in layer_stats:
                logging_output[f"moe_assign_{name}"] = s.assignments
                logging_output[f"moe_busiest_{name}"] = s.expert_counts.max().data
                logging_output[f"moe_dropped_{name}"] = s.dropped.data
        logging_output["loss"] = loss.data
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)

        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        batches = total("moe_batches")
        if batches == 0:
            return
        metrics.log_scalar("moe_balance_loss", total("moe_balance_loss") / batches, batches,
                           round=4)
        metrics.log_scalar("moe_z_loss", total("moe_z_loss") / batches, batches, round=4)
        layers = sorted({k[len("moe_assign_"):] for log in logging_outputs for k in log
                         if k.startswith("moe_assign_")})
        for name in layers:
            assignments = total(f"moe_assign_{name}")
            if assignments == 0:
                continue
            kept = assignments - total(f"moe_dropped_{name}")
            metrics.log_scalar(f"moe_top_share_{name}",
                               total(f"moe_busiest_{name}") / max(kept, 1), assignments, round=3)
            metrics.log_scalar(f"moe_overflow_{name}", total(f"moe_dropped_{name}") / assignments,
                               assignments, round=4)
