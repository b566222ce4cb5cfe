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
    from fairseq_taskmoe.moe_layer import MoELayer
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
    from fairseq_taskmoe.moe_layer import MoELayer
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
