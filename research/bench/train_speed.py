"""Training speed (target words/s, fairseq's `wps`) of a dense transformer, a token-routed MoE and
a task-routed MoE of the same size, measured back to back in one run on the same data.

    .venv/bin/python -m research.bench.train_speed --data work/demo/multi30k/bin

All models: d=128, 4+4 layers, 4 heads, FFN 512, shared embeddings; the MoE models have 8
experts (FFN 512 each), top-2, in layers 1 and 3 of each side. Each run trains `--updates`
updates with fairseq-train (no validation, no checkpoint); the first logging interval is
discarded as warm-up and the mean wps of the others is reported. Results go to
`--out` (markdown) as well as stdout.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

from fairseq_taskmoe.atomic import write_text_atomically
from research.common import BIN, LANGS, PAIRS, REPO  # the demo's data and languages

SIZE = ["--encoder-embed-dim", "128", "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim",
        "512", "--decoder-ffn-embed-dim", "512", "--encoder-layers", "4", "--decoder-layers",
        "4", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
        "--share-all-embeddings"]
PLUGIN = ["--user-dir", "user_dir", "--task", "translation_task_moe", "--arch", "task_moe",
          "--criterion", "moe_label_smoothed_cross_entropy", "--moe-expert-count", "8"]
CONFIGS = {
    "dense transformer": ["--task", "translation_multi_simple_epoch", "--arch", "transformer",
                          "--criterion", "label_smoothed_cross_entropy"],
    "token / token MoE": PLUGIN + ["--encoder-moe-routing", "token",
                                   "--decoder-moe-routing", "token"],
    "target / target MoE": PLUGIN + ["--encoder-moe-routing", "target",
                                     "--decoder-moe-routing", "target"],
}


def measure(data, flags, updates, interval):
    cmd = [BIN / "fairseq-train", data, *flags, *SIZE, "--langs", ",".join(LANGS),
           "--lang-pairs", ",".join(PAIRS), "--encoder-langtok", "tgt", "--decoder-langtok",
           "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "0.001",
           "--max-tokens", "4096", "--max-update", str(updates), "--disable-validation",
           "--no-save", "--log-format", "simple", "--log-interval", str(interval), "--cpu",
           "--seed", "1"]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    log = proc.stdout + proc.stderr
    wps = [float(w) for w in re.findall(r"train_inner \|.*?wps=([\d.]+)", log)]
    params = re.search(r"num\. (?:shared )?model params: ([\d,]+)", log)
    return statistics.mean(wps[1:]), params.group(1) if params else "?"


def main():
    p = argparse.ArgumentParser(prog="python -m research.bench.train_speed",
                                description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO / "work" / "demo" / "multi30k" / "bin"),
                   help="fairseq data dir from scripts/prepare_multi30k.py")
    p.add_argument("--updates", type=int, default=100, help="updates per model")
    p.add_argument("--interval", type=int, default=20, help="log interval (updates)")
    p.add_argument("--out", default=str(REPO / "results" / "train_speed.md"))
    args = p.parse_args()
    rows = []
    for name, flags in CONFIGS.items():
        start = time.time()
        wps, params = measure(args.data, flags, args.updates, args.interval)
        rows.append((name, params, wps))
        print(f"[bench] {name}: {wps:,.0f} words/s, {params} params "
              f"({time.time() - start:.0f}s)", flush=True)
    dense = rows[0][2]
    lines = ["| model | parameters | train words/s | vs dense |", "|---|---|---|---|"]
    lines += [f"| {n} | {p} | {w:,.0f} | {w / dense:.2f} |" for n, p, w in rows]
    table = "\n".join(lines)
    print(table)
    write_text_atomically(args.out,
                          f"Command: `.venv/bin/python -m research.bench.train_speed --data "
                          f"{args.data} --updates {args.updates}` "
                          f"({time.strftime('%Y-%m-%d')}, 2-core CPU)\n\n{table}\n")


if __name__ == "__main__":
    main()
