"""The study on LoHelp (--corpus lohelp; research/study/corpus.py and report/many.py): languages
and directions read from the corpus, references per pair, test sets capped, BLEU tokenizers per
target language, scoring, the runner's options and the page. No training; fake corpus folders."""

import json

import pytest

from research.study import corpus, evaluation, grid, runner
from research.study.report import many, page

LANGS = ["en", "de", "zh", "ja"]
PAIRS = ["en-de", "de-en", "en-zh", "zh-en", "en-ja", "ja-en"]


def fake_lohelp(root, with_lists=True, coverage=None):
    """A LoHelp folder as scripts/prepare_lohelp.py lays it out, without binaries."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for lang in LANGS:
        (bin_dir / f"dict.{lang}.txt").write_text("a 1\n")
    for pair in PAIRS:
        src = pair.split("-")[0]
        (bin_dir / f"train.{pair}.{src}.idx").write_bytes(b"")
        (bin_dir / f"train.{pair}.{pair.split('-')[1]}.idx").write_bytes(b"")
    if with_lists:
        (bin_dir / "langs.txt").write_text(",".join(LANGS) + "\n")
        (bin_dir / "pairs.txt").write_text(",".join(PAIRS) + "\n")
    coverage = coverage or {"de": 0.98, "zh": 0.68, "ja": 0.5}
    (root / "stats.json").write_text(json.dumps(
        {"langs": {l: {"train": 100 + i, "coverage": c}
                   for i, (l, c) in enumerate(coverage.items())}}))
    return bin_dir


# ---------------------------------------------------------------- languages and directions


def test_languages_and_directions_come_from_the_corpus(tmp_path):
    bin_dir = fake_lohelp(tmp_path / "a")
    assert corpus.read_langs_pairs(bin_dir) == (LANGS, PAIRS)
    # without langs.txt / pairs.txt: from the file names, English first, directions sorted
    bare = fake_lohelp(tmp_path / "b", with_lists=False)
    assert corpus.read_langs_pairs(bare) == (["en", "de", "ja", "zh"], sorted(PAIRS))
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="no pairs.txt"):
        corpus.read_langs_pairs(tmp_path / "c")
    (bin_dir / "pairs.txt").write_text("en-de,en-fi\n")
    with pytest.raises(ValueError, match="fi"):
        corpus.read_langs_pairs(bin_dir)


def test_lohelp_corpus_groups_by_side_and_coverage(tmp_path):
    fake_lohelp(tmp_path)
    c = corpus.lohelp_corpus(tmp_path)
    assert (c.name, c.langs, c.trained, c.zero_shot) == ("lohelp", LANGS, PAIRS, [])
    assert c.directions == PAIRS and c.detector.method == "py3langid"
    assert c.well_covered() == ["de"] and c.lower_coverage() == ["zh", "ja"]
    g = c.groups()
    assert g["en_x"] == ["en-de", "en-zh", "en-ja"] and g["x_en"] == ["de-en", "zh-en", "ja-en"]
    assert g["well_covered"] == ["en-de", "de-en"]
    assert g["x_en_lower_coverage"] == ["zh-en", "ja-en"]
    assert g["en_x_well_covered"] == ["en-de"]
    # before the corpus is built: the preparation script's default languages, en<->X
    default = corpus.lohelp_corpus(tmp_path / "missing")
    assert default.langs[0] == "en" and len(default.langs) == 15
    assert len(default.trained) == 28 and "en-fi" in default.trained and "fi-en" in default.trained
    assert corpus.MULTI30K.directions == grid.DIRECTIONS
    assert corpus.MULTI30K.detector.method == "stop-words"


def test_references_per_pair(tmp_path):
    text = tmp_path / "text"
    assert corpus.lohelp_reference(text, "en-de") == text / "test.en-de.de"
    assert corpus.lohelp_reference(text, "de-en") == text / "test.en-de.en"
    with pytest.raises(ValueError, match="en-X and X-en"):
        corpus.lohelp_reference(text, "de-fr")
    c = corpus.lohelp_corpus(tmp_path)
    assert c.reference(tmp_path, "zh-en") == tmp_path / "text" / "test.zh-en.en"
    assert corpus.MULTI30K.reference(tmp_path, "de-en") == tmp_path / "text" / "test.en"


def test_bleu_tokenizer_per_target_language(monkeypatch):
    assert corpus.bleu_tokenizer("zh") == "zh"
    assert corpus.bleu_tokenizer("de") == corpus.bleu_tokenizer("en") == "13a"
    monkeypatch.setattr(corpus, "ja_mecab_available", lambda: True)
    assert corpus.bleu_tokenizer("ja") == "ja-mecab"
    monkeypatch.setattr(corpus, "ja_mecab_available", lambda: False)
    assert corpus.bleu_tokenizer("ja") is None  # chrF only


def test_test_sets_are_capped_by_a_seeded_sample():
    assert corpus.sample_indices(5, 10) == [0, 1, 2, 3, 4]
    assert corpus.sample_indices(5, 0) == list(range(5))
    got = corpus.sample_indices(1000, 50, seed=1)
    assert len(got) == 50 == len(set(got)) and got == sorted(got) and got[-1] > 500
    assert got == corpus.sample_indices(1000, 50, seed=1) != corpus.sample_indices(1000, 50, 2)


def test_build_capped_test_keeps_binaries_and_references_aligned(tmp_path):
    import torch
    from fairseq.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder

    bin_dir, text = fake_lohelp(tmp_path / "lohelp"), tmp_path / "lohelp" / "text"
    text.mkdir()
    sizes = {"de": 12, "zh": 7, "ja": 3}
    for x, n in sizes.items():
        for side in ("en", x):  # item i of every file is sentence i: tokens [i, i+1]
            (text / f"test.en-{x}.{side}").write_text("".join(f"{side} {i}\n" for i in range(n)))
        for pair in (f"en-{x}", f"{x}-en"):
            for lang in pair.split("-"):
                b = MMapIndexedDatasetBuilder(str(bin_dir / f"test.{pair}.{lang}.bin"))
                for i in range(n):
                    b.add_item(torch.tensor([i, i + 1]))
                b.finalize(str(bin_dir / f"test.{pair}.{lang}.idx"))
    out = tmp_path / "capped"
    got = corpus.build_capped_test(bin_dir, text, out, PAIRS, cap=5)
    assert got == {"en-de": 5, "de-en": 5, "en-zh": 5, "zh-en": 5, "en-ja": 3, "ja-en": 3}
    keep = corpus.sample_indices(12, 5)
    for pair, lang in (("en-de", "de"), ("de-en", "de"), ("de-en", "en")):
        data = MMapIndexedDataset(str(out / "bin" / f"test.{pair}.{lang}"))
        assert [data[j].tolist() for j in range(len(data))] == [[i, i + 1] for i in keep]
    assert (out / "text" / "test.de-en.en").read_text().splitlines() == [f"en {i}"
                                                                        for i in keep]
    assert (out / "text" / "test.en-de.de").read_text().splitlines() == [f"de {i}"
                                                                        for i in keep]
    assert (out / "bin" / "dict.zh.txt").exists() and (out / "bin" / "pairs.txt").exists()
    # done: not rebuilt; another cap is
    (out / "text" / "test.en-de.de").write_text("kept\n")
    assert corpus.build_capped_test(bin_dir, text, out, PAIRS, cap=5) == got
    assert (out / "text" / "test.en-de.de").read_text() == "kept\n"
    assert corpus.build_capped_test(bin_dir, text, out, PAIRS, cap=0)["en-de"] == 12
    (text / "test.en-de.de").write_text("one line\n")
    with pytest.raises(RuntimeError, match="12 items for 1 reference"):
        corpus.build_capped_test(bin_dir, text, out, PAIRS, cap=4)


# ---------------------------------------------------------------- scoring


def test_score_uses_each_languages_tokenizer_and_detector(tmp_path, monkeypatch):
    pytest.importorskip("py3langid")
    fake_lohelp(tmp_path / "c")
    c = corpus.lohelp_corpus(tmp_path / "c")
    (tmp_path / "text").mkdir()
    zh_refs = ["我们打开一个对话框，然后选择单元格。", "这是一个测试。"]
    (tmp_path / "text" / "test.en-zh.zh").write_text("\n".join(zh_refs) + "\n")
    hyps = {0: "我们打开一个对话框,然后选择单元格。", 1: "这是一个测试。"}  # NFKC: ","
    got = evaluation.score(hyps, tmp_path, "en-zh", c)
    assert got["bleu_tokenize"] == "zh" and "tok:zh" in got["signatures"]["bleu"]
    assert got["sentences"] == 2 and got["on_target"] == 1.0 and got["off_target"] == 0.0
    assert 0 < got["bleu"] < 100
    nfkc = got["nfkc_references"]
    assert nfkc["lines_changed"] == 1 and nfkc["bleu"] == 100.0 and nfkc["chrf"] == 100.0
    de = ["Wählen Sie Tabelle – Umwandeln.", "Ein Test."]
    (tmp_path / "text" / "test.en-de.de").write_text("\n".join(de) + "\n")
    got = evaluation.score(dict(enumerate(de)), tmp_path, "en-de", c)
    assert got["bleu"] == 100.0 and got["bleu_tokenize"] == "13a"
    # a hypothesis in Japanese where German was asked for is off target
    got = evaluation.score({0: de[0], 1: "テストです。"}, tmp_path, "en-de", c)
    assert got["off_target"] == 0.5 and got["on_target"] == 0.5
    assert "nfkc_references" not in got and "tok:13a" in got["signatures"]["bleu"]
    # Japanese without MeCab: chrF only, said so
    monkeypatch.setattr(corpus, "ja_mecab_available", lambda: False)
    (tmp_path / "text" / "test.en-ja.ja").write_text("テストです。\n")
    got = evaluation.score({0: "テストです。"}, tmp_path, "en-ja", c)
    assert got["bleu"] is None and got["chrf"] == 100.0 and "sacrebleu[ja]" in got["bleu_missing"]
    assert evaluation.average({"a": {"bleu": 1.0}, "b": {"bleu": None}}, ["a", "b"], "bleu") \
        is None
    with pytest.raises(RuntimeError, match="2 hypotheses for 1 references"):
        evaluation.score({0: "a", 1: "b"}, tmp_path, "en-ja", c)


# ---------------------------------------------------------------- runner and grid


def test_runner_options_for_lohelp(tmp_path):
    fake_lohelp(tmp_path / "lh")
    base = ["--corpus", "lohelp", "--lohelp-dir", str(tmp_path / "lh")]
    args = runner.parse_args(base)
    assert (args.preset, args.work.name, args.results.name, args.img_dir.name) == \
        ("lohelp", "study-lohelp", "study-lohelp", "study-lohelp")
    assert args.directions == PAIRS and args.test_cap == corpus.TEST_CAP == 200
    assert args.max_update == grid.PRESETS["lohelp"]["max_update"]
    assert [r[0] for r in args.selected] == ["dense-s1", "token_token-s1", "target_target-s1",
                                             "lang_pair_lang_pair-s1"]
    assert [r[0] for r in runner.parse_args(base + ["--only", "dense,target_target"]).selected] \
        == ["dense-s1", "target_target-s1"]
    for bad in (["--preset", "gpu"], ["--preset", "cpu"], ["--directions", "de-fr"],
                ["--train-size", "10"], ["--only", "token_target"]):
        with pytest.raises(SystemExit):
            runner.parse_args(base + bad)
    with pytest.raises(SystemExit):
        runner.parse_args(["--preset", "lohelp"])  # Multi30k with LoHelp's preset
    m30k = runner.parse_args([])  # the default stays Multi30k's study
    assert (m30k.corpus, m30k.preset, m30k.directions) == ("multi30k", "cpu", grid.DIRECTIONS)


def test_lohelp_train_command_trains_the_corpus_directions(tmp_path):
    c = corpus.lohelp_corpus(fake_lohelp(tmp_path).parent)
    cmd = [str(x) for x in grid.train_command(tmp_path, "target_target", 1, tmp_path / "ck",
                                               7, preset="lohelp", langs=c.langs,
                                               pairs=c.trained)]
    assert cmd[cmd.index("--langs") + 1] == ",".join(LANGS)
    assert cmd[cmd.index("--lang-pairs") + 1] == ",".join(PAIRS)
    assert cmd[cmd.index("--sampling-method") + 1] == "temperature"
    assert cmd[cmd.index("--save-interval-updates") + 1] == "200"
    assert cmd[cmd.index("--keep-interval-updates") + 1] == "1" and "--cpu" in cmd
    flags = grid.PRESETS["lohelp"]["flags"]
    assert cmd[cmd.index("--max-tokens") + 1] == str(flags["--max-tokens"])


# ---------------------------------------------------------------- the page


def fake_lohelp_result(name, variant, base, pruned_ok=True):
    c = corpus.Corpus("lohelp", LANGS, PAIRS, [], "LoHelp test (fake)",
                      {"de": 0.98, "zh": 0.68, "ja": 0.5})
    directions = {p: {"zero_shot": False, "bleu": base + i, "chrf": 40.0 + i,
                      "bleu_tokenize": corpus.BLEU_TOKENIZERS.get(p.split("-")[1], "13a"),
                      "sentences": 500, "off_target": 0.01 * i} for i, p in enumerate(PAIRS)}
    directions["en-zh"]["nfkc_references"] = {"lines_changed": 3, "bleu": base + 5, "chrf": 50.0}
    spec = grid.VARIANTS[variant]
    pruned = {p: {"bleu": directions[p]["bleu"], "identical_hypotheses": pruned_ok or p != "en-de",
                  "bytes": 5_000_000} for p in PAIRS} if variant == "target_target" else {}
    return {
        "run": name, "variant": variant, "label": spec["label"], "seed": 1,
        "config": {"shared_flags": grid.PRESETS["lohelp"]["flags"],
                   "variant_flags": spec["flags"]},
        "budget": {"max_update": 10, "updates_done": 10, "max_tokens": 4096},
        "data": {"corpus": "lohelp", "languages": LANGS, "trained_directions": PAIRS,
                 "zero_shot_directions": [], "test_set": c.test_set, "test_cap": 500,
                 "test_cap_seed": 1, "test_sentences": {p: 500 for p in PAIRS},
                 "coverage": c.coverage, "well_covered": c.well_covered(),
                 "lower_coverage": c.lower_coverage(),
                 "bleu_tokenizers": {"en": "13a", "de": "13a", "zh": "zh", "ja": "ja-mecab"},
                 "evaluated_directions": PAIRS},
        "commands": {"study": "-m research.study --corpus lohelp", "prepare": "prepare X",
                     "train": f"fairseq-train X --seed 1 --variant {variant}",
                     "generate_example": "fairseq-generate X"},
        "wall_seconds": {"training": 10800.0, "evaluation": 1200.0},
        "checkpoint_bytes": 100_000_000,
        "final_training_loss": {"updates": [1, 10], "lines": 1, "loss": 8.0 - base / 10,
                                "nll_loss": 7.0 - base / 10},
        "langid": {"method": "py3langid, restricted",
                   "accuracy_on_test_references": {"en": {"on_target": 0.995},
                                                   "ja": {"on_target": 0.98}}},
        "directions": directions,
        "averages": {g: {k: evaluation.average(directions, names, k)
                         for k in ("bleu", "chrf", "off_target")}
                     for g, names in c.groups().items()},
        "pruned": pruned, "heatmap": None,
    }


def test_lohelp_page_stub_and_results(tmp_path):
    stub = many.render({}, tmp_path)
    assert "Results are pending" in stub and "python -m research.study --corpus lohelp" in stub
    assert stub.count("not yet run") == len(grid.runs("lohelp"))
    results = tmp_path / "r"
    results.mkdir()
    for name, v, base, ok in (("dense-s1", "dense", 10.0, True),
                              ("target_target-s1", "target_target", 11.0, False)):
        (results / f"{name}.json").write_text(json.dumps(fake_lohelp_result(name, v, base, ok)))
    out = tmp_path / "docs" / "results-many.md"
    assert page.main(["--corpus", "lohelp", "--results", str(results), "--out", str(out)]) == 0
    md = out.read_text()
    # dense: all 6 directions 10..15 -> 12.5; en->X 10, 12, 14 -> 12.0; X->en 13.0
    assert "| `dense-s1` | dense | 12.5 | 12.0 | 13.0 | 10.5 | 13.5 |" in md
    assert "target / target all +1.0, en→X +1.0, X→en +1.0" in md
    assert "| en-zh | 68% | 12.0 | 13.0 |" in md
    assert "| `target_target-s1` | target / target | 5 of 6 |" in md
    assert "Not identical: `target_target-s1` en-de." in md
    assert "| `dense-s1` | en-zh | 3 | 12.0 | 15.0 |" in md  # NFKC references
    assert "ja-mecab (ja)" in md and "zh (zh)" in md and "(py3langid, restricted)" in md
    assert "in their own language 98.0% to 99.5% of the time (lowest: ja)" in md
    # off-target 0, 1, ..., 5% over the six directions: average 2.5%
    assert "| `target_target-s1` | target / target | 1-10 | 6.900 | 5.900 | -0.100 |" in md
    assert "## Off-target rate per direction" in md and "| en-zh | 68% | 2.0% | 2.0% |" in md
    assert "| **average** |  | 2.5% | 2.5% |" in md
    assert "`token_token-s1` | token / token | 1 | not yet run" in md
    for absent in ("None", "nan", "TODO"):
        assert absent not in md, absent


def fake_pivot_record():
    rows = [{"pair": p, "via": "en", "sentences": 500,
             "pivot": {"bleu": 20.0 + i, "chrf": 45.0, "off_target": 0.002},
             "zero_shot": {"bleu": 4.0, "chrf": 20.0, "off_target": 0.3}}
            for i, p in enumerate(["de-zh", "zh-ja", "ja-de"])]
    return {"name": many.PIVOT_NAME, "checkpoint": "ckpt.pt", "backend": "ctranslate2",
            "quantization": "int8", "beam": 5, "directions": rows,
            "average": {"pivot": {"bleu": 21.0, "chrf": 45.0, "off_target": 0.002},
                        "zero_shot": {"bleu": 4.0, "chrf": 20.0, "off_target": 0.3}}}


def test_lohelp_page_pivot_section(tmp_path):
    """Pairs nobody trained: the command while pending, the figures once pivot_eval ran."""
    results = tmp_path / "r"
    results.mkdir()
    out = tmp_path / "docs" / "results-many.md"
    assert page.main(["--corpus", "lohelp", "--results", str(results), "--out", str(out)]) == 0
    md = out.read_text()
    assert "## Pairs nobody trained: pivot vs zero-shot" in md
    assert "**Pending the trained model**" in md and "make pivot-lohelp" in md
    assert "research.pivot_eval --corpus lohelp" in md and "de-fr, fr-cs" in md
    (tmp_path / f"pivot_eval-{many.PIVOT_NAME}.json").write_text(json.dumps(fake_pivot_record()))
    (tmp_path / "langid-lohelp.json").write_text(json.dumps(
        {"languages": {"en": {"restricted": {"accuracy": 0.993}},
                       "ja": {"restricted": {"accuracy": 0.994}}},
         "mean": {"restricted": 0.9934}}))
    (results / "dense-s1.json").write_text(json.dumps(fake_lohelp_result("dense-s1", "dense",
                                                                         10.0)))
    assert page.main(["--corpus", "lohelp", "--results", str(results), "--out", str(out)]) == 0
    md = out.read_text()
    assert "Pending the trained model" not in md
    assert "| zh-ja | 500 | 21.0 | 45.0 | 0.2% | 4.0 | 20.0 | 30.0% |" in md
    assert "Pivot minus zero-shot: +17.0 average BLEU (goal: at least +5.0, met)" in md
    assert "off-target through the pivot 0.2% (goal: at most 1%, met)" in md
    assert "99.3% to 99.4% per language, mean 99.3%" in md
