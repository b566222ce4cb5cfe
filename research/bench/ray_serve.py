#!/usr/bin/env python3
"""Load benchmark of taskmoe-serve --engine ray (issue 21, "Measure"): one run, side by side on
the same requests, one server at a time:

  embedded    the single-process server (the default engine)
  ray x1      --engine ray --replicas 1
  ray x2      --engine ray --replicas 2
  (--replicas-list changes the Ray rows)

every server with --threads 1 (one engine thread per replica), each `taskmoe-serve` starting its
own local Ray cluster (ray.init on this machine's CPUs) and stopped (SIGTERM) before the next
starts. The load is research/bench/load.py's, as in research/bench/serve.py: mixed pairs, N
concurrent clients (asyncio + aiohttp), the same request list for every server, after one warm-up
request per pair; measured twice per server, with one sentence per request and with S sentences
per request (an array `q`, --sentences-per-request). Reported per server and load: throughput
(sentences/s), latency p50/p95/p99, requests per engine call, the service's resident memory
(taskmoe_resident_memory_bytes of /metrics: under Ray the ingress plus every replica), and the
CPU time the load cost each part of the service (psutil over the server's process tree: the
taskmoe-serve process; under Ray, Serve's HTTP proxy, the ingress, the Translator replicas and
Ray's own processes), per request. The ratios the issue sets goals for: ray x2 / ray x1
throughput (goal >= 1.6 on 2 cores) and ray x1 / embedded (X1_GOAL: issue 30's 0.6 at one
sentence a request, 0.85 at 8).

    .venv/bin/python -m research.bench.ray_serve                      # the demo model
    .venv/bin/python -m research.bench.ray_serve --requests 32 --clients 4 \\
        --checkpoint CKPT --data BIN --spm-model '' --text-dir TEXT --pairs en-de,de-en

Writes --out-json and --out-md (atomically) and prints the table.
"""

import argparse
import itertools
import json
import shlex
import sys
from pathlib import Path

from research.bench.load import (DEMO_PAIRS, REPO, _mb, batch_counts, build_cache, environment,
                                 parse_counts, parse_pairs, ratio, read_sentences,
                                 requests_per_call, run_load, running, warm_up, workload)
from research.common import logger


X1_GOAL = {1: 0.6, 8: 0.85}  # ray x1 / embedded, by sentences per request (issue 30)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    demo = REPO / "work" / "demo"
    p.add_argument("--checkpoint", default=str(demo / "checkpoints" / "checkpoint_last.pt"))
    p.add_argument("--data", default=str(demo / "multi30k" / "bin"))
    p.add_argument("--spm-model", default=str(demo / "multi30k" / "spm.model"),
                   help="'' for a model without SentencePiece")
    p.add_argument("--text-dir", default=str(demo / "multi30k" / "text"))
    p.add_argument("--pairs", default=DEMO_PAIRS, type=parse_pairs)
    p.add_argument("--requests", type=int, default=256, help="requests per server (default 256)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--sentences-per-request", default="1,8",
                   type=lambda s: parse_counts(s, "--sentences-per-request"),
                   help="the loads measured on every server, as sentences per request "
                   "(default 1,8)")
    p.add_argument("--replicas-list", default="1,2",
                   type=lambda s: parse_counts(s, "--replicas-list"))
    p.add_argument("--pairs-per-replica", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="start every server this many times, the order rotated each round; "
                   "the table shows medians over rounds, the JSON every round (default 1)")
    p.add_argument("--backend", default="ctranslate2", choices=("ctranslate2", "fairseq"))
    p.add_argument("--quantization", default="int8")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--work", default=str(REPO / "work" / "bench_ray_serve"))
    p.add_argument("--out-json", default=str(REPO / "results" / "serve_ray_benchmark.json"))
    p.add_argument("--out-md", default=str(REPO / "results" / "serve_ray_benchmark.md"))
    return p.parse_args(argv)


def service_rss_mb(url: str):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if family.name == "taskmoe_resident_memory_bytes":
            return _mb(int(sum(s.value for s in family.samples)))
    return None


# the parts of the service, by what a process's command line says it is (first match wins)
ROLES = (("proxy", "ProxyActor"), ("ingress", ":Ingress"), ("replicas", ":Translator"),
         ("ray system", "ray"), ("taskmoe-serve", ""))


def role_of(cmdline: str) -> str:
    return next(role for role, marker in ROLES if marker in cmdline)


def cpu_seconds(pid: int) -> dict:
    """CPU seconds (user + system) so far of a process and its descendants, summed by role."""
    import psutil

    root = psutil.Process(pid)
    out = {}
    for proc in [root] + root.children(recursive=True):
        try:
            times = proc.cpu_times()
            role = "taskmoe-serve" if proc.pid == pid else role_of(" ".join(proc.cmdline()))
        except psutil.Error:  # ended meanwhile
            continue
        out[role] = out.get(role, 0.0) + times.user + times.system
    return out


def requests_of(items, per_request: int):
    """(src, tgt, text) sentences -> requests of `per_request` sentences of one pair (an array
    `q` when more than one)."""
    if per_request == 1:
        return list(items)
    by_pair = {}
    for src, tgt, text in items:
        by_pair.setdefault((src, tgt), []).append(text)
    chunks = [[(src, tgt, texts[i:i + per_request]) for i in range(0, len(texts), per_request)]
              for (src, tgt), texts in by_pair.items()]
    return [r for row in itertools.zip_longest(*chunks) for r in row if r]  # pairs interleaved


def measure(server, items, clients, timeout) -> dict:
    before, cpu_before = batch_counts(server.url), cpu_seconds(server.proc.pid)
    result = run_load(server.url, items, clients, timeout)
    after, cpu_after = batch_counts(server.url), cpu_seconds(server.proc.pid)
    result["requests_per_call"] = requests_per_call(before, after)
    result["service_rss_mb"] = service_rss_mb(server.url)
    result["cpu_ms_per_request"] = {
        role: round(1000 * (cpu_after[role] - cpu_before.get(role, 0.0)) / len(items), 1)
        for role in cpu_after}
    result["cpu_s_total"] = round(sum(cpu_after.values()) - sum(cpu_before.values()), 2)
    return result


def median_row(runs) -> dict:
    """The rounds of one (server, load) cell -> one row of medians (each figure on its own);
    the sentences/s of every round kept in `rounds_sentences_per_s`."""
    import statistics

    def med(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 2) if values else None

    results = [r["result"] for r in runs]
    out = {k: med([m[k] for m in results]) for k in
           ("sentences_per_s", "p50_ms", "p95_ms", "p99_ms", "requests_per_call",
            "service_rss_mb")}
    out["errors"] = sum(m["errors"] for m in results)
    roles = sorted({role for m in results for role in m["cpu_ms_per_request"]})
    out["cpu_ms_per_request"] = {role: med([m["cpu_ms_per_request"].get(role) for m in results])
                                 for role in roles}
    out["rounds_sentences_per_s"] = [m["sentences_per_s"] for m in results]
    return {"server": runs[0]["server"], "sentences_per_request": runs[0]["sentences_per_request"],
            "flags": runs[0]["flags"], "result": out}


def table(rows) -> str:
    roles = [r for r, _ in ROLES]
    out = ["| server | sentences / request | sentences/s | p50 ms | p99 ms | requests/call | "
           "errors | CPU ms per request: " + " / ".join(roles) + " | service RSS MB |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        m = r["result"]
        cpu = " / ".join(str(m["cpu_ms_per_request"].get(role, "-")) for role in roles)
        rounds = m.get("rounds_sentences_per_s", [])
        spread = f" ({', '.join(f'{x:.1f}' for x in rounds)})" if len(rounds) > 1 else ""
        out.append(f"| {r['server']} | {r['sentences_per_request']} | "
                   f"{m['sentences_per_s']:.2f}{spread} | {m['p50_ms']} | {m['p99_ms']} | "
                   f"{m['requests_per_call']} | {m['errors']} | {cpu} | "
                   f"{m['service_rss_mb']} |")
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    from fairseq_taskmoe.atomic import write_text_atomically

    log = logger("bench_ray_serve", clock=True)

    work = Path(args.work)
    sentences = read_sentences(args.text_dir, sorted({s for s, _ in args.pairs}))
    common = ["--cache-dir", work / "cache", "--backend", args.backend, "--quantization",
              args.quantization, "--threads", args.threads, "--beam", args.beam, "--timeout",
              args.timeout, "--max-queue", max(256, 2 * args.clients), "--log-level", "warning"]
    if args.spm_model:
        common += ["--spm-model", args.spm_model]
    log(f"building the sub-network cache of {args.checkpoint} ...")
    build_cache(args.checkpoint, args.data, common)
    servers = [("embedded", common)] + [
        (f"ray x{n}", common + ["--engine", "ray", "--replicas", n, "--pairs-per-replica",
                                args.pairs_per_replica]) for n in args.replicas_list]
    loads = {}
    for per in args.sentences_per_request:  # the same sentences, grouped per request
        loads[per] = requests_of(workload(args.pairs, sentences, args.requests * per), per)
    runs = []  # one per (round, server, load)
    for round_ in range(args.rounds):
        shift = round_ % len(servers)  # rotated: no server always first or last
        for name, extra in servers[shift:] + servers[:shift]:
            log_path = work / "logs" / (name.replace(" ", "_") + ".log")
            with running(args.checkpoint, args.data, extra, log_path,
                         args.start_timeout) as server:
                warm_up(server, args.pairs, sentences, args.timeout)
                for per, items in loads.items():
                    result = measure(server, items, args.clients, args.timeout)
                    runs.append({"round": round_ + 1, "server": name,
                                 "sentences_per_request": per,
                                 "flags": [str(x) for x in extra], "result": result})
                    log(f"round {round_ + 1}, {name}, {per} sentence(s) per request: "
                        f"{result['sentences_per_s']:.2f} sent/s, p99 {result['p99_ms']} ms, "
                        f"{result['requests_per_call']} requests per call, {result['errors']} "
                        f"errors, CPU ms per request {result['cpu_ms_per_request']}")
    rows = [median_row([r for r in runs if (r["server"], r["sentences_per_request"]) == cell])
            for cell in [(name, per) for name, _ in servers for per in loads]]
    ratios = {}
    for per in loads:
        speed = {r["server"]: r["result"]["sentences_per_s"] for r in rows
                 if r["sentences_per_request"] == per}
        ratios[per] = {
            "ray_x2_over_x1": ratio(speed.get("ray x2"), speed.get("ray x1")),
            "ray_x1_over_embedded": ratio(speed.get("ray x1"), speed.get("embedded"))}
    result = {"command": "python -m research.bench.ray_serve " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "environment": environment(args), "checkpoint": args.checkpoint,
        "pairs": ["-".join(p) for p in args.pairs], "requests": args.requests,
        "clients": args.clients, "rounds": args.rounds, "rows": rows, "runs": runs,
        "ratios": ratios}
    env = result["environment"]
    text = "\n".join([
        "# taskmoe-serve on Ray Serve: load benchmark", "", f"`{result['command']}`", "",
        f"{env['date']}; {env['machine']}; Python {env['python']}, torch {env['torch']}, "
        f"CTranslate2 {env['ctranslate2']}; --threads {args.threads} per server / replica, "
        f"--beam {args.beam}, --pairs-per-replica {args.pairs_per_replica}; {args.requests} "
        f"requests per load ({', '.join(result['pairs'])} mixed) from {args.clients} clients; "
        "client, servers and the local Ray cluster on the same machine (127.0.0.1). CPU ms per "
        "request: CPU time of each part of the service during the load, over the requests. "
        f"{args.rounds} round(s), every server started anew in each, the order rotated: "
        "medians over rounds (sentences/s of each round in brackets).",
        "", table(rows), ""] + [
        f"{per} sentence(s) per request: ray x2 / ray x1 throughput "
        f"{r['ray_x2_over_x1']} (goal >= 1.6); ray x1 / embedded {r['ray_x1_over_embedded']} "
        f"(goal >= {X1_GOAL.get(int(per), X1_GOAL[8])})." for per, r in ratios.items()] + [""])
    for path, content in ((args.out_json, json.dumps(result, indent=1) + "\n"),
                          (args.out_md, text)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, content)
    print(text)
    log(f"wrote {args.out_json} and {args.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
