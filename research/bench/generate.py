"""fairseq-generate speed of several checkpoints, measured side by side in one run.

    .venv/bin/python -m research.bench.generate \\
        full=work/demo/checkpoints/checkpoint_last.pt pruned=work/demo/pruned.en-de.pt

Each checkpoint translates the test set of `--pair` with the same flags; the runs alternate
(A B A B ...) `--repeats` times so that drifts of a noisy machine hit every checkpoint alike, and
the median of fairseq's own "tokens/s" (generated target tokens per second of generation, model
loading excluded) is reported, with the ratio to the first checkpoint. It also checks that all
checkpoints produced the same hypotheses. Results go to `--out` (markdown) and stdout.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from research.common import LANGS, PAIRS, REPO, generate_command, parse_generate


def generate(data, checkpoint, pair, args):
    cmd = generate_command(data, checkpoint, pair, beam=args.beam, max_tokens=args.max_tokens,
                           langs=args.langs, pairs=args.lang_pairs)
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        sys.exit(f"fairseq-generate failed for {checkpoint}:\n{proc.stderr[-3000:]}")
    hyps, tokens_per_s = parse_generate(proc.stdout + proc.stderr)
    return tokens_per_s, hyps


def main():
    p = argparse.ArgumentParser(prog="python -m research.bench.generate",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="NAME=PATH")
    p.add_argument("--data", default=str(REPO / "work" / "demo" / "multi30k" / "bin"))
    p.add_argument("--pair", default="en-de")
    p.add_argument("--langs", default=",".join(LANGS))
    p.add_argument("--lang-pairs", default=",".join(PAIRS))
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "results" / "generate_speed.md"))
    args = p.parse_args()
    named = [c.split("=", 1) for c in args.checkpoints]
    if any(len(c) != 2 for c in named):
        p.error("give checkpoints as NAME=PATH")
    speeds = {name: [] for name, _ in named}
    outputs = {}
    for r in range(args.repeats):
        for name, path in named:
            tok_s, hyps = generate(args.data, path, args.pair, args)
            speeds[name].append(tok_s)
            outputs[name] = hyps
            print(f"[bench] round {r + 1}: {name}: {tok_s:,.0f} tokens/s", flush=True)
    base = statistics.median(speeds[named[0][0]])
    same = all(h == outputs[named[0][0]] for h in outputs.values())
    lines = ["| checkpoint | bytes | generate tokens/s (median) | runs | vs first |",
             "|---|---|---|---|---|"]
    for name, path in named:
        med = statistics.median(speeds[name])
        runs = ", ".join(f"{s:,.0f}" for s in speeds[name])
        lines.append(f"| {name} | {os.path.getsize(path):,} | {med:,.0f} | {runs} | "
                     f"{med / base:.2f} |")
    table = "\n".join(lines)
    print(table)
    print(f"identical hypotheses: {same}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    cmd = " ".join(["-m research.bench.generate", *args.checkpoints, "--pair", args.pair,
                    "--repeats", str(args.repeats)])
    tmp.write_text(f"Command: `.venv/bin/python {cmd}` ({time.strftime('%Y-%m-%d')}, 2-core "
                   f"CPU, {args.pair} Multi30k test, beam {args.beam})\n\n{table}\n\n"
                   f"Identical hypotheses across checkpoints: {same}\n")
    tmp.rename(out)


if __name__ == "__main__":
    main()
