"""taskmoe-serve: routes, batching, guards and the HTTP API, on a tiny trained task-MoE.

Unit tests need no model. The end-to-end tests train one tiny target/target task-MoE (languages
en, de, fr; trained en-de, de-en, en-fr), start the real app under uvicorn on 127.0.0.1 (a free
port, in a thread of this process) and talk HTTP to it; the SIGTERM test runs the real
`taskmoe-serve` command in a subprocess."""

import json
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from test_cli import BIN, ENV, REPO, train
from tiny_data import LANGS

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

# --- routes (no model) --------------------------------------------------------------------------


def facts(kinds=("target", "target"), trained=("en-de", "de-en", "en-fr"), policy="target_mean",
          langs=LANGS):
    from fairseq_taskmoe.serve.routes import ModelFacts

    return ModelFacts(tuple(langs), tuple(tuple(p.split("-")) for p in trained), kinds, policy)


def kinds_of(routes):
    return {f"{s}-{t}": (r.kind, r.via) for (s, t), r in routes.items()}


def test_routes_of_a_target_routed_model():
    from fairseq_taskmoe.serve.routes import plan_routes

    assert kinds_of(plan_routes(facts())) == {
        "en-de": ("direct", None), "de-en": ("direct", None), "en-fr": ("direct", None),
        "de-fr": ("pivot", "en"),  # de-en + en-fr trained
        "fr-en": ("unavailable", None), "fr-de": ("unavailable", None)}  # fr was never a source
    # --pivot none: every target was trained, so the target gates' rows are trained: zero-shot
    assert kinds_of(plan_routes(facts(), pivot="none"))["de-fr"] == ("zero-shot", None)
    assert kinds_of(plan_routes(facts(), pivot="none"))["fr-de"] == ("zero-shot", None)
    # a target never trained into is refused with the reason, pivot or not
    routes = plan_routes(facts(trained=("en-de", "de-en")), pivot="none")
    assert routes[("en", "fr")].kind == "unavailable"
    assert "fr was never a training target" in routes[("en", "fr")].why


def test_lang_pair_own_row_zero_shot_is_never_served_directly():
    from fairseq_taskmoe.serve.routes import plan_routes

    own = facts(kinds=("lang_pair", "lang_pair"), policy="own_row")
    routes = plan_routes(own, pivot="none")
    assert routes[("de", "fr")].kind == "unavailable"
    assert "pair never trained" in routes[("de", "fr")].why
    assert plan_routes(own)[("de", "fr")].kind == "pivot"  # served only through trained legs
    # target_mean routes an untrained pair by trained rows into its target: zero-shot allowed
    mean = facts(kinds=("lang_pair", "lang_pair"), policy="target_mean")
    assert plan_routes(mean, pivot="none")[("de", "fr")].kind == "zero-shot"
    # token routing has no task rows at all: zero-shot direct is the model itself
    token = facts(kinds=("token", "token"), policy="own_row")
    assert plan_routes(token, pivot="none")[("fr", "de")].kind == "zero-shot"


def test_pairs_and_pivot_options():
    from fairseq_taskmoe.serve.routes import (RouteError, legs_needed, parse_pairs_option,
                                              plan_routes)

    four = facts(langs=("en", "de", "fr", "cs"),
                 trained=("en-de", "de-en", "en-fr", "fr-en", "de-cs", "cs-de", "en-cs"))
    assert plan_routes(four)[("de", "fr")].via == "en"
    # cs-en: cs-de + de-en (de) is the only pivot; forcing another one refuses
    assert plan_routes(four)[("cs", "en")].via == "de"
    forced = plan_routes(four, pivot="fr")[("cs", "en")]
    assert forced.kind == "unavailable" and "fr has both legs" in forced.why
    allowed = parse_pairs_option("en-de,*-fr", four.langs)
    routes = plan_routes(four, allowed=allowed)
    # cs-fr: cs-de is trained but de-fr is not (pivots are one hop): unavailable
    assert {p for p, r in routes.items() if r.available} == {("en", "de"), ("en", "fr"),
                                                             ("de", "fr")}
    assert "(--pairs)" in routes[("de", "en")].why
    # the legs of a pivot are built even when --pairs does not list them
    assert sorted(legs_needed(routes)) == [("de", "en"), ("en", "de"), ("en", "fr")]
    assert parse_pairs_option("all", four.langs) is None
    with pytest.raises(RouteError, match="unknown language 'xx'"):
        parse_pairs_option("en-xx", four.langs)
    with pytest.raises(RouteError, match="--pivot es"):
        plan_routes(four, pivot="es")


# --- text, keys, sizes (no model) ---------------------------------------------------------------

def test_html_markup_is_kept_and_text_nodes_translated():
    from fairseq_taskmoe.serve.text import html_fragments, html_rebuild, html_texts

    doc = '<p class="green">Hello &amp; bye!</p> <b>x</b><script>var a = "no";</script><br/>'
    parts = html_fragments(doc)
    assert html_texts(parts) == ["Hello & bye!", "x"]
    assert html_rebuild(parts, ["A & B", "Y"]) == \
        '<p class="green">A &amp; B</p> <b>Y</b><script>var a = "no";</script><br/>'


def test_api_keys_file_and_rate_limit(tmp_path):
    from fairseq_taskmoe.serve.keys import KeyGuard, load_keys

    (tmp_path / "keys.txt").write_text("# key rpm chars\nalpha 2\nbeta - 10\n")
    (tmp_path / "keys.json").write_text('{"alpha": {"req_per_min": 2}, "beta": {}}')
    for name in ("keys.txt", "keys.json"):
        guard = KeyGuard(load_keys(str(tmp_path / name)))
        assert guard.check(None)[0] == 403 and guard.check("nope")[0] == 403
        assert guard.check("alpha") is None and guard.check("alpha") is None
        assert guard.check("alpha") == (429, "Slowdown: 2 per 1 minute")
        assert guard.check("beta") is None
    assert KeyGuard(load_keys(str(tmp_path / "keys.txt"))).char_limit("beta") == 10
    (tmp_path / "bad.txt").write_text("alpha many\n")
    with pytest.raises(ValueError, match="bad.txt:1: REQ_PER_MIN must be a whole number"):
        load_keys(str(tmp_path / "bad.txt"))


def test_sizes_and_checkpoint_digest(tmp_path):
    from fairseq_taskmoe.distributed.checkpoints import find_checkpoint
    from fairseq_taskmoe.serve.registry import checkpoint_digest, parse_size

    assert parse_size("200MB") == 200 << 20 and parse_size("1.5GB") == int(1.5 * (1 << 30))
    assert parse_size("512k") == 512 << 10 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="bad size 'lots'"):
        parse_size("lots")
    path = tmp_path / "c.pt"
    path.write_bytes(b"x" * 1000)
    before = checkpoint_digest(find_checkpoint(str(path)))
    path.write_bytes(b"x" * 999 + b"y")  # same size, one byte changed
    assert checkpoint_digest(find_checkpoint(str(path))) != before


# --- batcher (fake engine) ----------------------------------------------------------------------

class FakeEngine:
    """Upper-cases texts; records each call; can be held on an event."""

    def __init__(self, gate=None):
        self.calls, self.gate = [], gate

    def group_key(self, src, tgt):
        return tgt

    def translate(self, texts, src, tgt, beam, nbest=1):
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(list(texts))
        return [[t.upper()] * nbest for t in texts]


class FakeRegistry:
    def __init__(self, engine):
        self.engine = engine

    @contextmanager
    def use(self, key, timeout=300.0):
        yield self.engine


def test_batcher_puts_concurrent_requests_in_one_call_and_bounds_the_queue():
    from fairseq_taskmoe.serve.batcher import Batcher, Job, QueueFull

    engine = FakeEngine()
    batcher = Batcher(FakeRegistry(engine), max_wait_ms=200, max_queue=8)
    futures = [batcher.submit("*-de", Job([f"a{i}", "bb" * i], "en", "de", 4, 1,
                                          [len(f"a{i}"), 2 * i])) for i in range(4)]
    assert [f.result(5) for f in futures] == [[["A0"], [""]], [["A1"], ["BB"]],
                                             [["A2"], ["BBBB"]], [["A3"], ["BBBBBB"]]]
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 8  # one call, sorted by length
    assert [len(t) for t in engine.calls[0]] == sorted((len(t) for t in engine.calls[0]),
                                                      reverse=True)
    gate = threading.Event()
    held = Batcher(FakeRegistry(FakeEngine(gate)), max_wait_ms=0, max_queue=1)
    first = held.submit("k", Job(["x"], "en", "de", 4, 1, [1]))
    time.sleep(0.2)  # the worker took it and is held in the engine
    second = held.submit("k", Job(["y"], "en", "de", 4, 1, [1]))
    with pytest.raises(QueueFull, match="queue is full"):
        held.submit("k", Job(["z"], "en", "de", 4, 1, [1]))
    gate.set()
    assert first.result(5) == [["X"]] and second.result(5) == [["Y"]]
    held.close()
    batcher.close()


def test_batcher_skips_cancelled_requests_and_drains_on_close():
    from fairseq_taskmoe.serve.batcher import Batcher, Closed, Job

    engine = FakeEngine()
    batcher = Batcher(FakeRegistry(engine), max_wait_ms=300)
    cancelled = batcher.submit("k", Job(["gone"], "en", "de", 4, 1, [1]))
    kept = batcher.submit("k", Job(["kept"], "en", "de", 4, 1, [1]))
    assert cancelled.cancel()
    batcher.close()  # answers what it accepted before stopping
    assert kept.result(0) == [["KEPT"]] and engine.calls == [["kept"]]
    with pytest.raises(Closed):
        batcher.submit("k", Job(["late"], "en", "de", 4, 1, [1]))


def test_a_request_past_its_timeout_is_answered_and_its_job_cancelled():
    import asyncio

    from fairseq_taskmoe.serve.batcher import Batcher, Job
    from fairseq_taskmoe.serve.routes import plan_routes
    from fairseq_taskmoe.serve.service import RequestTimeout, ServeLimits, Service

    gate = threading.Event()
    registry = FakeRegistry(FakeEngine(gate))
    registry.facts, registry.max_source_positions = facts(), 1024
    registry.key_of = lambda pair: f"*-{pair[1]}"
    batcher = Batcher(registry, max_wait_ms=0)
    service = Service(registry, batcher, plan_routes(facts()), ServeLimits(timeout=0.3))
    held = batcher.submit("*-de", Job(["first"], "en", "de", 4, 1, [1]))
    time.sleep(0.2)  # the worker took it and is held in the engine
    with pytest.raises(RequestTimeout, match="longer than 0.3 s"):
        asyncio.run(service.translate(["late"], "en", "de"))
    gate.set()
    assert held.result(5) == [["FIRST"]]
    batcher.close()
    assert registry.engine.calls == [["first"]]  # the timed-out request was skipped


# --- end to end ---------------------------------------------------------------------------------

PAIRS4 = ["en-de", "de-en", "en-fr", "de-fr"]  # three direct, one pivot (via en)


@pytest.fixture(scope="module")
def trained(trained_tiny):
    return trained_tiny  # conftest: one 120-update training for the whole session


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-cache")


def sentences(tiny_data, lang):
    return (tiny_data.parent / "text" / f"test.{lang}").read_text().splitlines()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_service(argv):
    from fairseq_taskmoe.cli.serve import build_parser, make_service as make

    return make(build_parser().parse_args([str(a) for a in argv]))


@contextmanager
def serving(argv):
    """The real app under uvicorn on 127.0.0.1, in a thread; yields (base URL, service)."""
    import uvicorn

    from fairseq_taskmoe.serve.app import create_app

    service, keys = make_service(argv)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, keys), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(30)


def base_args(trained, tiny_data, cache_dir, *extra):
    return [trained, "--data", tiny_data, "--cache-dir", cache_dir, "--beam", "4", *extra]


def post(url, path, **kwargs):
    return httpx.post(url + path, timeout=60, **kwargs)


def metric(text, name, **labels):
    """The value of one sample in Prometheus text format (0.0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else " ")):
            series, value = line.rsplit(" ", 1)
            got = series[len(name):].strip("{}")
            if not labels or ",".join(sorted(got.split(","))) == want:
                return float(value)
    return 0.0


@pytest.fixture(scope="module")
def ct2_server(trained, tiny_data, cache_dir):
    pytest.importorskip("ctranslate2")
    with serving(base_args(trained, tiny_data, cache_dir, "--quantization", "float32",
                           "--max-wait-ms", "50", "--char-limit", "3000", "--batch-limit",
                           "40", "--body-limit", "64KB")) as (url, service):
        yield url, service


def test_languages_pairs_and_metrics(ct2_server):  # runs first: nothing loaded yet
    url, _ = ct2_server
    languages = {lang["code"]: lang for lang in httpx.get(url + "/languages").json()}
    assert languages["de"]["targets"] == ["en", "fr"]
    assert languages["de"]["routes"]["fr"] == {"kind": "pivot", "via": "en"}
    assert languages["fr"]["targets"] == []  # fr was never a source: nothing honest to offer
    info = httpx.get(url + "/pairs/de-fr").json()
    assert info["route"] == {"kind": "pivot", "via": "en"}
    assert [s["subnetwork"] for s in info["subnetworks"]] == ["*-en", "*-fr"]
    for sub in info["subnetworks"]:
        assert sub["parameters"] < info["full_model"]["parameters"] and sub["bytes"] > 0
        layers = {layer["name"]: layer for layer in sub["layers"]}
        assert set(layers) == {"encoder.layers.1", "decoder.layers.1"}
        kept = layers["decoder.layers.1"]["kept"][sub["subnetwork"][-2:]]
        assert len(kept) == 2 and abs(sum(w for _, w in kept) - 1) < 1e-5  # top-2 experts
    assert httpx.get(url + "/pairs/xx-de").status_code == 404
    assert httpx.get(url + "/health").json()["status"] == "ok"
    text = httpx.get(url + "/metrics").text
    assert metric(text, "taskmoe_requests_total", endpoint="/languages", status="200",
                  pair="-") >= 1
    assert metric(text, "taskmoe_subnetwork_loads_total", subnetwork="*-fr") == 0  # not used yet
    assert post(url, "/translate", json={"q": "e1", "source": "en", "target": "fr"}).is_success
    post(url, "/translate", json={"q": "e2", "source": "en", "target": "fr"})
    text = httpx.get(url + "/metrics").text
    assert metric(text, "taskmoe_subnetwork_loads_total", subnetwork="*-fr") == 1  # kept loaded
    assert metric(text, "taskmoe_subnetwork_load_seconds_count") >= 1
    assert metric(text, "taskmoe_resident_memory_bytes") > 0
    spec = httpx.get(url + "/openapi.json").json()
    assert {"/translate", "/languages", "/detect", "/pairs/{pair}"} <= set(spec["paths"])
    assert httpx.get(url + "/docs").status_code == 200


def test_ct2_served_equals_ctranslate2_on_the_same_export(ct2_server, tiny_data):
    from fairseq_taskmoe.ct2 import load_ct2_translator

    url, service = ct2_server
    source = sentences(tiny_data, "en")
    for pair in ("en-fr", "en-de"):
        src, tgt = pair.split("-")
        answer = post(url, "/translate", json={"q": source, "source": src, "target": tgt})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["route"] == {"kind": "direct", "via": None}
        sub = service.registry.subnetwork(service.registry.key_of((src, tgt)))
        assert sub.key == f"*-{tgt}"  # target routing: one sub-network per target
        want = load_ct2_translator(sub.path, intra_threads=1).translate(source, beam=4)
        assert body["translatedText"] == want
        single = post(url, "/translate", data={"q": source[3], "source": src, "target": tgt})
        assert single.json()["translatedText"] == want[3]  # a form body, one text


def test_pivot_route_is_leg_one_then_leg_two(ct2_server, tiny_data):
    url, _ = ct2_server
    source = sentences(tiny_data, "de")[:6]
    pivot = post(url, "/translate", json={"q": source, "source": "de", "target": "fr"}).json()
    assert pivot["route"] == {"kind": "pivot", "via": "en"}
    english = post(url, "/translate", json={"q": source, "source": "de", "target": "en"}).json()
    french = post(url, "/translate", json={"q": english["translatedText"], "source": "en",
                                           "target": "fr"}).json()
    assert pivot["translatedText"] == french["translatedText"]
    refused = post(url, "/translate", json={"q": "f1 f2", "source": "fr", "target": "de"})
    assert refused.status_code == 400 and "fr-de is not available" in refused.json()["error"]


def test_mixed_pair_concurrency_equals_single_requests(ct2_server, tiny_data):
    url, _ = ct2_server
    source = {lang: sentences(tiny_data, lang) for lang in ("en", "de")}
    work = [(PAIRS4[i % 4], source[PAIRS4[i % 4][:2]][i % 24]) for i in range(64)]
    singles = {}
    for pair, text in set(work):  # one at a time first
        src, tgt = pair.split("-")
        singles[pair, text] = post(url, "/translate", json={"q": text, "source": src,
                                                           "target": tgt}).json()
    before = httpx.get(url + "/metrics").text

    def ask(item):
        pair, text = item
        src, tgt = pair.split("-")
        with httpx.Client(timeout=60) as client:
            return client.post(url + "/translate", json={"q": text, "source": src,
                                                         "target": tgt})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, work))
    assert [a.status_code for a in answers] == [200] * 64
    for (pair, text), answer in zip(work, answers):
        assert answer.json() == singles[pair, text], (pair, text)
    after = httpx.get(url + "/metrics").text
    calls = texts = 0
    for key in ("*-de", "*-en", "*-fr"):
        calls += (metric(after, "taskmoe_batch_requests_count", subnetwork=key)
                  - metric(before, "taskmoe_batch_requests_count", subnetwork=key))
        texts += (metric(after, "taskmoe_batch_requests_sum", subnetwork=key)
                  - metric(before, "taskmoe_batch_requests_sum", subnetwork=key))
    assert texts == 64 + 16  # each request once per leg (16 de-fr requests have two legs)
    assert calls < texts, "concurrent requests should share engine calls"


BAD_INPUTS = [
    ({"json": {"q": "e1", "source": "en", "target": "zz"}}, 400, "zz is not supported"),
    ({"json": {"q": "e1", "source": "xx", "target": "de"}}, 400, "xx is not supported"),
    ({"json": {"q": "", "source": "en", "target": "de"}}, 400, "missing q parameter"),
    ({"json": {"q": [], "source": "en", "target": "de"}}, 400, "missing q parameter"),
    ({"json": {"source": "en", "target": "de"}}, 400, "missing q parameter"),
    ({"json": {"q": 5, "source": "en", "target": "de"}}, 400, "q must be a string"),
    ({"json": {"q": ["e1", 2], "source": "en", "target": "de"}}, 400, "q must be a string"),
    ({"json": {"q": "e1", "target": "de"}}, 400, "missing source parameter"),
    ({"json": {"q": "e1", "source": "en"}}, 400, "missing target parameter"),
    ({"json": ["not", "a", "dict"]}, 400, "Invalid JSON format"),
    ({"content": b'{"q": "e1", "source": ', "headers": {"Content-Type": "application/json"}},
     400, "Invalid JSON format"),
    ({"content": b'{"q": "\xff\xfe", "source": "en", "target": "de"}',
      "headers": {"Content-Type": "application/json"}}, 400, "not valid UTF-8"),
    ({"content": b"q=%FF&source=en&target=de",
      "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 400, "not valid UTF-8"),
    ({"content": b"q=e1", "headers": {"Content-Type": "text/plain"}}, 400,
     "missing q parameter"),  # not read, as LibreTranslate (Flask) does not read it
    ({"json": {"q": "e1 " * 30000, "source": "en", "target": "de"}}, 413,
     "Request body too large"),
    ({"json": {"q": "e1", "source": "en", "target": "de", "alternatives": 1000}}, 400,
     "Invalid request: alternatives parameter must be <= 3"),
    ({"data": {"q": "e1", "source": "en", "target": "de", "alternatives": "abc"}}, 400,
     "alternatives parameter is not a number"),
    ({"json": {"q": "e1", "source": "en", "target": "de", "format": "xml"}}, 400,
     "xml format is not supported"),
    ({"json": {"q": "e1 " * 1100, "source": "en", "target": "de"}}, 400,
     "exceeds character limit (3000)"),
    ({"json": {"q": ["e1"] * 41, "source": "en", "target": "de"}}, 400,
     "request (41) exceeds text limit (40)"),
    ({"json": {"q": "xyz", "source": "auto", "target": "de"}}, 400,
     "could not detect the source language"),
]


def test_each_bad_input_gets_a_json_error_and_the_server_keeps_serving(ct2_server, caplog):
    url, _ = ct2_server
    caplog.set_level("INFO", logger="taskmoe.serve.access")
    good = post(url, "/translate", json={"q": "e1 e2", "source": "en", "target": "de"}).json()
    for request, status, message in BAD_INPUTS:
        answer = post(url, "/translate", **request)
        assert answer.status_code == status, (request, answer.text)
        assert message in answer.json()["error"], (request, answer.json())
        again = post(url, "/translate", json={"q": "e1 e2", "source": "en", "target": "de"})
        assert again.json() == good
    assert post(url, "/detect", json={}).status_code == 400
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "taskmoe.serve.access"]
    assert {"method": "POST", "path": "/translate", "status": 413, "pair": "-"}.items() <= \
        next(line for line in lines if line["status"] == 413).items()
    assert all({"method", "path", "status", "pair", "ms", "chars"} <= set(line) for line in lines)


def test_long_text_is_split_and_a_too_long_sentence_refused(ct2_server):
    url, service = ct2_server
    limit = service.max_tokens
    sentence = "e1 e2 e3 e4 e5 e6 e7 e8 e9."
    long_text = " ".join([sentence] * (limit // 9 + 5))
    with httpx.Client(timeout=120) as client:
        body = {"q": long_text, "source": "en", "target": "de"}
        service.limits.char_limit, service.limits.body_limit = None, 1 << 20  # this test only
        try:
            answer = client.post(url + "/translate", json=body)
            assert answer.status_code == 200, answer.text
            one = client.post(url + "/translate", json={"q": sentence, "source": "en",
                                                         "target": "de"}).json()
            # the segments are sentence groups that fit; the first is many sentences
            assert answer.json()["translatedText"].count(" ") > one["translatedText"].count(" ")
            run_on = client.post(url + "/translate", json={"q": "e1 " * (limit + 1),
                                                           "source": "en", "target": "de"})
            assert run_on.status_code == 400
            assert f"longer than this model takes ({limit} tokens" in run_on.json()["error"]
        finally:
            service.limits.char_limit, service.limits.body_limit = 3000, 64 << 10


def test_libretranslate_documented_examples(ct2_server):
    """The requests of LibreTranslate's README (Simple, Auto Detect, HTML, Alternative
    Translations) and the response shapes its own API tests check, with this model's
    languages."""
    url, _ = ct2_server
    simple = post(url, "/translate", json={"q": "e1 e2!", "source": "en", "target": "de"})
    assert simple.status_code == 200 and isinstance(simple.json()["translatedText"], str)
    auto = post(url, "/translate", json={"q": "the man and the dog", "source": "auto",
                                         "target": "de"}).json()
    assert auto["detectedLanguage"]["language"] == "en"
    assert 0 < auto["detectedLanguage"]["confidence"] <= 100
    html = post(url, "/translate", json={"q": '<p class="green">e1 e2</p>', "source": "en",
                                         "target": "de", "format": "html"}).json()
    plain = post(url, "/translate", json={"q": "e1 e2", "source": "en", "target": "de"}).json()
    assert html["translatedText"] == f'<p class="green">{plain["translatedText"]}</p>'
    alts = post(url, "/translate", json={"q": "e1 e2", "source": "en", "target": "de",
                                         "format": "text", "alternatives": 3}).json()
    assert alts["translatedText"] == plain["translatedText"]
    assert isinstance(alts["alternatives"], list) and len(alts["alternatives"]) == 3
    assert plain["translatedText"] not in alts["alternatives"]
    batch = post(url, "/translate", json={"q": ["e1", "e2"], "source": "en", "target": "de",
                                          "alternatives": 2}).json()
    assert len(batch["translatedText"]) == 2 and len(batch["alternatives"]) == 2
    emoji = post(url, "/translate", json={"q": ["😀", "😁"], "source": "en", "target": "de"})
    assert emoji.json()["translatedText"] == ["😀", "😁"]  # nothing translatable: returned
    auto_batch = post(url, "/translate", json={"q": ["the man", "the dog and the boy"],
                                               "source": "auto", "target": "de"}).json()
    assert [d["language"] for d in auto_batch["detectedLanguage"]] == ["en", "en"]
    same = post(url, "/translate", data={"q": "e1", "source": "en", "target": "en"}).json()
    assert same["translatedText"] == "e1" and same["route"]["kind"] == "identity"
    multipart = post(url, "/translate", files={"q": (None, "e1 e2"), "source": (None, "en"),
                                               "target": (None, "de")})
    assert multipart.json()["translatedText"] == plain["translatedText"]
    detect = post(url, "/detect", data={"q": "Der Mann und die Frau"}).json()
    assert detect[0] == {"confidence": 100.0, "language": "de"}
    settings = httpx.get(url + "/frontend/settings").json()
    assert settings["charLimit"] == 3000 and settings["apiKeys"] is False


def test_libretranslatepy_client_talks_to_the_server(ct2_server):
    libretranslatepy = pytest.importorskip("libretranslatepy")
    url, _ = ct2_server
    lt = libretranslatepy.LibreTranslateAPI(url)
    plain = post(url, "/translate", json={"q": "e1 e2", "source": "en", "target": "de"}).json()
    assert lt.translate("e1 e2", "en", "de") == plain["translatedText"]
    assert {lang["code"] for lang in lt.languages()} == set(LANGS)
    assert lt.detect("Le chien et la femme")[0]["language"] == "fr"


def test_api_keys_guard_requests(trained, tiny_data, cache_dir, tmp_path):
    pytest.importorskip("ctranslate2")
    (tmp_path / "keys.txt").write_text("slow 2\nfast\n")
    with serving(base_args(trained, tiny_data, cache_dir, "--quantization", "float32",
                           "--api-keys", tmp_path / "keys.txt")) as (url, _):
        body = {"q": "e1", "source": "en", "target": "de"}
        assert post(url, "/translate", json=body).status_code == 403
        assert post(url, "/translate", json={**body, "api_key": "nope"}).status_code == 403
        assert post(url, "/translate", json={**body, "api_key": "slow"}).status_code == 200
        assert post(url, "/detect", data={"q": "the dog", "api_key": "slow"}).status_code == 200
        limited = post(url, "/translate", json={**body, "api_key": "slow"})
        assert limited.status_code == 429 and limited.json()["error"] == "Slowdown: 2 per 1 minute"
        assert post(url, "/translate", json={**body, "api_key": "fast"}).status_code == 200
        assert httpx.get(url + "/frontend/settings").json()["apiKeys"] is True


def test_memory_budget_of_one_subnetwork(trained, tiny_data, cache_dir, ct2_server):
    url_free, service_free = ct2_server
    one = max(s.bytes for s in service_free.registry.subnets.values())
    source = sentences(tiny_data, "en")[:4] + sentences(tiny_data, "de")[:4]
    with serving(base_args(trained, tiny_data, cache_dir, "--quantization", "float32",
                           "--memory-budget", str(one))) as (url, service):
        for round_ in range(3):
            for pair in PAIRS4:
                src, tgt = pair.split("-")
                texts = source[:4] if src == "en" else source[4:]
                body = {"q": texts, "source": src, "target": tgt}
                got = post(url, "/translate", json=body).json()
                assert got == post(url_free, "/translate", json=body).json(), pair
                assert len(service.registry.loaded_keys()) == 1
                loaded = metric(httpx.get(url + "/metrics").text, "taskmoe_subnetworks_bytes")
                assert 0 < loaded <= one
        text = httpx.get(url + "/metrics").text
        evictions = sum(metric(text, "taskmoe_subnetwork_evictions_total", subnetwork=k)
                        for k in ("*-de", "*-en", "*-fr"))
        assert evictions == service.registry.evictions >= 10
    with pytest.raises(SystemExit) as exit_:
        make_service(base_args(trained, tiny_data, cache_dir, "--quantization", "float32",
                               "--memory-budget", str(one - 1)))
    assert exit_.value.code == 2


def test_budget_refusal_names_the_figure(trained, tiny_data, cache_dir, capsys):
    pytest.importorskip("ctranslate2")
    with pytest.raises(SystemExit):
        make_service(base_args(trained, tiny_data, cache_dir, "--quantization", "float32",
                               "--memory-budget", "10KB"))
    err = capsys.readouterr().err
    assert "--memory-budget 10.0 KB cannot hold one sub-network: *-" in err and "needs" in err


def test_fairseq_backend_served_equals_hub_on_the_pruned_checkpoint(trained, tiny_data,
                                                                     cache_dir, tmp_path):
    import torch

    from fairseq_taskmoe.deploy.pruning import prune_checkpoint
    from fairseq_taskmoe.hub import load_translator
    from fairseq_taskmoe.integration.compat import load_checkpoint

    pruned = tmp_path / "en-fr.pt"
    torch.save(prune_checkpoint(load_checkpoint(str(trained)), "en-fr")[0], pruned)
    source = sentences(tiny_data, "en")
    want = load_translator(pruned, data=tiny_data, source_lang="en",
                           target_lang="fr").translate(source, beam=4)
    with serving(base_args(trained, tiny_data, cache_dir, "--backend", "fairseq",
                           "--pairs", "en-fr,de-fr")) as (url, service):
        assert service.registry.backend == "fairseq"
        got = post(url, "/translate", json={"q": source, "source": "en", "target": "fr"}).json()
        assert got["translatedText"] == want
        # concurrent single requests: each its own answer
        with ThreadPoolExecutor(8) as pool:
            singles = list(pool.map(lambda t: post(url, "/translate", json={
                "q": t, "source": "en", "target": "fr"}).json()["translatedText"], source[:8]))
        assert singles == want[:8]
        languages = {lang["code"]: lang["targets"] for lang in httpx.get(url + "/languages").json()}
        assert languages == {"en": ["fr"], "de": ["fr"], "fr": []}  # --pairs


def test_token_routed_model_is_served_whole_by_fairseq(tiny_data, tmp_path):
    """No task-routed layer: nothing to prune, so the checkpoint itself is the one sub-network
    (`*-*`), served by the fairseq backend even when ctranslate2 is asked for."""
    from fairseq_taskmoe.hub import load_translator

    train(tiny_data, tmp_path, ["--encoder-moe-routing", "token", "--decoder-moe-routing",
                                "token"], updates=10)
    checkpoint = tmp_path / "checkpoint_best.pt"
    source = sentences(tiny_data, "de")[:4]
    want = load_translator(checkpoint, data=tiny_data, source_lang="de",
                           target_lang="fr").translate(source, beam=4)
    with serving([checkpoint, "--data", tiny_data, "--cache-dir", tmp_path / "cache",
                  "--pivot", "none"]) as (url, service):
        assert service.registry.backend == "fairseq"
        assert "token-routed MoE layers route on the input" in service.registry.backend_note
        got = post(url, "/translate", json={"q": source, "source": "de", "target": "fr"}).json()
        assert got["route"] == {"kind": "zero-shot", "via": None}  # no task gate rows at all
        assert got["translatedText"] == want
        info = httpx.get(url + "/pairs/de-fr").json()
        assert [(s["subnetwork"], s["whole"]) for s in info["subnetworks"]] == [("*-*", True)]
        assert service.registry.subnetwork("*-*").path == str(checkpoint.resolve())


def test_corrupt_cached_artifact_is_rebuilt_or_answers_503(trained, tiny_data, cache_dir,
                                                          ct2_server, monkeypatch):
    url_ok, service_ok = ct2_server
    registry = service_ok.registry
    artifact = Path(registry.subnetwork("*-de").path)
    body = {"q": "e1 e2 e3", "source": "en", "target": "de"}
    want = post(url_ok, "/translate", json=body).json()
    (artifact / "model.bin").write_bytes(b"not a model")
    with serving(base_args(trained, tiny_data, cache_dir, "--quantization", "float32")) as (
            url, service):
        assert post(url, "/translate", json=body).json() == want  # rebuilt on first use
        assert (artifact / "model.bin").stat().st_size > 1000
    (artifact / "model.bin").write_bytes(b"not a model")
    from fairseq_taskmoe.serve.registry import Registry

    def refuse(self, sub):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Registry, "_write_artifact", refuse)
    with serving(base_args(trained, tiny_data, cache_dir, "--quantization", "float32")) as (
            url, service):
        broken = post(url, "/translate", json=body)
        assert broken.status_code == 503
        assert "en-de is unavailable: sub-network *-de" in broken.json()["error"]
        assert "disk full (simulated)" in broken.json()["error"]
        fine = post(url, "/translate", json={"q": "e1 e2", "source": "en", "target": "fr"})
        assert fine.status_code == 200  # other pairs keep working
    monkeypatch.undo()
    with serving(base_args(trained, tiny_data, cache_dir, "--quantization", "float32")) as (
            url, service):
        assert post(url, "/translate", json=body).json() == want


def test_a_changed_checkpoint_is_never_served_from_the_stale_cache(trained, tiny_data,
                                                                   cache_dir, tmp_path):
    pytest.importorskip("ctranslate2")
    import torch

    from fairseq_taskmoe.integration.compat import load_checkpoint

    state = load_checkpoint(str(trained))
    changed = tmp_path / "changed.pt"
    key = next(k for k in state["model"] if k.endswith("experts.experts.0.fc1.weight"))
    state["model"][key] = state["model"][key] + 1.0
    torch.save(state, changed)
    a, _ = make_service(base_args(trained, tiny_data, cache_dir, "--quantization", "float32"))
    b, _ = make_service(base_args(changed, tiny_data, cache_dir, "--quantization", "float32"))
    assert a.registry.cache != b.registry.cache
    a.batcher.close()
    b.batcher.close()


def test_sigterm_finishes_requests_in_flight_and_exits_0(trained, tiny_data, cache_dir):
    pytest.importorskip("ctranslate2")
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "taskmoe-serve"), str(trained), "--data", str(tiny_data), "--cache-dir",
         str(cache_dir), "--quantization", "float32", "--port", str(port),
         "--max-wait-ms", "5000", "--log-level", "warning"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        body = {"q": "e1 e2", "source": "en", "target": "de"}
        results = []

        def ask(_):
            return httpx.post(url + "/translate", json=body, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, i) for i in range(8)]
            deadline = time.time() + 4  # all 8 accepted: waiting in the batcher (up to 5 s)
            while httpx.get(url + "/health", timeout=2).json()["queue"] < 8:
                assert time.time() < deadline, "requests did not reach the batcher"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        assert [r.status_code for r in results] == [200] * 8
        assert len({r.json()["translatedText"] for r in results}) == 1
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_start_up_errors_exit_2_with_a_message(tiny_data, tmp_path, capsys):
    def fails(argv, message):
        with pytest.raises(SystemExit) as exit_:
            make_service(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("taskmoe-serve: error: ") and message in err, err

    fails([tmp_path / "missing.pt", "--data", tiny_data], "missing.pt does not exist")
    fails([tmp_path / "missing.pt", "--data", tmp_path / "nope"], "--data")
    fails([tmp_path / "x.pt", "--data", tiny_data, "--memory-budget", "lots"], "bad size 'lots'")
    fails([tmp_path / "x.pt", "--data", tiny_data, "--beam", "0"], "--beam must be >= 1")


def test_output_bound_is_fairseq_generates_unless_the_source_is_long():
    """Ordinary inputs get fairseq-generate's 200 target tokens (served == generated); a long
    sentence gets twice its length, so its translation is not cut at 200; never more than the
    decoder's positions."""
    from fairseq_taskmoe.serve.engines import output_bound

    assert output_bound(10, 1024) == 200
    assert output_bound(300, 1024) == 616
    assert output_bound(900, 1024) == 1023


def test_a_full_queue_answers_503_with_retry_after_over_http(trained, tiny_data, cache_dir,
                                                             monkeypatch):
    """--max-queue 1: one request in the engine (held), one waiting, the third is refused with
    503, Retry-After and a JSON error; both accepted requests are answered once released."""
    from fairseq_taskmoe.serve import engines

    gate, entered = threading.Event(), threading.Event()
    original = engines.CT2Engine.translate

    def held(self, *args, **kwargs):
        entered.set()
        assert gate.wait(30), "the test never released the engine"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engines.CT2Engine, "translate", held)
    with serving(base_args(trained, tiny_data, cache_dir, "--quantization", "float32",
                           "--max-queue", "1", "--max-wait-ms", "0", "--threads", "1")) as (
            url, service):  # one engine thread: the second request must wait
        body = {"q": "e1 e2", "source": "en", "target": "de"}
        answers = {}

        def send(name):
            answers[name] = post(url, "/translate", json=body)

        first = threading.Thread(target=send, args=("first",))
        first.start()
        assert entered.wait(30)  # the worker took the first request and is held in the engine
        second = threading.Thread(target=send, args=("second",))
        second.start()
        deadline = time.time() + 30
        while service.batcher.pending() < 1:  # the second waits in the queue
            assert time.time() < deadline
            time.sleep(0.02)
        refused = post(url, "/translate", json=body)
        gate.set()
        first.join(30)
        second.join(30)
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert "queue is full" in refused.json()["error"]
    assert answers["first"].status_code == answers["second"].status_code == 200
    assert answers["first"].json()["translatedText"] == answers["second"].json()["translatedText"]


def test_a_checkpoint_whose_trained_pairs_are_not_src_tgt_is_a_clear_error():
    from argparse import Namespace

    from fairseq_taskmoe.moe.pairs import PruningError
    from fairseq_taskmoe.serve.routes import ModelFacts

    with pytest.raises(PruningError, match="not SRC-TGT: 'en'"):
        ModelFacts.from_checkpoint(Namespace(langs="en,de", moe_freq=0), [("en",)])
    facts = ModelFacts.from_checkpoint(Namespace(langs="en,de", moe_freq=0), [("en", "de")])
    assert ModelFacts.from_json(facts.as_json()) == facts
