#!/usr/bin/env python3
"""taskmoe-serve on many languages (issue 27, "Serving it"): sizes, start-up and load.

One task-MoE of many languages, every en<->X direction direct and --pivots X->Y pairs through
English, under a memory budget and without one, against the token-MoE of the same corpus served
whole:

    .venv/bin/python -m research.bench.serve_many   # the LoHelp study's models (make study-lohelp)
    .venv/bin/python -m research.bench.serve_many --token-checkpoint '' --requests 96

Inputs: --checkpoint, the target / target task-MoE (default: the LoHelp study's
target_target-s1), and --token-checkpoint, the token / token model of the same corpus ('' to
leave it out); the languages and the trained directions are the checkpoint's own (what the
server reads). Sentences: the source side of --text-dir's test sets (test.en-X.en and
test.en-X.X, as scripts/prepare_lohelp.py writes them: English for en->X from en-X's, X for
X->en and X->Y from en-X's), only lines that the server's sentence splitter keeps whole (one
sentence per request), at most --sentences per direction. Pivots: --pivots untrained X->Y pairs
whose two legs through English are trained, a seeded choice spread over the scripts' four
combinations (Latin -> Latin, Latin -> other, other -> Latin, other -> other; a language's
script is the Unicode script of most letters of its sentences) where the languages allow it.

What is measured, in one run (servers one after the other, each alone on the machine with the
client; they bind 127.0.0.1 only and are always stopped):
  sizes     each sub-network's parameters and bytes (what the server charges against
            --memory-budget: CTranslate2's model.bin, or fairseq's tensors) next to the full
            model's (its tensors as trained) and the token model's
  start-up  the cache build (the server's own start-up, every sub-network pruned and exported,
            run in this process into a fresh --work/cache unless --reuse-cache), then per server
            the time from launch to the first 200 on GET /health, from the built cache
  load      --requests one-sentence requests from --clients concurrent clients over all the
            directions and the pivots, pair popularity Zipf-distributed (s = --zipf over a
            seeded random ranking of the pairs) and uniform, against three servers:
              no budget  the task-MoE, every sub-network loaded
              budget     the task-MoE under --memory-budget of --budget-fraction of the sum of
                         all sub-networks' bytes (raised to the largest one where it is smaller)
              token      the token-MoE served whole (fairseq backend)
            throughput, latency p50 / p95, sub-network loads and evictions during the load
            (/metrics), resident memory (psutil RSS) at start before any translation, after
            warm-up (one request per pair) and the peak during the loads
  ratios    budget / no budget throughput, task / token throughput and RSS, and the budget
            server's peak RSS against the budget plus the process's base (its RSS at start)
Writes --out-json and --out-md (headed by the command, date, machine and versions),
atomically, and prints the tables. Servers, load and statistics: research/bench/load.py.
"""

import argparse
import json
import logging
import random
import shlex
import shutil
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from fairseq_taskmoe.serve.factory import default_threads
from fairseq_taskmoe.distributed.checkpoints import find_checkpoint
from research.bench.load import (REPO, _mb, build_cache, environment, measure, ratio, running,
                                 subnetwork_counts, warm_up)
from research.common import logger

HUB = "en"  # the pivot: LoHelp trains en->X and X->en only
RUNS = REPO / "work" / "study-lohelp" / "runs"  # research.study --corpus lohelp's runs
LOHELP = REPO / "work" / "lohelp"  # scripts/prepare_lohelp.py's output
LOADS = ("zipf", "uniform")
SERVERS = {"none": "task-MoE, no budget", "budget": "task-MoE, budget",
           "token": "token-MoE, whole"}

Pair = Tuple[str, str]


# ---------------------------------------------------------------- pure parts


def zipf_weights(n: int, s: float) -> List[float]:
    """Probabilities of ranks 1..n under Zipf's law with exponent s (1/r^s, normalized);
    s = 0 is uniform."""
    if n < 1 or s < 0:
        raise ValueError(f"zipf_weights: n >= 1 and s >= 0, got n={n}, s={s}")
    raw = [1.0 / r ** s for r in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def popularity(pairs: Sequence[Pair], s: float, seed: int) -> Dict[Pair, float]:
    """{pair: share of requests}, most popular first: the pairs ranked by a seeded shuffle,
    shares by zipf_weights (s = 0: uniform)."""
    ranking = list(pairs)
    random.Random(seed).shuffle(ranking)
    return dict(zip(ranking, zipf_weights(len(ranking), s)))


def sampled_workload(shares: Dict[Pair, float], texts: Dict[Pair, List[str]], n: int,
                     seed: int) -> List[tuple]:
    """n requests (src, tgt, text), each pair drawn independently with its share (seeded);
    a pair's k-th request carries its k-th sentence (cycling)."""
    rng = random.Random(seed)
    pairs = list(shares)
    drawn = rng.choices(pairs, weights=[shares[p] for p in pairs], k=n)
    seen: Counter = Counter()
    items = []
    for pair in drawn:
        items.append((*pair, texts[pair][seen[pair] % len(texts[pair])]))
        seen[pair] += 1
    return items


def script_of(texts: Sequence[str]) -> str:
    """The Unicode script of most letters in `texts` (the first word of their names: LATIN,
    GREEK, CYRILLIC, CJK, HIRAGANA...); LATIN when there are none."""
    counts = Counter(unicodedata.name(ch, "UNKNOWN").split()[0]
                     for text in texts for ch in text if ch.isalpha())
    return counts.most_common(1)[0][0] if counts else "LATIN"


def choose_pivots(langs: Sequence[str], trained: Sequence[Pair], n: int, seed: int,
                  scripts: Dict[str, str]) -> List[Pair]:
    """n untrained X->Y pairs (X, Y != HUB) whose legs X->HUB and HUB->Y are trained: a seeded
    choice taking turns between the script combinations (Latin or not, on each side) that the
    languages have, so that both scripts are covered where possible. ValueError if fewer
    than n exist."""
    trained = set(map(tuple, trained))
    candidates = [(s, t) for s in langs for t in langs
                  if s != t and HUB not in (s, t) and (s, t) not in trained
                  and (s, HUB) in trained and (HUB, t) in trained]
    if n > len(candidates):
        raise ValueError(f"--pivots {n}: the model has only {len(candidates)} untrained "
                         f"X->Y pairs with both legs through {HUB} trained")
    rng = random.Random(seed)
    groups: Dict[tuple, List[Pair]] = {}
    for s, t in candidates:
        latin = (scripts.get(s) == "LATIN", scripts.get(t) == "LATIN")
        groups.setdefault(latin, []).append((s, t))
    order = sorted(groups)
    for key in order:
        rng.shuffle(groups[key])
    chosen: List[Pair] = []
    while len(chosen) < n:
        for key in order:
            if groups[key] and len(chosen) < n:
                chosen.append(groups[key].pop())
    return chosen


def text_file(text_dir: Path, src: str, tgt: str) -> Path:
    """The test file whose lines are `src` sentences for (src, tgt): LoHelp's test sets are per
    English pair (test.en-X.en, test.en-X.X), so English comes from en-tgt's, X from en-X's."""
    other = tgt if src == HUB else src
    return Path(text_dir) / f"test.{HUB}-{other}.{src}"


def one_sentence_lines(lines: Sequence[str], lang: str, limit: int) -> List[str]:
    """The first `limit` lines that the server's splitter keeps whole: one sentence each."""
    from fairseq_taskmoe.serve.sentences import split

    out = []
    for line in lines:
        line = line.strip()
        if line and len(split(line, lang).sentences) == 1:
            out.append(line)
            if len(out) == limit:
                break
    return out


def read_texts(text_dir: Path, pairs: Sequence[Pair], limit: int) -> Dict[Pair, List[str]]:
    out = {}
    for src, tgt in pairs:
        path = text_file(text_dir, src, tgt)
        if not path.is_file():
            raise SystemExit(f"serve_many: no {src} sentences for {src}-{tgt}: {path} is missing "
                             "(give --text-dir)")
        out[src, tgt] = one_sentence_lines(path.read_text().splitlines(), src, limit)
        if not out[src, tgt]:
            raise SystemExit(f"serve_many: {path} has no line of one sentence")
    return out


# ---------------------------------------------------------------- ratios and goals


def peak(server: dict) -> Optional[float]:
    peaks = [r["peak_rss_mb"] for r in server["loads"].values() if r.get("peak_rss_mb")]
    return max(peaks) if peaks else None


def above_base(server: Optional[dict]) -> Optional[float]:
    """Peak RSS over the loads minus the server's RSS at start, in MB."""
    top = server and peak(server)
    return round(top - server["base_rss_mb"], 1) if top else None


def side_by_side(servers: Dict[str, dict], budget_bytes: int) -> dict:
    """Throughput ratios per load (budget / no budget, task / token), RSS ratios (task / token
    after warm-up and at peak), and the budget server's peak RSS against budget + its base."""
    none, budget, token = servers.get("none"), servers.get("budget"), servers.get("token")

    def rate(server, load):
        return server["loads"][load]["sentences_per_s"] if server else None

    out = {"throughput": {load: {
        "budget_over_none": ratio(rate(budget, load), rate(none, load)),
        "none_over_token": ratio(rate(none, load), rate(token, load)),
        "budget_over_token": ratio(rate(budget, load), rate(token, load))} for load in LOADS}}
    out["rss"] = {
        "none_over_token_after_warm_up": ratio(none and none["rss_after_warm_up_mb"],
                                               token and token["rss_after_warm_up_mb"]),
        "budget_over_token_after_warm_up": ratio(budget and budget["rss_after_warm_up_mb"],
                                                 token and token["rss_after_warm_up_mb"]),
        "none_over_token_peak": ratio(none and peak(none), token and peak(token)),
        "budget_over_token_peak": ratio(budget and peak(budget), token and peak(token)),
        # the models' share: peak RSS above each process's own RSS at start (Python, torch,
        # fairseq and CTranslate2 loaded: the same few hundred MB in every server)
        "none_over_token_peak_above_base": ratio(above_base(none), above_base(token)),
        "budget_over_token_peak_above_base": ratio(above_base(budget), above_base(token))}
    if budget:
        limit = budget_bytes / 2 ** 20 + budget["base_rss_mb"]
        out["budget_rss"] = {"budget_bytes": budget_bytes, "base_mb": budget["base_rss_mb"],
                             "limit_mb": round(limit, 1), "peak_mb": peak(budget),
                             "over_limit_mb": round(peak(budget) - limit, 1),
                             "peak_over_limit": ratio(peak(budget), limit)}
    return out


def goals(ratios: dict) -> List[dict]:
    """Issue 27's serving goals, each with what was measured (None: not measured)."""
    zipf = ratios["throughput"]["zipf"]
    rss = ratios.get("budget_rss")
    rows = [("Zipf load, a quarter of the sub-networks' bytes as budget: throughput against "
             "no budget", zipf["budget_over_none"], ">= 0.8x",
             lambda v: v >= 0.8, "{:g}x")]
    rows.append(("peak RSS under the budget plus the process's base (RSS at start)",
                 rss and rss["peak_over_limit"], "<= 1.0 of budget + base",
                 lambda v: v <= 1.0, "{:g} of " + (f"{rss['limit_mb']:g} MB" if rss else "")))
    rows.append(("task-MoE pruned (no budget) / token-MoE whole, Zipf load: throughput",
                 zipf["none_over_token"], ">= 3x", lambda v: v >= 3.0, "{:g}x"))
    rows.append(("task-MoE pruned (no budget) / token-MoE whole: peak RSS",
                 ratios["rss"]["none_over_token_peak"], "<= 0.33", lambda v: v <= 1 / 3,
                 "{:g}"))
    return [{"goal": goal, "value": value, "target": target,
             "measured": None if value is None else fmt.format(value),
             "met": None if value is None else bool(test(value))}
            for goal, value, target, test, fmt in rows]


# ---------------------------------------------------------------- tables


def _fmt(x, suffix="") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return f"{x:,}{suffix}" if isinstance(x, int) else f"{x:,g}{suffix}"


def _size(n: Optional[int]) -> str:
    from fairseq_taskmoe.serve.registry import human

    return "-" if not n else human(n)


def sizes_table(model: dict) -> str:
    """Markdown: one line per sub-network, then their sum, the full model and the token
    model (when measured)."""
    full = model["full_params"]
    lines = ["| sub-network | serves (legs) | parameters | of the full model | bytes | "
             "on disk |", "|---|---|---:|---:|---:|---:|"]
    for key, sub in model["subnetworks"].items():
        share = f"{100 * sub['params'] / full:.1f}%" if full and sub["params"] else "-"
        lines.append(f"| {key} | {', '.join(sub['pairs'])} | {_fmt(sub['params'])} | {share} | "
                     f"{_size(sub['bytes'])} | {_size(sub['disk_bytes'])} |")
    subs = model["subnetworks"].values()
    lines.append(f"| **all {len(model['subnetworks'])}** | | "
                 f"{_fmt(sum(s['params'] for s in subs))} | | "
                 f"{_size(sum(s['bytes'] for s in subs))} | "
                 f"{_size(sum(s['disk_bytes'] for s in subs))} |")
    lines.append(f"| full task-MoE | every pair | {_fmt(full)} | 100% | "
                 f"{_size(model['full_bytes'])} | |")
    if model.get("token"):
        t = model["token"]
        lines.append(f"| token-MoE, served whole | every pair | {_fmt(t['params'])} | | "
                     f"{_size(t['bytes'])} | |")
    return "\n".join(lines)


def startup_table(servers: Dict[str, dict], build_s: Dict[str, float]) -> str:
    lines = ["| server | cache build s | start-up s (launch to 200 on /health) | "
             "RSS at start MB | RSS after warm-up MB |", "|---|---:|---:|---:|---:|"]
    for name, s in servers.items():
        build = build_s.get("token" if name == "token" else "task")
        lines.append(f"| {SERVERS[name]} | {_fmt(build)} | {_fmt(s['startup_s'])} | "
                     f"{_fmt(s['base_rss_mb'])} | {_fmt(s['rss_after_warm_up_mb'])} |")
    return "\n".join(lines)


def load_table(servers: Dict[str, dict]) -> str:
    lines = ["| server | load | sent/s | p50 ms | p95 ms | loads | evictions | peak RSS MB | "
             "errors |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in servers.items():
        for load, r in s["loads"].items():
            lines.append(f"| {SERVERS[name]} | {load} | {_fmt(r['sentences_per_s'])} | "
                         f"{_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} | {_fmt(r['loads'])} | "
                         f"{_fmt(r['evictions'])} | {_fmt(r['peak_rss_mb'])} | "
                         f"{r['errors']} |")
    return "\n".join(lines)


def ratios_table(ratios: dict) -> str:
    t, rss = ratios["throughput"], ratios["rss"]
    lines = ["| ratio | Zipf | uniform |", "|---|---:|---:|"]
    for key, label in (("budget_over_none", "throughput: budget / no budget"),
                       ("none_over_token", "throughput: task (no budget) / token"),
                       ("budget_over_token", "throughput: task (budget) / token")):
        lines.append(f"| {label} | {_fmt(t['zipf'][key], 'x')} | "
                     f"{_fmt(t['uniform'][key], 'x')} |")
    for key, label in (("none_over_token", "RSS: task (no budget) / token"),
                       ("budget_over_token", "RSS: task (budget) / token")):
        lines.append(f"| {label}, after warm-up (peak) | "
                     f"{_fmt(rss[key + '_after_warm_up'])} ({_fmt(rss[key + '_peak'])}) | |")
    for key, label in (("none_over_token", "task (no budget) / token"),
                       ("budget_over_token", "task (budget) / token")):
        lines.append(f"| peak RSS above the process's RSS at start: {label} | "
                     f"{_fmt(rss.get(key + '_peak_above_base'))} | |")
    return "\n".join(lines)


def goals_table(rows: List[dict]) -> str:
    lines = ["| goal | measured | target | met |", "|---|---:|---|---|"]
    for g in rows:
        met = "not measured" if g["met"] is None else "**yes**" if g["met"] else "**no**"
        lines.append(f"| {g['goal']} | {_fmt(g['measured'])} | {g['target']} | {met} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    env, inp, model = result["environment"], result["inputs"], result["model"]
    budget = result["budget"]
    pivots = ", ".join(inp["pivots"]) or "none"
    out = ["# taskmoe-serve on many languages", "", f"`{result['command']}`", "",
           f"{env['date']}; {env['machine']}; Python {env['python']}, torch {env['torch']}, "
           f"CTranslate2 {env['ctranslate2']}; server --threads {env['server_threads']}, "
           f"--beam {env['beam']}; client and servers on the same machine (127.0.0.1), one "
           "server at a time.", "",
           "## Sub-networks", "",
           f"{inp['checkpoint']}: {len(inp['langs'])} languages ({', '.join(inp['langs'])}); "
           f"{len(inp['direct'])} trained directions served direct, {len(inp['pivots'])} "
           f"X->Y pairs through {HUB} ({pivots}); scripts: "
           + ", ".join(f"{lang} {s.lower()}" for lang, s in inp["scripts"].items()) + ". "
           f"Served by {model['backend']} ({model['quantization'] or 'float32'}); a "
           "sub-network's bytes are what the server charges against --memory-budget (what it "
           "holds loaded), the full model's are its tensors as trained.", "",
           sizes_table(model), "",
           "## Start-up", "",
           "Cache build: the server's own start-up (every sub-network pruned and exported) in "
           "the benchmark's process; start-up: from launch to the first 200 on GET /health, "
           "from the built cache (polled every 0.2 s); RSS at start: before any translation "
           "(the process's base).", "",
           startup_table(result["servers"], result["cache_build_s"]), "",
           "## Load", "",
           f"{inp['requests']} one-sentence requests from {inp['clients']} clients over "
           f"{len(inp['direct']) + len(inp['pivots'])} pairs, pair popularity Zipf (s = "
           f"{inp['zipf']} over a seeded ranking; the top pair {inp['zipf_top_share']:.1%} "
           f"of the requests) and uniform; seed {inp['seed']}. Budget: "
           f"{_size(budget['bytes'])} = {budget['fraction']:g} of all sub-networks' "
           f"{_size(budget['subnetworks_bytes'])}"
           + (" (raised to the largest sub-network)" if budget["raised_to_largest"] else "")
           + ". Loads and evictions: /metrics during the load; peak RSS sampled every 0.1 s.",
           "", load_table(result["servers"]), "",
           "## Side by side", "", ratios_table(result["ratios"]), ""]
    rss = result["ratios"].get("budget_rss")
    if rss:
        out += [f"Budget server: peak RSS {_fmt(rss['peak_mb'])} MB against the budget "
                f"({_size(rss['budget_bytes'])}) + its base ({_fmt(rss['base_mb'])} MB) = "
                f"{_fmt(rss['limit_mb'])} MB: {_fmt(rss['peak_over_limit'])} of it, "
                f"{_fmt(rss['over_limit_mb'])} MB over (negative: under).", ""]
    out += ["## Goals (issue 27)", "", goals_table(result["goals"]), ""]
    return "\n".join(out)


# ---------------------------------------------------------------- arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.bench.serve_many",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(RUNS / "target_target-s1" / "checkpoints" /
                                                "checkpoint_last.pt"),
                   help="the target / target task-MoE (default: %(default)s)")
    p.add_argument("--token-checkpoint", default=str(RUNS / "token_token-s1" / "checkpoints" /
                                                      "checkpoint_last.pt"),
                   help="the token / token model of the same corpus, served whole; '' leaves "
                   "it out (default: %(default)s)")
    p.add_argument("--data", default=str(LOHELP / "bin"), help="fairseq data folder with the "
                   "dictionaries (default: %(default)s)")
    p.add_argument("--spm-model", default=str(LOHELP / "spm.model"),
                   help="'' for a model without SentencePiece (default: %(default)s)")
    p.add_argument("--text-dir", default=str(LOHELP / "text"),
                   help="test.en-X.en and test.en-X.X (default: %(default)s)")
    p.add_argument("--pivots", type=int, default=12,
                   help="untrained X->Y pairs served through en in the load (default: 12)")
    p.add_argument("--sentences", type=int, default=200,
                   help="sentences per pair at most (default: 200)")
    p.add_argument("--requests", type=int, default=480, help="requests per load (default: 480)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    p.add_argument("--zipf", type=float, default=1.1,
                   help="Zipf exponent of pair popularity (default: 1.1)")
    p.add_argument("--seed", type=int, default=1,
                   help="seeds the pivots, the popularity ranking and the requests (default: 1)")
    p.add_argument("--budget-fraction", type=float, default=0.25,
                   help="--memory-budget of the budget server, as a share of all sub-networks' "
                   "bytes (default: 0.25)")
    p.add_argument("--backend", default="ctranslate2", choices=("ctranslate2", "fairseq"),
                   help="the task-MoE servers' backend (the token model is always fairseq)")
    p.add_argument("--quantization", default="int8")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="the servers' --threads (default: the cores this process may use: "
                   "%(default)s)")
    p.add_argument("--beam", type=int, default=4, help="the servers' --beam (default: 4)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="client timeout per request and the servers' --timeout, seconds")
    p.add_argument("--start-timeout", type=float, default=900.0,
                   help="seconds a server may take to answer /health")
    p.add_argument("--work", default=str(REPO / "work" / "bench_serve_many"),
                   help="the benchmark's folder: its cache/ (rebuilt each run, so that the "
                   "build is timed) and the servers' logs/")
    p.add_argument("--reuse-cache", action="store_true",
                   help="start from --work/cache as it is (the build time is then that of a "
                   "cache hit)")
    p.add_argument("--out-json", default=str(REPO / "results" / "serve_many.json"))
    p.add_argument("--out-md", default=str(REPO / "results" / "serve_many.md"))
    args = p.parse_args(argv)
    for name in ("sentences", "requests", "clients", "threads", "beam"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.pivots < 0:
        p.error("--pivots must be >= 0")
    if args.zipf < 0:
        p.error("--zipf must be >= 0 (0 is uniform)")
    if not 0 < args.budget_fraction <= 1:
        p.error("--budget-fraction must be in (0, 1]")
    if args.timeout <= 0 or args.start_timeout <= 0:
        p.error("--timeout and --start-timeout must be > 0")
    return args


# ---------------------------------------------------------------- the run


def model_pairs(checkpoint) -> tuple:
    """(languages, trained pairs) as the server reads them (routes.ModelFacts), the tensors
    left on disk."""
    from fairseq_taskmoe.deploy.pruning import model_args, trained_pairs
    from fairseq_taskmoe.integration.compat import load_checkpoint
    from fairseq_taskmoe.serve.routes import ModelFacts

    found = find_checkpoint(str(checkpoint))
    if found is None:
        raise SystemExit(f"serve_many: {checkpoint} is missing: train the LoHelp models first "
                         "(make study-lohelp), or give --checkpoint")
    header = load_checkpoint(found.path, mmap=True)
    facts = ModelFacts.from_checkpoint(model_args(header), trained_pairs(header))
    return list(facts.langs), [tuple(p) for p in facts.trained or ()]


def check_routes(facts: dict, pairs: Sequence[Pair], pivots: Sequence[Pair], what: str):
    """Every pair of the load is served, the pivots through HUB (the server's own routes)."""
    for src, tgt in pairs:
        route = facts["routes"].get(f"{src}-{tgt}")
        if route is None:
            raise SystemExit(f"serve_many: the {what} does not serve {src}-{tgt}")
        if (src, tgt) in pivots and route != {"kind": "pivot", "via": HUB}:
            raise SystemExit(f"serve_many: the {what} serves {src}-{tgt} as {route}, not "
                             f"through {HUB}")


def serve_and_load(name: str, checkpoint, data, extra: list, pairs: Sequence[Pair],
                   texts: Dict[Pair, List[str]], workloads: Dict[str, list], args, log) -> dict:
    """One server from the built cache: start-up time, RSS at start, warm-up (one request per
    pair), then each workload with the sub-network loads and evictions it caused."""
    first_text = {}
    for (src, _), lines in texts.items():
        first_text.setdefault(src, lines)
    logs = Path(args.work) / "logs"
    t0 = time.perf_counter()
    with running(checkpoint, data, extra, logs / f"{name}.log", args.start_timeout) as server:
        startup = time.perf_counter() - t0
        base = server.rss()
        log(f"{SERVERS[name]}: up in {startup:.1f} s, RSS {_mb(base)} MB; warming up "
            f"{len(pairs)} pairs ...")
        warm_up(server, pairs, first_text, args.timeout)
        warm = server.rss()
        result = {"checkpoint": str(checkpoint), "flags": [str(x) for x in extra],
                  "startup_s": round(startup, 2), "base_rss_mb": _mb(base),
                  "rss_after_warm_up_mb": _mb(warm), "loads": {}}
        for load, items in workloads.items():
            before = subnetwork_counts(server.url)
            r = measure(server, items, args.clients, args.timeout)
            after = subnetwork_counts(server.url)
            r["loads"], r["evictions"] = after[0] - before[0], after[1] - before[1]
            result["loads"][load] = r
            log(f"{SERVERS[name]}, {load}: {r['sentences_per_s']:.2f} sent/s, p50 "
                f"{r['p50_ms']} ms, p95 {r['p95_ms']} ms, {r['loads']} loads, "
                f"{r['evictions']} evictions, peak RSS {r['peak_rss_mb']} MB, "
                f"{r['errors']} errors")
    return result


def run(args, log) -> dict:
    langs, trained = model_pairs(args.checkpoint)
    direct = [p for p in trained if HUB in p]
    if not direct:
        raise SystemExit(f"serve_many: {args.checkpoint} records no trained {HUB}<->X pair")
    if args.token_checkpoint and find_checkpoint(str(args.token_checkpoint)) is None:
        raise SystemExit(f"serve_many: --token-checkpoint {args.token_checkpoint} is missing "
                         "(give '' to leave the token model out)")
    texts = read_texts(args.text_dir, direct, args.sentences)
    scripts = {lang: script_of(lines) for (lang, _), lines in texts.items()}
    for lang in sorted(set(langs) - set(scripts) - {HUB}):  # a language only translated into
        path = text_file(args.text_dir, lang, HUB)
        if path.is_file():
            scripts[lang] = script_of(path.read_text().splitlines()[:args.sentences])
    try:
        pivots = choose_pivots(langs, trained, args.pivots, args.seed, scripts)
    except ValueError as err:
        raise SystemExit(f"serve_many: {err}") from None
    texts.update(read_texts(args.text_dir, pivots, args.sentences))
    pairs = direct + pivots
    log(f"{len(langs)} languages, {len(direct)} directions direct, {len(pivots)} pivoted: "
        f"{', '.join('-'.join(p) for p in pivots) or 'none'}")

    work = Path(args.work)
    cache = work / "cache"
    if cache.exists() and not args.reuse_cache:
        shutil.rmtree(cache)  # the benchmark's own folder: a fresh build is the one timed
    common = ["--cache-dir", cache, "--threads", args.threads, "--beam", args.beam,
              "--timeout", args.timeout, "--max-queue", max(256, 2 * args.clients),
              "--log-level", "warning"]
    if args.spm_model:
        common += ["--spm-model", args.spm_model]
    task_flags = common + ["--backend", args.backend, "--quantization", args.quantization]
    token_flags = common + ["--backend", "fairseq"]
    build_s = {}
    log(f"building the sub-network cache of {args.checkpoint} ...")
    t0 = time.perf_counter()
    facts = build_cache(args.checkpoint, args.data, task_flags)
    build_s["task"] = round(time.perf_counter() - t0, 1)
    check_routes(facts, pairs, pivots, "task-MoE")
    subs = facts["subnetworks"]
    log(f"{len(subs)} sub-networks built in {build_s['task']} s")
    model = {k: facts[k] for k in ("backend", "quantization", "full_params", "full_bytes")}
    model["subnetworks"] = subs
    if args.token_checkpoint:
        t0 = time.perf_counter()
        token_facts = build_cache(args.token_checkpoint, args.data, token_flags)
        build_s["token"] = round(time.perf_counter() - t0, 1)
        check_routes(token_facts, pairs, pivots, "token-MoE")
        model["token"] = {"params": token_facts["full_params"],
                          "bytes": sum(s["bytes"] for s in token_facts["subnetworks"].values()),
                          "full_bytes": token_facts["full_bytes"]}

    total = sum(s["bytes"] for s in subs.values())
    largest = max(s["bytes"] for s in subs.values())
    budget = {"fraction": args.budget_fraction, "subnetworks_bytes": total,
              "bytes": max(int(args.budget_fraction * total), largest),
              "raised_to_largest": int(args.budget_fraction * total) < largest}
    shares = {"zipf": popularity(pairs, args.zipf, args.seed),
              "uniform": popularity(pairs, 0.0, args.seed)}
    workloads = {load: sampled_workload(shares[load], texts, args.requests, args.seed)
                 for load in LOADS}

    servers = {}
    plan = [("none", args.checkpoint, task_flags),
            ("budget", args.checkpoint, task_flags + ["--memory-budget", budget["bytes"]])]
    if args.token_checkpoint:
        plan.append(("token", args.token_checkpoint, token_flags))
    for name, checkpoint, flags in plan:
        servers[name] = serve_and_load(name, checkpoint, args.data, flags, pairs, texts,
                                       workloads, args, log)
    ratios = side_by_side(servers, budget["bytes"])
    inputs = {"checkpoint": str(args.checkpoint), "token_checkpoint": args.token_checkpoint or None,
              "data": str(args.data), "spm_model": args.spm_model or None,
              "text_dir": str(args.text_dir), "langs": langs, "scripts": scripts,
              "direct": ["-".join(p) for p in direct], "pivots": ["-".join(p) for p in pivots],
              "requests": args.requests, "clients": args.clients, "zipf": args.zipf,
              "seed": args.seed, "sentences_per_pair": {"-".join(p): len(t)
                                                        for p, t in texts.items()},
              "zipf_shares": {"-".join(p): round(w, 4) for p, w in shares["zipf"].items()},
              "zipf_top_share": max(shares["zipf"].values()),
              "requests_per_pair": {load: dict(Counter(f"{s}-{t}" for s, t, _ in items))
                                    for load, items in workloads.items()}}
    return {"inputs": inputs, "model": model, "budget": budget, "cache_build_s": build_s,
            "servers": servers, "ratios": ratios, "goals": goals(ratios)}


def main(argv=None):
    args = parse_args(argv)
    for noisy in ("httpx", "httpcore"):  # fairseq's import makes the root logger verbose
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.path.insert(0, str(REPO))
    from fairseq_taskmoe.atomic import write_text_atomically

    log = logger("serve_many", clock=True)

    result = {"command": "python -m research.bench.serve_many " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "environment": environment(args)}
    result.update(run(args, log))
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
