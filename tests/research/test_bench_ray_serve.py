"""research/bench/ray_serve.py (python -m research.bench.ray_serve): its pure parts; the load
itself is research/bench/load.py's, tested in tests/research/test_bench_load.py and
tests/research/test_bench_serve.py. No Ray is started here."""

from research.bench import ray_serve


def test_requests_group_the_same_sentences_per_pair_with_the_pairs_interleaved():
    items = [("en", "de", "a"), ("de", "en", "x"), ("en", "de", "b"), ("de", "en", "y"),
             ("en", "de", "c")]
    assert ray_serve.requests_of(items, 1) == items
    assert ray_serve.requests_of(items, 2) == [("en", "de", ["a", "b"]), ("de", "en", ["x", "y"]),
                                               ("en", "de", ["c"])]


def test_processes_are_told_apart_by_their_command_lines():
    role = ray_serve.role_of
    assert role("ray::ServeReplica:taskmoe:Translator") == "replicas"
    assert role("ray::ServeReplica:taskmoe:Ingress") == "ingress"
    assert role("ray::ProxyActor") == "proxy"
    assert role("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server") == \
        "ray system"
    assert role("/usr/bin/python something-else") == "taskmoe-serve"


def result(sent_s, p99, cpu):
    return {"sentences_per_s": sent_s, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": p99,
            "requests_per_call": 1.5, "service_rss_mb": 100.0, "errors": 0,
            "cpu_ms_per_request": cpu}


def test_rounds_become_one_row_of_medians_and_the_table_shows_every_round():
    runs = [{"round": i + 1, "server": "ray x2", "sentences_per_request": 8, "flags": ["f"],
             "result": result(s, p, {"proxy": c})}
            for i, (s, p, c) in enumerate([(10.0, 300.0, 5.0), (30.0, 100.0, 7.0),
                                           (20.0, 200.0, 9.0)])]
    row = ray_serve.median_row(runs)
    m = row["result"]
    assert (row["server"], row["sentences_per_request"]) == ("ray x2", 8)
    assert (m["sentences_per_s"], m["p99_ms"], m["cpu_ms_per_request"]) == (20.0, 200.0,
                                                                             {"proxy": 7.0})
    assert m["rounds_sentences_per_s"] == [10.0, 30.0, 20.0] and m["errors"] == 0
    line = ray_serve.table([row]).splitlines()[-1]
    assert line.startswith("| ray x2 | 8 | 20.00 (10.0, 30.0, 20.0) | 1.0 | 200.0 | 1.5 | 0 | ")
    assert "| 7.0 / - / - / - / - |" in line  # proxy / ingress / replicas / ray system / driver


def test_arguments():
    args = ray_serve.parse_args(["--replicas-list", "1,2,4", "--sentences-per-request", "1,4",
                                 "--rounds", "2"])
    assert (args.replicas_list, args.sentences_per_request, args.rounds) == ([1, 2, 4], [1, 4],
                                                                           2)
