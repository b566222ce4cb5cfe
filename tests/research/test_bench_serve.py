"""research/bench/serve.py (python -m research.bench.serve): its tables, markdown and arguments,
the random-weight checkpoints of part arch, and one tiny real run of part batching against real
servers on 127.0.0.1 (a random-weight task-MoE of a few thousand parameters: nothing to train),
which runs research/bench/load.py's servers and load for real (its pure parts:
tests/research/test_bench_load.py)."""

import json

import pytest

from research.bench import serve as bench
from research.bench.load import random_sentences


def test_arguments():
    args = bench.parse_args([])
    assert args.clients == [1, 16, 64] and args.parts == ["batching", "arch"]
    assert args.one_pair == [("en", "de")] and args.engine_batches == [8, 16, 32, 64]
    assert args.experts == [32, 128] and args.embed_dim == 512 and args.layers == 6
    assert args.pairs[0] == ("en", "de") and len(args.pairs) == 6
    args = bench.parse_args(["--parts", "arch", "--clients", "2,8", "--pairs", "de-fr"])
    assert args.parts == ["arch"] and args.clients == [2, 8] and args.pairs == [("de", "fr")]
    for bad in (["--clients", "0"], ["--clients", "a,b"], ["--pairs", "en"],
                ["--pairs", "en-en"], ["--parts", "speed"], ["--requests", "0"],
                ["--engine-batches", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def cell(sent_s, p50=10.0, **extra):
    return {"sentences_per_s": sent_s, "p50_ms": p50, "p95_ms": 20.0, "p99_ms": 30.0,
            "errors": 0, "requests_per_call": extra.get("calls"), "rss_mb": extra.get("rss"),
            "peak_rss_mb": extra.get("rss"), "mean_output_tokens": 200.0}


def test_tables_and_markdown():
    rows = [{"workload": "one pair (en-de)", "clients": 16, "on": cell(40.0, calls=5.5),
             "off": cell(10.0), "engine_row": "best", "engine_sentences_per_s": 50.0,
             "on_over_engine": 0.8, "off_over_engine": 0.2}]
    table = bench.batching_table(rows)
    lines = table.splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert ("| one pair (en-de) | 16 | 40 | 10 | 50 (best) | 0.8x | 0.2x | 10 / 20 / 30 | "
            "10 / 20 / 30 | 5.5 | 0 / 0 |") == lines[2]
    engines = {"one pair (en-de)": {"sentences": 8, "single": 20.0, "best": 50.0,
                                    "best_batch": 16, "by_batch": {8: 40.0, 16: 50.0}}}
    line = bench.engine_table(engines).splitlines()[2]
    assert line == "| one pair (en-de) | 8 | 20 | 50 | 16 | 2.5x | 8: 40, 16: 50 |"
    arch = [{"experts": 128, "clients": 16, "token": cell(2.0, rss=4000.0),
             "task": cell(8.0, rss=500.0), "throughput_ratio": 4.0, "rss_ratio": 0.12}]
    line = bench.arch_table(arch).splitlines()[2]
    assert line.startswith("| 128 | 16 | 2 | 8 | 4x | 4000 (4000) | 500 (500) | 0.12 |")
    result = {"command": "python -m research.bench.serve", "environment": {
        "date": "d", "machine": "m", "python": "3.11", "torch": "t", "ctranslate2": "c",
        "server_threads": 1, "beam": 4},
        "batching": {"checkpoint": "c.pt", "pairs": ["en-de"], "one_pair": "en-de",
                     "requests": 8, "rows": rows, "engines": engines},
        "arch": {"shape": {"embed_dim": 512, "ffn_dim": 2048, "layers": 6, "moe_freq": 2,
                           "src_len": 20}, "pairs": ["en-de"], "requests": 8,
                 "server_flags": {"task": ["--quantization", "int8"]}, "rows": arch}}
    text = bench.markdown(result)
    assert "## Served against the engine's own rate" in text and table in text
    assert "## Token-MoE served whole vs task-MoE served pruned" in text


def test_random_checkpoint_decodes_words_to_the_length_bound_in_every_direction(tmp_path):
    """The random-weight token-MoE of part arch, served whole by the fairseq engine: special
    symbols never win (so output length is the server's bound, not an accident of the random
    weights), and one engine serves several directions in any order (each direction's fairseq
    task has its own languages)."""
    from argparse import Namespace

    from research.bench import variants as bi
    from fairseq_taskmoe.serve.engines import FairseqEngine

    data = bi.dict_dir(tmp_path, 40)
    ckpt = tmp_path / "token.pt"
    bench.build_random_checkpoint(data, Namespace(layers=2, embed_dim=16, ffn_dim=32, heads=2,
                                                  moe_freq=2), 4, "a", ckpt)
    engine = FairseqEngine(str(ckpt), str(data), None, ("en", "de"))
    for src, tgt in [("en", "de"), ("cs", "en"), ("en", "de"), ("fr", "en")]:
        [[out]] = engine.translate(["w1 w2 w3 w4"], src, tgt, beam=1)
        words = out.split()
        assert len(words) >= 190 and all(w.startswith("w") for w in words), (src, tgt, out)


def test_tiny_real_run_of_part_batching(tmp_path):
    """Random-weight tiny task-MoE, real servers (cache build, then on and off side by side),
    a few requests at 1 and 2 clients; results written as JSON and markdown."""
    pytest.importorskip("httpx")
    pytest.importorskip("aiohttp")  # the load generator
    pytest.importorskip("ctranslate2")
    pytest.importorskip("psutil")
    from argparse import Namespace

    from research.bench import variants as bi

    work = tmp_path / "work"
    data = bi.dict_dir(work, 40)
    ckpt = work / "task.pt"
    bench.build_random_checkpoint(data, Namespace(layers=2, embed_dim=16, ffn_dim=32, heads=2,
                                                  moe_freq=2), 4, "b", ckpt)
    text = tmp_path / "text"
    text.mkdir()
    for n, lang in enumerate(("en", "de")):
        words = [f"w{i}" for i in range(30)]
        (text / f"test.{lang}").write_text("\n".join(random_sentences(words, 5, 4, n)))
    out = tmp_path / "bench.json"
    assert bench.main(["--parts", "batching", "--checkpoint", str(ckpt), "--data", str(data),
                       "--spm-model", "", "--text-dir", str(text), "--pairs", "en-de,de-en",
                       "--clients", "1,2", "--requests", "4", "--beam", "1",
                       "--engine-batches", "2,4", "--threads", "2",
                       "--work", str(work), "--out-json", str(out),
                       "--out-md", str(tmp_path / "bench.md")]) == 0
    result = json.loads(out.read_text())
    rows = result["batching"]["rows"]
    assert [(r["workload"], r["clients"]) for r in rows] == [
        ("one pair (en-de)", 1), ("one pair (en-de)", 2), ("2 pairs mixed", 1),
        ("2 pairs mixed", 2)]
    for name, engine in result["batching"]["engines"].items():
        assert engine["sentences"] == 4 and engine["single"] > 0 and engine["best"] > 0
        assert engine["best"] == max(engine["by_batch"].values())
    for row in rows:
        which = "single" if row["clients"] == 1 else "best"
        assert row["engine_sentences_per_s"] == result["batching"]["engines"][
            row["workload"]][which]
        assert row["on_over_engine"] == pytest.approx(
            row["on"]["sentences_per_s"] / row["engine_sentences_per_s"], abs=0.006)
        for mode in ("on", "off"):
            assert row[mode]["ok"] == 4 and row[mode]["errors"] == 0
            assert row[mode]["sentences_per_s"] > 0 and row[mode]["p99_ms"] > 0
            assert row[mode]["rss_mb"] > 0
        assert row["off"]["requests_per_call"] == 1.0  # one request per engine call
    assert "--no-cross-batching" in result["batching"]["server_flags"]["off"]
    assert (tmp_path / "bench.md").read_text().startswith("# taskmoe-serve load benchmark")
