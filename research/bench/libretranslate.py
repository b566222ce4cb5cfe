#!/usr/bin/env python3
"""taskmoe-serve against the real LibreTranslate 1.9.6 on the same pairs (issue 29).

    make bench-libretranslate      # after `make demo` and `make lt-venv`
    .venv/bin/python -m research.bench.libretranslate --quick --servers taskmoe   # seconds

The checkpoint's trained pairs, exported as Argos packages (research/libretranslate.py's
export_packages: taskmoe-export --all-pairs --format argos, --quantization as the server's),
are served by each of --servers, one server at a time on 127.0.0.1:

  taskmoe   taskmoe-serve on the checkpoint, its defaults (continuous cross-request batching,
            --threads the cores this process may use), the same --quantization and --beam 4
  lt        LibreTranslate with its defaults (ARGOS_INTRA_THREADS 0: every core for each
            translation; ARGOS_INTER_THREADS 1; waitress with --threads 4)
  lt-tuned  LibreTranslate as tuned as its settings allow here: --lt-tuned-env (default
            ARGOS_INTRA_THREADS=1 and ARGOS_INTER_THREADS=the cores: one translation per core)
            and --lt-tuned-args (default --threads 8, waitress threads)

Every round starts each server afresh, in rotated order (round r begins with server r), and
then: start-up (launch to the first answer; taskmoe-serve's sub-network cache is built once
beforehand, LibreTranslate's packages installed beforehand), warm-up (one request per pair), its
RSS, and every cell: the workloads (--one-pair alone, and --pairs mixed round robin) x
--per-request (1, and 8 sentences sent as an array q) x --clients (1, 16, 64), --sentences
sentences a cell, the same request list for every server. Reported: medians over the rounds of
sentences/s and per-request p50 / p95 latency, RSS after warm-up (median) and at peak (the
highest sampled during any load), start-up (median), BLEU of each server's answers against the
references (sacreBLEU over the answered sentences, the target side of the same test lines), and
ratios against --reference (lt-tuned). Argos fixes its decoding (beam 4, length penalty 0.2),
so BLEU shows how far the two servers' answers agree in quality, not only speed.

The load generator, servers and statistics are research/bench/load.py's (run_load, measure,
warm_up, running, build_cache); LibreTranslate is started by research/libretranslate.py.
--quick: clients 1 and 4, 1 and 2 sentences a request, 8 sentences a cell, one round, written
under --work unless --out-json / --out-md are given (a test runs it on the tiny model).
"""

import argparse
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from fairseq_taskmoe.serve.factory import default_threads
from research import libretranslate as lt
from research.bench.load import (REPO, _mb, build_cache, environment, measure, parse_counts,
                                 parse_pairs, positions, read_sentences, running, warm_up,
                                 workload)
from research.common import logger

SERVERS = ("taskmoe", "lt", "lt-tuned")
LABELS = {"taskmoe": "taskmoe-serve", "lt": "LibreTranslate, defaults",
          "lt-tuned": "LibreTranslate, tuned"}
QUICK = {"clients": [1, 4], "per_request": [1, 2], "sentences": 8, "rounds": 1}


# ---------------------------------------------------------------- pure parts


def parse_env(text: str) -> Dict[str, str]:
    """'A=1,B=2' -> {"A": "1", "B": "2"}."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=VALUE")
        out[name] = value
    return out


def rotated(servers: Sequence[str], round_no: int) -> List[str]:
    """The order of one round: round r begins with server r (mod their number)."""
    k = round_no % len(servers)
    return list(servers[k:]) + list(servers[:k])


def references(pairs: Sequence[tuple], n: int, sentences: Dict[str, List[str]],
               per_request: int) -> List[List[str]]:
    """The reference sentences of each of the n requests load.workload(pairs, sentences, n,
    per_request) makes: the target side at the same positions (parallel test files)."""
    n_texts = len(next(iter(sentences.values())))
    return [[sentences[pairs[i % len(pairs)][1]][j]
             for j in positions(i, len(pairs), n_texts, per_request)] for i in range(n)]


def bleu(answers: Sequence, refs: Sequence[List[str]]) -> Optional[float]:
    """sacreBLEU of the answered requests' sentences (an answer: a text or a list of them)
    against their references; None when nothing was answered."""
    import sacrebleu

    hyps, gold = [], []
    for answer, ref in zip(answers, refs):
        if answer is None:
            continue
        texts = answer if isinstance(answer, list) else [answer]
        hyps += texts
        gold += ref[:len(texts)]
    return round(sacrebleu.corpus_bleu(hyps, [gold]).score, 2) if hyps else None


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def aggregate(runs: List[dict]) -> dict:
    """One cell's rounds -> medians of throughput, latency and BLEU; errors summed; the peak."""
    return {"rounds": len(runs),
            "sentences_per_s": _median([r["sentences_per_s"] for r in runs]),
            "p50_ms": _median([r["p50_ms"] for r in runs]),
            "p95_ms": _median([r["p95_ms"] for r in runs]),
            "bleu": _median([r["bleu"] for r in runs]),
            "errors": sum(r["errors"] for r in runs),
            "peak_rss_mb": max((r["peak_rss_mb"] or 0 for r in runs), default=None)}


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def with_ratios(cells: List[dict], reference: Optional[str]) -> List[dict]:
    """Each cell's servers against the reference server: throughput and p95 ratios."""
    for cell in cells:
        ref = cell["servers"].get(reference) if reference else None
        for name, s in cell["servers"].items():
            if ref is not None and name != reference:
                s["throughput_vs_ref"] = _ratio(s["sentences_per_s"], ref["sentences_per_s"])
                s["p95_vs_ref"] = _ratio(s["p95_ms"], ref["p95_ms"])
    return cells


def _fmt(x, suffix="") -> str:
    return "-" if x is None else f"{x:g}{suffix}"


def cells_table(cells: List[dict], servers: Sequence[str], reference: Optional[str]) -> str:
    others = [s for s in servers if s != reference] if reference in servers else []
    head = ["workload", "sentences / request", "clients"] + \
        [f"{LABELS[s]}: sent/s (p50 / p95 ms)" for s in servers] + \
        [f"{LABELS[s]} / {LABELS[reference]}: sent/s, p95" for s in others]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|" + "---:|" * (len(head) - 3)]
    for c in cells:
        row = [c["workload"], str(c["per_request"]), str(c["clients"])]
        for s in servers:
            x = c["servers"][s]
            row.append(f"{_fmt(x['sentences_per_s'])} ({_fmt(x['p50_ms'])} / "
                       f"{_fmt(x['p95_ms'])})" + (f", {x['errors']} errors" if x["errors"] else ""))
        for s in others:
            x = c["servers"][s]
            row.append(f"{_fmt(x.get('throughput_vs_ref'), 'x')}, "
                       f"{_fmt(x.get('p95_vs_ref'), 'x')}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def bleu_table(cells: List[dict], servers: Sequence[str]) -> str:
    """BLEU per workload and request size (median over client counts and rounds)."""
    lines = ["| workload | sentences / request | " +
             " | ".join(f"{LABELS[s]} BLEU" for s in servers) + " |",
             "|---|---:|" + "---:|" * len(servers)]
    groups: Dict[tuple, Dict[str, list]] = {}
    for c in cells:
        g = groups.setdefault((c["workload"], c["per_request"]), {s: [] for s in servers})
        for s in servers:
            g[s].append(c["servers"][s]["bleu"])
    for (name, per), g in groups.items():
        lines.append(f"| {name} | {per} | " +
                     " | ".join(_fmt(_median(g[s])) for s in servers) + " |")
    return "\n".join(lines)


def servers_table(facts: Dict[str, dict], servers: Sequence[str]) -> str:
    lines = ["| server | settings | start-up s (median) | RSS after warm-up MB | peak RSS MB |",
             "|---|---|---:|---:|---:|"]
    for s in servers:
        f = facts[s]
        lines.append(f"| {LABELS[s]} | `{f['settings']}` | {_fmt(f['startup_s'])} | "
                     f"{_fmt(f['rss_mb'])} | {_fmt(f['peak_rss_mb'])} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    env, servers = result["environment"], result["servers"]
    out = ["# taskmoe-serve and LibreTranslate on the same pairs", "",
           f"`{result['command']}`", "",
           f"{env['date']}; {env['machine']}; Python {env['python']}, CTranslate2 "
           f"{env['ctranslate2']}, LibreTranslate {lt.LT_VERSION}; {result['checkpoint']}, "
           f"pairs {', '.join(result['pairs'])} ({result['quantization']}); "
           f"{result['sentences']} sentences a cell, {result['rounds']} round(s) in rotated "
           "order, one server at a time; client and server on the same machine (127.0.0.1).",
           "", cells_table(result["cells"], servers, result["reference"]), "",
           servers_table(result["server_facts"], servers), "",
           bleu_table(result["cells"], servers), ""]
    return "\n".join(out)


# ---------------------------------------------------------------- servers


def our_flags(args, work: Path) -> list:
    return ["--spm-model", args.spm_model, "--cache-dir", work / "serve-cache", "--quantization",
            args.quantization, "--beam", args.beam, "--threads", args.threads, "--timeout",
            args.timeout, "--max-queue", max(256, 2 * max(args.clients)),
            "--log-level", "warning"]


def lt_settings(args) -> Dict[str, dict]:
    """The two LibreTranslate set-ups: environment and flags."""
    return {"lt": {"env": {}, "args": []},
            "lt-tuned": {"env": args.lt_tuned_env, "args": shlex.split(args.lt_tuned_args)}}


@contextmanager
def serving(name: str, args, work: Path, packages: Optional[Path], log):
    """One server started afresh: yields (server, start-up seconds); always stopped."""
    if name == "taskmoe":
        t0 = time.perf_counter()
        with running(args.checkpoint, args.data, our_flags(args, work),
                     work / "logs" / "taskmoe.log", args.start_timeout) as server:
            yield server, round(time.perf_counter() - t0, 2)
        return
    setting = lt_settings(args)[name]
    home = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    try:
        with lt.running_libretranslate(packages, home, args=setting["args"],
                                       env=setting["env"], timeout=args.start_timeout) as server:
            if server.connections():
                log(f"{name}: refused connections: {server.connections()}")
            yield server, server.startup_s
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------- the run


def run(args, log) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    uses_lt = any(s.startswith("lt") for s in args.servers)
    packages = None
    if uses_lt:
        packages = Path(args.packages) if args.packages else lt.export_packages(
            args.checkpoint, args.data, args.spm_model, work / "packages", args.quantization)
        packaged = lt.package_languages(lt.package_files(packages))
        missing = [p for p in args.pairs if p not in packaged]
        if missing:
            raise SystemExit(f"bench_libretranslate: no package for {missing} in {packages}")
    langs = sorted({c for p in args.pairs for c in p})
    sentences = read_sentences(Path(args.text_dir), langs)
    if len({len(v) for v in sentences.values()}) != 1:
        raise SystemExit("bench_libretranslate: the test files of "
                         f"{', '.join(langs)} differ in length: references need parallel lines")
    if "taskmoe" in args.servers:
        log("taskmoe-serve: building the sub-network cache (not timed) ...")
        build_cache(args.checkpoint, args.data, our_flags(args, work))
    workloads = {f"one pair ({'-'.join(args.one_pair[0])})": args.one_pair,
                 f"{len(args.pairs)} pairs mixed": args.pairs}
    plan = []  # (workload, pairs, per request, clients, items, references)
    for wname, pairs in workloads.items():
        for per in args.per_request:
            n = max(1, args.sentences // per)
            items = workload(pairs, sentences, n, per)
            refs = references(pairs, n, sentences, per)
            for clients in args.clients:
                plan.append((wname, pairs, per, clients, items, refs))
    runs: Dict[tuple, Dict[str, list]] = {}
    facts = {s: {"startup_s": [], "rss_mb": [], "peak_rss_mb": 0} for s in args.servers}
    for r in range(args.rounds):
        for name in rotated(args.servers, r):
            with serving(name, args, work, packages, log) as (server, startup_s):
                warm_up(server, args.pairs, sentences, args.timeout)
                rss = _mb(server.rss())
                facts[name]["startup_s"].append(startup_s)
                facts[name]["rss_mb"].append(rss)
                log(f"round {r + 1} {name}: started in {startup_s} s, RSS {rss} MB after "
                    "warm-up")
                for wname, pairs, per, clients, items, refs in plan:
                    answers = [None] * len(items)
                    res = measure(server, items, clients, args.timeout, answers)
                    res["bleu"] = bleu(answers, refs)
                    runs.setdefault((wname, per, clients), {}).setdefault(name, []).append(res)
                    facts[name]["peak_rss_mb"] = max(facts[name]["peak_rss_mb"],
                                                     res["peak_rss_mb"] or 0)
                    log(f"round {r + 1} {name} {wname}, {per} a request, {clients} clients: "
                        f"{res['sentences_per_s']} sent/s, p50 {res['p50_ms']} ms, p95 "
                        f"{res['p95_ms']} ms, BLEU {res['bleu']}, {res['errors']} errors")
    cells = [{"workload": w, "per_request": per, "clients": c,
              "servers": {s: aggregate(by[s]) for s in args.servers},
              "runs": by} for (w, per, c), by in runs.items()]
    settings = {"taskmoe": f"--quantization {args.quantization} --beam {args.beam} --threads "
                           f"{args.threads}",
                **{k: " ".join([f"{e}={v}" for e, v in s["env"].items()] + s["args"])
                   or "(defaults)" for k, s in lt_settings(args).items()}}
    server_facts = {s: {"settings": settings[s], "startup_s": _median(f["startup_s"]),
                        "startup_all_s": f["startup_s"], "rss_mb": _median(f["rss_mb"]),
                        "peak_rss_mb": f["peak_rss_mb"] or None}
                    for s, f in facts.items()}
    reference = args.reference if args.reference in args.servers else None
    return {"checkpoint": str(Path(args.checkpoint)).replace(f"{REPO}/", ""),
            "pairs": ["-".join(p) for p in args.pairs], "quantization": args.quantization,
            "sentences": args.sentences, "rounds": args.rounds, "servers": list(args.servers),
            "reference": reference, "server_facts": server_facts,
            "cells": with_ratios(cells, reference)}


def parse_args(argv=None):
    demo = REPO / "work" / "demo"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(demo / "checkpoints" / "checkpoint_last.pt"))
    p.add_argument("--data", default=str(demo / "multi30k" / "bin"))
    p.add_argument("--spm-model", default=str(demo / "multi30k" / "spm.model"))
    p.add_argument("--text-dir", default=str(demo / "multi30k" / "text"),
                   help="sentences and references from TEXT_DIR/test.LANG (parallel lines)")
    p.add_argument("--packages", help="the checkpoint's .argosmodel packages (default: exported "
                   "into WORK/packages)")
    p.add_argument("--pairs", default="en-de,de-en,en-fr,fr-en,en-cs,cs-en", type=parse_pairs,
                   help="the mixed workload's pairs (default: the demo's six trained directions)")
    p.add_argument("--one-pair", default="en-de", type=parse_pairs,
                   help="the one-pair workload (default: en-de)")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"which of {', '.join(SERVERS)} (default: all)")
    p.add_argument("--reference", default="lt-tuned",
                   help="the server the others are compared with (default: lt-tuned)")
    p.add_argument("--clients", default="1,16,64", type=lambda s: parse_counts(s, "--clients"))
    p.add_argument("--per-request", default="1,8",
                   type=lambda s: parse_counts(s, "--per-request"),
                   help="sentences per request (default: 1,8)")
    p.add_argument("--sentences", type=int, default=384, help="sentences per cell (default 384)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, in rotated order (default 3)")
    p.add_argument("--quantization", default="int8",
                   help="weight type of the packages and of taskmoe-serve (default: int8)")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="taskmoe-serve's --threads (default: its own default, %(default)s)")
    p.add_argument("--beam", type=int, default=4, help="taskmoe-serve's --beam (Argos: 4)")
    p.add_argument("--lt-tuned-env", type=parse_env,
                   default=f"ARGOS_INTRA_THREADS=1,ARGOS_INTER_THREADS={default_threads()}",
                   help="lt-tuned's environment, NAME=VALUE,... (default: %(default)s)")
    p.add_argument("--lt-tuned-args", default="--threads 8",
                   help="lt-tuned's libretranslate flags, as one value: "
                   "--lt-tuned-args='--threads 16' (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds a server may take to start")
    p.add_argument("--quick", action="store_true", help="clients 1,4; 1 and 2 sentences a "
                   "request; 8 sentences a cell; one round (a smoke test)")
    p.add_argument("--work", default=str(REPO / "work" / "bench_libretranslate"),
                   help="packages, sub-network cache, logs")
    p.add_argument("--out-json", help="default: results/libretranslate_benchmark.json "
                   "(--quick: WORK/quick.json)")
    p.add_argument("--out-md", help="default: results/libretranslate_benchmark.md "
                   "(--quick: WORK/quick.md)")
    args = p.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in args.servers if s not in SERVERS]
    if bad or not args.servers or len(set(args.servers)) != len(args.servers):
        p.error(f"--servers: give some of {', '.join(SERVERS)}, each once")
    if args.quick:
        args.clients, args.per_request = QUICK["clients"], QUICK["per_request"]
        args.sentences, args.rounds = QUICK["sentences"], QUICK["rounds"]
    for name in ("sentences", "rounds", "threads", "beam"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    out = Path(args.work) / "quick" if args.quick else REPO / "results" / \
        "libretranslate_benchmark"
    args.out_json = args.out_json or str(out.with_suffix(".json"))
    args.out_md = args.out_md or str(out.with_suffix(".md"))
    return args


def main(argv=None):
    args = parse_args(argv)
    from fairseq_taskmoe.atomic import write_text_atomically

    if any(s.startswith("lt") for s in args.servers) and lt.unavailable():
        raise SystemExit(f"bench_libretranslate: {lt.unavailable()}")
    if not Path(args.checkpoint).exists():
        raise SystemExit(f"bench_libretranslate: {args.checkpoint} is missing: run `make demo` "
                         "first, or give --checkpoint, --data, --spm-model and --text-dir")
    log = logger("bench_libretranslate", clock=True)

    result = {"command": "python -m research.bench.libretranslate " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "environment": environment(args)}
    result.update(run(args, log))
    text = markdown(result)
    for path, content in ((args.out_json, json.dumps(result, indent=1)), (args.out_md, text)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, content + "\n")
    print(text)
    log(f"wrote {args.out_json} and {args.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
