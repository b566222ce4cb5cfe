"""research/bench/export.py's parts (an end-to-end run needs a trained model and five translation
runs, too slow for the suite): the binarized subset, the stock command, fairseq's speed line,
CTranslate2's token count and detokenization, and the summary."""

import pytest

from research.bench import export as bench
from research.common import generate_command


def test_subset_data_holds_the_first_test_sentences(tiny_data, tmp_path):
    from fairseq.data import Dictionary, data_utils

    out = bench.subset_data(tiny_data, "en-fr", 5, tmp_path)
    assert (out / "dict.en.txt").resolve() == (tiny_data / "dict.en.txt").resolve()
    for lang in ("en", "fr"):
        dictionary = Dictionary.load(str(tiny_data / f"dict.{lang}.txt"))
        full, part = (data_utils.load_indexed_dataset(str(d / f"test.en-fr.{lang}"), dictionary)
                      for d in (tiny_data, out))
        assert len(part) == 5 and all(part[i].tolist() == full[i].tolist() for i in range(5))


def test_stock_command_drops_only_the_plugin():
    cmd = [str(c) for c in generate_command("data", "model.pt", "en-de")]
    stock = bench.stock_command(cmd)
    assert "--user-dir" not in stock and "user_dir" not in stock
    assert stock[stock.index("--task") + 1] == "translation_multi_simple_epoch"
    assert len(stock) == len(cmd) - 2 and "--decoder-langtok" in stock


def test_fairseq_speed_reads_the_translated_line():
    line = ("INFO:fairseq_cli.generate:Translated 1,000 sentences (18,132 tokens) in 24.7s "
            "(40.47 sentences/s, 733.83 tokens/s)")
    assert bench.fairseq_speed(line) == {"sentences": 1000, "tokens": 18132,
                                         "sentences_per_s": 40.47, "tokens_per_s": 733.83}


class FakeTranslator:
    convention = {"lang_tok_format": "__{}__", "target_prefix": ["__de__"]}
    target_lang = "de"

    def translate_tokens(self, pieces, **options):
        self.options = options
        return [["\u2581Ein", "\u2581Hund", "."], ["\u2581Zwei", "__de__", "\u2581Katzen"]]


def test_ct2_output_detokenizes_like_fairseq_and_counts_its_tokens():
    mt = FakeTranslator()
    hyps, speed = bench.ct2_output(mt, [["\u2581A"], ["\u2581B"]], beam=5)
    assert hyps == {0: "Ein Hund.", 1: "Zwei Katzen"}
    assert mt.options == {"beam": 5, "max_batch_size": 8000, "batch_type": "tokens"}
    assert speed["sentences"] == 2 and speed["tokens"] == 10  # pieces + prefix + </s> each
    assert speed["tokens_per_s"] == pytest.approx(5 * speed["sentences_per_s"])


def test_summary_counts_agreement_and_ratios(tmp_path):
    ref = tmp_path / "test.de"
    same = {0: "Ein Hund rennt durch den Park .", 1: "Zwei Katzen schlafen auf dem Sofa ."}
    ref.write_text(same[0] + "\n" + same[1] + "\n")
    hyps = {"pruned": same, "ct2-int8": {**same, 1: "Drei Katzen schlafen auf dem Sofa ."}}
    speed = {"sentences_per_s": 10.0, "tokens_per_s": 100.0}
    runs = {"pruned": [speed, {**speed, "tokens_per_s": 300.0}, speed],
            "ct2-int8": [{"sentences_per_s": 30.0, "tokens_per_s": 250.0}]}
    results = bench.summarize(runs, hyps, ref, {"pruned": 4e6, "ct2-int8": 1e6})
    assert round(results["pruned"]["bleu"], 6) == 100 > results["ct2-int8"]["bleu"]
    assert results["pruned"]["median_tokens_per_s"] == 100
    int8 = results["ct2-int8"]
    assert int8["identical_to_pruned"] == 1 and int8["differ_from_pruned"] == [1]
    assert int8["sentences_per_s_vs_pruned"] == 3.0 and int8["tokens_per_s_vs_pruned"] == 2.5
    assert "| ct2-int8 | 1.0 | 30.0 | 250 | 250 | 3.00, 2.50 |" in bench.table(results)


def test_exports_come_from_the_pruned_checkpoint(tmp_path):
    paths = {"pruned": tmp_path / "pruned.en-de.pt", "exported": tmp_path / "e.pt",
             "ct2-float32": tmp_path / "f32", "ct2-int8": tmp_path / "i8",
             "data": tmp_path / "bin", "spm": tmp_path / "spm.model"}
    cmds = {out: [str(c) for c in cmd] for out, cmd in bench.export_commands(paths,
                                                                                "en-de").items()}
    assert set(cmds) == {paths["exported"], paths["ct2-float32"], paths["ct2-int8"]}
    for out, cmd in cmds.items():
        assert cmd[1] == str(paths["pruned"]) and cmd[-2:] == ["--output", str(out)]
    assert "float32" in cmds[paths["ct2-float32"]] and "int8" in cmds[paths["ct2-int8"]]
