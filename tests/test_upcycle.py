"""taskmoe-upcycle: a dense model -> a task-MoE with the dense model's function at step 0.

Two dense models, each trained a few dozen updates on the tiny data: fairseq's own `transformer`
with the stock `translation_multi_simple_epoch` (no plugin, as users train it), and the plugin's
`task_moe --moe-freq 0` (test_cli's train helper). Generation goes through fairseq-generate's own
code (`fairseq_cli.generate.main` on fairseq's generation parser, in this process to save the
start-up of one process per run; one run is the real `fairseq-generate` subprocess)."""

import argparse
import inspect
import re
import shlex
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import first_batch
from test_cli import BIN, REPO, hypotheses, run, train
from tiny_data import LANGS, PAIRS

LANG_FLAGS = ["--langs", ",".join(LANGS), "--lang-pairs", ",".join(PAIRS),
              "--encoder-langtok", "tgt", "--decoder-langtok"]
STOCK_TASK = ["--task", "translation_multi_simple_epoch", *LANG_FLAGS]
MOE_TASK = ["--task", "translation_task_moe", *LANG_FLAGS]
TINY_ARCH = ["--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim",
             "64", "--decoder-ffn-embed-dim", "64", "--encoder-layers", "2", "--decoder-layers",
             "2", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
             "--share-all-embeddings"]
RECIPE = ["--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler",
          "inverse_sqrt", "--warmup-updates", "20", "--max-tokens", "1500", "--cpu", "--seed",
          "1", "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "5",
          "--num-workers", "0"]
DENSE_UPDATES = 60  # fewer: most hypotheses of the tiny model are still empty


# ---------------------------------------------------------------- dense models and helpers

@pytest.fixture(scope="module")
def dense_stock(tiny_data, tmp_path_factory) -> Path:
    """fairseq's transformer (task_moe_tiny's sizes) trained with the stock multilingual task,
    without the plugin: the checkpoint a user of stock fairseq has."""
    save_dir = tmp_path_factory.mktemp("dense-stock")
    run([BIN / "fairseq-train", tiny_data, *STOCK_TASK, "--arch", "transformer", *TINY_ARCH,
         "--criterion", "label_smoothed_cross_entropy", *RECIPE, "--disable-validation",
         "--max-update", DENSE_UPDATES, "--save-dir", save_dir])
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def dense_moe0(tiny_data, tmp_path_factory) -> Path:
    """The plugin's task_moe with --moe-freq 0 (dense), through test_cli's train helper."""
    save_dir = tmp_path_factory.mktemp("dense-moe0")
    train(tiny_data, save_dir, ["--moe-freq", "0"], updates=DENSE_UPDATES)
    return save_dir / "checkpoint_best.pt"


def generate(data, checkpoint, pair, task_flags=MOE_TASK):
    """fairseq-generate's own code on fairseq's generation parser -> {id: (score, hyp)}."""
    from fairseq import options
    from fairseq_cli.generate import main as generate_main

    src, tgt = pair.split("-")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a d=32 model: threads cost more than they give on 2 busy cores
    try:
        with tempfile.TemporaryDirectory() as results:
            argv = [str(data), "--user-dir", str(REPO / "user_dir"), *task_flags, "--source-lang",
                    src, "--target-lang", tgt, "--gen-subset", "test", "--path", str(checkpoint),
                    "--beam", "4", "--max-tokens", "2000", "--cpu", "--results-path", results]
            generate_main(options.parse_args_and_arch(options.get_generation_parser(), argv))
            return hypotheses(Path(results, "generate-test.txt").read_text())
    finally:
        torch.set_num_threads(threads)


def assert_same(dense, other, what, exact=False):
    assert dense.keys() == other.keys() and len(dense) == 24, what
    for i in dense:
        assert other[i][1] == dense[i][1], f"{what}: sentence {i} differs"
        if exact:
            assert other[i][0] == dense[i][0], f"{what}: sentence {i}'s score differs"
        else:
            assert other[i][0] == pytest.approx(dense[i][0], abs=1e-5), what


def upcycle(args, check=True):
    """The command in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from fairseq_taskmoe.cli.upcycle import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    if check:
        assert code == 0, err.getvalue()
    return code, out.getvalue(), err.getvalue()


def prune(checkpoint, pair, output):
    from fairseq_taskmoe.cli.prune import main

    assert main([str(checkpoint), "--lang-pair", pair, "--output", str(output)]) == 0


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------- exact at step 0, real CLI

def test_stock_transformer_upcycles_to_the_dense_hypotheses(tiny_data, dense_stock, tmp_path):
    """The console command on a stock transformer (target / target, 4 experts, top-2, copies):
    fairseq-generate gives the dense model's hypotheses for every pair, from the upcycled
    checkpoint, from each pair's taskmoe-prune of it and from its taskmoe-export."""
    moe = tmp_path / "moe.pt"
    proc = run([BIN / "taskmoe-upcycle", dense_stock, "--output", moe, "--moe-expert-count", "4",
                "--moe-top-k", "2", "--encoder-moe-routing", "target",
                "--decoder-moe-routing", "target"])
    assert "dense: transformer (--arch transformer" in proc.stdout
    assert "step 0: exact" in proc.stdout
    assert re.search(r"encoder\.layers\.1 +target +experts: copies of the dense FFN \(dim 64\)",
                     proc.stdout)
    state = load(moe)
    assert state["cfg"]["model"].arch == "task_moe"
    assert state["cfg"]["task"]._name == "translation_task_moe"
    assert state["last_optimizer_state"] is None
    assert state["optimizer_history"][-1]["num_updates"] == 0
    assert not list(tmp_path.glob(".*.tmp"))

    # the real fairseq-generate process on one pair
    real = hypotheses(run([BIN / "fairseq-generate", tiny_data, "--user-dir", "user_dir",
                           *MOE_TASK, "--source-lang", "en", "--target-lang", "fr",
                           "--gen-subset", "test", "--path", moe, "--beam", "4",
                           "--max-tokens", "2000", "--cpu"]).stdout)
    translated = 0
    for pair in PAIRS:
        dense = generate(tiny_data, dense_stock, pair, STOCK_TASK)
        translated += sum(1 for _, h in dense.values() if h)
        upcycled = real if pair == "en-fr" else generate(tiny_data, moe, pair)
        assert_same(dense, upcycled, f"upcycled {pair}")
        pruned = tmp_path / f"{pair}.pt"
        prune(moe, pair, pruned)
        small = generate(tiny_data, pruned, pair)
        assert_same(dense, small, f"pruned for {pair}")
        assert_same(upcycled, small, f"pruned {pair} vs full", exact=True)  # merged: bit for bit
        if pair == "en-de":  # taskmoe-export: a stock transformer again, served without us
            from fairseq_taskmoe.cli.export import main as export_main

            exported = tmp_path / "en-de.transformer.pt"
            assert export_main([str(moe), "--lang-pair", "en-de", "--format", "fairseq",
                                "--output", str(exported)]) == 0
            assert_same(dense, generate(tiny_data, exported, pair, STOCK_TASK), "exported")
            # and the export is a dense transformer to upcycle again (its cfg: plain dicts)
            _, again, _ = upcycle([exported, "--output", tmp_path / "again.pt",
                                   "--moe-expert-count", "2"])
            assert "dense: transformer" in again and "dim 128" in again  # merged top-2 width
    assert translated >= 36, "the dense model should translate (non-empty hypotheses)"


@pytest.mark.slow  # three trainings' worth of generation on 2 cores; the stock kind above is
def test_task_moe_dense_upcycles_bit_exactly_when_split(tiny_data, dense_moe0, tmp_path):
    """task_moe --moe-freq 0 input, every layer MoE, FFN split in 2 pieces of 32 (k = 2 pieces):
    each task's merged FFN is the dense FFN itself, so generation is bit-identical, for the
    upcycled model and for each pair's pruned one. Encoder target, decoder lang_pair."""
    moe = tmp_path / "moe.pt"
    _, out, _ = upcycle([dense_moe0, "--output", moe, "--moe-freq", "1", "--moe-expert-count",
                         "4", "--moe-expert-ffn-dim", "32", "--decoder-moe-routing", "lang_pair"])
    assert "dense: task_moe (--arch task_moe_tiny" in out and "step 0: exact" in out
    assert out.count("2 pieces of the dense FFN (dim 64 -> 32, fc2 x2)") == 4
    translated = 0
    for pair in PAIRS:
        dense = generate(tiny_data, dense_moe0, pair)
        translated += sum(1 for _, h in dense.values() if h)
        assert_same(dense, generate(tiny_data, moe, pair), f"upcycled {pair}", exact=True)
        pruned = tmp_path / f"{pair}.pt"
        prune(moe, pair, pruned)
        assert_same(dense, generate(tiny_data, pruned, pair), f"pruned {pair}", exact=True)
    assert translated >= 36, "the dense model should translate (non-empty hypotheses)"


# ---------------------------------------------------------------- every construction, in-process

def _models(data, dense, upcycled):
    from fairseq import checkpoint_utils

    import user_dir  # noqa: F401  (registers the plugin)

    out = []
    for path in (dense, upcycled):
        models, _, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(path)], arg_overrides={"data": str(data)})  # strict: every key, every shape
        out.append((models[0].eval(), task))
    return out


def _logits(model, batch, dispatch=False):
    net_input = dict(batch["net_input"])
    if "src_lang_idx" not in inspect.signature(model.forward).parameters:  # stock transformer
        net_input.pop("src_lang_idx"), net_input.pop("tgt_lang_idx")
    with torch.set_grad_enabled(dispatch):  # grad on: the training path (dispatch, combine)
        return model(**net_input)[0].detach()


CONSTRUCTIONS = {  # name: (flags, bit-exact in inference)
    "target top-2 copies": (["--moe-top-k", "2"], False),
    "target top-1 saturated": (["--moe-top-k", "1", "--moe-expert-count", "3"], True),
    "lang_pair top-4 of 8, split in 4": (
        ["--encoder-moe-routing", "lang_pair", "--decoder-moe-routing", "lang_pair",
         "--moe-expert-count", "8", "--moe-top-k", "4", "--moe-expert-ffn-dim", "16"], True),
    "token / sentence top-2 copies": (
        ["--encoder-moe-routing", "token", "--decoder-moe-routing", "sentence"], False),
    "token / target top-3 of 5 copies, freq 1": (
        ["--encoder-moe-routing", "token", "--moe-expert-count", "5", "--moe-top-k", "3",
         "--moe-freq", "1"], False),
}


@pytest.mark.parametrize("name", list(CONSTRUCTIONS))
def test_every_construction_computes_the_dense_function(tiny_data, dense_stock, tmp_path, name):
    """The upcycled model's logits equal the stock dense model's on a batch mixing all pairs,
    in inference (task-routed layers merged) and on the training path (tokens dispatched to
    the k experts and combined); bit for bit where each task's merged FFN is the dense one."""
    flags, bit_exact = CONSTRUCTIONS[name]
    moe = tmp_path / "moe.pt"
    _, out, _ = upcycle([dense_stock, "--output", moe, "--moe-expert-count", "4", *flags])
    assert "step 0: exact" in out
    (dense, _), (upcycled, task) = _models(tiny_data, dense_stock, moe)
    batch = first_batch(task, "valid")
    assert len(set(batch["net_input"]["tgt_lang_idx"].tolist())) > 1, "a batch of several tasks"
    mask = batch["target"].ne(task.target_dictionary.pad())  # pads: masked downstream anyway
    reference = _logits(dense, batch)[mask]
    for dispatch in (False, True):
        got = _logits(upcycled, batch, dispatch)[mask]
        assert (got - reference).abs().max() <= 1e-5, (name, dispatch)
    if bit_exact:  # one task per batch: one merged FFN over the whole batch, as in serving
        ids = batch["net_input"]["tgt_lang_idx"]
        rows = (ids == ids[0]).nonzero().squeeze(1)
        one = {"net_input": {k: v.index_select(0, rows) for k, v in batch["net_input"].items()}}
        mask = mask.index_select(0, rows)
        assert torch.equal(_logits(upcycled, one)[mask], _logits(dense, one)[mask]), name


def test_task_moe_dense_input_maps_every_layer(tiny_data, tmp_path):
    """The plugin's own dense kind (task_moe --moe-freq 0, FFNs under `ffn.`), here a
    seeded random one in fairseq's legacy checkpoint layout (one `args` namespace): the split
    upcycle's logits are the dense model's, bit for bit per task. (Trained, through
    fairseq-generate: the slow test above.)"""
    from conftest import build_task_and_model

    args, _, model = build_task_and_model(tiny_data, ["--moe-freq", "0"], seed=3)
    dense = tmp_path / "dense.pt"
    torch.save({"args": args, "cfg": None, "model": model.state_dict(),
                "optimizer_history": [{"criterion_name": "MoELabelSmoothedCrossEntropy",
                                       "optimizer_name": "FairseqAdam",
                                       "lr_scheduler_state": {}, "num_updates": 0}],
                "extra_state": {"train_iterator": {"epoch": 1}}, "last_optimizer_state": None},
               dense)
    moe = tmp_path / "moe.pt"
    _, out, _ = upcycle([dense, "--output", moe, "--moe-freq", "1", "--moe-expert-count", "4",
                         "--moe-expert-ffn-dim", "32", "--encoder-moe-routing", "lang_pair"])
    assert "dense: task_moe (--arch task_moe_tiny" in out and "step 0: exact" in out
    assert load(moe)["args"].moe_freq == 1
    (dense_model, _), (upcycled, task) = _models(tiny_data, dense, moe)
    batch = first_batch(task, "valid")
    mask = batch["target"].ne(task.target_dictionary.pad())
    ids = batch["net_input"]["tgt_lang_idx"]
    for tgt in ids.unique().tolist():
        rows = (ids == tgt).nonzero().squeeze(1)
        one = {"net_input": {k: v.index_select(0, rows) for k, v in batch["net_input"].items()}}
        keep = mask.index_select(0, rows)
        assert torch.equal(_logits(upcycled, one)[keep], _logits(dense_model, one)[keep])


def test_exactness_check_reads_routes_as_the_model_does():
    """The check behind "step 0: exact": each task's route through top_k_route (lang_pair rows
    mixed as the model mixes them) must hold every piece with total weight 1."""
    from fairseq_taskmoe.deploy.upcycle import gate_table, piece_map, read_routes, task_routes
    from fairseq_taskmoe.moe.routing import unseen_pair_mixing

    names = {0: "x", 1: "y", 2: "z"}
    table = torch.tensor([[0.0, -1, 0, -1], [0, 0, -1, -1], [0, -9, -9, -9]])
    _, bad = read_routes(table, None, 2, [0, 1, 0, 1], names)
    assert bad == ["x", "z"]  # x: piece 0 twice; z: weight 1 on e0 and ~0 on another
    _, bad = read_routes(table, None, 2, [0, 0, 0, 0], names)  # copies: any top-2 sums to 1
    assert bad == []
    # a-d and b-d train; c-d borrows their mean: rows of two groups tie, a split cannot be
    # trusted there, while the trained pairs' own routes are exact
    langs, pairs = ["a", "b", "c", "d"], ["a-d", "b-d"]
    table = gate_table(task_routes("lang_pair", langs, pairs, 8, 2), 8, 1.0)
    pieces = piece_map(table, 2, 8, 2)
    mixing = unseen_pair_mixing(4, [(0, 3), (1, 3)], "target_mean")
    routes, bad = read_routes(table, mixing, 2, pieces, {3: "a-d", 7: "b-d", 11: "c-d"})
    assert routes["a-d"] == [0, 1] and routes["b-d"] == [2, 3]
    assert set(routes["c-d"]) <= {0, 1, 2, 3} and "a-d" not in bad and "b-d" not in bad


def test_learned_routing_gets_a_seeded_random_gate_and_identical_experts(dense_stock, tmp_path):
    a, b, c = (tmp_path / f"{n}.pt" for n in "abc")
    flags = ["--encoder-moe-routing", "token", "--decoder-moe-routing", "sentence",
             "--moe-expert-count", "4"]
    upcycle([dense_stock, "--output", a, *flags])
    upcycle([dense_stock, "--output", b, *flags])
    upcycle([dense_stock, "--output", c, *flags, "--seed", "2"])
    ma, mb, mc = (load(p)["model"] for p in (a, b, c))
    dense = load(dense_stock)["model"]
    gate = "encoder.layers.1.ffn.router.wg.weight"
    assert ma[gate].shape == (4, 32) and ma[gate].abs().max() <= 1 / 32 ** 0.5
    assert torch.equal(ma[gate], mb[gate]) and not torch.equal(ma[gate], mc[gate])
    for e in range(4):
        assert torch.equal(ma[f"decoder.layers.1.ffn.experts.experts.{e}.fc2.weight"],
                           dense["decoder.layers.1.fc2.weight"])
    assert torch.equal(ma["encoder.layers.0.ffn.fc1.weight"], dense["encoder.layers.0.fc1.weight"])


def test_noise_and_drop_upcycling_are_seeded_and_reported(dense_stock, tmp_path):
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 3)):
        _, out, _ = upcycle([dense_stock, "--output", tmp_path / f"{name}.pt",
                             "--encoder-moe-routing", "token", "--moe-expert-count", "4",
                             "--noise", "0.01", "--reinit-fraction", "0.25", "--seed", seed])
        outs.append((out, load(tmp_path / f"{name}.pt")["model"]))
    out, model = outs[0]
    assert "step 0: NOT exact" in out and "perturbed" in out
    assert torch.equal(model["encoder.layers.1.ffn.experts.experts.0.fc1.weight"],
                       outs[1][1]["encoder.layers.1.ffn.experts.experts.0.fc1.weight"])
    assert not torch.equal(model["encoder.layers.1.ffn.experts.experts.0.fc1.weight"],
                           outs[2][1]["encoder.layers.1.ffn.experts.experts.0.fc1.weight"])
    dense = load(dense_stock)["model"]["encoder.layers.1.fc1.weight"]
    experts = [model[f"encoder.layers.1.ffn.experts.experts.{e}.fc1.weight"] for e in range(4)]
    assert not torch.equal(experts[0], experts[1])
    for w in experts:  # a quarter of the 64 units re-drawn, the rest the dense ones plus noise
        moved = ((w - dense).abs() > 0.05 * dense.std()).any(1).sum().item()
        assert 12 <= moved <= 20, moved
    # task-routed layers are left exact unless asked
    for e in range(4):
        assert torch.equal(model[f"decoder.layers.1.ffn.experts.experts.{e}.fc1.weight"],
                           load(dense_stock)["model"]["decoder.layers.1.fc1.weight"])


# ---------------------------------------------------------------- training continues

def test_finetune_from_model_continues_the_upcycled_checkpoint(tiny_data, dense_stock, tmp_path):
    """fairseq-train --finetune-from-model with the flags the command prints: loads strictly,
    fresh optimizer (update 0), trains; the task's experts move apart from the others."""
    moe = tmp_path / "moe.pt"
    _, out, _ = upcycle([dense_stock, "--output", moe, "--moe-expert-count", "4"])
    line = next(l for l in out.splitlines() if l.startswith("continue training with:"))
    flags = shlex.split(line.split("fairseq-train DATA", 1)[1].rstrip(". "))
    assert flags[flags.index("--finetune-from-model") + 1] == str(moe)
    save_dir = tmp_path / "ft"
    proc = run([BIN / "fairseq-train", tiny_data, *flags, "--criterion",
                "moe_label_smoothed_cross_entropy", *RECIPE, "--max-update", "4",
                "--save-dir", save_dir, "--disable-validation"])
    log = proc.stdout + proc.stderr
    assert "loading pretrained model from" in log
    assert "Loaded checkpoint" in log and "(epoch 1 @ 0 updates)" in log
    assert re.search(r"num_updates[ =]4\b", log)
    trained = load(save_dir / "checkpoint_last.pt")["model"]
    key = "decoder.layers.1.ffn.experts.experts.{}.fc2.weight"
    # en-de / en-fr route to e0,e1 (de, fr targets), de-en to e2,e3: all trained, differently
    assert not torch.equal(trained[key.format(0)], trained[key.format(2)])


# ---------------------------------------------------------------- refusals

def _refused(args, output, message):
    code, out, err = upcycle([*args, "--output", output], check=False)
    assert code == 2, (out, err)
    assert message in err, err
    assert not Path(output).exists() and not list(Path(output).parent.glob(".*.tmp"))


def _altered(src, dst, **changes):
    state = load(src)
    for section in ("model", "task"):
        state["cfg"][section] = argparse.Namespace(**{**vars(state["cfg"][section]), **changes})
    torch.save(state, dst)
    return dst


def test_options_without_an_exact_construction_are_refused(dense_stock, tmp_path):
    out = tmp_path / "moe.pt"
    d = str(dense_stock)
    _refused([d, "--moe-expert-ffn-dim", "48"], out,
             "Exact here: --moe-expert-ffn-dim 64 (copies), 32 (2 pieces)")
    _refused([d, "--moe-expert-ffn-dim", "128"], out, "must be the dense width or divide it")
    _refused([d, "--moe-expert-ffn-dim", "16", "--moe-expert-count", "4"], out,
             "--moe-top-k and --moe-expert-count (4) must be multiples of 4")
    _refused([d, "--encoder-moe-routing", "token", "--moe-expert-ffn-dim", "32"], out,
             "token routing picks each token's experts from the input")
    _refused([d, "--decoder-moe-routing", "sentence", "--moe-top-k", "1"], out,
             "Exact: --moe-top-k 2 or more")
    _refused([d, "--noise", "0.1"], out, "add --perturb-task-routed")
    _refused([d, "--moe-freq", "3"], out, "makes no layer an MoE layer")
    _refused([d, "--moe-freq", "0"], out, "--moe-freq must be >= 1")
    _refused([d, "--moe-top-k", "9"], out, "--moe-top-k must be between 1 and")


def test_languages_and_pairs_the_dictionaries_lack_are_refused(dense_stock, tmp_path):
    out = tmp_path / "moe.pt"
    d = str(dense_stock)
    _refused([d, "--langs", "en,de,fr,cs"], out, "the dense checkpoint's dictionaries lack cs")
    _refused([d, "--lang-pairs", "en-de,en-cs"], out,
             "pair en-cs: the dense checkpoint's dictionaries lack cs")
    _refused([d, "--langs", "de,en,fr"], out, "pass --langs en,de,fr (or leave it out)")
    _refused([d, "--lang-pairs", "ende"], out, "bad language pair 'ende'")
    # a pair subset is fine: routes go to the given pairs first
    upcycle([d, "--output", out, "--lang-pairs", "en-fr", "--moe-expert-count", "2"])
    assert load(out)["cfg"]["model"].moe_trained_pairs == "en-fr"


def test_architectures_it_cannot_map_are_refused_naming_what_differs(dense_stock, tmp_path):
    out = tmp_path / "moe.pt"
    lstm = _altered(dense_stock, tmp_path / "lstm.pt", arch="lstm", _name="lstm")
    _refused([lstm], out, "architecture lstm (model lstm) cannot be mapped")
    xattn = _altered(dense_stock, tmp_path / "x.pt", cross_self_attention=True,
                     scale_fc=True)
    _refused([xattn], out, "--cross-self-attention True: the task_moe layers do not implement")
    _refused([xattn], out, "--scale-fc True")
    bilingual = _altered(dense_stock, tmp_path / "bi.pt", task="translation")
    state = load(bilingual)
    state["cfg"]["task"]._name = "translation"
    torch.save(state, bilingual)
    _refused([bilingual], out, "task translation: the task-MoE routes on the languages")
    moe = _altered(dense_stock, tmp_path / "moe2.pt", moe_freq=2, moe_langs="en,de,fr",
                   arch="task_moe_tiny")
    _refused([moe], out, "already a task-MoE (--arch task_moe_tiny, --moe-freq 2)")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(dense_stock.read_bytes()[: dense_stock.stat().st_size // 2])
    _refused([truncated], out, "cannot read")
    _refused([tmp_path / "missing.pt"], out, "does not exist")
    # training-time options are switched off, not refused
    dropping = _altered(dense_stock, tmp_path / "ld.pt", encoder_layerdrop=0.1)
    _, text, _ = upcycle([dropping, "--output", out, "--moe-expert-count", "4"])
    assert "--encoder-layerdrop 0.1 is training-time only" in text
    assert load(out)["cfg"]["model"].encoder_layerdrop == 0


def test_an_existing_output_is_never_overwritten_without_force(dense_stock, tmp_path):
    out = tmp_path / "moe.pt"
    out.write_bytes(b"keep me")
    proc = run([BIN / "taskmoe-upcycle", dense_stock, "--output", out], check=False)
    assert proc.returncode == 2 and "moe.pt exists; pass --force" in proc.stderr
    assert out.read_bytes() == b"keep me"
    _refused([dense_stock, "--force"], dense_stock.parent / "x" / "moe.pt", "does not exist")
    code, _, err = upcycle([dense_stock, "--output", dense_stock, "--force"], check=False)
    assert code == 2 and "--output must differ from the input" in err
    upcycle([dense_stock, "--output", out, "--force", "--moe-expert-count", "4"])
    assert out.stat().st_size > 10000


def test_unsupported_option_lists_agree_with_the_model():
    """deploy/ may not import integration/model.py (tests/test_layout.py): its copy of the
    options task_moe refuses must stay the model's."""
    from fairseq_taskmoe.deploy.upcycle import STRUCTURAL_OPTIONS, TRAINING_ONLY_OPTIONS
    from fairseq_taskmoe.integration.model import UNSUPPORTED_OPTIONS

    ours = {**STRUCTURAL_OPTIONS, **TRAINING_ONLY_OPTIONS}
    assert {k: v for k, v in ours.items() if k in UNSUPPORTED_OPTIONS} == UNSUPPORTED_OPTIONS
    assert set(ours) - set(UNSUPPORTED_OPTIONS) == {"merge_src_tgt_embed"}


def test_upcycled_checkpoint_pickles_no_module_of_the_package(dense_stock, tmp_path):
    from test_layout import pickled_globals

    out = tmp_path / "moe.pt"
    upcycle([dense_stock, "--output", out, "--moe-expert-count", "4"])
    assert {g[0].split(".")[0] for g in pickled_globals(out)} <= {"argparse", "collections",
                                                                "torch"}
