"""Inference of task-routed layers through per-task merged FFNs (task_merge.py)."""

import pytest
import torch

from conftest import build_task_and_model, first_batch
from test_pruning import checkpoint_of, pair_batch, pruned_model
from fairseq_taskmoe.moe_layer import MoELayer
from fairseq_taskmoe.pruning import prune_checkpoint


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def forward_both_ways(model, net):
    """(merged inference, dispatch path) outputs and stats of the same eval-mode forward."""
    model.eval()
    with torch.no_grad():
        merged = model(**net)
    with torch.enable_grad():  # autograd on: the merged shortcut is off
        dispatched = model(**net)
    return merged, dispatched


@pytest.mark.parametrize("enc,dec", [("target", "target"), ("lang_pair", "token"),
                                     ("sentence", "lang_pair")])
def test_merged_inference_equals_dispatch_on_mixed_batches(tiny_data, enc, dec):
    _, task, model = build_task_and_model(
        tiny_data, ["--encoder-moe-routing", enc, "--decoder-moe-routing", dec])
    net = first_batch(task, max_tokens=10000)["net_input"]  # every pair, left-padded rows
    assert net["tgt_lang_idx"].unique().numel() > 1
    (m_out, m_extra), (d_out, d_extra) = forward_both_ways(model, net)
    torch.testing.assert_close(m_out, d_out.detach(), rtol=1e-5, atol=1e-5)
    assert any(layer.merged is not None and layer.merged._ffns for layer in moe_layers(model))
    for (name, a), (_, b) in zip(m_extra["moe_stats"], d_extra["moe_stats"]):
        assert torch.equal(a.expert_counts, b.expert_counts), name
        assert torch.equal(a.counts_by_pair, b.counts_by_pair), name
        torch.testing.assert_close(a.balance_loss, b.balance_loss.detach())


def test_full_model_inference_is_bitwise_the_pruned_model(tiny_data):
    args, task, model = build_task_and_model(tiny_data)  # target / target
    model.eval()
    small = pruned_model(task, prune_checkpoint(checkpoint_of(args, model), "en-de")[0])
    net = pair_batch(task, "en-de")
    with torch.no_grad():
        assert torch.equal(model(**net)[0], small(**net)[0])


def test_merged_ffns_follow_weight_updates(tiny_data):
    _, task, model = build_task_and_model(tiny_data)
    net = pair_batch(task, "en-de")
    forward_both_ways(model, net)  # fills the caches
    with torch.no_grad():  # an in-place update, as an optimizer step makes
        for layer in moe_layers(model):
            for expert in layer.experts.experts:
                expert.fc2.bias.add_(0.5)
            layer.router.wg.weight.mul_(-1.0)  # and a new route
    (m_out, _), (d_out, _) = forward_both_ways(model, net)
    torch.testing.assert_close(m_out, d_out.detach(), rtol=1e-5, atol=1e-5)
    _, _, other = build_task_and_model(tiny_data, seed=3)
    model.load_state_dict(other.state_dict())
    (m_out, _), (d_out, _) = forward_both_ways(model, net)
    torch.testing.assert_close(m_out, d_out.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(**net)[0], other.eval()(**net)[0], rtol=0, atol=0)


def test_training_and_autograd_never_use_the_merged_ffns(tiny_data):
    _, task, model = build_task_and_model(tiny_data)
    net = pair_batch(task, "en-de")
    model.train()
    with torch.no_grad():
        model(**net)
    model.eval()
    model(**net)[0].sum().backward()  # eval with autograd: gradients reach the experts
    assert all(not layer.merged._ffns for layer in moe_layers(model))
    grads = [e.fc1.weight.grad for layer in moe_layers(model) for e in layer.experts.experts]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
