import itertools

import pytest
import torch

from conftest import ROUTINGS, build_task_and_model, first_batch
from tiny_data import LANGS


@pytest.mark.parametrize("enc,dec", [(r, r) for r in ROUTINGS] + [("token", "target")])
def test_incremental_decoding_equals_full_decoding(tiny_data, enc, dec):
    args, task, model = build_task_and_model(
        tiny_data, ["--encoder-moe-routing", enc, "--decoder-moe-routing", dec])
    model.eval()
    batch = first_batch(task)
    net = batch["net_input"]
    with torch.no_grad():
        full, _ = model(**net)  # [B, T, V]
        encoder_out = model.encoder(net["src_tokens"], net["src_lengths"],
                                    src_lang_idx=net["src_lang_idx"],
                                    tgt_lang_idx=net["tgt_lang_idx"])
        state = {}
        prev = net["prev_output_tokens"]
        steps = [model.decoder(prev[:, : t + 1], encoder_out, incremental_state=state)[0]
                 for t in range(prev.size(1))]
    incremental = torch.cat(steps, dim=1)
    real = prev.ne(task.target_dictionary.pad())  # right-padded targets: compare real positions
    torch.testing.assert_close(incremental[real], full[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", ["train", "valid"])  # sampled mixture / concatenation
def test_batches_carry_per_row_language_ids(tiny_data, split):
    args, task, model = build_task_and_model(tiny_data)
    task.load_dataset(split)
    itr = task.get_batch_iterator(task.dataset(split), max_tokens=10000, seed=1)
    batch = next(itr.next_epoch_itr(shuffle=False))
    net, d = batch["net_input"], task.source_dictionary
    pairs = set()
    for row in range(net["src_tokens"].size(0)):
        src_words = [d[i] for i in net["src_tokens"][row] if i != d.pad()]
        tgt_words = [d[i] for i in batch["target"][row] if i not in (d.pad(), d.eos())]
        src, tgt = LANGS[net["src_lang_idx"][row]], LANGS[net["tgt_lang_idx"][row]]
        assert src_words[0] == f"__{tgt}__"  # --encoder-langtok tgt
        assert src_words[1][0] == src[0] and tgt_words[1][0] == tgt[0]  # e7/d7/f7 vocabulary
        pairs.add((src, tgt))
    assert len(pairs) == 3, "the batch mixes all three pairs"


def test_beam_search_keeps_per_row_task_ids(tiny_data):
    args, task, model = build_task_and_model(tiny_data, ["--encoder-moe-routing", "lang_pair"])
    model.eval()
    net = first_batch(task)["net_input"]
    enc = model.encoder(**{k: v for k, v in net.items() if k != "prev_output_tokens"})
    order = torch.arange(net["src_tokens"].size(0)).flip(0).repeat_interleave(2)
    re = model.encoder.reorder_encoder_out(enc, order)
    ids = re["task_ids"][0]
    assert torch.equal(ids.src_lang, net["src_lang_idx"][order])
    assert torch.equal(ids.tgt_lang, net["tgt_lang_idx"][order])


def test_generation_routes_each_row_by_its_own_task(tiny_data):
    """A mixed batch generated at once equals each row generated alone (beam search)."""
    args, task, model = build_task_and_model(tiny_data, ["--decoder-moe-routing", "lang_pair"])
    model.eval()
    batch = first_batch(task, max_tokens=200)
    from fairseq.sequence_generator import SequenceGenerator
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=4, max_len_b=10)
    with torch.no_grad():
        together = gen.generate([model], batch)
        for row in range(batch["net_input"]["src_tokens"].size(0)):
            alone = {"net_input": {k: v[row : row + 1] for k, v in batch["net_input"].items()}}
            hyp = gen.generate([model], alone)[0][0]
            torch.testing.assert_close(hyp["score"], together[row][0]["score"], rtol=1e-4,
                                       atol=1e-4)
            assert torch.equal(hyp["tokens"], together[row][0]["tokens"])


def test_moe_layers_every_other_layer_and_stats(tiny_data):
    args, task, model = build_task_and_model(tiny_data, ["--encoder-layers", "4"])
    from fairseq_taskmoe.moe.moe_layer import MoELayer
    moe = [i for i, l in enumerate(model.encoder.layers) if isinstance(l.ffn, MoELayer)]
    assert moe == [1, 3]
    batch = first_batch(task)
    _, extra = model(**batch["net_input"])
    names = [n for n, _ in extra["moe_stats"]]
    assert names == ["enc1", "enc3", "dec1"]
    stats = dict(extra["moe_stats"])["enc1"]
    non_pad = int(batch["net_input"]["src_tokens"].ne(task.source_dictionary.pad()).sum())
    assert stats.assignments == non_pad * 2  # pads never routed, top-2
    assert int(stats.counts_by_pair.sum()) == non_pad * 2


def test_routing_needing_ids_is_refused_without_them(tiny_data):
    from fairseq import options, tasks
    from conftest import parse_train_args
    args = parse_train_args(tiny_data)
    args.task = "translation_multi_simple_epoch"
    task = tasks.setup_task(args)
    with pytest.raises(ValueError, match="translation_task_moe"):
        task.build_model(args)


def test_task_refuses_a_model_that_cannot_take_language_ids(tiny_data):
    with pytest.raises(ValueError, match="--moe-freq 0 for a dense baseline"):
        build_task_and_model(tiny_data, ["--arch", "transformer_tiny",
                                         "--criterion", "label_smoothed_cross_entropy"])


def test_dense_baseline_through_the_same_code(tiny_data):
    from fairseq_taskmoe.moe.moe_layer import MoELayer
    args, task, model = build_task_and_model(tiny_data, ["--moe-freq", "0"])
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    _, extra = model(**first_batch(task)["net_input"])
    assert extra["moe_stats"] == []


def test_unsupported_transformer_options_are_refused(tiny_data):
    with pytest.raises(ValueError, match="--encoder-layerdrop"):
        build_task_and_model(tiny_data, ["--encoder-layerdrop", "0.1"])


def test_language_list_must_match_the_one_trained_with(tiny_data):
    args, task, model = build_task_and_model(tiny_data)
    assert args.moe_langs == "en,de,fr"  # recorded in the checkpoint's model args
    from fairseq import tasks
    from conftest import parse_train_args
    other = parse_train_args(tiny_data)
    other.langs = ["de", "en", "fr"]
    with pytest.raises(ValueError, match="trained with --langs en,de,fr"):
        tasks.setup_task(other).build_model(args)


def test_langs_are_required(tiny_data):
    from fairseq import tasks
    from conftest import parse_train_args
    args = parse_train_args(tiny_data)
    args.langs = None
    with pytest.raises(ValueError, match="--langs"):
        tasks.setup_task(args)


def test_reordered_langs_are_refused_when_loading_weights(tiny_data):
    """Resume / fine-tune build the model from the new --langs, then load the state dict: the
    language list stored in it must match, or the gate rows would be silently permuted."""
    args, task, model = build_task_and_model(tiny_data)
    state = model.state_dict()
    assert state["_extra_state"] == {"moe_langs": "en,de,fr"}
    _, _, other = build_task_and_model(tiny_data, ["--langs", "de,en,fr"])
    with pytest.raises(ValueError, match="trained with --langs en,de,fr.*Pass --langs en,de,fr"):
        other.load_state_dict(state, strict=True)
    _, _, same = build_task_and_model(tiny_data)
    same.load_state_dict(state, strict=True)
    legacy = {k: v for k, v in state.items() if k != "_extra_state"}  # older checkpoints
    same.load_state_dict(legacy, strict=True)


def test_moe_transformer_is_the_same_model(tiny_data):
    from fairseq_taskmoe.moe.moe_layer import MoELayer
    args, task, model = build_task_and_model(
        tiny_data, ["--arch", "moe_transformer", "--encoder-layers", "2", "--decoder-layers", "2",
                    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
                    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
                    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"])
    assert type(model).__name__ == "TaskMoETransformerModel"
    assert isinstance(model.encoder.layers[1].ffn, MoELayer)


def _without_ids(net):
    return {k: v for k, v in net.items() if k not in ("src_lang_idx", "tgt_lang_idx")}


def test_ids_are_read_from_language_tags_when_the_batch_has_none(tiny_data):
    """A mixed batch without per-row ids: target ids come from the source tag
    (--encoder-langtok tgt), per row and pad-aware (sources are left-padded)."""
    args, task, model = build_task_and_model(tiny_data)  # target / target
    model.eval()
    net = first_batch(task)["net_input"]
    assert len(set(net["tgt_lang_idx"].tolist())) == 3, "a batch mixing target languages"
    assert net["src_tokens"].eq(task.source_dictionary.pad()).any(), "with left padding"
    ids = model.encoder.task_ids(net["src_tokens"], None, None)
    assert torch.equal(ids.tgt_lang, net["tgt_lang_idx"]) and ids.src_lang is None
    with torch.no_grad():
        torch.testing.assert_close(model(**_without_ids(net))[0], model(**net)[0])
    # lang_pair routing needs the source language, which a target tag cannot give
    _, _, pair_model = build_task_and_model(tiny_data, ["--encoder-moe-routing", "lang_pair"])
    with pytest.raises(RuntimeError, match="needs each row's source language"):
        pair_model.eval()(**_without_ids(net))


def test_ids_from_source_and_decoder_tags(tiny_data):
    """--encoder-langtok src --decoder-langtok: the source tag names the source language and
    the decoder's prefix the target; a full forward pass reads both."""
    args, task, model = build_task_and_model(
        tiny_data, ["--encoder-langtok", "src", "--encoder-moe-routing", "lang_pair",
                    "--decoder-moe-routing", "lang_pair"])
    model.eval()
    batch = first_batch(task)
    net = batch["net_input"]
    with torch.no_grad():
        torch.testing.assert_close(model(**_without_ids(net))[0], model(**net)[0])
    broken = _without_ids(net)
    broken["src_tokens"] = net["src_tokens"].clone()
    first = broken["src_tokens"].ne(task.source_dictionary.pad()).int().argmax(1)
    broken["src_tokens"][2, first[2]] = task.source_dictionary.index("e1")  # not a tag
    with pytest.raises(RuntimeError, match=r"cannot read the language of row\(s\) \[2\]"):
        model(**broken)


def test_capacity_applies_in_training_only_unless_asked_for_in_eval():
    from fairseq_taskmoe.moe.experts import ExpertFFNs
    from fairseq_taskmoe.moe.moe_layer import MoELayer
    from fairseq_taskmoe.moe.routing import TokenGate

    torch.manual_seed(0)
    layer = MoELayer(TokenGate(8, 4, 2), ExpertFFNs(8, [16] * 4, torch.relu, torch.nn.Identity()),
                     capacity_factor=0.5)
    with torch.no_grad():
        layer.router.wg.weight.zero_()
        layer.router.wg.weight[0] = 1.0  # every token prefers expert 0: capacity overflows
    x = torch.rand(10, 3, 8)
    _, train_stats = layer.train()(x)
    assert int(train_stats.dropped) > 0
    out, eval_stats = layer.eval()(x)
    assert int(eval_stats.dropped) == 0, "eval is dropless by default"
    layer.eval_capacity_factor = 0.5
    _, capped = layer(x)
    assert int(capped.dropped) == int(train_stats.dropped)


def test_balance_scope_tasks_reaches_task_routed_layers(tiny_data):
    results = {}
    for scope in ("tokens", "tasks"):
        args, task, model = build_task_and_model(
            tiny_data, ["--moe-balance-scope", scope, "--encoder-moe-routing", "token"])
        model.eval()
        _, extra = model(**first_batch(task)["net_input"])
        results[scope] = {name: s.balance_loss.item() for name, s in extra["moe_stats"]}
    assert results["tokens"]["enc1"] == results["tasks"]["enc1"]  # token layer: tokens always
    assert results["tokens"]["dec1"] != results["tasks"]["dec1"]


def test_task_layers_balance_over_tasks_by_default(tiny_data):
    args, task, model = build_task_and_model(tiny_data, [])
    assert args.moe_balance_scope == "tasks"
    layer = next(m for m in model.modules() if getattr(m, "balance_scope", None))
    assert layer.balance_scope == "tasks"
