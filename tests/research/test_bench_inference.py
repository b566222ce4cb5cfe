"""research/bench/inference.py on a tiny shape: every variant measured, sizes consistent."""

import json

from research.bench import inference as bench
from research.bench import variants

TINY = ["--experts", "4", "--embed-dim", "16", "--ffn-dim", "32", "--layers", "2", "--heads",
        "2", "--vocab", "120", "--batch-sizes", "1,3", "--reps", "1", "--threads", "1",
        "--src-len", "5", "--tgt-len", "4", "--no-memory"]


def test_every_variant_is_measured_and_pruned_matches_dense_size(tmp_path):
    out = tmp_path / "r.json"
    bench.main(TINY + ["--work", str(tmp_path / "w"), "--json", str(out), "--markdown",
                       str(tmp_path / "r.md"), "--plot", str(tmp_path / "p.png")])
    rows = json.loads(out.read_text())["experts"]["4"]["variants"]
    assert set(rows) == set("abcdef")
    for r in rows.values():
        for measure in ("decode", "score"):
            assert r["throughput"][measure]["peak"] > 0
        assert r["latency_ms_per_sentence"] > 0
    # a merged pruned task-MoE is a dense transformer of the same active size
    assert rows["c"]["params"] == rows["e"]["params"]
    assert rows["c"]["params"] < rows["d"]["params"] < rows["b"]["params"]
    assert rows["c"]["checkpoint_bytes"] < rows["b"]["checkpoint_bytes"]
    assert rows["a"]["peak_score_vs_a"] == 1.0 and rows["e"]["peak_decode_vs_e"] == 1.0
    assert (tmp_path / "p.png").stat().st_size > 0
    assert "| 4 | c: task-MoE pruned, merged |" in (tmp_path / "r.md").read_text()


def test_memory_probe_reports_peak_rss(tmp_path):
    args = bench.parse_args(TINY)
    data = variants.dict_dir(tmp_path, args.vocab)
    path = tmp_path / "c.pt"
    variants.build_checkpoint(data, args, 4, "c", path)
    mem = bench.peak_memory(path, 3, args)
    assert mem["peak_rss_kib"] >= mem["rss_before_load_kib"] > 0
