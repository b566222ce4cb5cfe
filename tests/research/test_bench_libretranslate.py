"""research/bench/libretranslate.py (python -m research.bench.libretranslate): its pure parts
(arguments, the rotated order, references of a workload, BLEU, medians, ratios, tables), a
--quick run of taskmoe-serve alone on the tiny model (seconds, no LibreTranslate), and, slow and
with .venv-lt, the --quick run of all three servers. No timing is checked: the figures come
from `make bench-libretranslate` on the demo model."""

import json

import pytest

from research import libretranslate as lt
from research.bench import libretranslate as bench
from research.bench.load import workload
from test_export_argos import spm_data  # noqa: F401 (a fixture)
from test_libretranslate import packages  # noqa: F401 (a fixture)

TINY_PAIRS = "en-de,de-en,en-fr"


def test_arguments():
    args = bench.parse_args(["--quick", "--servers", "taskmoe,lt-tuned"])
    assert args.clients == [1, 4] and args.per_request == [1, 2] and args.rounds == 1
    assert args.sentences == 8 and args.out_json.endswith("quick.json")
    assert args.lt_tuned_env["ARGOS_INTRA_THREADS"] == "1"
    full = bench.parse_args([])
    assert full.clients == [1, 16, 64] and full.per_request == [1, 8]
    assert full.servers == ["taskmoe", "lt", "lt-tuned"] and full.reference == "lt-tuned"
    assert full.out_md.endswith("results/libretranslate_benchmark.md")
    assert bench.parse_args(["--lt-tuned-args=--threads 16"]).lt_tuned_args == "--threads 16"
    for bad in (["--servers", "lt,nginx"], ["--servers", "lt,lt"], ["--rounds", "0"],
                ["--lt-tuned-env", "A"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert bench.parse_env("A=1, B=x=y") == {"A": "1", "B": "x=y"}


FAKE_LT = """
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps([{"code": "en"}, {"code": "zh-Hans"}]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.mark.parametrize("target,ready", [("zh", True), ("ja", False)])
def test_start_waits_for_the_installed_languages_under_their_listed_codes(tmp_path, target,
                                                                           ready):
    """LibreTranslate lists Argos's zh as zh-Hans: start() knows it is up; a language that is
    not listed keeps it waiting until the timeout (a fake server answering /languages)."""
    import sys

    from research.bench.load import HOST, free_port

    pytest.importorskip("httpx")
    port = free_port()
    (tmp_path / "run").mkdir()
    server = lt.LibreTranslate([sys.executable, "-c", FAKE_LT, str(port)],
                               f"http://{HOST}:{port}", tmp_path / "lt.log", {}, tmp_path)
    server.installed = [{"from": "en", "to": target, "path": "x"}]
    try:
        if ready:
            assert server.start(timeout=30).startup_s > 0
        else:
            with pytest.raises(RuntimeError, match="did not answer /languages"):
                server.start(timeout=2)
    finally:
        server.stop(grace=5)
    assert server.proc.poll() is not None  # stopped, by its own process group


def test_rotated_order_and_references_follow_the_workload():
    assert [bench.rotated(["a", "b", "c"], r) for r in range(4)] == \
        [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    sentences = {"en": [f"e{i}" for i in range(5)], "de": [f"d{i}" for i in range(5)],
                 "fr": [f"f{i}" for i in range(5)]}
    pairs = [("en", "de"), ("de", "fr")]
    for per in (1, 3):
        items = workload(pairs, sentences, 7, per)
        refs = bench.references(pairs, 7, sentences, per)
        for (src, tgt, text), ref in zip(items, refs):
            texts = text if per > 1 else [text]
            assert [t[1:] for t in texts] == [r[1:] for r in ref]  # same positions
            assert all(r.startswith(tgt[0]) for r in ref)


def test_bleu_medians_and_ratios():
    one, two, three = ("the cat sat on the mat", "a dog ran into the park",
                       "it rained all day long")
    refs = [[one], [two, three]]
    assert bench.bleu([one, [two, three]], refs) == 100.0
    assert bench.bleu([None, None], refs) is None
    assert bench.bleu([None, [two, three]], refs) == 100.0
    assert bench.bleu([one, [three, two]], refs) < 100.0
    runs = [{"sentences_per_s": s, "p50_ms": 10, "p95_ms": p, "bleu": 30.0, "errors": e,
             "peak_rss_mb": m} for s, p, e, m in ((10, 20, 0, 100), (30, 40, 1, 300),
                                                  (20, 30, 0, 200))]
    agg = bench.aggregate(runs)
    assert (agg["sentences_per_s"], agg["p95_ms"], agg["errors"], agg["peak_rss_mb"]) == \
        (20, 30, 1, 300)
    cells = bench.with_ratios([{"servers": {"lt-tuned": {"sentences_per_s": 20, "p95_ms": 40},
                                            "taskmoe": {"sentences_per_s": 30,
                                                        "p95_ms": 20}}}], "lt-tuned")
    assert cells[0]["servers"]["taskmoe"]["throughput_vs_ref"] == 1.5
    assert cells[0]["servers"]["taskmoe"]["p95_vs_ref"] == 0.5
    assert "throughput_vs_ref" not in cells[0]["servers"]["lt-tuned"]


def _tiny_args(trained_tiny, spm_data, tiny_data, tmp_path, *more):  # noqa: F811
    spm_model, data = spm_data
    return ["--quick", "--checkpoint", str(trained_tiny), "--data", str(data), "--spm-model",
            str(spm_model), "--text-dir", str(tiny_data.parent / "text"), "--pairs",
            TINY_PAIRS, "--one-pair", "en-fr", "--quantization", "float32", "--work",
            str(tmp_path / "work"), *more]


def test_quick_run_of_taskmoe_serve_alone(trained_tiny, spm_data, tiny_data,  # noqa: F811
                                          tmp_path):
    pytest.importorskip("httpx")
    pytest.importorskip("aiohttp")  # the load generator
    pytest.importorskip("ctranslate2")
    pytest.importorskip("psutil")
    pytest.importorskip("sacrebleu")
    assert bench.main(_tiny_args(trained_tiny, spm_data, tiny_data, tmp_path,
                                 "--servers", "taskmoe")) == 0
    result = json.loads((tmp_path / "work" / "quick.json").read_text())
    assert len(result["cells"]) == 2 * 2 * 2  # workloads x sentences a request x clients
    for cell in result["cells"]:
        s = cell["servers"]["taskmoe"]
        assert s["errors"] == 0 and s["sentences_per_s"] > 0 and s["bleu"] is not None
    facts = result["server_facts"]["taskmoe"]
    assert facts["startup_s"] > 0 and facts["rss_mb"] > 0 and result["reference"] is None
    md = (tmp_path / "work" / "quick.md").read_text()
    assert "| one pair (en-fr) | 2 | 4 |" in md and "taskmoe-serve BLEU" in md


@pytest.mark.slow
@pytest.mark.skipif(lt.unavailable() is not None, reason=lt.unavailable() or "")
def test_quick_run_with_libretranslate(trained_tiny, spm_data, tiny_data, packages,  # noqa: F811
                                       tmp_path):
    """All three servers on the tiny model's packages: the same requests answered by each,
    ratios against the tuned LibreTranslate, BLEU of every server."""
    assert bench.main(_tiny_args(trained_tiny, spm_data, tiny_data, tmp_path,
                                 "--packages", str(packages))) == 0
    result = json.loads((tmp_path / "work" / "quick.json").read_text())
    assert result["reference"] == "lt-tuned"
    for cell in result["cells"]:
        assert all(s["errors"] == 0 and s["bleu"] is not None for s in cell["servers"].values())
        assert cell["servers"]["taskmoe"]["throughput_vs_ref"] is not None
    assert result["server_facts"]["lt-tuned"]["settings"].startswith("ARGOS_INTRA_THREADS=1")
    assert all(result["server_facts"][s]["startup_s"] > 0 for s in bench.SERVERS)
