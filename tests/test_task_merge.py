"""Inference of task-routed layers through per-task merged FFNs (task_merge.py)."""

import pytest
import torch

from conftest import build_task_and_model, first_batch
from test_pruning import checkpoint_of, pair_batch, pruned_model
from fairseq_taskmoe.deploy.pruning import prune_checkpoint
from fairseq_taskmoe.moe.moe_layer import MoELayer


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


def _fairseq_optimizer(args, model, fp16: bool):
    """fairseq's own optimizer classes, as fairseq-train builds them: its Adam (CPU) writes
    weights through p.data, the fp16 optimizer copies fp32 masters into the fp16 model the same
    way; neither bumps a tensor's version counter."""
    from fairseq import optim
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    cfg = convert_namespace_to_omegaconf(args)
    params = [p for p in model.parameters() if p.requires_grad]
    if fp16:
        return optim.FP16Optimizer.build_optimizer(cfg, params)
    return optim.build_optimizer(cfg.optimizer, params)


@pytest.mark.parametrize("fp16", [False, True])
def test_merged_ffns_follow_fairseq_optimizer_steps(tiny_data, fp16):
    """Validation after training steps computes with the new weights (issue 19.1: every
    validation after the first used the experts and routes of the first)."""
    flags = ["--optimizer", "adam", "--lr", "0.05", "--encoder-moe-routing", "target",
             "--decoder-moe-routing", "lang_pair"]
    if fp16:
        flags += ["--fp16", "--fp16-no-flatten-grads", "--fp16-init-scale", "1"]
    args, task, model = build_task_and_model(tiny_data, flags)
    if fp16:
        model = model.half()
    optimizer = _fairseq_optimizer(args, model, fp16)
    net = pair_batch(task, "en-de")
    train_net = first_batch(task, split="train", max_tokens=10000)["net_input"]
    for step in range(3):
        model.eval()  # what fairseq's valid_step does, then its forward under no_grad
        with torch.no_grad():
            merged = model(**net)[0]
        assert any(len(layer.merged) for layer in moe_layers(model))
        with torch.enable_grad():  # the dispatch path reads the weights as they are now
            reference = model(**net)[0].detach()
        torch.testing.assert_close(merged, reference, rtol=1e-2 if fp16 else 1e-5,
                                   atol=1e-2 if fp16 else 1e-5, msg=f"step {step}")
        model.train()  # fairseq's train_step
        assert all(len(layer.merged) == 0 for layer in moe_layers(model))
        optimizer.zero_grad()
        out = model(**train_net)[0]
        optimizer.backward(out.float().logsumexp(-1).mean())
        optimizer.step()


def test_merged_ffn_cache_is_bounded(tiny_data):
    """lang_pair routing has P = L^2 task ids: the cache keeps at most E // k merged FFNs per
    layer (the layer's expert weights once over), or the tasks of the batch at hand."""
    _, task, model = build_task_and_model(
        tiny_data, ["--encoder-moe-routing", "lang_pair", "--decoder-moe-routing", "lang_pair"])
    model.eval()
    layers = moe_layers(model)
    limit = len(layers[0].experts) // layers[0].router.top_k
    batch = first_batch(task, max_tokens=10000)["net_input"]
    tasks = (batch["src_lang_idx"] * 10 + batch["tgt_lang_idx"]).unique().numel()
    assert tasks > limit  # the tiny data has more pairs than the bound
    with torch.no_grad():
        model(**batch)
        assert all(len(layer.merged) == tasks for layer in layers)  # a mixed batch keeps its own
        before = model(**batch)[0]  # all hits: nothing rebuilt
        unseen = dict(pair_batch(task, "en-de"))
        unseen["src_lang_idx"] = unseen["tgt_lang_idx"]  # de-de: a task id not in `batch`
        model(**unseen)  # one new task evicts the others down to the bound
        assert all(len(layer.merged) <= limit for layer in layers)
        torch.testing.assert_close(model(**batch)[0], before, rtol=0, atol=0)
