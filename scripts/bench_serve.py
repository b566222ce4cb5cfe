#!/usr/bin/env python3
"""Load benchmark of taskmoe-serve (issue 20, "Measure"): real servers on 127.0.0.1, a fixed
number of requests from N concurrent clients, everything side by side in one run.

    .venv/bin/python scripts/bench_serve.py          # both parts -> results/serve_benchmark.*
    .venv/bin/python scripts/bench_serve.py --parts batching --requests 128
    .venv/bin/python scripts/bench_serve.py --parts arch --experts 32,128 --arch-clients 16

Part "batching" (the demo model, work/demo by default): mixed pairs (--pairs, one Multi30k
test_2016_flickr sentence per request, the source side of each pair, round robin over the pairs)
at --clients 1,4,16,64, against two servers of the same checkpoint that run at the same time on
two ports:
  on   cross-request batching (the server's defaults, or --on-args)
  off  one request per engine call and no wait: --no-cross-batching --max-wait-ms 0, as
       LibreTranslate serves (its array `q` is looped over, requests are never batched together)
For each client count the two modes run back to back (their order alternating between counts),
on the same request list. Reported: throughput (sentences/s = answered requests / wall time),
latency p50/p95/p99 (per request, client side), and from /metrics the requests per engine call.

Part "arch" (random weights, --embed-dim 512, --layers 6+6, every --moe-freq-th layer MoE with E
experts of width --ffn-dim/2, top-2, for E in --experts; the checkpoints are built as
scripts/benchmark_inference.py builds its variants a and b, and cached under --work):
  token-MoE  token/token routing, served whole (fairseq backend: nothing can be pruned)
  task-MoE   target/target routing, served pruned per target (CTranslate2, --quantization)
under the same load (random dictionary words, --src-len per sentence, mixed trained pairs, at
--arch-clients). Reported: throughput, latency, target tokens/s (random weights decode until the
server's output bound, so the output length is printed too), and resident memory of the server
process (psutil RSS: after warm-up with every sub-network loaded, and the peak sampled every
0.1 s during the load), with task/token ratios.

The sub-network cache of every server is built beforehand by the server's own start-up code run
in this process (so start-up work is neither timed nor counted in the server's memory); each
measured server then starts from the cache and is warmed up with one request per pair. Servers
bind 127.0.0.1 only and are always stopped (SIGTERM, then kill).
The client is one asyncio process (httpx); it shares the machine's cores with the servers.
Writes --out-json and --out-md (headed by the command, date, machine and versions), atomically,
and prints the tables.
"""

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"  # never anything else: the benchmark must not reach or expose other hosts
DEMO_PAIRS = "en-de,de-en,en-fr,fr-en,en-cs,cs-en"
MODES = {"on": [], "off": ["--no-cross-batching", "--max-wait-ms", "0"]}


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
              out_tokens: int = 0) -> dict:
    """One load level: latencies (seconds, answered requests) -> throughput and percentiles."""
    out = {"requests": ok + errors, "ok": ok, "errors": errors, "wall_s": round(wall, 3),
           "sentences_per_s": round(ok / wall, 3) if wall > 0 else 0.0,
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


def workload(pairs: Sequence[tuple], sentences: Dict[str, List[str]], n: int) -> List[tuple]:
    """n requests (src, tgt, text), round robin over the pairs; sentence i of the source side."""
    out = []
    for i in range(n):
        src, tgt = pairs[i % len(pairs)]
        texts = sentences[src]
        out.append((src, tgt, texts[(i // len(pairs)) % len(texts)]))
    return out


def random_sentences(words: Sequence[str], n: int, length: int, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


def _mb(n: Optional[int]) -> Optional[float]:
    return round(n / 2 ** 20, 1) if n else None


def _fmt(x, suffix="") -> str:
    return "-" if x is None else f"{x:g}{suffix}" if isinstance(x, (int, float)) else str(x)


def batching_table(rows: List[dict]) -> str:
    """Markdown: one line per client count, batching on and off side by side."""
    lines = ["| clients | on: sent/s | off: sent/s | on / off | on: p50 / p95 / p99 ms | "
             "off: p50 / p95 / p99 ms | on: requests per engine call | errors on / off |",
             "|---:|---:|---:|---:|---|---|---:|---|"]
    for r in rows:
        on, off = r["on"], r["off"]
        lines.append(
            f"| {r['clients']} | {_fmt(on['sentences_per_s'])} | {_fmt(off['sentences_per_s'])} "
            f"| {_fmt(r['on_over_off'], 'x')} | {_fmt(on['p50_ms'])} / {_fmt(on['p95_ms'])} / "
            f"{_fmt(on['p99_ms'])} | {_fmt(off['p50_ms'])} / {_fmt(off['p95_ms'])} / "
            f"{_fmt(off['p99_ms'])} | {_fmt(on.get('requests_per_call'))} | "
            f"{on['errors']} / {off['errors']} |")
    return "\n".join(lines)


def arch_table(rows: List[dict]) -> str:
    """Markdown: one line per (experts, clients), token-MoE and task-MoE side by side."""
    lines = ["| experts | clients | token-MoE sent/s | task-MoE sent/s | task / token | "
             "token-MoE RSS MB (peak) | task-MoE RSS MB (peak) | task / token RSS | "
             "p50 ms token / task | output tokens token / task |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        a, b = r["token"], r["task"]
        lines.append(
            f"| {r['experts']} | {r['clients']} | {_fmt(a['sentences_per_s'])} | "
            f"{_fmt(b['sentences_per_s'])} | {_fmt(r['throughput_ratio'], 'x')} | "
            f"{_fmt(a['rss_mb'])} ({_fmt(a['peak_rss_mb'])}) | "
            f"{_fmt(b['rss_mb'])} ({_fmt(b['peak_rss_mb'])}) | {_fmt(r['rss_ratio'])} | "
            f"{_fmt(a['p50_ms'])} / {_fmt(b['p50_ms'])} | "
            f"{_fmt(a['mean_output_tokens'])} / {_fmt(b['mean_output_tokens'])} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="batching,arch", help="batching, arch or both "
                   "(default: %(default)s)")
    p.add_argument("--clients", default="1,4,16,64", type=lambda s: parse_counts(s, "--clients"),
                   help="concurrent clients of part batching (default: 1,4,16,64)")
    p.add_argument("--requests", type=int, default=256,
                   help="requests per (mode, client count) in part batching (default: 256)")
    p.add_argument("--work", default=str(REPO / "work" / "bench_serve"),
                   help="sub-network caches, random-weight checkpoints, server logs")
    p.add_argument("--threads", type=int, default=1, help="the servers' --threads (default 1)")
    p.add_argument("--beam", type=int, default=4, help="the servers' --beam (default 4)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="client timeout per request and the servers' --timeout, seconds")
    p.add_argument("--start-timeout", type=float, default=900.0,
                   help="seconds a server may take to start (building sub-networks included)")
    # part batching
    demo = REPO / "work" / "demo"
    p.add_argument("--checkpoint", default=str(demo / "checkpoints" / "checkpoint_last.pt"))
    p.add_argument("--data", default=str(demo / "multi30k" / "bin"))
    p.add_argument("--spm-model", default=str(demo / "multi30k" / "spm.model"),
                   help="'' for a model without SentencePiece")
    p.add_argument("--text-dir", default=str(demo / "multi30k" / "text"),
                   help="sentences from TEXT_DIR/test.SRC")
    p.add_argument("--pairs", default=DEMO_PAIRS, type=parse_pairs,
                   help="pairs mixed in the load (default: the demo's six trained directions)")
    p.add_argument("--backend", default="ctranslate2", choices=("ctranslate2", "fairseq"))
    p.add_argument("--quantization", default="int8")
    p.add_argument("--on-args", default="", help="extra server flags of mode on, e.g. "
                   "'--max-wait-ms 20 --max-batch-tokens 8192'")
    # part arch
    p.add_argument("--experts", default="32,128", type=lambda s: parse_counts(s, "--experts"))
    p.add_argument("--arch-clients", default="16",
                   type=lambda s: parse_counts(s, "--arch-clients"),
                   help="concurrent clients of part arch (default: 16)")
    p.add_argument("--arch-requests", type=int, default=64,
                   help="requests per (variant, client count) in part arch (default: 64)")
    p.add_argument("--embed-dim", type=int, default=512)
    p.add_argument("--ffn-dim", type=int, default=2048,
                   help="dense FFN width; experts are half as wide, top-2 (default: 2048)")
    p.add_argument("--layers", type=int, default=6, help="layers per side (default: 6)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--moe-freq", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--src-len", type=int, default=20, help="words per random sentence")
    p.add_argument("--out-json", default=str(REPO / "results" / "serve_benchmark.json"))
    p.add_argument("--out-md", default=str(REPO / "results" / "serve_benchmark.md"))
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = set(args.parts) - {"batching", "arch"}
    if bad or not args.parts:
        p.error(f"--parts: {','.join(sorted(bad)) or '(none)'}: give batching, arch or both")
    for name in ("requests", "arch_requests", "threads", "beam"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


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
    """A taskmoe-serve process: started, waited for (GET /health), measured (psutil), stopped."""

    def __init__(self, argv: List[str], url: str, log_path: Path):
        self.argv, self.url, self.log_path = argv, url, log_path
        self.proc: Optional[subprocess.Popen] = None
        self._peak = 0
        self._sampling = None

    def launch(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONWARNINGS="ignore")
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


def build_cache(checkpoint, data, extra: Sequence):
    """The server's own start-up (cli.serve.make_service: plan routes, build every sub-network
    into --cache-dir), run in this process without serving, so that the measured servers start
    from the cache: start-up work is neither timed nor in their memory."""
    import gc

    from fairseq_taskmoe.cli.serve import build_parser, make_service

    argv = [str(checkpoint), "--data", str(data), *[str(x) for x in extra]]
    service, _ = make_service(build_parser().parse_args(argv))
    service.batcher.close()
    del service
    gc.collect()


# ---------------------------------------------------------------- load


async def _load(url: str, items: Sequence[tuple], clients: int, timeout: float) -> dict:
    import httpx

    latencies, statuses, out_tokens = [], {}, 0
    next_item = iter(range(len(items)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def one_client():
            nonlocal out_tokens
            for i in next_item:  # shared iterator: each request is sent exactly once
                src, tgt, text = items[i]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/translate", json={"q": text, "source": src,
                                                              "target": tgt})
                    status = r.status_code
                except httpx.HTTPError as err:
                    status = type(err).__name__
                seconds = time.perf_counter() - t0
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(seconds)
                    out_tokens += len(r.json()["translatedText"].split())

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    result = summarize(latencies, wall, ok, len(items) - ok, out_tokens)
    result["statuses"] = {str(k): v for k, v in statuses.items()}
    return result


def run_load(url: str, items: Sequence[tuple], clients: int, timeout: float) -> dict:
    return asyncio.run(_load(url, items, clients, timeout))


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


def warm_up(server: Server, pairs: Sequence[tuple], sentences: Dict[str, List[str]],
            timeout: float):
    """One request per pair: every sub-network the load uses is loaded before timing."""
    items = [(s, t, sentences[s][0]) for s, t in pairs]
    result = run_load(server.url, items, 1, timeout)
    if result["ok"] != len(items):
        raise RuntimeError(f"warm-up failed on {server.url}: {result['statuses']}; "
                           f"{server.log_tail()}")


def measure(server: Server, items: Sequence[tuple], clients: int, timeout: float) -> dict:
    before = batch_counts(server.url)
    with server.peak_rss():
        result = run_load(server.url, items, clients, timeout)
    after = batch_counts(server.url)
    calls = after[0] - before[0]
    result["requests_per_call"] = round((after[1] - before[1]) / calls, 2) if calls else None
    result["rss_mb"], result["peak_rss_mb"] = _mb(server.rss()), _mb(server.peak)
    return result


# ---------------------------------------------------------------- parts


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


def part_batching(args, log) -> dict:
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        raise SystemExit(f"bench_serve: {checkpoint} is missing: run `make demo` first, or give "
                         "--checkpoint, --data, --spm-model and --text-dir")
    work = Path(args.work)
    sentences = read_sentences(args.text_dir, sorted({s for s, _ in args.pairs}))
    common = ["--cache-dir", work / "cache", "--backend", args.backend, "--quantization",
              args.quantization, "--threads", args.threads, "--beam", args.beam, "--timeout",
              args.timeout, "--max-queue", max(256, 2 * max(args.clients)), "--log-level",
              "warning"]
    if args.spm_model:
        common += ["--spm-model", args.spm_model]
    extra = {"on": common + shlex.split(args.on_args), "off": common + MODES["off"]}
    log(f"batching: building the sub-network cache of {checkpoint} ...")
    build_cache(checkpoint, args.data, common)
    rows = []
    specs = [(checkpoint, args.data, extra[m], work / "logs" / f"{m}.log") for m in ("on", "off")]
    with running_all(specs, args.start_timeout) as (on, off):
        servers = {"on": on, "off": off}
        for server in servers.values():
            warm_up(server, args.pairs, sentences, args.timeout)
        items = workload(args.pairs, sentences, args.requests)
        for n, clients in enumerate(args.clients):
            row = {"clients": clients}
            for mode in (("on", "off") if n % 2 == 0 else ("off", "on")):
                row[mode] = measure(servers[mode], items, clients, args.timeout)
                r = row[mode]
                log(f"batching {mode:3s} clients {clients:3d}: {r['sentences_per_s']:.2f} sent/s, "
                    f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                    f"{r['requests_per_call']} requests per engine call, {r['errors']} errors")
            row["on_over_off"] = ratio(row["on"]["sentences_per_s"],
                                       row["off"]["sentences_per_s"])
            rows.append(row)
    return {"checkpoint": str(checkpoint), "pairs": ["-".join(p) for p in args.pairs],
            "requests": args.requests, "server_flags": {m: [str(x) for x in e]
                                                        for m, e in extra.items()},
            "rows": rows}


def build_random_checkpoint(data: Path, shape: Namespace, experts: int, variant: str,
                            path: Path):
    """A random-weight model of scripts/benchmark_inference.py's variant (its own train_args:
    the same flags, seed and shape), saved as fairseq's Trainer saves a checkpoint (an
    OmegaConf cfg and an optimizer history), so that the server loads it like a trained one
    (benchmark_inference's own files are read only by its own loader)."""
    import benchmark_inference as bi  # sibling script
    import torch
    from fairseq import tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    from fairseq_taskmoe.atomic import write_atomically

    _, routing, _, _ = bi.VARIANTS[variant]
    targs = bi.train_args(data, shape, experts, routing)
    torch.manual_seed(1)
    task = tasks.setup_task(targs)
    model = task.build_model(targs)
    # Random weights end a sentence whenever </s> happens to score high, and emit <s> or
    # language tokens (which the server strips) as readily as words; how often differs between
    # engines (fairseq float32 vs CTranslate2 int8), so output length, and with it throughput,
    # would be an accident. With the rows of every special symbol zeroed in the (shared)
    # embeddings, their logits are exactly 0 while the best word's is positive: every engine
    # decodes ordinary words up to the server's length bound (as benchmark_inference forces
    # --tgt-len tokens), and the table reports the output length to show it.
    d = task.target_dictionary
    special = {d.bos(), d.pad(), d.eos(), d.unk()} | {d.index(f"__{lang}__") for lang in bi.LANGS}
    with torch.no_grad():
        for name, weight in model.state_dict().items():
            if name.endswith(("embed_tokens.weight", "output_projection.weight")):
                weight[sorted(special)] = 0
    cfg = OmegaConf.to_container(convert_namespace_to_omegaconf(targs), resolve=True,
                                 enum_to_str=True)
    state = {"args": None, "cfg": cfg, "model": model.state_dict(), "criterion": None,
             "optimizer_history": [{"criterion_name": "MoELabelSmoothedCrossEntropyCriterion",
                                    "optimizer_name": "Adam", "lr_scheduler_state": {},
                                    "num_updates": 0}],
             "task_state": {}, "extra_state": {}, "last_optimizer_state": None}
    write_atomically(state, str(path))


def arch_checkpoints(args, experts: int, work: Path) -> dict:
    """Random-weight token-MoE (variant a) and task-MoE (variant b) checkpoints; cached."""
    import benchmark_inference as bi  # sibling script

    data = bi.dict_dir(work, args.vocab)
    shape = Namespace(layers=args.layers, embed_dim=args.embed_dim, ffn_dim=args.ffn_dim,
                      heads=args.heads, moe_freq=args.moe_freq)
    tag = f"e{experts}-d{args.embed_dim}-f{args.ffn_dim}-l{args.layers}-m{args.moe_freq}"
    paths = {}
    for name, variant in (("token", "a"), ("task", "b")):
        path = work / f"{name}-{tag}.pt"
        if not path.exists():
            build_random_checkpoint(data, shape, experts, variant, path)
        paths[name] = path
    return {"data": data, **paths}


def part_arch(args, log) -> dict:
    import benchmark_inference as bi

    work = Path(args.work) / "arch"
    work.mkdir(parents=True, exist_ok=True)
    pairs = [tuple(p.split("-")) for p in bi.PAIRS]
    words = [f"w{i}" for i in range(args.vocab - 4 - len(bi.LANGS))]  # bi.dict_dir's words
    sentences = {lang: random_sentences(words, 200, args.src_len, seed=n)
                 for n, lang in enumerate(bi.LANGS)}
    items = workload(pairs, sentences, args.arch_requests)
    common = ["--threads", args.threads, "--beam", args.beam, "--timeout", args.timeout,
              "--max-queue", max(256, 2 * max(args.arch_clients)), "--log-level", "warning"]
    variants = {"token": ["--backend", "fairseq"],
                "task": ["--backend", "ctranslate2", "--quantization", args.quantization]}
    rows = []
    for experts in args.experts:
        log(f"arch: {experts} experts: random-weight checkpoints ...")
        paths = arch_checkpoints(args, experts, work)
        results = {}
        for name, flags in variants.items():
            extra = common + ["--cache-dir", work / "cache"] + flags
            logs = work / "logs"
            build_cache(paths[name], paths["data"], extra)
            with running(paths[name], paths["data"], extra, logs / f"{name}-{experts}.log",
                         args.start_timeout) as server:
                warm_up(server, pairs, sentences, args.timeout)
                idle = server.rss()
                for clients in args.arch_clients:
                    r = measure(server, items, clients, args.timeout)
                    r["rss_mb"] = _mb(idle)  # after warm-up, every sub-network loaded
                    results[name, clients] = r
                    log(f"arch {experts:4d} experts {name}-MoE clients {clients:3d}: "
                        f"{r['sentences_per_s']:.2f} sent/s, RSS {r['rss_mb']} MB "
                        f"(peak {r['peak_rss_mb']} MB), {r['errors']} errors")
        for clients in args.arch_clients:
            a, b = results["token", clients], results["task", clients]
            rows.append({"experts": experts, "clients": clients, "token": a, "task": b,
                         "throughput_ratio": ratio(b["sentences_per_s"], a["sentences_per_s"]),
                         "rss_ratio": ratio(b["rss_mb"], a["rss_mb"])})
    return {"shape": {"embed_dim": args.embed_dim, "ffn_dim": args.ffn_dim,
                      "layers": args.layers, "heads": args.heads, "moe_freq": args.moe_freq,
                      "vocab": args.vocab, "src_len": args.src_len, "top_k": 2},
            "pairs": list(bi.PAIRS), "requests": args.arch_requests,
            "server_flags": {k: [str(x) for x in common + v] for k, v in variants.items()},
            "rows": rows}


def environment(args) -> dict:
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


def markdown(result: dict) -> str:
    env = result["environment"]
    out = ["# taskmoe-serve load benchmark", "",
           f"`{result['command']}`", "",
           f"{env['date']}; {env['machine']}; Python {env['python']}, torch {env['torch']}, "
           f"CTranslate2 {env['ctranslate2']}; server --threads {env['server_threads']}, "
           f"--beam {env['beam']}; client and servers on the same machine (127.0.0.1).", ""]
    if "batching" in result:
        b = result["batching"]
        out += ["## Cross-request batching on vs off", "",
                f"{b['checkpoint']}; pairs {', '.join(b['pairs'])} mixed round robin, one "
                f"sentence per request, {b['requests']} requests per cell. Off: "
                "`--no-cross-batching --max-wait-ms 0` (one request per engine call).", "",
                batching_table(b["rows"]), ""]
    if "arch" in result:
        a = result["arch"]
        s = a["shape"]
        out += ["## Token-MoE served whole vs task-MoE served pruned", "",
                f"Random weights, d={s['embed_dim']}, {s['layers']}+{s['layers']} layers, every "
                f"{s['moe_freq']}. layer MoE (experts FFN {s['ffn_dim'] // 2}, top-2); token-MoE "
                "on the fairseq backend (whole), task-MoE pruned per target on CTranslate2 "
                f"({a['server_flags']['task'][-1]}); {a['requests']} requests of "
                f"{s['src_len']} random words over {', '.join(a['pairs'])}. RSS: the server "
                "process after warm-up (peak during the load).", "",
                arch_table(a["rows"]), ""]
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    for noisy in ("httpx", "httpcore"):  # fairseq's import makes the root logger verbose
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    from fairseq_taskmoe.atomic import write_text_atomically

    started = time.time()

    def log(msg):
        print(f"[bench_serve {time.time() - started:7.1f}s] {msg}", flush=True)

    result = {"command": "python scripts/bench_serve.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "environment": environment(args)}
    if "batching" in args.parts:
        result["batching"] = part_batching(args, log)
    if "arch" in args.parts:
        result["arch"] = part_arch(args, log)
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out_json, json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out_md, text + "\n")
    print(text)
    log(f"wrote {args.out_json} and {args.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
