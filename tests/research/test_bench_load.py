"""research/bench/load.py, the harness of the serving load benchmarks: its pure parts
(percentiles, summaries, the --clients / --pairs parsers, the request list). Servers and the load
itself run for real in tests/research/test_bench_serve.py's tiny run."""

import argparse

import pytest

from research.bench import load


def test_percentile_interpolates_like_numpy():
    values = [15, 20, 35, 40, 50]
    assert load.percentile(values, 0) == 15 and load.percentile(values, 100) == 50
    assert load.percentile(values, 50) == 35
    assert load.percentile(values, 40) == pytest.approx(29.0)  # numpy.percentile: 29.0
    assert load.percentile(values, 95) == pytest.approx(48.0)
    assert load.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert load.percentile([7.5], 99) == 7.5
    assert load.percentile([3, 1, 2], 50) == 2  # order does not matter
    with pytest.raises(ValueError):
        load.percentile([], 50)
    with pytest.raises(ValueError):
        load.percentile([1], 101)


def test_summarize_one_load_level():
    s = load.summarize([0.1, 0.2, 0.3, 0.4], wall=2.0, ok=4, errors=1, out_tokens=40)
    assert s["requests"] == 5 and s["ok"] == 4 and s["errors"] == 1
    assert s["sentences_per_s"] == 2.0 and s["target_tokens_per_s"] == 20.0
    assert s["mean_output_tokens"] == 10.0
    assert s["p50_ms"] == 250.0 and s["p99_ms"] == pytest.approx(397.0)
    assert s["mean_ms"] == 250.0
    arrays = load.summarize([0.1, 0.2], wall=2.0, ok=4, errors=0, sentences=12)
    assert arrays["sentences_per_s"] == 6.0 and arrays["requests_per_s"] == 2.0
    empty = load.summarize([], wall=1.0, ok=0, errors=3)
    assert empty["sentences_per_s"] == 0 and empty["p50_ms"] is None
    assert load.ratio(6.0, 2.0) == 3.0 and load.ratio(None, 2.0) is None
    assert load.ratio(1.0, 0) is None


def test_counts_and_pairs():
    assert load.parse_counts("1,4, 16", "--clients") == [1, 4, 16]
    for bad in ("0", "a,b", "4,-1", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            load.parse_counts(bad, "--clients")
    with pytest.raises(argparse.ArgumentTypeError, match="must list numbers >= 1"):
        load.parse_counts("4,-1", "--clients")
    assert load.parse_pairs("en-de, de-fr") == [("en", "de"), ("de", "fr")]
    assert len(load.parse_pairs(load.DEMO_PAIRS)) == 6
    for bad in ("en", "en-en", "en-", "en-de-fr"):
        with pytest.raises(argparse.ArgumentTypeError):
            load.parse_pairs(bad)


def test_workload_is_round_robin_over_pairs_and_sentences():
    sentences = {"en": ["e0", "e1"], "de": ["d0", "d1", "d2"]}
    items = load.workload([("en", "de"), ("de", "en")], sentences, 6)
    assert items == [("en", "de", "e0"), ("de", "en", "d0"), ("en", "de", "e1"),
                     ("de", "en", "d1"), ("en", "de", "e0"), ("de", "en", "d2")]
    # several sentences a request (an array q): consecutive positions, wrapping around
    batched = load.workload([("en", "de"), ("de", "en")], sentences, 4, per_request=2)
    assert batched == [("en", "de", ["e0", "e1"]), ("de", "en", ["d0", "d1"]),
                       ("en", "de", ["e0", "e1"]), ("de", "en", ["d2", "d0"])]
    assert load.positions(3, 2, 3, 2) == [2, 0]
    words = load.random_sentences(["a", "b"], 3, 4, seed=1)
    assert len(words) == 3 and all(len(s.split()) == 4 for s in words)
    assert words == load.random_sentences(["a", "b"], 3, 4, seed=1)  # reproducible


def test_servers_bind_localhost_only_and_sentences_are_read_per_language(tmp_path):
    argv = load.serve_command("c.pt", "bin", 5123, "--beam", 1)
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[-2:] == ["--beam", "1"]
    assert argv[argv.index("--port") + 1] == "5123" and "c.pt" in argv
    (tmp_path / "test.en").write_text("a b\n\n c \n")
    assert load.read_sentences(tmp_path, ["en"]) == {"en": ["a b", "c"]}
    with pytest.raises(SystemExit, match="no sentences for de"):
        load.read_sentences(tmp_path, ["en", "de"])
    assert load._mb(3 * 2 ** 20) == 3.0 and load._mb(None) is None
