"""research/bench/moe_layer.py on tiny sizes: every variant timed, our token layer equal to a
by-hand GShard top-2, and fairscale (its Gumbel noise off) equal to ours where it dropped
nothing."""

import json

import pytest
import torch

from research.bench import moe_layer as bench

TINY = ["--experts", "4", "--tokens", "64", "--embed-dim", "16", "--ffn-dim", "32",
        "--reps", "2", "--warmup", "1"]
VARIANTS = {bench.OURS, bench.FAIRSCALE, bench.TASK, bench.DENSE}


def test_report_times_every_variant_and_checks_fairscale(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    threads = str(torch.get_num_threads())  # main sets it; keep this process's as it is
    bench.main(TINY + ["--threads", threads, "--json", str(out), "--markdown", str(md)])
    (result,) = json.loads(out.read_text())["results"]
    assert result["experts"] == 4
    assert set(result["variants"]) == VARIANTS
    for v in result["variants"].values():
        assert len(v["times_ms"]) == 2 and all(t > 0 for t in v["times_ms"])
        assert 0 < v["min_ms"] <= v["median_ms"]
        assert v["vs_ours_token"] > 0 and v["vs_dense"] > 0
    assert result["variants"][bench.OURS]["vs_ours_token"] == 1.0
    assert result["variants"][bench.DENSE]["vs_dense"] == 1.0
    routing = result["fairscale_routing"]
    assert routing["capacity"] == 2 * 64 // 4 and routing["assignments"] == 128
    assert routing["ours_dropped"] == 0 and 0 <= routing["dropped"] < 128
    assert 0 < routing["noise_off_tokens_kept_whole"] <= 64
    assert routing["noise_off_max_abs_diff"] < 1e-5
    text = md.read_text()
    assert text.startswith("# ") and "-m research.bench.moe_layer --experts 4" in text
    assert all(name in text for name in VARIANTS)


def test_ours_token_matches_direct_top2():
    args = bench.parse_args(TINY)
    with bench.one_process_group():  # fairscale's MOELayer reads the world size when built
        s = bench.build(4, args)
    with torch.inference_mode():
        out = bench.variants(s)[bench.OURS]().reshape(64, 16)
        x = s.x.reshape(64, 16)
        probs = torch.softmax(x @ s.ours.router.wg.weight.t(), dim=-1)
        w, idx = probs.topk(2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        every = torch.stack([ffn(x) for ffn in s.ours.experts.experts])  # [E, N, C]
        n = torch.arange(64)
        expected = w[:, :1] * every[idx[:, 0], n] + w[:, 1:] * every[idx[:, 1], n]
    torch.testing.assert_close(out, expected)
    assert not torch.equal(out, torch.zeros_like(out))


def test_rejects_expert_counts_fairscale_cannot_take():
    with pytest.raises(SystemExit):
        bench.parse_args(["--experts", "3", "--tokens", "64", "--batch", "16"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens", "100", "--batch", "64"])
