"""The harness that starts taskmoe-serve processes and loads them: a free port on 127.0.0.1 and
the real command line (serve_command), a Server (launched, waited for on GET /health, its
resident memory sampled with psutil, always stopped: SIGTERM, then kill), running / running_all
(servers started together, yielded once all answer), build_cache (the server's own start-up run
in this process, so that measured servers start from a built sub-network cache), the load itself
(run_load: a fixed request list from N concurrent asyncio + aiohttp clients, each request sent
once, the answers kept on request), warm_up, measure (a load with /metrics' requests per engine
call and peak RSS), subnetwork_counts (/metrics' sub-network loads and evictions), and the pure
parts around them (percentile, summarize, ratio, workload and positions, random_sentences, the
--clients / --pairs parsers, read_sentences, environment).

Not a command. Used by the load benchmarks research/bench/serve.py,
research/bench/serve_many.py, research/bench/ray_serve.py and research/bench/libretranslate.py
(research/libretranslate.py's LibreTranslate is a Server too), and by scripts/serve_screenshot.py
and tests/test_serve_browser.py, which start the real server with `running`.
"""

import argparse
import asyncio
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"  # never anything else: the benchmark must not reach or expose other hosts
DEMO_PAIRS = "en-de,de-en,en-fr,fr-en,en-cs,cs-en"


# ---------------------------------------------------------------- pure parts


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics, as
    numpy.percentile's default ('linear') computes it."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not between 0 and 100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(latencies: Sequence[float], wall: float, ok: int, errors: int,
              out_tokens: int = 0, sentences: Optional[int] = None) -> dict:
    """One load level: latencies (seconds, answered requests) -> throughput and percentiles.
    `sentences`: those the answered requests carried (default: one each)."""
    sentences = ok if sentences is None else sentences
    out = {"requests": ok + errors, "ok": ok, "errors": errors, "wall_s": round(wall, 3),
           "sentences_per_s": round(sentences / wall, 3) if wall > 0 else 0.0,
           "requests_per_s": round(ok / wall, 3) if wall > 0 else 0.0,
           "target_tokens_per_s": round(out_tokens / wall, 1) if wall > 0 else 0.0,
           "mean_output_tokens": round(out_tokens / ok, 1) if ok else 0.0}
    for q in (50, 95, 99):
        out[f"p{q}_ms"] = round(1000 * percentile(latencies, q), 1) if latencies else None
    out["mean_ms"] = round(1000 * sum(latencies) / len(latencies), 1) if latencies else None
    return out


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 2) if a and b else None


def parse_counts(text: str, name: str) -> List[int]:
    """'1,4,16' -> [1, 4, 16]; each a positive whole number."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a list of whole numbers, "
                                         "e.g. 1,4,16") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{name}: {text!r} must list numbers >= 1")
    return values


def parse_pairs(text: str) -> List[tuple]:
    pairs = []
    for item in text.split(","):
        parts = item.strip().split("-")
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise argparse.ArgumentTypeError(f"--pairs: {item!r} is not SRC-TGT (e.g. en-de)")
        pairs.append(tuple(parts))
    return pairs


def positions(i: int, n_pairs: int, n_texts: int, per_request: int = 1) -> List[int]:
    """The sentence numbers request i of a workload carries (round robin over n_pairs pairs,
    n_texts sentences each, per_request consecutive sentences a request)."""
    k = i // n_pairs
    return [(k * per_request + m) % n_texts for m in range(per_request)]


def workload(pairs: Sequence[tuple], sentences: Dict[str, List[str]], n: int,
             per_request: int = 1) -> List[tuple]:
    """n requests (src, tgt, text), round robin over the pairs; request i carries the source
    side's sentences at positions(i, ...): one sentence, or (per_request > 1) a list of that
    many, sent as an array q."""
    out = []
    for i in range(n):
        src, tgt = pairs[i % len(pairs)]
        texts = sentences[src]
        picked = [texts[j] for j in positions(i, len(pairs), len(texts), per_request)]
        out.append((src, tgt, picked[0] if per_request == 1 else picked))
    return out


def random_sentences(words: Sequence[str], n: int, length: int, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


def _mb(n: Optional[int]) -> Optional[float]:
    return round(n / 2 ** 20, 1) if n else None



# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def serve_command(checkpoint, data, port: int, *extra) -> List[str]:
    """The real command line (the installed console script), bound to 127.0.0.1."""
    exe = BIN / "taskmoe-serve"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "fairseq_taskmoe.cli.serve"]
    return head + [str(checkpoint), "--data", str(data), "--host", HOST, "--port", str(port),
                   *[str(x) for x in extra]]


class Server:
    """A taskmoe-serve process: started, waited for (GET /health), measured (psutil), stopped.
    (research/libretranslate.py's LibreTranslate is one too.)"""

    has_batch_metrics = True  # /metrics counts engine calls (taskmoe_batch_requests)

    def __init__(self, argv: List[str], url: str, log_path: Path,
                 env: Optional[Dict[str, str]] = None):
        self.argv, self.url, self.log_path = argv, url, log_path
        self.extra_env = env or {}  # more environment for the process (e.g. PYTHONPATH)
        self.proc: Optional[subprocess.Popen] = None
        self._peak = 0
        self._sampling = None

    def launch(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONWARNINGS="ignore", **self.extra_env)
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        return self

    def start(self, timeout: float):
        """Launch (unless launched) and wait until GET /health answers."""
        import httpx

        if self.proc is None:
            self.launch()
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"taskmoe-serve exited with {self.proc.returncode} at start: "
                                   f"{self.log_tail()}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"taskmoe-serve did not answer /health within {timeout:.0f} "
                                   f"s: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return "(no log)"

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    @contextmanager
    def peak_rss(self, every: float = 0.1):
        """Samples the resident memory while the block runs; .peak holds the maximum."""
        self._peak = self.rss()
        stop = threading.Event()

        def sample():
            while not stop.wait(every):
                try:
                    self._peak = max(self._peak, self.rss())
                except Exception:  # the process ended: nothing more to sample
                    return

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(5)

    @property
    def peak(self) -> int:
        return self._peak

    def stop(self, grace: float = 60.0):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def running_all(specs: Sequence[tuple], timeout: float):
    """Servers (checkpoint, data, extra flags, log path) started at the same time (their
    start-ups overlap), yielded once all answer, always all stopped."""
    servers = []
    try:
        for checkpoint, data, extra, log_path in specs:
            port = free_port()
            servers.append(Server(serve_command(checkpoint, data, port, *extra),
                                  f"http://{HOST}:{port}", log_path).launch())
        for server in servers:
            server.start(timeout)
        yield servers
    finally:
        for server in servers:
            server.stop()


@contextmanager
def running(checkpoint, data, extra: Sequence, log_path: Path, timeout: float):
    with running_all([(checkpoint, data, extra, log_path)], timeout) as (server,):
        yield server


def build_cache(checkpoint, data, extra: Sequence) -> dict:
    """The server's own start-up (cli.serve.make_service: plan routes, build every sub-network
    into --cache-dir), run in this process without serving, so that the measured servers start
    from the cache: start-up work is neither timed nor in their memory. Returns what a
    reference row needs to run the same artifacts: {"paths": {(src, tgt): the artifact of the
    pair's sub-network}, "max_target_positions": ...}, and what a report of sizes and routes
    needs: "backend", "quantization", "full_params" and "full_bytes" (the whole model's
    parameters and the bytes of its tensors), "subnetworks" ({key: {"pairs": the legs it
    serves, "params", "bytes" (charged against --memory-budget: what it holds loaded),
    "disk_bytes", "whole"}}) and "routes" ({"src-tgt": {"kind", "via"}}, available ones)."""
    import gc

    from fairseq_taskmoe.cli.serve import build_parser, make_service

    argv = [str(checkpoint), "--data", str(data), *[str(x) for x in extra]]
    service, _ = make_service(build_parser().parse_args(argv))
    registry = service.registry
    facts = {"paths": {pair: registry.subnetwork(key).path
                       for pair, key in registry.pair_to_key.items()},
             "max_target_positions": registry.max_target_positions}
    facts.update(backend=registry.backend, quantization=registry.quantization,
                 full_params=registry.full_params, full_bytes=registry.full_bytes)
    facts["subnetworks"] = {}
    for key in sorted(set(registry.pair_to_key.values())):
        sub = registry.subnetwork(key)
        facts["subnetworks"][key] = {
            "pairs": sorted(f"{s}-{t}" for (s, t), k in registry.pair_to_key.items() if k == key),
            "params": sub.params, "bytes": sub.bytes, "disk_bytes": sub.disk_bytes,
            "whole": sub.whole}
    facts["routes"] = {f"{r.src}-{r.tgt}": r.as_json() for r in service.routes.values()
                       if r.available}
    service.batcher.close()
    del service, registry
    gc.collect()
    return facts


# ---------------------------------------------------------------- load


async def _load(url: str, items: Sequence[tuple], clients: int, timeout: float,
                answers: Optional[list] = None) -> dict:
    import aiohttp

    latencies, statuses, out_tokens, sentences = [], {}, 0, 0
    next_item = iter(range(len(items)))

    async def one_client(session):
        nonlocal out_tokens, sentences
        for i in next_item:  # shared iterator: each request is sent exactly once
            src, tgt, text = items[i]
            t0 = time.perf_counter()
            try:
                async with session.post("/translate", json={"q": text, "source": src,
                                                            "target": tgt}) as r:
                    status = r.status
                    body = await r.json(content_type=None) if status == 200 else None
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                status = type(err).__name__
            seconds = time.perf_counter() - t0
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:  # text: one sentence, or a list of them (one request)
                latencies.append(seconds)
                answer = body["translatedText"]
                if answers is not None:
                    answers[i] = answer
                texts = answer if isinstance(answer, list) else [answer]
                sentences += len(texts)
                out_tokens += sum(len(a.split()) for a in texts)

    # aiohttp, one kept-alive connection per client: the load generator shares the server's
    # cores, and httpx (one pool for every client) cost ~5.5 ms of CPU a request at 64 clients
    # (0.8 ms at 16), starving the server; aiohttp costs 0.2-0.4 ms (measured here)
    async with aiohttp.ClientSession(
            url, timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(limit=clients, limit_per_host=clients)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(session) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    result = summarize(latencies, wall, ok, len(items) - ok, out_tokens, sentences)
    result["statuses"] = {str(k): v for k, v in statuses.items()}
    return result


def run_load(url: str, items: Sequence[tuple], clients: int, timeout: float,
             answers: Optional[list] = None) -> dict:
    """Each request of `items` sent once by `clients` concurrent clients; `answers` (a list as
    long as items), when given, gets each answered request's translatedText at its index."""
    return asyncio.run(_load(url, items, clients, timeout, answers))


def batch_counts(url: str) -> tuple:
    """(engine calls, requests answered by them) so far, summed over sub-networks (/metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    calls = requests = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if family.name == "taskmoe_batch_requests":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    calls += sample.value
                elif sample.name.endswith("_sum"):
                    requests += sample.value
    return calls, requests


def subnetwork_counts(url: str) -> tuple:
    """(sub-network loads, evictions) so far, summed over sub-networks (/metrics'
    taskmoe_subnetwork_loads_total and taskmoe_subnetwork_evictions_total)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    counts = {"taskmoe_subnetwork_loads_total": 0.0, "taskmoe_subnetwork_evictions_total": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in counts:
                counts[sample.name] += sample.value
    return (int(counts["taskmoe_subnetwork_loads_total"]),
            int(counts["taskmoe_subnetwork_evictions_total"]))


def requests_per_call(before: tuple, after: tuple) -> Optional[float]:
    """Requests answered per engine call between two batch_counts() readings."""
    calls = after[0] - before[0]
    return round((after[1] - before[1]) / calls, 2) if calls else None


def warm_up(server: Server, pairs: Sequence[tuple], sentences: Dict[str, List[str]],
            timeout: float):
    """One request per pair: every sub-network the load uses is loaded before timing."""
    items = [(s, t, sentences[s][0]) for s, t in pairs]
    result = run_load(server.url, items, 1, timeout)
    if result["ok"] != len(items):
        raise RuntimeError(f"warm-up failed on {server.url}: {result['statuses']}; "
                           f"{server.log_tail()}")


def measure(server: Server, items: Sequence[tuple], clients: int, timeout: float,
            answers: Optional[list] = None) -> dict:
    """run_load (answers: as there) with the server's peak RSS, its RSS afterwards and, where
    its /metrics counts engine calls (server.has_batch_metrics), the requests per engine
    call."""
    before = batch_counts(server.url) if server.has_batch_metrics else None
    with server.peak_rss():
        result = run_load(server.url, items, clients, timeout, answers)
    result["requests_per_call"] = (requests_per_call(before, batch_counts(server.url))
                                   if server.has_batch_metrics else None)
    result["rss_mb"], result["peak_rss_mb"] = _mb(server.rss()), _mb(server.peak)
    return result


# ---------------------------------------------------------------- inputs, machine


def read_sentences(text_dir: Path, langs, limit: int = 1000) -> Dict[str, List[str]]:
    out = {}
    for lang in langs:
        path = Path(text_dir) / f"test.{lang}"
        if not path.is_file():
            raise SystemExit(f"bench_serve: no sentences for {lang}: {path} is missing "
                             "(give --text-dir)")
        out[lang] = [line.strip() for line in path.read_text().splitlines() if line.strip()][
            :limit]
    return out


def environment(args) -> dict:
    """Date, machine and versions a result is headed by, with the servers' --threads and --beam
    (args.threads, args.beam)."""
    import ctranslate2
    import torch

    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), platform.processor() or "unknown CPU")
    except OSError:
        cpu = platform.processor() or "unknown CPU"
    return {"date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{cpu}, {os.cpu_count()} logical CPUs", "python": platform.python_version(),
            "torch": torch.__version__, "ctranslate2": ctranslate2.__version__,
            "server_threads": args.threads, "beam": args.beam}
