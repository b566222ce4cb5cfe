"""research/bench/large_request.py on the tiny trained model: the real server, a large request
and small ones beside it, every one answered; the JSON it prints. No timing is checked: the
figures come from the demo model (docs/serving.md)."""

import json

import pytest


def test_small_requests_beside_a_large_one(trained_tiny, tiny_data, tmp_path, capsys):
    pytest.importorskip("httpx")
    pytest.importorskip("ctranslate2")
    from research.bench import large_request

    text = tiny_data.parent / "text" / "test.en"
    assert large_request.main([str(trained_tiny), "--data", str(tiny_data), "--text", str(text),
                               "--texts", "300", "--smalls", "2", "--after", "0.2", "--gap",
                               "0.1", "--cache-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["small_latencies_s"]) == 2 and out["large"]["status"] == 200
    assert out["small_max_s"] >= out["small_median_s"] > 0
    assert (tmp_path / "server.log").exists()
