#!/usr/bin/env python3
"""Where a request's CPU goes in taskmoe-serve (issue 30 item 3): the real server on 127.0.0.1,
one pair, one sentence per request, and two measurements of the same load:

- CPU per request: the server process's CPU time (psutil: user + system, every thread) over
  --requests requests from --clients clients, divided by the requests; beside it, the engine's
  own CPU per sentence (CTranslate2's translate_batch, one sentence per call, one thread, on the
  same artifact, beam and decoding bound, in this process): the difference is what serving
  costs beyond translating.
- Where it goes: the same load again, with the CPU time of every thread of the server read
  from /proc before and after, and py-spy (sampling the Python threads, `--threads`, idle ones
  left out) recording it. A thread py-spy never saw has no Python frames: CTranslate2's own
  workers (the engine). A Python thread's CPU is split over CATEGORIES by its samples: each
  sample goes to the first category whose pattern a frame of its stack matches (the engine call
  first, then the request path's parts, the frameworks last); a sample whose deepest Python frame
  is the event loop's run call is the loop in C (uvloop: I/O, httptools parsing, or waiting).

    .venv/bin/python -m research.bench.profile_serve           # -> results/serve_profile.*
    .venv/bin/python -m research.bench.profile_serve --clients 16 --requests 800

Run it on a quiet machine: the client shares the cores. The server runs with its defaults
(continuous batching, --threads = the cores) unless --server-args says otherwise; the sub-network
cache is built beforehand by the server's own start-up code (research/bench/load.py).
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from research.bench.load import (REPO, build_cache, environment, read_sentences, run_load,
                                 running, warm_up, workload)
from research.common import logger

# (category, a regular expression matched against "function (file:line)" frames), in the order
# a sample is tried: the engine before the request path, the frameworks last
CATEGORIES: List[Tuple[str, str]] = [
    ("engine: CTranslate2 translate_batch", r"translate_batch|serve/engines\.py"),
    ("batcher: queue, fill, answer", r"serve/batcher\.py"),
    ("prepare: sentence split, HTML, tokenize", r"serve/(sentences|text)\.py|sentencex|"
     r"sentencepiece|_prepare|_encode|_pieces|_inputs"),
    ("JSON: parse and render", r"\bjson/|orjson|render \(|JSONResponse|_json"),
    ("logging: access log", r"logging/__init__\.py|AccessLog|_access"),
    ("metrics: prometheus-client", r"prometheus_client|serve/metrics\.py"),
    ("our request handling (app.py, service.py, routes, keys)",
     r"serve/(app|service|routes|keys)\.py"),
    ("framework: FastAPI and Starlette", r"fastapi/|starlette/|pydantic"),
    ("HTTP: uvicorn, httptools", r"uvicorn/|httptools|h11"),
    ("event loop and thread hand-offs", r"asyncio/|concurrent/futures|threading\.py|uvloop"),
]
OTHER = "other"


LOOP_IN_C = "event loop in C (uvloop I/O, httptools parsing)"
ENGINE_THREADS = "engine: CTranslate2's worker threads"


def categorize(stack: str) -> str:
    """The category of one sampled stack (py-spy's raw format: frames joined by ';', the root
    first)."""
    for name, pattern in CATEGORIES:
        if re.search(pattern, stack):
            return name
    leaf = stack.rsplit(";", 1)[-1]
    if re.search(r"run_until_complete|run_forever|asyncio/runners\.py|uvicorn/server\.py|"
                 r"uvicorn/main\.py", leaf):
        return LOOP_IN_C
    return OTHER


def read_raw(path: Path) -> Dict[int, Dict[str, int]]:
    """py-spy --format raw --threads: 'thread (TID): NAME;frame;... COUNT' per line ->
    {TID: samples per category}."""
    out: Dict[int, Dict[str, int]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        found = re.match(r"thread \((\d+)\)[^;]*;?(.*)", stack)
        if not found or not count.isdigit():
            continue
        tid, frames = int(found.group(1)), found.group(2)
        counts = out.setdefault(tid, {})
        name = categorize(frames)
        counts[name] = counts.get(name, 0) + int(count)
    return out


def thread_cpu(pid: int) -> Dict[int, float]:
    """CPU seconds (user + system) of every thread of `pid` so far, from /proc."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def attribute(cpu: Dict[int, float], samples: Dict[int, Dict[str, int]]) -> Dict[str, float]:
    """CPU seconds per category: a Python thread's CPU split by its samples; a thread without
    samples is an engine worker (CTranslate2's threads have no Python frames)."""
    out: Dict[str, float] = {}
    for tid, seconds in cpu.items():
        counts = samples.get(tid)
        if not counts:
            out[ENGINE_THREADS] = out.get(ENGINE_THREADS, 0.0) + seconds
            continue
        total = sum(counts.values())
        for name, n in counts.items():
            out[name] = out.get(name, 0.0) + seconds * n / total
    return out


def engine_cpu_per_sentence(path: str, pair: Tuple[str, str], texts: Sequence[str], beam: int,
                            max_target_positions: int) -> float:
    """CPU ms of CTranslate2's translate_batch per sentence, one sentence per call, one
    thread, as the server calls it (engines.CT2Engine's tokens and bound)."""
    from fairseq_taskmoe.ct2 import CT2Translator
    from fairseq_taskmoe.serve.engines import output_bound

    mt = CT2Translator(path, intra_threads=1, inter_threads=1)
    prefix, target = mt.tokens(*pair)
    sources = [prefix + mt.encode(t) for t in texts]

    def one(source):
        bound = output_bound(len(source) + 1, max_target_positions)
        mt.translator.translate_batch([source], target_prefix=[target] if target else None,
                                      beam_size=beam, max_input_length=0,
                                      max_decoding_length=bound + len(target))

    for source in sources[:4]:
        one(source)  # warm-up
    t0 = time.process_time()
    for source in sources:
        one(source)
    return 1000 * (time.process_time() - t0) / len(sources)


def parse_args(argv=None):
    demo = REPO / "work" / "demo"
    p = argparse.ArgumentParser(prog="python -m research.bench.profile_serve",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(demo / "checkpoints" / "checkpoint_last.pt"))
    p.add_argument("--data", default=str(demo / "multi30k" / "bin"))
    p.add_argument("--spm-model", default=str(demo / "multi30k" / "spm.model"))
    p.add_argument("--text-dir", default=str(demo / "multi30k" / "text"))
    p.add_argument("--pair", default="en-de", help="the pair of every request (default: en-de)")
    p.add_argument("--clients", type=int, default=1, help="concurrent clients (default: 1)")
    p.add_argument("--requests", type=int, default=400, help="requests per measurement "
                   "(default: 400)")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    p.add_argument("--server-args", default="", help="extra taskmoe-serve flags")
    p.add_argument("--work", default=str(REPO / "work" / "bench_serve"))
    p.add_argument("--out-json", default=str(REPO / "results" / "serve_profile.json"))
    p.add_argument("--out-md", default=str(REPO / "results" / "serve_profile.md"))
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        p.error("--clients and --requests must be >= 1")
    try:
        args.pair = tuple(args.pair.split("-"))
        assert len(args.pair) == 2
    except AssertionError:
        p.error(f"--pair {args.pair}: give SRC-TGT, e.g. en-de")
    return args


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# Where a request's CPU goes in taskmoe-serve", "", f"`{result['command']}`", "",
             f"{env['date']}; {env['machine']}; Python {env['python']}, CTranslate2 "
             f"{env['ctranslate2']}; beam {env['beam']}; pair {result['pair']}, one sentence "
             f"per request, {result['requests']} requests from {result['clients']} client(s); "
             f"server flags `{' '.join(result['server_flags'])}`.", "",
             f"- Server CPU per request: **{result['server_cpu_ms']:.2f} ms** "
             f"({result['sentences_per_s']:.1f} requests/s).",
             f"- The engine's own CPU per sentence (translate_batch, one sentence per call, one "
             f"thread, this process): **{result['engine_cpu_ms']:.2f} ms**.",
             f"- Serving beyond the engine: **{result['overhead_ms']:.2f} ms** per request "
             f"({100 * result['overhead_ms'] / result['server_cpu_ms']:.0f}% of the server's "
             "CPU).", "",
             f"The same load again under py-spy ({result['profiled_cpu_ms']:.2f} CPU ms per "
             "request): each thread's CPU time (/proc), a Python thread's split by its py-spy "
             "samples:", "",
             "| where | CPU s | share | CPU ms per request |", "|---|---:|---:|---:|"]
    for name, row in result["profile"].items():
        lines.append(f"| {name} | {row['cpu_s']:.2f} | {100 * row['share']:.1f}% | "
                     f"{row['ms']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import logging

    import psutil

    for noisy in ("httpx", "httpcore"):  # fairseq's import makes the root logger verbose
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from fairseq_taskmoe.atomic import write_text_atomically

    log = logger("profile_serve", clock=True)

    work = Path(args.work)
    extra = ["--cache-dir", work / "cache", "--beam", args.beam, "--spm-model", args.spm_model,
             "--max-queue", max(256, 2 * args.clients), "--log-level", "warning",
             *shlex.split(args.server_args)]
    log("building the sub-network cache ...")
    facts = build_cache(args.checkpoint, args.data, extra)
    sentences = read_sentences(args.text_dir, [args.pair[0]])
    items = workload([args.pair], sentences, args.requests)
    engine_ms = engine_cpu_per_sentence(facts["paths"][args.pair], args.pair,
                                        [text for _, _, text in items], args.beam,
                                        facts["max_target_positions"])
    log(f"engine: {engine_ms:.2f} CPU ms per sentence")
    with running(args.checkpoint, args.data, extra, work / "logs" / "profile.log",
                 900) as server:
        warm_up(server, [args.pair], sentences, 600)
        proc = psutil.Process(server.proc.pid)
        before = proc.cpu_times()
        load = run_load(server.url, items, args.clients, 600)
        after = proc.cpu_times()
        cpu_ms = 1000 * ((after.user - before.user) + (after.system - before.system)) / max(
            1, load["ok"])
        log(f"server: {cpu_ms:.2f} CPU ms per request, {load['sentences_per_s']:.1f} "
            "requests/s")
        raw = work / "profile.raw.txt"
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p",
                                str(server.proc.pid), "--format", "raw", "--threads", "-o",
                                str(raw), "--rate", str(args.rate), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches
        first = thread_cpu(server.proc.pid)
        profiled = run_load(server.url, items, args.clients, 600)
        last = thread_cpu(server.proc.pid)
        spy.send_signal(2)  # SIGINT: py-spy writes what it has
        _, err = spy.communicate(timeout=60)
        if not raw.exists():
            raise SystemExit(f"profile_serve: py-spy wrote nothing: {err.decode()[-2000:]}")
    cpu = {tid: last[tid] - first.get(tid, 0.0) for tid in last}
    seconds = attribute(cpu, read_raw(raw))
    total = sum(seconds.values())
    order = [ENGINE_THREADS] + [c for c, _ in CATEGORIES] + [LOOP_IN_C, OTHER]
    profile = {name: {"cpu_s": round(seconds[name], 3), "share": seconds[name] / total,
                      "ms": 1000 * seconds[name] / max(1, profiled["ok"])}
               for name in order if seconds.get(name)}
    result = {"command": "python -m research.bench.profile_serve " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "environment": environment(Namespace(threads=None, beam=args.beam)),
        "pair": "-".join(args.pair), "clients": args.clients, "requests": args.requests,
        "server_flags": [str(x) for x in extra[2:]],
        "sentences_per_s": load["sentences_per_s"], "server_cpu_ms": cpu_ms,
        "engine_cpu_ms": engine_ms, "overhead_ms": cpu_ms - engine_ms,
        "profiled_cpu_ms": 1000 * total / max(1, profiled["ok"]), "profile": profile}
    write_text_atomically(args.out_json, json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    write_text_atomically(args.out_md, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
