import argparse
import itertools

import pytest
import torch

from conftest import ROUTINGS, build_task_and_model, first_batch
from fairseq_taskmoe.deploy.pruning import PruningError, parse_pairs, prune_checkpoint

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


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("merge", [True, False])
def test_pruning_is_exact_for_every_top_k_and_merge_mode(tiny_data, k, merge):
    """k=1 unmerged once took the single-FFN shortcut and dropped the frozen gate weight."""
    args, task, model = build_task_and_model(
        tiny_data, ["--moe-top-k", str(k), "--moe-expert-ffn-dim", "24",
                    "--encoder-moe-routing", "lang_pair", "--decoder-moe-routing", "target"])
    model.eval()
    state = checkpoint_of(args, model)
    for pair in ("en-de", "de-en"):
        pruned_state, report = prune_checkpoint(state, pair, merge=merge)
        small = pruned_model(task, pruned_state)
        for layer in report.layers:
            assert layer.form == ("merged" if merge else "unmerged")
            assert layer.ffn_dims == ([24 * k] if merge else [24] * k)
        net = pair_batch(task, pair)
        with torch.no_grad():
            torch.testing.assert_close(small(**net)[0], model(**net)[0], rtol=1e-5, atol=1e-5)


def _ffn_params(state, layer):
    prefix = f"{layer}.ffn.experts."
    return sum(v.numel() for k, v in state["model"].items() if k.startswith(prefix))


def test_multi_task_prune_is_never_larger_than_the_unmerged_union(tiny_data):
    """Merging gives every distinct route its own FFN; with tasks that share experts that can
    exceed the union of the experts they use: then the layer stays unmerged."""
    args, task, model = build_task_and_model(
        tiny_data, ["--encoder-moe-routing", "lang_pair", "--decoder-moe-routing", "lang_pair",
                    "--moe-expert-count", "4"])
    model.eval()
    state = checkpoint_of(args, model)
    pairs = "en-de,de-en,en-fr"
    merged_state, report = prune_checkpoint(state, pairs)
    union_state, _ = prune_checkpoint(state, pairs, merge=False)
    expert_size = sum(v.numel() for k, v in state["model"].items()
                      if k.startswith("encoder.layers.1.ffn.experts.experts.0."))
    for layer in report.layers:
        union = {e for picks in layer.kept.values() for e, _ in picks}
        assert _ffn_params(merged_state, layer.name) <= len(union) * expert_size
        assert _ffn_params(merged_state, layer.name) <= _ffn_params(union_state, layer.name)
        distinct = {tuple(e for e, _ in picks) for picks in layer.kept.values()}
        if len(distinct) * 2 > len(union):  # 2 experts per merged route
            assert layer.form == "unmerged" and "distinct routes would hold" in layer.why
    small = pruned_model(task, merged_state)
    with torch.no_grad():
        for pair in pairs.split(","):
            net = pair_batch(task, pair)
            torch.testing.assert_close(small(**net)[0], model(**net)[0], rtol=1e-5, atol=1e-5)


def test_tasks_routed_alike_share_one_merged_ffn(tiny_data):
    args, task, model = build_task_and_model(tiny_data)  # target / target
    state = checkpoint_of(args, model)
    pruned_state, report = prune_checkpoint(state, "en-de,fr-de")  # both route by target de
    assert all(layer.ffn_dims == [layer.ffn_dims[0]] for layer in report.layers)


def _with_trained_pairs(state, pairs):
    state = dict(state)
    state["cfg"] = dict(state["cfg"], task=argparse.Namespace(lang_pairs=pairs))
    return state


def test_untrained_routes_are_refused_unless_accepted(tiny_data):
    args, task, model = build_task_and_model(
        tiny_data, ["--encoder-moe-routing", "lang_pair", "--decoder-moe-routing", "target",
                    "--moe-unseen-pairs", "own_row"])
    state = _with_trained_pairs(checkpoint_of(args, model), "en-de,de-en,en-fr")
    with pytest.raises(PruningError, match=r"fr-de \(lang_pair routing: pair never trained\)"):
        prune_checkpoint(state, "*-de")  # en-de trained, fr-de zero-shot
    _, report = prune_checkpoint(state, "*-de", allow_untrained=True)
    assert any("fr-de" in w for w in report.warnings)
    _, report = prune_checkpoint(state, "en-de")
    assert report.warnings == []
    # target routing: a target language that was never a training target
    args, task, model = build_task_and_model(tiny_data)
    state = _with_trained_pairs(checkpoint_of(args, model), ["en-de", "de-en"])
    with pytest.raises(PruningError, match="fr was never a training target"):
        prune_checkpoint(state, "en-fr")
    prune_checkpoint(state, "fr-de")  # zero-shot pair, but its target's route was trained


def test_served_pairs_come_from_task_routed_layers_only(tiny_data):
    """token encoder / target decoder pruned for en-de serves every source into de: the token
    layers are kept whole."""
    from fairseq_taskmoe.integration.task import check_pruned_serves
    from tiny_data import LANGS

    args, task, model = build_task_and_model(
        tiny_data, ["--encoder-moe-routing", "token", "--decoder-moe-routing", "target"])
    model.eval()
    pruned_state, report = prune_checkpoint(checkpoint_of(args, model), "en-de")
    assert report.served_pairs == ["*-de"]
    check_pruned_serves(pruned_state["cfg"]["model"], "fr", "de")  # no error
    small = pruned_model(task, pruned_state)
    net = pair_batch(task, "en-de")
    net["src_lang_idx"] = torch.full_like(net["src_lang_idx"], LANGS.index("fr"))  # as fr-de
    with torch.no_grad():
        torch.testing.assert_close(small(**net)[0], model(**net)[0], rtol=1e-5, atol=1e-5)


def test_ema_weights_are_not_copied_unpruned(tiny_data):
    args, task, model = build_task_and_model(tiny_data)
    state = checkpoint_of(args, model)
    state["extra_state"] = {"ema": dict(model.state_dict()), "best": 1.0}
    pruned_state, report = prune_checkpoint(state, "en-de")
    assert "ema" not in pruned_state["extra_state"] and pruned_state["extra_state"]["best"] == 1.0
    assert any("EMA" in w for w in report.warnings)


def test_zero_shot_pairs_routed_by_their_target_prune_exactly(tiny_data):
    """Default --moe-unseen-pairs target_mean: zero-shot fr-de is routed by the trained pairs
    into de (here en-de alone), in the model and in the pruned checkpoint alike."""
    from tiny_data import LANGS

    args, task, model = build_task_and_model(
        tiny_data, ["--encoder-moe-routing", "lang_pair", "--decoder-moe-routing", "lang_pair"])
    model.eval()
    state = _with_trained_pairs(checkpoint_of(args, model), "en-de,de-en,en-fr")
    pruned_state, report = prune_checkpoint(state, "fr-de")
    assert report.warnings == []
    en_de = report.layers[0].kept["fr-de"]
    assert en_de == prune_checkpoint(state, "en-de")[1].layers[0].kept["en-de"]
    net = pair_batch(task, "en-de")
    net["src_lang_idx"] = torch.full_like(net["src_lang_idx"], LANGS.index("fr"))
    with torch.no_grad():
        torch.testing.assert_close(pruned_model(task, pruned_state)(**net)[0], model(**net)[0],
                                   rtol=1e-5, atol=1e-5)
