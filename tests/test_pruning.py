import argparse
import itertools

import pytest
import torch

from conftest import ROUTINGS, build_task_and_model, first_batch
from fairseq_taskmoe.pruning import PruningError, parse_pairs, prune_checkpoint

TASK_KINDS = ("target", "lang_pair")
COMBOS = [(e, d) for e, d in itertools.product(ROUTINGS, ROUTINGS)
          if e in TASK_KINDS or d in TASK_KINDS]


def checkpoint_of(args, model):
    return {"cfg": {"model": argparse.Namespace(**vars(args))}, "model": model.state_dict(),
            "optimizer_history": [], "extra_state": {}, "last_optimizer_state": {"big": 1}}


def pruned_model(task, state):
    model = task.build_model(state["cfg"]["model"])
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


def pair_batch(task, pair):
    """The valid batch restricted to rows of one language pair."""
    from tiny_data import LANGS
    batch = first_batch(task, max_tokens=10000)
    net = batch["net_input"]
    src, tgt = (LANGS.index(l) for l in pair.split("-"))
    rows = (net["src_lang_idx"] == src) & (net["tgt_lang_idx"] == tgt)
    assert rows.any()
    return {k: v[rows] for k, v in net.items()}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("enc,dec", COMBOS)
def test_pruned_logits_equal_full_logits_for_every_task(tiny_data, enc, dec):
    args, task, model = build_task_and_model(
        tiny_data, ["--encoder-moe-routing", enc, "--decoder-moe-routing", dec])
    model.eval()
    state = checkpoint_of(args, model)
    for pair in ("en-de", "de-en", "en-fr"):
        net = pair_batch(task, pair)
        with torch.no_grad():
            want = model(**net)[0]
            for merge in (True, False):
                pruned_state, report = prune_checkpoint(state, pair, merge=merge)
                small = pruned_model(task, pruned_state)
                torch.testing.assert_close(small(**net)[0], want, rtol=1e-5, atol=1e-5)
                assert n_params(small) < n_params(model)
                assert report.params_after < report.params_before


def test_merged_and_unmerged_agree_and_merged_is_one_ffn(tiny_data):
    args, task, model = build_task_and_model(tiny_data)  # target / target
    state = checkpoint_of(args, model)
    merged, _ = prune_checkpoint(state, "en-de", merge=True)
    unmerged, _ = prune_checkpoint(state, "en-de", merge=False)
    a, b = pruned_model(task, merged), pruned_model(task, unmerged)
    assert len(a.encoder.layers[1].ffn.experts) == 1
    assert len(b.encoder.layers[1].ffn.experts) == 2
    net = pair_batch(task, "en-de")
    with torch.no_grad():
        torch.testing.assert_close(a(**net)[0], b(**net)[0], rtol=1e-5, atol=1e-5)
    assert merged["last_optimizer_state"] is None
    _, report = prune_checkpoint(state, "en-de")
    assert report.params_before == n_params(model)  # tied embeddings counted once
    assert report.params_after == n_params(a)


def test_several_tasks_keep_the_union_and_stay_exact(tiny_data):
    args, task, model = build_task_and_model(
        tiny_data, ["--encoder-moe-routing", "lang_pair", "--decoder-moe-routing", "target"])
    model.eval()
    state = checkpoint_of(args, model)
    pruned_state, report = prune_checkpoint(state, "en-de,en-fr")
    assert report.served_pairs == ["en-de", "en-fr"]
    small = pruned_model(task, pruned_state)
    with torch.no_grad():
        for pair in ("en-de", "en-fr"):
            net = pair_batch(task, pair)
            torch.testing.assert_close(small(**net)[0], model(**net)[0], rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="serves only en-de, en-fr"):
            small(**pair_batch(task, "de-en"))


def test_target_routing_serves_every_source(tiny_data):
    args, task, model = build_task_and_model(tiny_data)
    _, report = prune_checkpoint(checkpoint_of(args, model), "en-de")
    assert report.served_pairs == ["*-de"]


def test_bad_requests_name_the_problem(tiny_data):
    args, task, model = build_task_and_model(tiny_data)
    state = checkpoint_of(args, model)
    with pytest.raises(PruningError, match="unknown language 'xx'.*en, de, fr"):
        prune_checkpoint(state, "en-xx")
    with pytest.raises(PruningError, match="SRC-TGT"):
        prune_checkpoint(state, "ende")
    pruned_state, _ = prune_checkpoint(state, "en-de")
    with pytest.raises(PruningError, match="already pruned"):
        prune_checkpoint(pruned_state, "en-de")
    with pytest.raises(PruningError, match="not a task-MoE checkpoint"):
        prune_checkpoint({"cfg": {"model": argparse.Namespace(arch="transformer")},
                          "model": {}}, "en-de")
    args2, _, model2 = build_task_and_model(
        tiny_data, ["--encoder-moe-routing", "token", "--decoder-moe-routing", "sentence"])
    with pytest.raises(PruningError, match="nothing to prune"):
        prune_checkpoint(checkpoint_of(args2, model2), "en-de")


def test_parse_pairs():
    assert parse_pairs("*-de", ["en", "de", "fr"]) == [("en", "de"), ("fr", "de")]
    assert parse_pairs("en-de, en-de,fr-de", ["en", "de", "fr"]) == [("en", "de"), ("fr", "de")]
