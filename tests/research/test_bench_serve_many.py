"""research/bench/serve_many.py (python -m research.bench.serve_many): its pure parts (Zipf
popularity, the seeded request list, the pivots' choice over scripts, which test file holds a
pair's sentences, ratios, goals, tables and markdown, argument errors), and one tiny real run
against real servers on 127.0.0.1: a random-weight task-MoE of five languages (no budget and
under a budget) and a token-MoE of the same languages served whole."""

import json
from argparse import Namespace

import pytest

from research.bench import serve_many as bench
from research.bench.load import random_sentences


def test_zipf_weights_and_popularity():
    assert bench.zipf_weights(4, 1.0) == pytest.approx([12 / 25, 6 / 25, 4 / 25, 3 / 25])
    assert bench.zipf_weights(3, 0.0) == pytest.approx([1 / 3] * 3)
    w = bench.zipf_weights(40, 1.1)
    assert sum(w) == pytest.approx(1.0) and w == sorted(w, reverse=True)
    assert w[0] / w[1] == pytest.approx(2 ** 1.1)
    for n, s in ((0, 1.1), (3, -1)):
        with pytest.raises(ValueError):
            bench.zipf_weights(n, s)
    pairs = [("en", x) for x in "abcdefgh"]
    shares = bench.popularity(pairs, 1.1, seed=1)
    assert shares == bench.popularity(pairs, 1.1, seed=1)  # seeded
    assert set(shares) == set(pairs)  # most popular first
    assert list(shares.values()) == pytest.approx(bench.zipf_weights(8, 1.1))
    assert list(shares) != list(bench.popularity(pairs, 1.1, seed=2))  # the seed ranks them
    assert list(bench.popularity(pairs, 0.0, 1).values()) == pytest.approx([1 / 8] * 8)


def test_sampled_workload_is_seeded_follows_the_shares_and_cycles_sentences():
    shares = {("en", "de"): 0.75, ("de", "en"): 0.25, ("fr", "de"): 0.0}
    texts = {("en", "de"): ["e0", "e1"], ("de", "en"): ["d0"], ("fr", "de"): ["f0"]}
    items = bench.sampled_workload(shares, texts, 2000, seed=3)
    assert items == bench.sampled_workload(shares, texts, 2000, seed=3)
    assert items != bench.sampled_workload(shares, texts, 2000, seed=4)
    en_de = [text for s, t, text in items if (s, t) == ("en", "de")]
    assert 0.7 < len(en_de) / 2000 < 0.8 and not any(s == "fr" for s, _, _ in items)
    assert en_de[:4] == ["e0", "e1", "e0", "e1"]  # a pair's k-th request: its k-th sentence
    assert {text for s, _, text in items if s == "de"} == {"d0"}


def test_scripts_and_pivots_cover_both_scripts():
    assert bench.script_of(["Ergibt WAHR, wenn"]) == "LATIN"
    assert bench.script_of(["Επιστρέφει ΑΛΗΘΕΣ"]) == "GREEK"
    assert bench.script_of(["Возвращает ИСТИНА"]) == "CYRILLIC"
    assert bench.script_of(["少なくとも"]) != "LATIN" and bench.script_of(["123 !"]) == "LATIN"
    langs = ["en", "de", "fr", "el", "ru", "ja"]
    trained = [(bench.HUB, x) for x in langs[1:]] + [(x, bench.HUB) for x in langs[1:]]
    scripts = {"en": "LATIN", "de": "LATIN", "fr": "LATIN", "el": "GREEK", "ru": "CYRILLIC",
               "ja": "CJK"}
    pivots = bench.choose_pivots(langs, trained + [("de", "fr")], 8, 1, scripts)
    assert pivots == bench.choose_pivots(langs, trained + [("de", "fr")], 8, 1, scripts)
    assert len(set(pivots)) == 8 and ("de", "fr") not in pivots  # trained: not a pivot
    assert all(bench.HUB not in p and p[0] != p[1] for p in pivots)
    combos = {(scripts[s] == "LATIN", scripts[t] == "LATIN") for s, t in pivots}
    assert combos == {(True, True), (True, False), (False, True), (False, False)}
    latin = {lang: "LATIN" for lang in langs}  # one script: whatever there is
    assert len(bench.choose_pivots(langs, trained, 20, 1, latin)) == 20
    with pytest.raises(ValueError, match="only 20"):
        bench.choose_pivots(langs, trained, 21, 1, latin)
    only_en_x = [(bench.HUB, x) for x in langs[1:]]  # no X->en leg: nothing to pivot
    assert bench.choose_pivots(langs, only_en_x, 0, 1, latin) == []
    with pytest.raises(ValueError):
        bench.choose_pivots(langs, only_en_x, 1, 1, latin)


def test_text_files_and_one_sentence_lines(tmp_path):
    assert bench.text_file(tmp_path, "en", "de") == tmp_path / "test.en-de.en"
    assert bench.text_file(tmp_path, "de", "en") == tmp_path / "test.en-de.de"
    assert bench.text_file(tmp_path, "de", "fr") == tmp_path / "test.en-de.de"  # a pivot
    lines = ["Returns TRUE.", "", "One. Two sentences here.", "  Three words here  ", "Four."]
    assert bench.one_sentence_lines(lines, "en", 10) == ["Returns TRUE.", "Three words here",
                                                         "Four."]
    assert bench.one_sentence_lines(lines, "en", 2) == ["Returns TRUE.", "Three words here"]
    (tmp_path / "test.en-de.de").write_text("Eins. Zwei.\n")
    with pytest.raises(SystemExit, match="no line of one sentence"):
        bench.read_texts(tmp_path, [("de", "en")], 5)
    with pytest.raises(SystemExit, match="test.en-fr.fr is missing"):
        bench.read_texts(tmp_path, [("fr", "en")], 5)


def test_arguments():
    args = bench.parse_args([])
    assert args.zipf == 1.1 and args.budget_fraction == 0.25 and args.clients == 16
    assert args.pivots == 12 and args.checkpoint.endswith(
        "target_target-s1/checkpoints/checkpoint_last.pt")
    assert "token_token-s1" in args.token_checkpoint and args.data.endswith("lohelp/bin")
    args = bench.parse_args(["--token-checkpoint", "", "--zipf", "0", "--pivots", "0"])
    assert args.token_checkpoint == "" and args.zipf == 0 and args.pivots == 0
    for bad in (["--zipf", "-1"], ["--budget-fraction", "0"], ["--budget-fraction", "1.5"],
                ["--pivots", "-1"], ["--requests", "0"], ["--clients", "0"],
                ["--sentences", "0"], ["--timeout", "0"], ["--clients", "a"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def cell(sent_s, peak=None, loads=0, evictions=0):
    return {"sentences_per_s": sent_s, "p50_ms": 10.0, "p95_ms": 20.0, "loads": loads,
            "evictions": evictions, "peak_rss_mb": peak, "errors": 0}


def servers_of(token=True):
    out = {"none": {"startup_s": 3.5, "base_rss_mb": 300.0, "rss_after_warm_up_mb": 400.0,
                    "loads": {"zipf": cell(50.0, 420.0), "uniform": cell(48.0, 410.0)}},
           "budget": {"startup_s": 3.4, "base_rss_mb": 300.0, "rss_after_warm_up_mb": 330.0,
                      "loads": {"zipf": cell(45.0, 340.0, 12, 10),
                                "uniform": cell(30.0, 350.0, 80, 78)}}}
    if token:
        out["token"] = {"startup_s": 6.0, "base_rss_mb": 900.0, "rss_after_warm_up_mb": 1000.0,
                        "loads": {"zipf": cell(10.0, 1200.0), "uniform": cell(10.0, 1100.0)}}
    return out


def test_ratios_and_goals():
    r = bench.side_by_side(servers_of(), budget_bytes=40 << 20)
    assert r["throughput"]["zipf"] == {"budget_over_none": 0.9, "none_over_token": 5.0,
                                       "budget_over_token": 4.5}
    assert r["throughput"]["uniform"]["budget_over_none"] == 0.62
    assert r["rss"]["none_over_token_after_warm_up"] == 0.4
    assert r["rss"]["none_over_token_peak"] == 0.35  # 420 / 1200
    # above each process's base: (420 - 300) / (1200 - 900), (350 - 300) / 300
    assert r["rss"]["none_over_token_peak_above_base"] == 0.4
    assert r["rss"]["budget_over_token_peak_above_base"] == 0.17
    assert "| peak RSS above the process's RSS at start: task (budget) / token | 0.17 | |" in \
        bench.ratios_table(r)
    assert r["budget_rss"] == {"budget_bytes": 40 << 20, "base_mb": 300.0, "limit_mb": 340.0,
                               "peak_mb": 350.0, "over_limit_mb": 10.0,
                               "peak_over_limit": 1.03}
    rows = bench.goals(r)
    assert [g["met"] for g in rows] == [True, False, True, False]
    assert rows[0]["measured"] == "0.9x" and rows[1]["measured"] == "1.03 of 340 MB"
    alone = bench.side_by_side(servers_of(token=False), budget_bytes=40 << 20)
    assert alone["throughput"]["zipf"]["none_over_token"] is None
    assert [g["met"] for g in bench.goals(alone)] == [True, False, None, None]


def test_tables_and_markdown():
    subs = {"*-de": {"pairs": ["en-de"], "params": 25, "bytes": 2048, "disk_bytes": 4096,
                     "whole": False},
            "*-en": {"pairs": ["de-en"], "params": 30, "bytes": 3 << 20, "disk_bytes": 3 << 20,
                     "whole": False}}
    model = {"backend": "ctranslate2", "quantization": "int8", "full_params": 100,
             "full_bytes": 400, "subnetworks": subs, "token": {"params": 1234567, "bytes": 9 << 20}}
    lines = bench.sizes_table(model).splitlines()
    assert lines[2] == "| *-de | en-de | 25 | 25.0% | 2.0 KB | 4.0 KB |"
    assert lines[4] == "| **all 2** | | 55 | | 3.0 MB | 3.0 MB |"
    assert lines[6] == "| token-MoE, served whole | every pair | 1,234,567 | | 9.0 MB | |"
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    servers = servers_of()
    load_lines = bench.load_table(servers).splitlines()
    assert len(load_lines) == 2 + 6
    assert load_lines[5] == "| task-MoE, budget | uniform | 30 | 10 | 20 | 80 | 78 | 350 | 0 |"
    ratios = bench.side_by_side(servers, 40 << 20)
    assert "| throughput: budget / no budget | 0.9x | 0.62x |" in bench.ratios_table(ratios)
    result = {"command": "python -m research.bench.serve_many", "environment": {
        "date": "d", "machine": "m", "python": "3.11", "torch": "t", "ctranslate2": "c",
        "server_threads": 2, "beam": 4},
        "inputs": {"checkpoint": "t.pt", "langs": ["en", "de"], "direct": ["en-de", "de-en"],
                   "pivots": [], "scripts": {"en": "LATIN", "de": "LATIN"}, "requests": 8,
                   "clients": 2, "zipf": 1.1, "zipf_top_share": 0.68, "seed": 1},
        "model": model, "budget": {"fraction": 0.25, "subnetworks_bytes": 5 << 20,
                                   "bytes": 3 << 20, "raised_to_largest": True},
        "cache_build_s": {"task": 12.5, "token": 0.4}, "servers": servers, "ratios": ratios,
        "goals": bench.goals(ratios)}
    text = bench.markdown(result)
    for heading in ("# taskmoe-serve on many languages", "## Sub-networks", "## Start-up",
                    "## Load", "## Side by side", "## Goals (issue 27)"):
        assert heading + "\n" in text
    assert "(raised to the largest sub-network)" in text and "the top pair 68.0%" in text
    assert "| token-MoE, whole | 0.4 | 6 | 900 | 1,000 |" in text
    assert ("peak RSS 350 MB against the budget (40.0 MB) + its base (300 MB) = 340 MB: 1.03 "
            "of it, 10 MB over") in text


@pytest.mark.slow  # three real servers started one after another: about a minute idle, two loaded
def test_tiny_real_run(tmp_path):
    """A random-weight task-MoE of five languages (en<->de, fr, cs, el trained) and its
    token-MoE, real servers: the cache built, two pivots, three servers one after the other,
    a few requests per load; results written as JSON and markdown."""
    pytest.importorskip("httpx")
    pytest.importorskip("aiohttp")  # the load generator
    pytest.importorskip("ctranslate2")
    pytest.importorskip("psutil")
    from research.bench import variants as bi
    from research.bench.serve import build_random_checkpoint

    langs = ["en", "de", "fr", "cs", "el"]
    pairs = [f"en-{x}" for x in langs[1:]] + [f"{x}-en" for x in langs[1:]]
    work = tmp_path / "work"
    data = bi.dict_dir(work, 40, langs)
    # random weights decode to the server's output bound: 23 tokens at 24 target positions,
    # not 200 (a pivot's second leg reads 23 + 2: the source positions stay fairseq's)
    shape = Namespace(layers=2, embed_dim=16, ffn_dim=32, heads=2, moe_freq=2, langs=langs,
                      pairs=pairs, max_target_positions=24)
    task, token = work / "task.pt", work / "token.pt"
    build_random_checkpoint(data, shape, 4, "b", task)
    build_random_checkpoint(data, shape, 4, "a", token)
    text = tmp_path / "text"
    text.mkdir()
    words = [f"w{i}" for i in range(30)]
    for n, lang in enumerate(langs[1:]):
        for side, seed in ((lang, n), ("en", 10 + n)):
            (text / f"test.en-{lang}.{side}").write_text(
                "\n".join(random_sentences(words, 4, 4, seed)) + "\n")
    out = tmp_path / "many.json"
    assert bench.main(["--checkpoint", str(task), "--token-checkpoint", str(token),
                       "--data", str(data), "--spm-model", "", "--text-dir", str(text),
                       "--pivots", "2", "--requests", "8", "--clients", "2", "--beam", "1",
                       "--threads", "1", "--timeout", "60", "--start-timeout", "120",
                       "--work", str(work), "--out-json", str(out),
                       "--out-md", str(tmp_path / "many.md")]) == 0
    result = json.loads(out.read_text())
    inputs, model, budget = result["inputs"], result["model"], result["budget"]
    assert inputs["langs"] == langs and sorted(inputs["direct"]) == sorted(pairs)
    assert len(inputs["pivots"]) == 2 and all("en" not in p.split("-")
                                             for p in inputs["pivots"])
    assert sorted(model["subnetworks"]) == ["*-cs", "*-de", "*-el", "*-en", "*-fr"]
    for sub in model["subnetworks"].values():
        assert 0 < sub["params"] < model["full_params"] and sub["bytes"] > 0
    assert model["token"]["params"] > 0 and model["token"]["bytes"] > 0
    largest = max(s["bytes"] for s in model["subnetworks"].values())
    assert budget["subnetworks_bytes"] == sum(s["bytes"] for s in model["subnetworks"].values())
    assert budget["bytes"] == max(int(0.25 * budget["subnetworks_bytes"]), largest)
    assert result["cache_build_s"]["task"] > 0 and set(result["servers"]) == {
        "none", "budget", "token"}
    for name, server in result["servers"].items():
        assert server["startup_s"] > 0 and server["base_rss_mb"] > 0
        assert "--memory-budget" in server["flags"] if name == "budget" else True
        for load in ("zipf", "uniform"):
            r = server["loads"][load]
            assert r["ok"] == 8 and r["errors"] == 0 and r["sentences_per_s"] > 0
            assert r["p95_ms"] > 0 and r["peak_rss_mb"] > 0
    none, limited = result["servers"]["none"], result["servers"]["budget"]
    assert all(r["loads"] == r["evictions"] == 0 for r in none["loads"].values())
    assert sum(r["evictions"] for r in limited["loads"].values()) > 0
    assert result["ratios"]["throughput"]["zipf"]["budget_over_none"] > 0
    assert len(result["goals"]) == 4 and all(g["met"] is not None for g in result["goals"])
    md = (tmp_path / "many.md").read_text()
    assert md.startswith("# taskmoe-serve on many languages") and "## Goals (issue 27)" in md
