"""Inference benchmark (issue 8): pruned task-MoE vs token-MoE vs dense, the paper's Figure 2 on
this machine, one process, measured side by side in one run.

    .venv/bin/python -m research.bench.inference --experts 8,32,128      # results/ + docs/img/
    .venv/bin/python -m research.bench.inference --experts 8 --reps 3 --batch-sizes 1,16  # quick

Variants (the paper's; random weights, which is all speed needs; research/bench/variants.py),
for each expert count E:
  a  token-MoE, token/token routing, full model
  b  task-MoE, target/target routing, full model (single-task batches: one target language)
  c  b pruned for en-de, experts merged (taskmoe-prune)
  d  b pruned for en-de, --no-merge (k experts per layer behind a frozen routing table)
  e  a stock fairseq `transformer` (no plugin) of the same active size as c
  f  token/target routing pruned for en-de (decoder pruned and merged, encoder MoE whole)
Shape (--embed-dim, --ffn-dim, --layers): every --moe-freq-th layer of each side is an MoE layer
of E experts of width ffn-dim/2, top-2, so a token's active FFN width is ffn-dim, as in the dense
layers and in e; a merged pruned layer is exactly a dense FFN of width ffn-dim.

Measures, on the same random inputs for every variant (source --src-len tokens, one language pair):
  decode  fairseq's SequenceGenerator (beam --beam) forced to exactly --tgt-len target tokens
          (min_len = max_len), so no model's stopping behaviour decides the figure: target
          tokens/s, and ms per sentence at batch size 1 (latency);
  score   teacher-forced forward of --tgt-len target tokens: target tokens/s.
Every (variant, batch size) is warmed up, then --reps rounds run interleaved (each round visits
the variants in a rotated order); medians are reported, and the ratios to a (token-MoE) and e
(dense) are computed from this run's medians. Each variant's parameters, checkpoint bytes and
peak resident memory (ru_maxrss of a fresh process that loads the checkpoint and decodes one
batch of the largest size) are measured in its own process.

Outputs: --json (default results/inference_benchmark.json), a markdown table (--markdown), a plot
of throughput vs batch size per variant (--plot, PNG). Checkpoints are cached under --work.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from fairseq_taskmoe.atomic import atomic_file, write_text_atomically
from research.bench.variants import (VARIANTS, build_checkpoint, count_params, dict_dir, load,
                                     make_inputs, net_input_for, run_measure, train_args)
from research.common import REPO, logger

log = logger("bench")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.bench.inference",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", default="8,32,128", help="expert counts (default: %(default)s)")
    p.add_argument("--variants", default="abcdef", help="which variants (default: %(default)s)")
    p.add_argument("--embed-dim", type=int, default=512)
    p.add_argument("--ffn-dim", type=int, default=2048,
                   help="dense FFN width; experts are half as wide, top-2 (default: 2048)")
    p.add_argument("--layers", type=int, default=6, help="layers per side (default: 6)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--moe-freq", type=int, default=2,
                   help="every N-th layer of a side is MoE (default: 2)")
    p.add_argument("--vocab", type=int, default=8000, help="dictionary size (default: 8000)")
    p.add_argument("--src-len", type=int, default=24)
    p.add_argument("--tgt-len", type=int, default=24)
    p.add_argument("--beam", type=int, default=1, help="beam size of decode (default: 1)")
    p.add_argument("--batch-sizes", default="1,8,32,128",
                   help="sentences per batch, swept for each variant's peak (default: %(default)s)")
    p.add_argument("--measures", default="decode,score", help="(default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds (default: 5)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: 0 = torch's default, all cores)")
    p.add_argument("--serve-parallel", type=int, default=0, metavar="W",
                   help="also the paper's serving setting on these cores: W processes (gloo, "
                   "one thread each) score teacher-forced batches in lockstep, token-MoE with its "
                   "experts sharded over the W ranks (all-to-all per MoE layer) vs the pruned "
                   "model and the dense model as W independent replicas (default: 0 = off)")
    p.add_argument("--serve-batch", type=int, default=32,
                   help="sentences per rank per forward in --serve-parallel (default: 32)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the per-variant peak-memory processes")
    p.add_argument("--work", default=str(REPO / "work" / "bench_inference"),
                   help="checkpoint cache (default: work/bench_inference)")
    p.add_argument("--json", default=str(REPO / "results" / "inference_benchmark.json"))
    p.add_argument("--markdown", default=str(REPO / "results" / "inference_benchmark.md"))
    p.add_argument("--plot", default=str(REPO / "docs" / "img" / "inference_throughput.png"))
    p.add_argument("--memory-probe", nargs=2, metavar=("CHECKPOINT", "BATCH"),
                   help=argparse.SUPPRESS)  # internal: the per-variant memory process
    return p.parse_args(argv)


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux keeps that
    across execve, so a child would report its parent's peak from before the exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def memory_probe(path: Path, batch: int, args):
    """Own process: load one checkpoint, decode one batch, print peak RSS (KiB)."""
    base = peak_rss_kib()
    model, task = load(path)
    run_measure("decode", model, task, make_inputs(task, batch, args), args)
    print(json.dumps({"peak_rss_kib": peak_rss_kib(), "rss_before_load_kib": base}))


def peak_memory(path: Path, batch: int, args) -> dict:
    cmd = [sys.executable, "-m", "research.bench.inference", "--memory-probe",
           str(path.resolve()), str(batch), "--src-len", str(args.src_len),
           "--tgt-len", str(args.tgt_len), "--beam", str(args.beam), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_experts(experts: int, args, data: Path, work: Path) -> dict:
    names = [v for v in VARIANTS if v in args.variants]
    paths = {}
    for v in names:  # dense and pruned models do not depend on E: shared files where they can
        tag = "dense" if VARIANTS[v][1] is None else f"E{experts}.{v}"
        paths[v] = work / (f"{tag}.d{args.embed_dim}.f{args.ffn_dim}.l{args.layers}."
                           f"m{args.moe_freq}.pt")
        if not paths[v].exists():
            log(f"E={experts}: build checkpoint {v} ({VARIANTS[v][0]}) ...")
            build_checkpoint(data, args, experts, v, paths[v])
    models = {v: load(paths[v]) for v in names}
    batches = [int(b) for b in args.batch_sizes.split(",")]
    measures = args.measures.split(",")
    inputs = {b: make_inputs(models[names[0]][1], b, args) for b in batches}
    times = {(v, m, b): [] for v in names for m in measures for b in batches}
    log(f"E={experts}: warm-up ...")
    for v in names:
        for m in measures:
            for b in batches:
                run_measure(m, *models[v], inputs[b], args)
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for v in order:
            for m in measures:
                for b in batches:
                    times[(v, m, b)].append(run_measure(m, *models[v], inputs[b], args))
        log(f"E={experts}: round {r + 1}/{args.reps} done")
    rows = {}
    for v in names:
        row = {"label": VARIANTS[v][0], "params": count_params(models[v][0]),
               "checkpoint_bytes": paths[v].stat().st_size, "throughput": {}}
        for m in measures:
            tokens = {b: b * args.tgt_len for b in batches}
            row["throughput"][m] = {str(b): tokens[b] / statistics.median(times[(v, m, b)])
                                    for b in batches}
            row["throughput"][m]["peak"] = max(row["throughput"][m][str(b)] for b in batches)
            row["throughput"][m]["runs_s"] = {str(b): times[(v, m, b)] for b in batches}
        if "decode" in measures and 1 in batches:
            row["latency_ms_per_sentence"] = 1000 * statistics.median(times[(v, "decode", 1)])
        rows[v] = row
    del models
    if not args.no_memory:
        for v in names:
            log(f"E={experts}: peak memory of {v} (own process) ...")
            rows[v]["memory"] = peak_memory(paths[v], max(batches), args)
    for m in measures:  # ratios of peak throughput, within this run
        for ref in ("a", "e"):
            if ref in rows:
                for v in rows:
                    rows[v].setdefault(f"peak_{m}_vs_{ref}", rows[v]["throughput"][m]["peak"]
                                       / rows[ref]["throughput"][m]["peak"])
    out = {"variants": rows}
    if args.serve_parallel:
        log(f"E={experts}: serving on {args.serve_parallel} processes ...")
        out["serve_parallel"] = serve_parallel(experts, args, data, paths)
    return out


def _serve_worker(rank: int, world: int, port: int, args, experts: int, data: Path, paths,
                  out: Path):
    """One rank of --serve-parallel: builds token-MoE with sharded experts (the model's own
    expert parallelism: --moe-expert-parallel auto under a process group) and loads the pruned
    and dense replicas, then times lockstep teacher-forced forwards, rounds interleaved."""
    import torch.distributed as dist
    from fairseq import tasks

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    targs = train_args(data, args, experts, ("token", "token"))
    torch.manual_seed(1)
    task = tasks.setup_task(targs)
    models = {"a": task.build_model(targs).eval()}
    models.update({v: load(paths[v])[0] for v in ("c", "e")})
    net = make_inputs(task, args.serve_batch, args, seed=rank)  # every rank its own sentences
    times = {v: [] for v in models}

    def timed(v):
        dist.barrier()
        start = time.perf_counter()
        with torch.inference_mode():
            models[v](**net_input_for(models[v], net))
        dist.barrier()  # the slowest rank decides
        return time.perf_counter() - start

    for v in models:  # warm-up
        timed(v)
    names = list(models)
    for r in range(args.reps):
        for v in names[r % len(names):] + names[:r % len(names)]:
            times[v].append(timed(v))
    if rank == 0:
        out.write_text(json.dumps(times))
    dist.destroy_process_group()


def serve_parallel(experts: int, args, data: Path, paths) -> dict:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    W = args.serve_parallel
    if experts % W:
        sys.exit(f"--serve-parallel {W} needs an expert count divisible by it, got {experts}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        mp.spawn(_serve_worker, args=(W, port, args, experts, data, paths, out), nprocs=W)
        times = json.loads(out.read_text())
    tokens = W * args.serve_batch * args.tgt_len
    rows = {v: {"label": VARIANTS[v][0] + (" (experts sharded over the ranks)" if v == "a"
                                          else " (one replica per rank)"),
                "score_tokens_per_s": tokens / statistics.median(t), "runs_s": t}
            for v, t in times.items()}
    for v in rows:
        rows[v]["vs_a"] = rows[v]["score_tokens_per_s"] / rows["a"]["score_tokens_per_s"]
    return {"world_size": W, "batch_per_rank": args.serve_batch, "variants": rows}


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"Command: `{result['command']}`  ", f"{result['date']}, {result['machine']}, "
             f"torch {result['torch']}, {result['threads']} threads; d={a['embed_dim']}, FFN "
             f"{a['ffn_dim']}, {a['layers']}+{a['layers']} layers, MoE every {a['moe_freq']} "
             f"layers (experts of width {a['ffn_dim'] // 2}, top-2); source {a['src_len']} / "
             f"target {a['tgt_len']} tokens, beam {a['beam']}, medians of {a['reps']} "
             "interleaved rounds.", ""]
    measures = a["measures"].split(",")
    head = ["E", "variant", "params", "checkpoint MB"]
    for m in measures:
        head += [f"{m} peak tok/s", f"{m} vs a", f"{m} vs e"]
    head += ["latency ms/sent", "peak RSS MB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for E, res in result["experts"].items():
        for v, r in res["variants"].items():
            cells = [E, f"{v}: {r['label']}", f"{r['params']:,}",
                     f"{r['checkpoint_bytes'] / 1e6:,.1f}"]
            for m in measures:
                cells += [f"{r['throughput'][m]['peak']:,.0f}",
                          f"{r.get(f'peak_{m}_vs_a', float('nan')):.2f}",
                          f"{r.get(f'peak_{m}_vs_e', float('nan')):.2f}"]
            lat = r.get("latency_ms_per_sentence")
            mem = r.get("memory", {}).get("peak_rss_kib")
            cells += [f"{lat:.1f}" if lat else "-", f"{mem / 1024:,.0f}" if mem else "-"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    served = {E: res["serve_parallel"] for E, res in result["experts"].items()
              if "serve_parallel" in res}
    if served:
        lines += ["", "Serving on W processes (gloo, one thread each, lockstep teacher-forced "
                  f"scoring of {a['serve_batch']} sentences per rank; medians of {a['reps']} "
                  "interleaved rounds):", "",
                  "| E | W | variant | score tok/s (all ranks) | vs a |", "|---|---|---|---|---|"]
        for E, sp in served.items():
            for v, r in sp["variants"].items():
                lines.append(f"| {E} | {sp['world_size']} | {v}: {r['label']} | "
                             f"{r['score_tokens_per_s']:,.0f} | {r['vs_a']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path):
    import logging

    # importing fairseq leaves the root logger at DEBUG: keep matplotlib's start-up quiet
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = result["args"]["measures"].split(",")
    experts = list(result["experts"])
    fig, axes = plt.subplots(len(measures), len(experts), squeeze=False,
                             figsize=(4.2 * len(experts), 3.4 * len(measures)))
    for i, m in enumerate(measures):
        for j, E in enumerate(experts):
            ax = axes[i][j]
            for v, r in result["experts"][E]["variants"].items():
                tp = {int(b): s for b, s in r["throughput"][m].items() if b.isdigit()}
                ax.plot(list(tp), list(tp.values()), marker="o", label=f"{v}: {r['label']}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{m}, {E} experts")
            ax.set_xlabel("batch size (sentences)")
            ax.set_ylabel("target tokens/s")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(str(path)) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(Path(args.memory_probe[0]), int(args.memory_probe[1]), args)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variant(s) {''.join(sorted(unknown))}: choose from "
                 f"{''.join(VARIANTS)}")
    if args.serve_parallel and not set("ace") <= set(args.variants):
        sys.exit("--serve-parallel compares variants a, c and e: keep them in --variants")
    if args.ffn_dim % 2:
        sys.exit(f"--ffn-dim must be even (experts are half as wide), got {args.ffn_dim}")
    work = Path(args.work)
    data = dict_dir(work, args.vocab)
    result = {"command": " ".join([".venv/bin/python -m research.bench.inference",
                                   *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()} {platform.processor() or ''}, "
                         f"{os.cpu_count()} cores".replace(" ,", ","),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "args": vars(args), "experts": {}}
    for E in (int(e) for e in args.experts.split(",")):
        result["experts"][str(E)] = bench_experts(E, args, data, work)
        print(markdown(result), flush=True)
    write_text_atomically(Path(args.json), json.dumps(result, indent=1))
    write_text_atomically(Path(args.markdown), markdown(result))
    plot(result, Path(args.plot))
    log(f"wrote {args.json}, {args.markdown}, {args.plot}")


if __name__ == "__main__":
    main()
