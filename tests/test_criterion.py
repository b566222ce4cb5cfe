"""The criterion's loss value and logged metrics, recomputed by hand on a small batch."""

import math

import pytest
import torch

from conftest import build_task_and_model, first_batch


def test_loss_is_label_smoothed_ce_plus_weighted_mean_router_losses(tiny_data):
    from fairseq import metrics
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    from fairseq_taskmoe.integration.criterion import MoELabelSmoothedCrossEntropy

    args, task, model = build_task_and_model(
        tiny_data, ["--encoder-moe-routing", "token", "--decoder-moe-routing", "target"])
    model.eval()  # no dropout: two forward passes give the same values
    crit = MoELabelSmoothedCrossEntropy(task, sentence_avg=False, label_smoothing=0.1,
                                        moe_gate_loss_wt=0.5, moe_z_loss_wt=0.25)
    sample = first_batch(task, max_tokens=120)
    with torch.no_grad():
        loss, sample_size, log = crit(model, sample)
        net_output = model(**sample["net_input"])
    lprobs = model.get_normalized_probs(net_output, log_probs=True)
    lprobs = lprobs.view(-1, lprobs.size(-1))
    target = sample["target"].view(-1)
    ce, nll = label_smoothed_nll_loss(lprobs, target, 0.1,
                                      ignore_index=task.target_dictionary.pad())
    stats = dict(net_output[1]["moe_stats"])
    balance = sum(float(s.balance_loss) for s in stats.values()) / len(stats)
    z = sum(float(s.z_loss) for s in stats.values()) / len(stats)
    ntokens = int(target.ne(task.target_dictionary.pad()).sum())
    assert sample_size == ntokens == sample["ntokens"]
    assert float(loss) == pytest.approx(float(ce) + ntokens * (0.5 * balance + 0.25 * z),
                                        rel=1e-5)
    assert float(log["moe_balance_loss"]) == pytest.approx(balance, rel=1e-6)
    assert float(log["moe_z_loss"]) == pytest.approx(z, rel=1e-6)
    assert float(log["nll_loss"]) == pytest.approx(float(nll), rel=1e-6)
    assert set(stats) == {"enc1", "dec1"}
    # per-layer usage: busiest expert's share of the kept assignments, overflow share
    with metrics.aggregate() as agg:
        MoELabelSmoothedCrossEntropy.reduce_metrics([log, log])
    values = agg.get_smoothed_values()
    for name, s in stats.items():
        want = float(s.expert_counts.max()) / float(s.expert_counts.sum())
        assert values[f"moe_top_share_{name}"] == pytest.approx(want, abs=1e-3)
        assert values[f"moe_overflow_{name}"] == 0  # eval: dropless
    assert values["moe_balance_loss"] == pytest.approx(balance, abs=1e-4)
    assert values["loss"] == pytest.approx(float(loss) / ntokens / math.log(2), abs=1e-3)
