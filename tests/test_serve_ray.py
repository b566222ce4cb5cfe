"""taskmoe-serve --engine ray: the same API on Ray Serve, on a local Ray cluster.

The first tests start no Ray: the fleet metrics (fleet.py), the flags, that the embedded
server never imports Ray, the routing rule of a replica (which legs it translates itself), the
side of a replica that hands legs over and scrapes the others (a fake deployment handle) and
the deployment's bounds. The others start one local cluster for the module (2 CPUs, no
dashboard; always shut down), deploy the real application (ray_engine.deploy) on the tiny
trained model of tests/test_serve.py and talk HTTP to it. The fault tests (slow) kill or freeze
a replica's process, or fill a replica with requests whose bodies never come."""

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from test_cli import ENV, REPO
from test_serve import PAIRS4, base_args, free_port, make_service, metric, sentences, serving

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


# --- no Ray started -----------------------------------------------------------------------------


def test_fleet_sums_every_family_over_replicas_and_drops_the_gauges_of_silent_ones():
    """Every replica is a whole server: whichever answers /metrics renders every family
    (requests and latency too) summed over the replicas' snapshots."""
    from fairseq_taskmoe.serve.fleet import Fleet, snapshot
    from fairseq_taskmoe.serve.metrics import Metrics

    a, b = Metrics(), Metrics()
    a.loads.labels("*-de").inc()
    b.loads.labels("*-de").inc(2)
    b.loads.labels("*-fr").inc()
    a.loaded.set(1)
    b.loaded.set(2)
    a.batch_requests.labels("*-de").observe(3)
    a.requests.labels("/translate", "200", "en-de").inc()
    b.requests.labels("/translate", "200", "en-de").inc(2)
    fleet = Fleet()
    fleet.update("r1", snapshot(a), ["*-de"], 11)
    fleet.update("r2", snapshot(b), ["*-de", "*-fr"], 12)
    text = fleet.render().decode()
    assert metric(text, "taskmoe_subnetwork_loads_total", subnetwork="*-de") == 3
    assert metric(text, "taskmoe_subnetworks_loaded") == 3
    assert metric(text, "taskmoe_batch_requests_sum", subnetwork="*-de") == 3
    assert metric(text, "taskmoe_requests_total", endpoint="/translate", status="200",
                  pair="en-de") == 3
    assert fleet.loaded_keys() == ["*-de", "*-fr"]
    fleet.scraped(["r1"], asked=2)  # r2 did not answer the broadcast: silent
    text = fleet.render().decode()
    assert metric(text, "taskmoe_subnetwork_loads_total", subnetwork="*-de") == 3  # kept
    assert metric(text, "taskmoe_requests_total", endpoint="/translate", status="200",
                  pair="en-de") == 3
    assert metric(text, "taskmoe_subnetworks_loaded") == 1  # only live replicas
    assert fleet.loaded_keys() == ["*-de"]
    assert text.count("# TYPE taskmoe_subnetwork_loads_total counter") == 1


def test_fleet_drops_a_gone_replica_and_keeps_its_counters():
    """A replica silent at a scrape loses its gauges and sub-networks (it may only be hung: its
    entry stays); one that a complete scrape (every replica asked answered) did not include is
    gone: its entry is dropped after forget_after seconds, its counters and histograms stay
    summed (totals never go down), and taskmoe_replicas says how the last scrape went."""
    from fairseq_taskmoe.serve.fleet import Fleet, snapshot
    from fairseq_taskmoe.serve.metrics import Metrics

    now = [0.0]
    a, b = Metrics(), Metrics()
    a.loads.labels("*-de").inc()
    b.loads.labels("*-de").inc(2)
    a.loaded.set(1)
    b.loaded.set(2)
    b.batch_requests.labels("*-de").observe(3)
    fleet = Fleet(forget_after=10.0, clock=lambda: now[0])

    def scrape(answering, asked):
        for name in answering:
            fleet.update(name, snapshot({"r1": a, "r2": b}[name]), ["*-de"], 1, pending=0)
        fleet.scraped(answering, asked)
        return fleet.render().decode()

    text = scrape(["r1", "r2"], 2)
    assert metric(text, "taskmoe_replicas", state="answering") == 2
    text = scrape(["r1"], 2)  # r2 hung: asked, no answer
    assert metric(text, "taskmoe_replicas", state="silent") == 1
    assert metric(text, "taskmoe_subnetworks_loaded") == 1  # its gauges dropped
    assert metric(text, "taskmoe_subnetwork_loads_total", subnetwork="*-de") == 3
    now[0] = 100.0
    scrape(["r1"], 2)
    assert set(fleet.replicas()) == {"r1", "r2"}  # silent is not gone: it may come back
    text = scrape(["r1"], 1)  # Ray no longer sends to r2: gone, kept forget_after seconds
    assert set(fleet.replicas()) == {"r1", "r2"}
    assert metric(text, "taskmoe_replicas", state="silent") == 0
    now[0] = 110.0
    a.loads.labels("*-de").inc()
    text = scrape(["r1"], 1)
    assert set(fleet.replicas()) == {"r1"}  # dropped ...
    assert metric(text, "taskmoe_subnetwork_loads_total", subnetwork="*-de") == 4  # ... kept
    assert metric(text, "taskmoe_batch_requests_sum", subnetwork="*-de") == 3
    assert metric(text, "taskmoe_batch_requests_count", subnetwork="*-de") == 1
    assert metric(text, "taskmoe_subnetworks_loaded") == 1
    assert text.count("# TYPE taskmoe_subnetwork_loads_total counter") == 1


def test_engine_flags_are_checked(tmp_path, capsys):
    def fails(extra, message):
        with pytest.raises(SystemExit) as exit_:
            make_service([tmp_path / "x.pt", "--data", tmp_path, *extra])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err, err

    fails(["--ray-address", "auto"], "--ray-address needs --engine ray")
    fails(["--engine", "ray", "--replicas", "0"],
          "--replicas and --pairs-per-replica must be >= 1")
    fails(["--engine", "ray", "--pairs-per-replica", "0"], "--pairs-per-replica must be >= 1")
    fails(["--engine", "ray", "--memory-budget", "1GB"],
          "under --engine ray each replica keeps --pairs-per-replica")


def test_the_embedded_server_does_not_import_ray():
    code = ("import sys; from fairseq_taskmoe.cli import serve; "
            "from fairseq_taskmoe.serve import app, factory, service, registry, batcher, fleet; "
            "serve.build_parser(); assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, check=True, timeout=120)


class FakeRegistry:
    """What a replica's Residents asks of the Registry: load (`held`), let go (`dropped`)."""

    load_timeout = 5.0

    def __init__(self):
        self.loads, self.drops = [], []

    def held(self, key):
        self.loads.append(key)
        return f"engine {key}"

    def dropped(self, key, why):
        self.drops.append(key)

    def call_shape(self, key):
        return 1, 1


class Recorder:
    """A batcher that answers every leg at once and remembers which sub-networks it got."""

    def __init__(self):
        self.keys = []

    def submit(self, key, job):
        self.keys.append(key)
        future = Future()
        future.set_result([[f"{key}:{t}"] for t in job.texts])
        return future

    def pending(self):
        return 0

    def close(self, timeout=None):
        pass


def test_a_replica_translates_what_it_holds_or_has_room_for_and_hands_over_the_rest():
    """The routing rule (Residents.here): with K = 2, a replica loads the first two
    sub-networks its requests need (loading evicts nothing) and translates their legs itself;
    a leg of a third, pivot legs included, is handed over (to a replica that holds it) instead
    of evicting; once Ray's LRU evicts one here, room is made for the next. The only replica
    translates everything itself. A leg queued here whose sub-network is gone by the time of
    its engine call is loaded again, through the loader, from the Batcher's thread."""
    pytest.importorskip("ray.serve")
    from fairseq_taskmoe.serve.batcher import Job
    from fairseq_taskmoe.serve.ray_engine import Legs, Residents

    def leg():
        return Job(["x"], "en", "de", 4, 1, [3])

    async def run(keys, alone=False):
        registry, local, remote = FakeRegistry(), Recorder(), Recorder()
        residents = Residents(registry, 2, alone, lambda key: residents.held_by_ray(key),
                              asyncio.get_running_loop())
        legs = Legs(residents, local, remote)
        for key in keys:
            assert (await asyncio.wrap_future(legs.submit(key, leg()))) == [[f"{key}:x"]]
            await asyncio.sleep(0.05)  # the claim's load, in the load thread
        return residents, registry, local.keys, remote.keys, legs

    residents, registry, here, handed, legs = asyncio.run(
        run(["*-de", "*-en", "*-fr", "*-de", "*-fr", "*-en"]))
    assert here == ["*-de", "*-en", "*-de", "*-en"] and handed == ["*-fr", "*-fr"]
    assert registry.loads == ["*-de", "*-en"] and sorted(residents.held) == ["*-de", "*-en"]
    assert legs.ongoing == 0
    residents.held["*-de"].__del__()  # Ray's LRU lets *-de go
    assert registry.drops == ["*-de"] and sorted(residents.held) == ["*-en"]
    assert residents.here("*-fr")  # room again

    _, registry, here, handed, _ = asyncio.run(run(["*-de", "*-en", "*-fr"], alone=True))
    assert here == ["*-de", "*-en", "*-fr"] and handed == []

    async def reload():
        registry = FakeRegistry()
        residents = Residents(registry, 2, False, lambda key: residents.held_by_ray(key),
                              asyncio.get_running_loop())

        def engine_call():
            with residents.use("*-de", timeout=5) as engine:
                return engine

        return await asyncio.to_thread(engine_call), registry.loads

    assert asyncio.run(reload()) == ("engine *-de", ["*-de"])


HANG = "hang"  # a call that never answers


async def _outcome(outcome):
    if outcome == HANG:
        await asyncio.Event().wait()
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


class FakeHandle:
    """A DeploymentHandle whose calls answer from a script: an exception to raise, HANG, an
    error answer (a dict), or hyps; `broadcast("report")` answers with `replies` (one per
    replica: a report, an exception, or HANG), or raises `replies` when it is an exception."""

    def __init__(self, script, replies=()):
        self.script, self.calls, self.replies = list(script), [], replies

    def options(self, multiplexed_model_id):
        self.key = multiplexed_model_id
        return self

    @property
    def translate(self):
        return self

    def remote(self, payload):
        self.calls.append((self.key, payload["texts"]))
        outcome = self.script.pop(0)

        async def answer():
            if isinstance(outcome, dict):
                return outcome
            return {"hyps": await _outcome(outcome)}

        return answer()

    def broadcast(self, method):
        assert method == "report"
        if isinstance(self.replies, Exception):
            raise self.replies
        return FakeBroadcast(self.replies)


class FakeReplicaResult:
    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    async def get_async(self):
        return await _outcome(self.outcome)

    def cancel(self):
        self.cancelled = True


class FakeBroadcast:
    """Ray 2.60's DeploymentBroadcastResponse: the calls sent to every replica, and their
    results gathered under one timeout."""

    def __init__(self, replies):
        self.results = [FakeReplicaResult(r) for r in replies]

    async def _fetch_replica_results_async(self):
        return self.results

    async def results_async(self, timeout_s=None, return_exceptions=False):
        try:
            return list(await asyncio.wait_for(asyncio.gather(
                *(r.get_async() for r in self.results), return_exceptions=return_exceptions),
                timeout_s))
        except asyncio.TimeoutError:
            raise TimeoutError("Timed out waiting for broadcast results.") from None


def report(name, metrics=None, loaded=("*-de",), pending=0):
    """A Translator replica's answer to a scrape (Replica.report)."""
    from fairseq_taskmoe.serve.fleet import snapshot
    from fairseq_taskmoe.serve.metrics import Metrics

    return {"name": name, "pid": 1, "loaded": list(loaded), "ongoing": pending,
            "pending": pending, "metrics": snapshot(metrics or Metrics())}


def handing_side(handle, **options):
    """A HandleBatcher over `handle` with a replica's metrics and fleet."""
    from fairseq_taskmoe.serve.fleet import Fleet
    from fairseq_taskmoe.serve.metrics import Metrics
    from fairseq_taskmoe.serve.ray_engine import HandleBatcher

    return HandleBatcher(handle, Fleet(), Metrics(), **options)


def test_a_scrape_waits_for_each_replica_on_its_own():
    """/health, /metrics and /pairs scrape the replicas: a hung replica costs its own timeout
    (not the whole gather's), the answers that came are used, the others counted silent, and
    the service is unready only when no replica answered."""
    pytest.importorskip("ray.serve")
    from ray.serve.exceptions import DeploymentUnavailableError

    from fairseq_taskmoe.serve.metrics import Metrics

    busy = Metrics()
    busy.loads.labels("*-fr").inc(2)

    async def scrape(replies):
        batcher = handing_side(FakeHandle([], replies), report_timeout=0.5)
        t0 = time.monotonic()
        await batcher.refresh()
        return (time.monotonic() - t0, batcher.fleet, batcher.unready(),
                batcher.fleet.render().decode())

    seconds, fleet, unready, text = asyncio.run(scrape(
        [report("r1", busy, ["*-fr"], pending=2), HANG, RuntimeError("broken")]))
    assert seconds < 1.5, seconds
    assert unready is None and fleet.loaded_keys() == ["*-fr"] and fleet.pending() == 2
    assert metric(text, "taskmoe_subnetwork_loads_total", subnetwork="*-fr") == 2
    assert metric(text, "taskmoe_replicas", state="answering") == 1
    assert metric(text, "taskmoe_replicas", state="silent") == 2
    seconds, fleet, unready, text = asyncio.run(scrape([HANG, HANG]))
    assert seconds < 1.5, seconds
    assert unready == "no Translator replica answered within 0.5 s (2 asked)"
    assert metric(text, "taskmoe_replicas", state="silent") == 2
    _, _, unready, _ = asyncio.run(scrape(DeploymentUnavailableError("Translator")))
    assert unready == "no Translator replica is running"


def test_the_deployment_is_bounded_serves_http_itself_and_reserves_its_threads():
    """One deployment, Ray Serve's ingress itself (no ingress deployment in front): a replica
    takes more than --max-queue requests at once (its own JSON 503s and legs from other
    replicas fit), Ray's proxy queues a bounded number more, Ray's access log is off, no
    @serve.batch (the replica's Batcher batches), and --threads CPUs are reserved."""
    pytest.importorskip("ray.serve")
    from fairseq_taskmoe.cli.serve import build_parser
    from fairseq_taskmoe.serve.ray_engine import HEADROOM, application, translator_deployment

    for extra in ([], ["--max-queue", "2", "--threads", "1"], ["--threads", "3"]):
        args = build_parser().parse_args(["c.pt", "--data", "bin", "--engine", "ray", *extra])
        translator = translator_deployment(args)
        assert translator.name == "Translator"
        assert translator.max_ongoing_requests == args.max_queue + HEADROOM, extra
        assert 0 < translator.max_queued_requests <= HEADROOM
        assert translator.ray_actor_options["num_cpus"] == args.threads
        assert translator.logging_config["enable_access_log"] is False
        cls = translator.func_or_class
        assert hasattr(cls, "__serve_build_asgi_app__") and hasattr(cls, "translate")
        assert not hasattr(cls.translate, "_get_max_batch_size")  # no @serve.batch
        assert application(args).__class__.__name__ == "Application"


def test_handing_over_retries_a_lost_replica_and_refuses_cleanly():
    """A leg whose replica died is sent again (translation is idempotent: one answer per
    request); Ray's back-pressure, a busy replica and a replica lost on every try are 503s
    (QueueFull); a sub-network that failed there is Unavailable."""
    pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    from fairseq_taskmoe.serve.batcher import Job, QueueFull
    from fairseq_taskmoe.serve.fleet import Fleet
    from fairseq_taskmoe.serve.ray_engine import HandleBatcher, ReplicaLost
    from fairseq_taskmoe.serve.registry import Unavailable

    async def leg(script):
        handle = FakeHandle(script)
        fleet = Fleet()
        fleet.update("dead", [], ["*-de"])
        batcher = HandleBatcher(handle, fleet, retries=2)
        future = batcher.submit("*-de", Job(["e1 e2"], "en", "de", 4, 1, [4],
                                            deadline=time.monotonic() + 30))
        try:
            return await asyncio.wrap_future(future), handle.calls, fleet
        finally:
            assert batcher.pending() == 0

    hyps, calls, fleet = asyncio.run(leg([RayActorError("dead", "gone"), [["D1"]]]))
    assert hyps == [["D1"]] and calls == [("*-de", ["e1 e2"])] * 2
    assert fleet.replicas()["dead"]["live"] is False
    with pytest.raises(QueueFull, match="queue is full"):
        asyncio.run(leg([BackPressureError(5, 5)]))
    with pytest.raises(QueueFull, match="waiting"):
        asyncio.run(leg([{"error": "the queue is full (2 requests waiting)", "kind": "busy"}]))
    with pytest.raises(Unavailable, match="sub-network \\*-de"):
        asyncio.run(leg([{"error": "sub-network *-de: did not load", "kind": "unavailable"}]))
    with pytest.raises(ReplicaLost, match="the replica serving \\*-de was lost"):
        asyncio.run(leg([RayActorError("dead", "gone")] * 3))


def test_serve_run_options_are_taskmoe_serve_flags():
    from fairseq_taskmoe.cli.serve import build_parser, builder_argv

    argv = builder_argv({"checkpoint": "c.pt", "data": "bin", "replicas": "2",
                         "pairs_per_replica": 2, "no_cross_batching": "true",
                         "max_wait_ms": "5"})
    assert argv == ["c.pt", "--data", "bin", "--replicas", "2", "--pairs-per-replica", "2",
                    "--no-cross-batching", "--max-wait-ms", "5", "--engine", "ray"]
    args = build_parser().parse_args(argv)
    assert (args.engine, args.replicas, args.no_cross_batching) == ("ray", 2, True)


# --- on a local Ray cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_model(trained_tiny):
    return trained_tiny


@pytest.fixture(scope="module")
def ray_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ray-serve-cache")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with Serve's HTTP proxy on a free port of 127.0.0.1."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    pytest.importorskip("ctranslate2")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def ray_serving(argv, port):
    """The application on the module's cluster; yields (URL, args). The sub-networks are built
    first by this process (the `taskmoe-serve` start-up), as the command does. One engine
    thread (one CPU reserved) per replica: two replicas fit the module's 2-CPU cluster."""
    from fairseq_taskmoe.cli.serve import build_parser
    from fairseq_taskmoe.serve import ray_engine

    args = build_parser().parse_args([str(a) for a in argv] + [
        "--engine", "ray", "--threads", "1", "--host", "127.0.0.1", "--port", str(port)])
    service, _ = make_service([str(a) for a in argv] + ["--engine", "ray"])
    service.batcher.close()
    url = ray_engine.deploy(args)
    try:
        yield url, args
    finally:
        ray_engine.undeploy(shutdown=False)


def requests_for(tiny_data):
    """Arrays and single texts on 4 pairs (one pivot), alternatives, html, and refusals."""
    en, de = sentences(tiny_data, "en"), sentences(tiny_data, "de")
    out = []
    for pair in PAIRS4:
        src, tgt = pair.split("-")
        texts = en if src == "en" else de
        out.append({"q": texts[:6], "source": src, "target": tgt})
        out += [{"q": t, "source": src, "target": tgt} for t in texts[6:9]]
    out += [{"q": en[0], "source": "en", "target": "de", "alternatives": 2},
            {"q": de[1], "source": "de", "target": "fr", "alternatives": 1},
            {"q": f"<p>{en[2]}</p>", "source": "en", "target": "fr", "format": "html"},
            {"q": "e1", "source": "en", "target": "zz"},
            {"q": "f1 f2", "source": "fr", "target": "de"},
            {"q": "e1 " * 1100, "source": "en", "target": "de"}]
    return out


def ask_all(url, bodies):
    with httpx.Client(timeout=120) as client:
        return [(r.status_code, r.json()) for r in
                (client.post(url + "/translate", json=b) for b in bodies)]


def test_ray_answers_equal_the_embedded_servers(trained_model, tiny_data, ray_cache, cluster):
    argv = base_args(trained_model, tiny_data, ray_cache, "--quantization", "float32",
                     "--char-limit", "3000")
    bodies = requests_for(tiny_data)
    with serving(argv) as (url, _):
        want = ask_all(url, bodies)
        want_languages = httpx.get(url + "/languages").json()
        want_pair = httpx.get(url + "/pairs/de-fr").json()
    assert [s for s, _ in want].count(200) == len(bodies) - 3
    with ray_serving(argv, cluster) as (url, _):
        assert ask_all(url, bodies) == want
        assert httpx.get(url + "/languages").json() == want_languages
        pair = httpx.get(url + "/pairs/de-fr").json()
        for sub in pair["subnetworks"] + want_pair["subnetworks"]:
            sub.pop("loaded")  # which process holds what differs; the rest is the same
        assert pair == want_pair
        health = httpx.get(url + "/health").json()
        assert health["status"] == "ok" and health["subnetworks_loaded"] == 3
        text = httpx.get(url + "/metrics").text
        for key in ("*-de", "*-en", "*-fr"):  # one replica, K=3: each loaded once
            assert metric(text, "taskmoe_subnetwork_loads_total", subnetwork=key) == 1, key
        assert metric(text, "taskmoe_requests_total", endpoint="/translate", status="200",
                      pair="de-fr") == 3 + 1 + 1
        assert metric(text, "taskmoe_batch_requests_count", subnetwork="*-en") >= 1
        assert httpx.get(url + "/").status_code == 200  # the web page
        assert "/translate" in httpx.get(url + "/openapi.json").json()["paths"]


def mixed_load(tiny_data, n):
    source = {lang: sentences(tiny_data, lang) for lang in ("en", "de")}
    return [(PAIRS4[i % 4], source[PAIRS4[i % 4][:2]][i % 24]) for i in range(n)]


def translate_one(client, url, item):
    pair, text = item
    src, tgt = pair.split("-")
    return client.post(url + "/translate", json={"q": text, "source": src, "target": tgt})


def test_two_replicas_keep_their_sub_networks(trained_model, tiny_data, ray_cache, cluster):
    """--replicas 2 --pairs-per-replica 2, 3 sub-networks (*-de, *-en, *-fr): a mixed 4-pair
    load (80 legs) is served with a bounded number of loads (a replica holding 2 others hands
    a leg over to a replica that holds its sub-network instead of evicting), every leg is
    translated once, and every answer equals the single request's."""
    argv = base_args(trained_model, tiny_data, ray_cache, "--quantization", "float32",
                     "--replicas", "2", "--pairs-per-replica", "2", "--max-wait-ms", "20")
    work = mixed_load(tiny_data, 64)
    with ray_serving(argv, cluster) as (url, _):
        with httpx.Client(timeout=120) as client:
            singles = {item: translate_one(client, url, item).json() for item in set(work)}
        with ThreadPoolExecutor(8) as pool, httpx.Client(timeout=120) as client:
            answers = list(pool.map(lambda item: translate_one(client, url, item), work))
        assert [a.status_code for a in answers] == [200] * len(work)
        for item, answer in zip(work, answers):
            assert answer.json() == singles[item], item
        text = httpx.get(url + "/metrics").text
        loads = {k: metric(text, "taskmoe_subnetwork_loads_total", subnetwork=k)
                 for k in ("*-de", "*-en", "*-fr")}
        legs = sum(metric(text, "taskmoe_batch_requests_sum", subnetwork=k) for k in loads)
        print(f"loads {loads}, legs {legs}")
        # the singles, then the load: one leg per request, two for de-fr (pivot)
        assert legs == sum(2 if p == "de-fr" else 1 for p, _ in list(set(work)) + work)
        assert all(n >= 1 for n in loads.values()) and sum(loads.values()) <= 8, loads


def replica_reports(timeout=30.0):
    """The live Translator replicas' reports (name, pid, loaded, ...), by asking each."""
    from ray import serve

    from fairseq_taskmoe.serve.ray_engine import APP

    handle = serve.get_deployment_handle("Translator", app_name=APP)
    return handle.broadcast("report").results(timeout_s=timeout)


def replica_pids(timeout=30.0):
    """{replica name: pid} of the live Translator replicas."""
    return {r["name"]: r["pid"] for r in replica_reports(timeout)}


def held_requests(port, n):
    """n POST /translate whose bodies never finish, each holding its place in a replica: one
    answered within a second (refused: the place of a request just answered was not free yet)
    is replaced."""
    held, deadline = [], time.time() + 30
    while len(held) < n:
        assert time.time() < deadline, "no request could hold a place in the replica"
        sock = socket.create_connection(("127.0.0.1", port), timeout=1.0)
        sock.sendall(b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n{")
        try:
            sock.recv(1024)
            sock.close()
        except socket.timeout:
            held.append(sock)
    return held


@contextmanager
def frozen(pids):
    """The processes stopped (SIGSTOP), and always continued after."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
def test_an_overloaded_replica_answers_503_itself(trained_model, tiny_data, ray_cache, cluster):
    """--max-queue 2: two requests whose bodies never come fill the replica; the next request
    is refused at once by the replica, with the API's JSON 503 and Retry-After (not left
    waiting in Ray's proxy), counted under its route; /health still answers; once they are
    gone, requests are served again."""
    argv = base_args(trained_model, tiny_data, ray_cache, "--quantization", "float32",
                     "--max-queue", "2")
    body = {"q": sentences(tiny_data, "en")[0], "source": "en", "target": "de"}
    with ray_serving(argv, cluster) as (url, _), httpx.Client(timeout=60) as client:
        assert client.post(url + "/translate", json=body).status_code == 200
        held = held_requests(cluster, 2)
        try:
            t0 = time.monotonic()
            answer = client.post(url + "/translate", json=body)
            seconds = time.monotonic() - t0
            assert answer.status_code == 503 and seconds < 5, (answer.text, seconds)
            assert answer.headers["Retry-After"] == "1"
            assert answer.json() == {"error": "the server is busy (2 requests in progress); "
                                     "retry shortly", "hint": "retry after the Retry-After "
                                     "seconds"}
            assert client.get(url + "/health").status_code == 200
        finally:
            for sock in held:
                sock.close()
        deadline = time.time() + 20
        while client.post(url + "/translate", json=body).status_code != 200:
            assert time.time() < deadline, "the held requests never left the replica"
            time.sleep(0.2)
        text = client.get(url + "/metrics").text
        assert metric(text, "taskmoe_requests_total", endpoint="/translate", status="503",
                      pair="-") >= 1


def answered(client, method, url, tries=3, timeout=8.0, **kwargs):
    """(response, seconds, requests that timed out first): a request Ray's proxy gave to a
    frozen replica waits with it; the client gives up after `timeout` and sends it again (the
    proxy's router then counts that replica busy and sends the next to another)."""
    stuck = 0
    for _ in range(tries):
        t0 = time.monotonic()
        try:
            response = client.request(method, url, timeout=timeout, **kwargs)
        except httpx.TimeoutException:
            stuck += 1
            continue
        return response, time.monotonic() - t0, stuck
    raise AssertionError(f"{method} {url}: no answer in {tries} tries of {timeout:g} s")


@pytest.mark.slow
def test_a_hung_replica_costs_a_scrape_its_own_timeout(trained_model, tiny_data, ray_cache,
                                                      cluster):
    """2 replicas, one frozen (SIGSTOP): /health from the other answers within the
    per-replica scrape timeout (2 s) and /metrics counts one silent replica, and translations
    are served. A request Ray's proxy had given the frozen replica waits with it (nothing else
    holds it: the client's timeout, then its retry, goes to the replica that answers); at most
    one such here. Continued (SIGCONT): both replicas answer again."""
    argv = base_args(trained_model, tiny_data, ray_cache, "--quantization", "float32",
                     "--replicas", "2")
    body = {"q": sentences(tiny_data, "en")[0], "source": "en", "target": "de"}
    with ray_serving(argv, cluster) as (url, _), httpx.Client(timeout=60) as client:
        assert client.post(url + "/translate", json=body).status_code == 200
        pids = sorted(replica_pids().values())
        assert len(pids) == 2
        with frozen(pids[:1]):
            health, seconds, stuck = answered(client, "GET", url + "/health")
            assert health.status_code == 200 and seconds < 8, (health.text, seconds)
            text, _, more = answered(client, "GET", url + "/metrics")
            assert metric(text.text, "taskmoe_replicas", state="answering") == 1, text.text
            assert metric(text.text, "taskmoe_replicas", state="silent") == 1
            answer, _, also = answered(client, "POST", url + "/translate", json=body)
            assert answer.status_code == 200, answer.text
            print(f"requests given to the frozen replica: {stuck + more + also}")
            assert stuck + more + also <= 1
        deadline = time.time() + 30
        while True:
            text = client.get(url + "/metrics").text
            if metric(text, "taskmoe_replicas", state="answering") == 2:
                break
            assert time.time() < deadline, "the continued replica does not answer"
            time.sleep(0.5)
        assert client.post(url + "/translate", json=body).status_code == 200


@pytest.mark.slow
def test_a_killed_replica_loses_no_request(trained_model, tiny_data, ray_cache, cluster):
    """Kill one of 2 replicas while 96 requests from 6 clients run: every request is answered
    exactly once, with the right translation, and the deployment is back to 2 replicas. The
    victim is frozen (SIGSTOP) as soon as it reports 2 legs in flight, and killed a second
    later, so that legs die with it. K = 2 of 3 sub-networks, so that replicas hand legs to
    each other: a handed-over leg lost with the victim is re-sent by the replica that handed
    it over (HandleBatcher, counted in taskmoe_replica_losses_total) or, when the victim had
    not yet confirmed it, by Ray's router; when the retries are used up, a 503. A request whose
    own replica (the one running its HTTP handler) is the victim dies with it: Ray's proxy
    answers 500. The client retries once on a 503 or a 500 (translation is idempotent)."""
    from fairseq_taskmoe.serve.ray_engine import replica_counts

    argv = base_args(trained_model, tiny_data, ray_cache, "--quantization", "float32",
                     "--replicas", "2", "--pairs-per-replica", "2")
    work = mixed_load(tiny_data, 96)
    with ray_serving(argv, cluster) as (url, _):
        with httpx.Client(timeout=120) as client:
            singles = {item: translate_one(client, url, item).json() for item in set(work)}
        reports = replica_reports()
        assert len(reports) == 2
        victim = max(reports, key=lambda r: (len(r["loaded"]), r["pid"]))["pid"]
        answered, retried, frozen_with = [], [], []
        lock = threading.Lock()

        def ask(i):
            with httpx.Client(timeout=120) as client:
                answer = translate_one(client, url, work[i])
                if answer.status_code in (500, 503):  # the client retries once
                    with lock:
                        retried.append((i, answer.status_code, answer.text[:300]))
                    time.sleep(float(answer.headers.get("Retry-After", "1")))
                    answer = translate_one(client, url, work[i])
                with lock:
                    answered.append(i)
                return answer

        def killer():
            deadline = time.time() + 60
            while len(answered) < 12 and time.time() < deadline:
                time.sleep(0.01)
            while time.time() < deadline:  # until legs are in flight on the victim
                ongoing = {r["pid"]: r["ongoing"] for r in replica_reports()}
                if ongoing.get(victim, 0) >= 2:
                    break
            os.kill(victim, signal.SIGSTOP)  # what it holds now dies with it
            frozen_with.append(ongoing.get(victim, 0))
            time.sleep(1.0)
            os.kill(victim, signal.SIGKILL)

        kill = threading.Thread(target=killer)
        kill.start()
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(len(work))))
        kill.join()
        print(f"500s and 503s retried by the client: {retried}")
        # a 500 is a request the victim was running: at most one per client
        assert sum(1 for _, status, _ in retried if status == 500) <= 6, retried
        assert len(answered) == len(work) and sorted(answered) == list(range(len(work)))
        assert [a.status_code for a in answers] == [200] * len(work), [
            (a.status_code, a.text) for a in answers if a.status_code != 200]
        for item, answer in zip(work, answers):
            assert answer.json() == singles[item], item
        text = httpx.get(url + "/metrics").text
        lost = {(k, outcome): metric(text, "taskmoe_replica_losses_total", subnetwork=k,
                                     outcome=outcome)
                for k in ("*-de", "*-en", "*-fr") for outcome in ("retried", "refused")}
        print(f"legs in flight on the victim when frozen: {frozen_with}; of them re-sent by "
              f"the service (the others, not yet confirmed by the replica, by Ray's router): "
              f"{lost}")
        assert frozen_with and frozen_with[0] >= 2, "no legs were in flight on the victim"
        assert sum(n for (_, outcome), n in lost.items() if outcome == "refused") <= len(retried)
        deadline = time.time() + 120
        while replica_counts().get("RUNNING") != 2:
            assert time.time() < deadline, replica_counts()
            time.sleep(1)
        now = replica_pids()
        assert len(now) == 2 and victim not in now.values()
        with httpx.Client(timeout=120) as client:
            assert translate_one(client, url, work[3]).json() == singles[work[3]]


@pytest.mark.slow
def test_the_command_joins_a_cluster_started_with_ray_start(trained_model, tiny_data, ray_cache,
                                                           tmp_path):
    import tempfile
    """The documented set-up on one machine: `ray start --head`, then `taskmoe-serve ...
    --engine ray --ray-address HOST:PORT` (the real command, a process of its own) serves; on
    SIGTERM it deletes its application, exits 0 and leaves the cluster running."""
    from test_cli import BIN
    from test_serve import free_port

    gcs, port = free_port(), free_port()
    # short: Ray's socket paths under it must fit the 107 characters of a Unix socket name
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # `ray start` turns token authentication on (Ray 2.60): the command must send the token
    env = dict(ENV, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port",
             str(gcs), "--num-cpus", "1", "--include-dashboard", "false",
             "--temp-dir", temp_dir]
    subprocess.run(start, env=env, check=True, timeout=180, capture_output=True)
    log = open(tmp_path / "serve.log", "w")
    proc = None
    try:
        argv = [str(a) for a in base_args(trained_model, tiny_data, ray_cache, "--quantization",
                                          "float32", "--threads", "1")]  # the cluster's 1 CPU
        refused = subprocess.run(  # without the token: a clear error, no traceback
            [str(BIN / "taskmoe-serve"), *argv, "--engine", "ray", "--ray-address",
             f"127.0.0.1:{gcs}", "--port", str(port)], cwd=REPO, capture_output=True,
            text=True, timeout=300, env={k: v for k, v in env.items() if k != "RAY_AUTH_MODE"})
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert "RAY_AUTH_MODE=token" in refused.stderr and "Traceback" not in refused.stderr
        proc = subprocess.Popen(
            [str(BIN / "taskmoe-serve"), *argv, "--engine", "ray", "--ray-address",
             f"127.0.0.1:{gcs}", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        text = sentences(tiny_data, "de")[0]
        answer = httpx.post(url + "/translate", json={"q": text, "source": "de",
                                                      "target": "fr"}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["route"] == {"kind": "pivot", "via": "en"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        status = subprocess.run([str(BIN / "ray"), "status", "--address", f"127.0.0.1:{gcs}"],
                                env=env, timeout=60, capture_output=True, text=True)
        assert status.returncode == 0, status.stderr  # the cluster outlives the command
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        log.close()
        stop_cluster(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_cluster(temp_dir, gcs_port):
    """Kill the processes of the cluster whose --temp-dir is temp_dir, and its client server
    (which names the head's port instead); not `ray stop`, which stops every Ray process of the
    machine, the module's cluster included."""
    import psutil

    def ours(cmdline):
        return str(temp_dir) in cmdline or (
            "ray.util.client.server" in cmdline and f":{gcs_port} " in cmdline + " ")

    roots = [p for p in psutil.process_iter(["cmdline"])
             if ours(" ".join(p.info["cmdline"] or [])) and p.pid != os.getpid()]
    mine = {p.pid: p for p in roots}
    for p in roots:  # with their children (Ray's agents do not name the folder)
        with contextlib.suppress(psutil.Error):
            mine.update((c.pid, c) for c in p.children(recursive=True))
    mine = list(mine.values())
    for p in mine:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(mine, timeout=30)
