"""Training speed and all-to-all share with sharded experts: token / token vs target / target
routing on W CPU processes (scripts/train_multiproc.sh, gloo, one thread each), back to back in
one run on the same data, and the same model with replicated experts for reference.

    .venv/bin/python -m research.bench.expert_parallel --data work/demo/multi30k/bin

Model as research.bench.train_speed (d=128, 4+4 layers, FFN 512; 8 experts, top-2, in layers
1 and 3 of each side). Each run trains `--updates` updates (no validation, no checkpoint) with
--moe-record-a2a-time; the first logging interval is discarded as warm-up and the mean of the
others' wps (target words/s over all ranks) and a2a_share (rank 0's all-to-all seconds / step
seconds) is reported, to stdout and `--out` (markdown).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fairseq_taskmoe.atomic import write_text_atomically
from research.bench.train_speed import PLUGIN, SIZE  # the same model
from research.common import LANGS, PAIRS, REPO

ROUTINGS = {"token / token": ["--encoder-moe-routing", "token", "--decoder-moe-routing", "token"],
            "target / target": ["--encoder-moe-routing", "target",
                                "--decoder-moe-routing", "target"]}


def measure(data, world_size, flags, updates, interval):
    cmd = [REPO / "scripts" / "train_multiproc.sh", world_size, data, *PLUGIN, *flags, *SIZE,
           "--langs", ",".join(LANGS), "--lang-pairs", ",".join(PAIRS), "--encoder-langtok", "tgt",
           "--decoder-langtok", "--label-smoothing", "0.1", "--optimizer", "adam", "--lr",
           "0.001", "--max-tokens", "4096", "--max-update", updates, "--disable-validation",
           "--no-save", "--log-format", "simple", "--log-interval", interval, "--seed", "1",
           "--moe-record-a2a-time"]
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               FAIRSEQ_TRAIN=str(Path(sys.executable).parent / "fairseq-train"))
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO,
                          env=env)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(log[-3000:])
    inner = [line for line in log.splitlines() if "| train_inner |" in line][1:]
    wps = [float(re.search(r"wps=([\d.]+)", line).group(1)) for line in inner]
    share = [float(m.group(1)) for m in (re.search(r"a2a_share=([\d.]+)", line)
                                          for line in inner) if m]
    return statistics.mean(wps), statistics.mean(share) if share else 0.0


def main():
    p = argparse.ArgumentParser(prog="python -m research.bench.expert_parallel",
                                description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO / "work" / "demo" / "multi30k" / "bin"),
                   help="fairseq data dir from scripts/prepare_multi30k.py")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--updates", type=int, default=60, help="updates per configuration")
    p.add_argument("--interval", type=int, default=10, help="log interval (updates)")
    p.add_argument("--out", default=str(REPO / "results" / "expert_parallel.md"))
    args = p.parse_args()
    configs = {f"{name}, sharded": flags for name, flags in ROUTINGS.items()}
    configs.update({f"{name}, replicated": flags + ["--moe-expert-parallel", "off"]
                    for name, flags in ROUTINGS.items()})
    rows = []
    for name, flags in configs.items():
        start = time.time()
        wps, share = measure(args.data, args.world_size, flags, args.updates, args.interval)
        rows.append((name, wps, share))
        print(f"[bench] {name}: {wps:,.0f} words/s, a2a share {share:.1%} "
              f"({time.time() - start:.0f}s)", flush=True)
    lines = [f"| routing (encoder / decoder), experts over {args.world_size} ranks | "
             "train words/s | all-to-all share of the step |", "|---|---|---|"]
    lines += [f"| {n} | {w:,.0f} | {s:.1%} |" if "sharded" in n else f"| {n} | {w:,.0f} | - |"
              for n, w, s in rows]
    table = "\n".join(lines)
    print(table)
    write_text_atomically(args.out,
                          f"Command: `.venv/bin/python -m research.bench.expert_parallel --data "
                          f"{args.data} --world-size {args.world_size} --updates {args.updates}` "
                          f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()}-core CPU, gloo, "
                          f"one thread per rank)\n\n{table}\n")


if __name__ == "__main__":
    main()
