#!/usr/bin/env python3
"""Load benchmark of taskmoe-serve (issue 20, "Measure"): real servers on 127.0.0.1, a fixed
number of requests from N concurrent clients, everything side by side in one run.

    .venv/bin/python -m research.bench.serve          # both parts -> results/serve_benchmark.*
    .venv/bin/python -m research.bench.serve --parts batching --requests 128
    .venv/bin/python -m research.bench.serve --parts arch --experts 32,128 --arch-clients 16

Part "batching" (the demo model, work/demo by default), for two workloads: ONE pair
(--one-pair, en-de) and the pairs MIXED (--pairs, the demo's six trained directions, round robin);
one Multi30k test_2016_flickr sentence per request (the source side of each pair), at
--clients 1,16,64, against two servers of the same checkpoint that run at the same time on two
ports:
  on   the server's defaults (continuous cross-request batching, --threads engine threads for
       the whole server), or --on-args
  off  one request per engine call and no wait: --no-cross-batching --max-wait-ms 0, as
       LibreTranslate serves (its array `q` is looped over, requests are never batched together)
and against the ceiling, CTranslate2's own `translate_batch` on the same sentences, the same
model directories (the server's cache), beam, decoding bound and threads, in this process:
  engine 1-at-a-time  one sentence per call on one thread (intra_threads 1), in request order:
                      what a server answering one client at a time can reach
  engine best         every sentence of a pair in ONE translate_batch call split into batches of
                      B (--engine-batches, the best B reported), inter_threads --threads,
                      intra_threads 1: --threads batches in flight, sorted by length by the
                      engine itself: what a server under heavy load can reach
For each client count the two modes run back to back (their order alternating between counts),
on the same request list. Reported: throughput (sentences/s = answered requests / wall time),
latency p50/p95/p99 (per request, client side), from /metrics the requests per engine call, and
served / engine (1 client against 1-at-a-time, more clients against best).

Part "arch" (random weights, --embed-dim 512, --layers 6+6, every --moe-freq-th layer MoE with E
experts of width --ffn-dim/2, top-2, for E in --experts; the checkpoints are built as
research/bench/variants.py builds the inference benchmark's variants a and b, and cached under
--work):
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
The client is one asyncio process (aiohttp); it shares the machine's cores with the servers.
Servers, load and statistics are research/bench/load.py's (shared with research/bench/ray_serve.py).
Writes --out-json and --out-md (headed by the command, date, machine and versions), atomically,
and prints the tables.
"""

import argparse
import json
import logging
import shlex
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Dict, List, Sequence

from fairseq_taskmoe.serve.factory import default_threads
from research.bench.load import (DEMO_PAIRS, REPO, _mb, build_cache, environment, measure,
                                 parse_counts, parse_pairs, random_sentences, ratio,
                                 read_sentences, running, running_all, warm_up, workload)
from research.common import logger

MODES = {"on": [], "off": ["--no-cross-batching", "--max-wait-ms", "0"]}


# ---------------------------------------------------------------- tables


def _fmt(x, suffix="") -> str:
    return "-" if x is None else f"{x:g}{suffix}" if isinstance(x, (int, float)) else str(x)


def batching_table(rows: List[dict]) -> str:
    """Markdown: one line per (workload, client count): batching on and off side by side, and
    served / the engine's own rate (1 client: one at a time; more: its best)."""
    lines = ["| workload | clients | on: sent/s | off: sent/s | engine sent/s (which) | "
             "on / engine | off / engine | on: p50 / p95 / p99 ms | off: p50 / p95 / p99 ms | "
             "on: requests per engine call | errors on / off |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|"]
    for r in rows:
        on, off = r["on"], r["off"]
        lines.append(
            f"| {r['workload']} | {r['clients']} | {_fmt(on['sentences_per_s'])} | "
            f"{_fmt(off['sentences_per_s'])} | {_fmt(r['engine_sentences_per_s'])} "
            f"({r['engine_row']}) | {_fmt(r['on_over_engine'], 'x')} | "
            f"{_fmt(r['off_over_engine'], 'x')} | {_fmt(on['p50_ms'])} / {_fmt(on['p95_ms'])} / "
            f"{_fmt(on['p99_ms'])} | {_fmt(off['p50_ms'])} / {_fmt(off['p95_ms'])} / "
            f"{_fmt(off['p99_ms'])} | {_fmt(on.get('requests_per_call'))} | "
            f"{on['errors']} / {off['errors']} |")
    return "\n".join(lines)


def engine_table(engines: Dict[str, dict]) -> str:
    lines = ["| workload | sentences | 1-at-a-time sent/s (1 thread) | best sent/s | best batch "
             "size | best / 1-at-a-time | sent/s by batch size |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, e in engines.items():
        by = ", ".join(f"{b}: {v:g}" for b, v in e["by_batch"].items())
        lines.append(f"| {name} | {e['sentences']} | {_fmt(e['single'])} | {_fmt(e['best'])} | "
                     f"{e['best_batch']} | {_fmt(ratio(e['best'], e['single']), 'x')} | {by} |")
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
    p.add_argument("--clients", default="1,16,64", type=lambda s: parse_counts(s, "--clients"),
                   help="concurrent clients of part batching (default: 1,16,64)")
    p.add_argument("--requests", type=int, default=384,
                   help="requests per (workload, mode, client count) in part batching "
                   "(default: 384)")
    p.add_argument("--work", default=str(REPO / "work" / "bench_serve"),
                   help="sub-network caches, random-weight checkpoints, server logs")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="the servers' --threads and the engine reference's (default: the "
                   "server's own default, the cores this process may use: %(default)s)")
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
    p.add_argument("--one-pair", default="en-de", type=parse_pairs,
                   help="the pair of the one-pair workload (default: en-de)")
    p.add_argument("--engine-batches", default="8,16,32,64",
                   type=lambda s: parse_counts(s, "--engine-batches"),
                   help="batch sizes the engine reference tries for its best rate "
                   "(default: 8,16,32,64)")
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


# ---------------------------------------------------------------- parts


def engine_reference(facts: dict, items: Sequence[tuple], beam: int, threads: int,
                     batch_sizes: Sequence[int]) -> dict:
    """CTranslate2's own translate_batch on `items` ((src, tgt, text)), with the server's
    artifacts (facts from build_cache), tokens (the export's SentencePiece model, the pair's
    language tokens), beam and decoding bound (engines.output_bound): sentences/s one at a
    time on one thread, and the best over `batch_sizes` with `threads` batches in flight."""
    from fairseq_taskmoe.ct2 import CT2Translator
    from fairseq_taskmoe.serve.engines import output_bound

    paths = facts["paths"]
    missing = sorted({f"{s}-{t}" for s, t, _ in items} - {f"{s}-{t}" for s, t in paths})
    if missing:
        raise SystemExit(f"bench_serve: the server's cache has no artifact for {missing}")

    def load(inter: int) -> dict:
        return {path: CT2Translator(path, intra_threads=1, inter_threads=inter)
                for path in set(paths.values())}

    def call(mt, pair, sources, batch_size=0):
        prefix, target = mt.tokens(*pair)
        sources = [prefix + s for s in sources]
        bound = output_bound(max(len(s) for s in sources) + 1, facts["max_target_positions"])
        return mt.translator.translate_batch(
            sources, target_prefix=[target] * len(sources) if target else None,
            beam_size=beam, max_input_length=0, max_decoding_length=bound + len(target),
            max_batch_size=batch_size)

    def inputs(models):
        return [(models[paths[(s, t)]], (s, t), models[paths[(s, t)]].encode(text))
                for s, t, text in items]

    models = load(1)
    single = inputs(models)
    for mt, pair, pieces in single[:4]:
        call(mt, pair, [pieces])  # warm-up
    t0 = time.perf_counter()
    for mt, pair, pieces in single:
        call(mt, pair, [pieces])
    one = len(single) / (time.perf_counter() - t0)
    del models, single
    models = load(threads)
    groups: Dict[tuple, list] = {}
    for mt, pair, pieces in inputs(models):
        groups.setdefault(pair, (mt, []))[1].append(pieces)
    for pair, (mt, sources) in groups.items():
        call(mt, pair, sources[:8], 8)  # warm-up
    by_batch = {}
    for size in batch_sizes:
        t0 = time.perf_counter()
        for pair, (mt, sources) in groups.items():
            call(mt, pair, sources, size)
        by_batch[size] = round(len(items) / (time.perf_counter() - t0), 2)
    best = max(by_batch, key=by_batch.get)
    return {"sentences": len(items), "single": round(one, 2), "best": by_batch[best],
            "best_batch": best, "by_batch": by_batch, "threads": threads}


def part_batching(args, log) -> dict:
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        raise SystemExit(f"bench_serve: {checkpoint} is missing: run `make demo` first, or give "
                         "--checkpoint, --data, --spm-model and --text-dir")
    if args.backend != "ctranslate2":
        raise SystemExit("bench_serve: part batching compares against CTranslate2's own "
                         "translate_batch: give --backend ctranslate2")
    work = Path(args.work)
    workloads = {f"one pair ({'-'.join(args.one_pair[0])})": args.one_pair,
                 f"{len(args.pairs)} pairs mixed": args.pairs}
    sentences = read_sentences(args.text_dir, sorted(
        {s for pairs in workloads.values() for s, _ in pairs}))
    common = ["--cache-dir", work / "cache", "--backend", args.backend, "--quantization",
              args.quantization, "--threads", args.threads, "--beam", args.beam, "--timeout",
              args.timeout, "--max-queue", max(256, 2 * max(args.clients)), "--log-level",
              "warning"]
    if args.spm_model:
        common += ["--spm-model", args.spm_model]
    extra = {"on": common + shlex.split(args.on_args), "off": common + MODES["off"]}
    log(f"batching: building the sub-network cache of {checkpoint} ...")
    facts = build_cache(checkpoint, args.data, common)
    items = {name: workload(pairs, sentences, args.requests) for name, pairs in workloads.items()}
    engines = {}
    for name, work_items in items.items():
        engines[name] = engine_reference(facts, work_items, args.beam, args.threads,
                                         args.engine_batches)
        e = engines[name]
        log(f"engine {name}: {e['single']} sent/s one at a time, {e['best']} best (batch "
            f"{e['best_batch']}, {args.threads} in flight)")
    rows = []
    specs = [(checkpoint, args.data, extra[m], work / "logs" / f"{m}.log") for m in ("on", "off")]
    with running_all(specs, args.start_timeout) as (on, off):
        servers = {"on": on, "off": off}
        for server in servers.values():
            warm_up(server, args.pairs, sentences, args.timeout)
        n = 0
        for name, work_items in items.items():
            for clients in args.clients:
                row = {"workload": name, "clients": clients}
                for mode in (("on", "off") if n % 2 == 0 else ("off", "on")):
                    row[mode] = measure(servers[mode], work_items, clients, args.timeout)
                    r = row[mode]
                    log(f"{name} {mode:3s} clients {clients:3d}: {r['sentences_per_s']:.2f} "
                        f"sent/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                        f"{r['requests_per_call']} requests per engine call, "
                        f"{r['errors']} errors")
                n += 1
                which = "single" if clients == 1 else "best"
                row["engine_row"] = "1-at-a-time" if clients == 1 else "best"
                row["engine_sentences_per_s"] = engines[name][which]
                for mode in ("on", "off"):
                    row[f"{mode}_over_engine"] = ratio(row[mode]["sentences_per_s"],
                                                       engines[name][which])
                rows.append(row)
    return {"checkpoint": str(checkpoint), "pairs": ["-".join(p) for p in args.pairs],
            "one_pair": "-".join(args.one_pair[0]), "requests": args.requests,
            "server_flags": {m: [str(x) for x in e] for m, e in extra.items()},
            "engines": engines, "rows": rows}


def build_random_checkpoint(data: Path, shape: Namespace, experts: int, variant: str,
                            path: Path):
    """A random-weight model of the inference benchmark's variant (its own train_args:
    the same flags, seed and shape), saved as fairseq's Trainer saves a checkpoint (an
    OmegaConf cfg and an optimizer history), so that the server loads it like a trained one
    (the inference benchmark's own files are read only by its own loader)."""
    from research.bench import variants as bi
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
    # decodes ordinary words up to the server's length bound (as the inference benchmark forces
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
    from research.bench import variants as bi

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
    from research.bench import variants as bi

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


def markdown(result: dict) -> str:
    env = result["environment"]
    out = ["# taskmoe-serve load benchmark", "",
           f"`{result['command']}`", "",
           f"{env['date']}; {env['machine']}; Python {env['python']}, torch {env['torch']}, "
           f"CTranslate2 {env['ctranslate2']}; server --threads {env['server_threads']}, "
           f"--beam {env['beam']}; client and servers on the same machine (127.0.0.1).", ""]
    if "batching" in result:
        b = result["batching"]
        out += ["## Served against the engine's own rate", "",
                f"{b['checkpoint']}; one pair ({b['one_pair']}), and the pairs "
                f"{', '.join(b['pairs'])} mixed round robin; one sentence per request, "
                f"{b['requests']} requests per cell. On: the server's defaults; off: `--no-cross-batching --max-wait-ms 0` (one request per engine call). "
                "Engine: CTranslate2's own translate_batch on the same sentences, artifacts, "
                "beam and threads, in the benchmark's process (1 client is compared with one "
                "sentence at a time on one thread, more clients with the engine's best).", "",
                batching_table(b["rows"]), "", "The engine's own rates:", "",
                engine_table(b["engines"]), ""]
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
    from fairseq_taskmoe.atomic import write_text_atomically

    log = logger("bench_serve", clock=True)

    result = {"command": "python -m research.bench.serve " + " ".join(
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
