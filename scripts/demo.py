#!/usr/bin/env python3
"""`make demo`: the whole job on real data, on a CPU, in under 15 minutes on 2 cores.

  1. prepare Multi30k en/de/fr/cs (SentencePiece + fairseq-preprocess)  scripts/prepare_multi30k.py
  2. train a task-MoE (target routing, 8 experts) with fairseq-train for a fixed 1,250 updates
     (seeded: every machine gets the same model; a slow one takes longer), showing progress
     (updates, loss, time left)
  3. prune the checkpoint for one pair with taskmoe-prune
  4. translate the test set of every direction with fairseq-generate (beam 5), and that pair's
     with the pruned checkpoint: two fairseq-generate processes at a time, one thread each
     (about 1.2x the throughput of one two-thread process here); the full and pruned runs of
     the pruned pair start together, so their speeds are measured side by side
  5. export the pruned pair (taskmoe-export: a stock fairseq transformer, and CTranslate2 int8)
  6. print per-direction sacreBLEU, a few example translations (source, full, pruned,
     CTranslate2 int8, reference), whether full and pruned hypotheses are identical,
     checkpoint sizes, parameter counts and generation speed; also in <work>/summary.json

The model (DEMO_MODEL below): d=256, 3+3 layers, FFN 1024; the middle FFN of each side is an MoE
of 8 experts of width 512, top-2 (so a token's active FFN width is 1024, as in the dense layers),
routed by target language on both sides; shared embeddings, 8k SentencePiece vocabulary.
The recipe (DEMO_TRAINING) is tuned for wall time on 2 cores: pre-norm, peak learning rate 0.003
after 150 warm-up updates, 2,048-token batches, no dropout (a 9.5-minute run is far from
overfitting). Each change was measured by the validation loss after 6 minutes of training
(docs/demo.md).

Every step skips work already done (a re-run resumes, fairseq-train from checkpoint_last.pt);
outputs are written under a temporary name and renamed.

    .venv/bin/python scripts/demo.py                 # what `make demo` runs
    .venv/bin/python scripts/demo.py --max-update 3000 --work work/demo-long
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # research/ (run as a script)
from research.common import (BIN, LANGS, PAIRS, REPO, bleu, generate_command,  # noqa: E402
                             logger, parse_generate, run, task_flags)

log = logger("demo")
# A fixed number of updates, not a time cap: machine speed must not become BLEU (a 9.5-minute
# cap reached 505 updates and 10.7 BLEU on a slow machine, 1,250 and 26.9 on a usual one).
# 1,250 updates take about 9.5 minutes on 2 idle cores of the reference machine
# (UPDATES_PER_SECOND), so that the whole demo fits in about 15 minutes there.
DEFAULT_UPDATES = 1250
DEFAULT_MINUTES = 0  # --train-minutes: an optional cap on top (0 = none)
UPDATES_PER_SECOND = 2.2  # measured: 1,250 updates in 9.5 minutes (docs/demo.md)
EXAMPLES = [0, 9, 21]  # test sentences shown next to the BLEU table
DEMO_MODEL = [
    "--arch", "task_moe", "--encoder-layers", 3, "--decoder-layers", 3,
    "--encoder-embed-dim", 256, "--decoder-embed-dim", 256,
    "--encoder-ffn-embed-dim", 1024, "--decoder-ffn-embed-dim", 1024,
    "--encoder-attention-heads", 4, "--decoder-attention-heads", 4, "--share-all-embeddings",
    "--moe-expert-count", 8, "--moe-expert-ffn-dim", 512, "--moe-top-k", 2,
    "--encoder-moe-routing", "target", "--decoder-moe-routing", "target",
    "--encoder-normalize-before", "--decoder-normalize-before",
]
DEMO_TRAINING = [
    "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", 0.1,
    "--moe-gate-loss-wt", 0.01, "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
    "--lr", 0.003, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 150,
    "--dropout", 0, "--max-tokens", 2048,
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "work" / "demo"),
                   help="output folder (default: work/demo)")
    p.add_argument("--train-size", type=int, default=None,
                   help="training lines per direction (default: all 29,000)")
    p.add_argument("--max-update", type=int, default=DEFAULT_UPDATES,
                   help="at most this many training updates (default: %(default)s)")
    p.add_argument("--train-minutes", type=float, default=DEFAULT_MINUTES,
                   help="and at most this much training time, counted over resumed sittings "
                   "(fairseq's --stop-time-hours; default: %(default)s; 0 = no limit)")
    p.add_argument("--prune-pair", default="en-de", help="pair to prune for (default: en-de)")
    p.add_argument("--multi30k-dir", default=None, help="raw Multi30k folder "
                   "(default: $MULTI30K_DIR, else ../shared/data/multi30k, else download)")
    return p.parse_args(argv)


_PROGRESS = re.compile(r"loss[ =]([\d.]+).*num_updates[ =](\d+)")


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def train(args, data, save_dir: Path):
    """fairseq-train, its log in save_dir/train.log; a progress line per 50 updates."""
    done = save_dir / "train.log"
    if done.exists():
        log(f"train: {done} exists, skipped")
        return
    limit = (f" or {args.train_minutes:g} minutes, whichever comes first"
             if args.train_minutes else "")
    log(f"train: task-MoE (target/target routing, 8 experts), {args.max_update} updates"
        f"{limit} (resumes from {save_dir}/checkpoint_last.pt if present); about "
        f"{_clock(args.max_update / UPDATES_PER_SECOND)} on 2 idle cores of the reference "
        "machine, longer on a slower or busy one ...")
    save_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(c) for c in [
        BIN / "fairseq-train", *task_flags(data), *DEMO_MODEL, *DEMO_TRAINING,
        "--max-update", args.max_update, "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--save-interval-updates", 300, "--keep-interval-updates", 1, "--disable-validation",
        "--log-format", "simple", "--log-interval", 50, "--num-workers", 0, "--cpu",
        "--seed", 1] + (["--stop-time-hours", args.train_minutes / 60]
                        if args.train_minutes else [])]
    start, first_update = time.time(), None
    tmp = done.with_name(done.name + ".tmp")
    with open(tmp, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONWARNINGS="ignore"), cwd=REPO)
        for line in proc.stdout:
            out.write(line)
            m = _PROGRESS.search(line) if "train_inner" in line else None
            if m:
                loss, updates = float(m.group(1)), int(m.group(2))
                if first_update is None:  # a resumed run starts counting here
                    first_update, first_time = updates - 50, start
                elapsed = time.time() - start
                rate = (updates - first_update) / max(time.time() - first_time, 1e-6)
                left = (args.max_update - updates) / max(rate, 1e-6)
                if args.train_minutes:
                    left = min(left, max(args.train_minutes * 60 - elapsed, 0))
                log(f"  update {updates:5d}/{args.max_update}  loss {loss:6.3f}  "
                    f"elapsed {_clock(elapsed)}  left ~{_clock(left)}")
        proc.wait()
    if proc.returncode != 0:
        sys.exit(f"[demo] fairseq-train failed; see {tmp}\n" + tmp.read_text()[-3000:])
    tmp.rename(done)
    log(f"train: done in {_clock(time.time() - start)}; log in {done}")


def generate(data, checkpoint, pair, out: Path, threads: int = None):
    """fairseq-generate on the test set; returns (detokenized hypotheses by id, tokens/s)."""
    if not out.exists():
        run(generate_command(data, checkpoint, pair), log_path=out, threads=threads)
    return parse_generate(out.read_text())


def generate_all(jobs, parallel: int = 2):
    """Run generate(*job) for every job, `parallel` fairseq-generate processes at a time with one
    thread each, in order (the first `parallel` jobs start together). Returns their results."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda job: generate(*job, threads=1), jobs))


def count_params(checkpoint: Path) -> int:
    from fairseq_taskmoe.deploy.pruning import count_parameters
    from fairseq_taskmoe.integration.compat import load_checkpoint

    return count_parameters(load_checkpoint(str(checkpoint))["model"])


def main(argv=None):
    warnings.filterwarnings("ignore", category=FutureWarning)  # fairscale vs current torch
    args = parse_args(argv)
    started = time.time()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_s = args.max_update / UPDATES_PER_SECOND
    log(f"cost: about {_clock(train_s + 5.5 * 60)} on 2 idle cores of the reference machine "
        f"(data ~1 min, training {args.max_update} updates ~{_clock(train_s)}, translation, "
        "pruning and export ~4.5 min); skipped steps cost nothing, a slower machine takes "
        "longer but ends at the same model")
    prep = work / "multi30k"
    prep_cmd = [sys.executable, REPO / "scripts" / "prepare_multi30k.py", "--out", prep,
                "--langs", ",".join(LANGS), "--pairs", ",".join(PAIRS)]
    if args.train_size:
        prep_cmd += ["--train-size", args.train_size]
    if args.multi30k_dir:
        prep_cmd += ["--multi30k-dir", args.multi30k_dir]
    log("prepare data ...")
    run(prep_cmd)
    data = prep / "bin"

    save_dir = work / "checkpoints"
    train(args, data, save_dir)
    full_ckpt = save_dir / "checkpoint_last.pt"

    pair = args.prune_pair
    pruned_ckpt = work / f"pruned.{pair}.pt"
    if not pruned_ckpt.exists():
        log(f"prune for {pair} ...")
        run([BIN / "taskmoe-prune", full_ckpt, "--lang-pair", pair, "--output", pruned_ckpt])

    gen_dir = work / "generate"
    gen_dir.mkdir(exist_ok=True)
    # the pruned pair first, its full and pruned runs side by side, then the other directions
    order = [pair] + [p for p in PAIRS if p != pair]
    log(f"generate {pair} with the full and the pruned checkpoint, then {', '.join(order[1:])} "
        "(full model, beam 5, two processes at a time) ...")
    jobs = [(data, full_ckpt, pair, gen_dir / f"full.{pair}.txt"),
            (data, pruned_ckpt, pair, gen_dir / f"pruned.{pair}.txt")]
    jobs += [(data, full_ckpt, p, gen_dir / f"full.{p}.txt") for p in order[1:]]
    outputs = generate_all(jobs)
    (pruned_hyps, pruned_speed), full_outputs = outputs[1], [outputs[0]] + outputs[2:]
    results, full_hyps = {}, {}
    for p, (hyps, speed) in zip(order, full_outputs):
        full_hyps[p] = hyps
        results[p] = {"bleu": bleu(hyps, prep / "text" / f"test.{p.split('-')[1]}"),
                      "tokens_per_s": speed}
    results = {p: results[p] for p in PAIRS}
    ct2_examples = export_and_translate(work, data, prep, pruned_ckpt, pair)
    ref = prep / "text" / f"test.{pair.split('-')[1]}"
    src_lines = (prep / "text" / f"test.{pair.split('-')[0]}").read_text().splitlines()
    ref_lines = ref.read_text().splitlines()
    summary = {
        "directions": results,
        "average_bleu": sum(r["bleu"] for r in results.values()) / len(results),
        "examples": [{"source": src_lines[i], "full": full_hyps[pair][i],
                      "pruned": pruned_hyps[i], "ctranslate2 int8": ct2_examples.get(i, ""),
                      "reference": ref_lines[i]}
                     for i in EXAMPLES if i in pruned_hyps],
        "pruned": {
            "pair": pair,
            "identical_hypotheses": sum(pruned_hyps.get(i) == h
                                        for i, h in full_hyps[pair].items()),
            "sentences": len(full_hyps[pair]),
            "bleu_full": results[pair]["bleu"],
            "bleu_pruned": bleu(pruned_hyps, ref),
            "bytes_full": full_ckpt.stat().st_size,
            "bytes_pruned": pruned_ckpt.stat().st_size,
            "params_full": count_params(full_ckpt),
            "params_pruned": count_params(pruned_ckpt),
            "tokens_per_s_full": results[pair]["tokens_per_s"],
            "tokens_per_s_pruned": pruned_speed,
        },
    }
    tmp = work / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.rename(work / "summary.json")
    print_summary(summary)
    log(f"done in {_clock(time.time() - started)} (steps already done were skipped)")


def export_and_translate(work: Path, data: Path, prep: Path, pruned_ckpt: Path, pair: str):
    """Export the pruned pair for serving without the plugin (a stock fairseq transformer, and
    CTranslate2 int8), then translate the example sentences with CTranslate2."""
    from fairseq_taskmoe.ct2 import load_ct2_translator

    exported = work / f"export.{pair}.transformer.pt"
    ct2_dir = work / f"export.{pair}.ct2"
    if not exported.exists():
        log(f"export {pair} as a stock fairseq transformer ...")
        run([BIN / "taskmoe-export", pruned_ckpt, "--lang-pair", pair, "--format", "fairseq",
             "--output", exported])
    if not ct2_dir.exists():
        log(f"export {pair} to CTranslate2 (int8) ...")
        run([BIN / "taskmoe-export", pruned_ckpt, "--lang-pair", pair, "--format", "ctranslate2",
             "--data", data, "--spm-model", prep / "spm.model", "--quantization", "int8",
             "--output", ct2_dir])
    sources = (prep / "text" / f"test.{pair.split('-')[0]}").read_text().splitlines()
    outputs = load_ct2_translator(ct2_dir).translate([sources[i] for i in EXAMPLES], beam=5)
    return dict(zip(EXAMPLES, outputs))


def print_summary(summary):
    print("\nper-direction sacreBLEU (Multi30k test_2016_flickr, full task-MoE checkpoint, "
          "beam 5)")
    print(f"  {'pair':6s} {'BLEU':>6s} {'gen tok/s':>10s}  (one thread each, two at a time)")
    for pair, r in summary["directions"].items():
        print(f"  {pair:6s} {r['bleu']:6.2f} {r['tokens_per_s'] or 0:10.1f}")
    print(f"  {'avg':6s} {summary['average_bleu']:6.2f}")
    p = summary["pruned"]
    print(f"\nexample translations, {p['pair']}:")
    for ex in summary["examples"]:
        for key in ("source", "full", "pruned", "ctranslate2 int8", "reference"):
            print(f"  {key:16s} {ex[key]}")
        print()
    print(f"\npruned for {p['pair']}:")
    print(f"  hypotheses identical to the full model: {p['identical_hypotheses']} of "
          f"{p['sentences']} (in inference the full model runs each task's experts merged, as "
          "the pruned one does, so they compute bit for bit the same)")
    print(f"  BLEU full {p['bleu_full']:.2f} / pruned {p['bleu_pruned']:.2f}")
    print(f"  checkpoint bytes full {p['bytes_full']:,} / pruned {p['bytes_pruned']:,} "
          f"({p['bytes_pruned'] / p['bytes_full']:.1%})")
    print(f"  parameters full {p['params_full']:,} / pruned {p['params_pruned']:,} "
          f"({p['params_pruned'] / p['params_full']:.1%})")
    print(f"  fairseq-generate tokens/s full {p['tokens_per_s_full']} / pruned "
          f"{p['tokens_per_s_pruned']} (run side by side, one thread each)")


if __name__ == "__main__":
    main()
