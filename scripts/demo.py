#!/usr/bin/env python3
"""`make demo`: the whole job on real data, on a CPU, in about 10-15 minutes.

  1. prepare a Multi30k subset (SentencePiece + fairseq-preprocess)   scripts/prepare_multi30k.py
  2. train a small task-MoE (target routing, 8 experts) with fairseq-train
  3. translate the test set of every direction with fairseq-generate
  4. prune the checkpoint for one pair with taskmoe-prune
  5. translate that pair with the pruned checkpoint
  6. print per-direction sacreBLEU, whether full and pruned hypotheses are identical, checkpoint
     sizes, parameter counts and generation speed; also written to <work>/summary.json

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

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LANGS = "en,de,fr,cs"
PAIRS = ["en-de", "de-en", "en-fr", "fr-en", "en-cs", "cs-en"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "work" / "demo"),
                   help="output folder (default: work/demo)")
    p.add_argument("--train-size", type=int, default=10000,
                   help="training lines per direction (default: %(default)s)")
    p.add_argument("--max-update", type=int, default=500,
                   help="training updates (default: %(default)s, a few minutes on 2 cores)")
    p.add_argument("--prune-pair", default="en-de", help="pair to prune for (default: en-de)")
    p.add_argument("--multi30k-dir", default=None, help="raw Multi30k folder "
                   "(default: $MULTI30K_DIR, else ../shared/data/multi30k, else download)")
    return p.parse_args(argv)


def log(msg):
    print(f"[demo] {msg}", flush=True)


def run(cmd, log_path: Path = None):
    """Run a command; its output goes to log_path (written atomically) or to our stdout."""
    cmd = [str(c) for c in cmd]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if log_path is None:
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        return None
    tmp = log_path.with_name(log_path.name + ".tmp")
    with open(tmp, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"[demo] {cmd[0]} failed; see {tmp}\n" + tmp.read_text()[-3000:])
    tmp.rename(log_path)
    return log_path.read_text()


def task_flags(data, langs=LANGS, pairs=",".join(PAIRS)):
    return [data, "--user-dir", "user_dir", "--task", "translation_task_moe", "--langs", langs,
            "--lang-pairs", pairs, "--encoder-langtok", "tgt", "--decoder-langtok"]


def generate_command(data, checkpoint, pair, beam=4, max_tokens=8000, **task):
    """fairseq-generate on the test set of `pair`, hypotheses detokenized (SentencePiece)."""
    src, tgt = pair.split("-")
    return [BIN / "fairseq-generate", *task_flags(data, **task), "--source-lang", src,
            "--target-lang", tgt, "--gen-subset", "test", "--path", checkpoint, "--beam", beam,
            "--max-tokens", max_tokens, "--post-process", "sentencepiece", "--cpu"]


def parse_generate(text):
    """fairseq-generate output -> ({sentence id: detokenized hypothesis}, tokens/s or None)."""
    hyps = {}
    for line in text.splitlines():
        if line.startswith("D-"):
            key, _score, *hyp = line.split("\t")
            hyps[int(key[2:])] = hyp[0] if hyp else ""
    speed = re.search(r"Translated .*\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", text)
    return hyps, float(speed.group(2)) if speed else None


def train(args, data, save_dir: Path):
    done = save_dir / "train.log"
    if done.exists():
        log(f"train: {done} exists, skipped")
        return
    log(f"train: task_moe_small, target/target routing, 8 experts, {args.max_update} updates "
        f"(resumes from {save_dir}/checkpoint_last.pt if present) ...")
    save_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    run([BIN / "fairseq-train", *task_flags(data), "--arch", "task_moe_small",
         "--encoder-moe-routing", "target", "--decoder-moe-routing", "target",
         "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
         "--moe-gate-loss-wt", "0.01", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
         "--lr", "0.003", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "200",
         "--dropout", "0.1", "--max-tokens", "4096", "--max-update", args.max_update,
         "--sampling-method", "temperature", "--sampling-temperature", "1.5",
         "--save-dir", save_dir, "--no-epoch-checkpoints", "--keep-last-epochs", "1",
         "--validate-interval-updates", 250, "--save-interval-updates", 250,
         "--keep-interval-updates", 1, "--log-format", "simple", "--log-interval", 100,
         "--cpu", "--seed", 1], log_path=done)
    log(f"train: done in {time.time() - start:.0f}s; log in {done}")


def generate(data, checkpoint, pair, out: Path):
    """fairseq-generate on the test set; returns (detokenized hypotheses by id, tokens/s)."""
    if not out.exists():
        run(generate_command(data, checkpoint, pair), log_path=out)
    return parse_generate(out.read_text())


def bleu(hyps, ref_path: Path):
    import sacrebleu

    refs = ref_path.read_text().splitlines()
    order = sorted(hyps)
    return sacrebleu.corpus_bleu([hyps[i] for i in order], [[refs[i] for i in order]]).score


def count_params(checkpoint: Path) -> int:
    import torch

    from fairseq_taskmoe.pruning import count_parameters

    return count_parameters(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])


def main(argv=None):
    warnings.filterwarnings("ignore", category=FutureWarning)  # fairscale vs current torch
    args = parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    prep = work / "multi30k"
    prep_cmd = [sys.executable, REPO / "scripts" / "prepare_multi30k.py", "--out", prep,
                "--langs", LANGS, "--pairs", ",".join(PAIRS), "--train-size", args.train_size]
    if args.multi30k_dir:
        prep_cmd += ["--multi30k-dir", args.multi30k_dir]
    log("prepare data ...")
    run(prep_cmd)
    data = prep / "bin"

    save_dir = work / "checkpoints"
    train(args, data, save_dir)
    full_ckpt = save_dir / "checkpoint_last.pt"

    gen_dir = work / "generate"
    gen_dir.mkdir(exist_ok=True)
    results = {}
    for pair in PAIRS:
        log(f"generate {pair} (full model) ...")
        hyps, speed = generate(data, full_ckpt, pair, gen_dir / f"full.{pair}.txt")
        results[pair] = {"bleu": bleu(hyps, prep / "text" / f"test.{pair.split('-')[1]}"),
                         "tokens_per_s": speed}

    pruned_ckpt = work / f"pruned.{args.prune_pair}.pt"
    if not pruned_ckpt.exists():
        log(f"prune for {args.prune_pair} ...")
        run([BIN / "taskmoe-prune", full_ckpt, "--lang-pair", args.prune_pair,
             "--output", pruned_ckpt])
    # full and pruned generation of the pruned pair, timed back to back in this run
    pair = args.prune_pair
    log(f"generate {pair} with the full and the pruned checkpoint, back to back ...")
    for name in (f"full-timed.{pair}.txt", f"pruned.{pair}.txt"):
        (gen_dir / name).unlink(missing_ok=True)
    full_hyps, full_speed = generate(data, full_ckpt, pair, gen_dir / f"full-timed.{pair}.txt")
    pruned_hyps, pruned_speed = generate(data, pruned_ckpt, pair, gen_dir / f"pruned.{pair}.txt")
    ref = prep / "text" / f"test.{pair.split('-')[1]}"
    summary = {
        "directions": results,
        "pruned": {
            "pair": pair,
            "identical_hypotheses": full_hyps == pruned_hyps,
            "bleu_full": bleu(full_hyps, ref),
            "bleu_pruned": bleu(pruned_hyps, ref),
            "bytes_full": full_ckpt.stat().st_size,
            "bytes_pruned": pruned_ckpt.stat().st_size,
            "params_full": count_params(full_ckpt),
            "params_pruned": count_params(pruned_ckpt),
            "tokens_per_s_full": full_speed,
            "tokens_per_s_pruned": pruned_speed,
        },
    }
    tmp = work / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.rename(work / "summary.json")
    print_summary(summary)


def print_summary(summary):
    print("\nper-direction sacreBLEU (Multi30k test_2016_flickr, full task-MoE checkpoint)")
    print(f"  {'pair':6s} {'BLEU':>6s} {'gen tok/s':>10s}")
    for pair, r in summary["directions"].items():
        print(f"  {pair:6s} {r['bleu']:6.2f} {r['tokens_per_s'] or 0:10.1f}")
    p = summary["pruned"]
    print(f"\npruned for {p['pair']}:")
    print(f"  hypotheses identical to the full model: {p['identical_hypotheses']}")
    print(f"  BLEU full {p['bleu_full']:.2f} / pruned {p['bleu_pruned']:.2f}")
    print(f"  checkpoint bytes full {p['bytes_full']:,} / pruned {p['bytes_pruned']:,} "
          f"({p['bytes_pruned'] / p['bytes_full']:.1%})")
    print(f"  parameters full {p['params_full']:,} / pruned {p['params_pruned']:,} "
          f"({p['params_pruned'] / p['params_full']:.1%})")
    print(f"  fairseq-generate tokens/s full {p['tokens_per_s_full']} / pruned "
          f"{p['tokens_per_s_pruned']} (same run, back to back)")


if __name__ == "__main__":
    main()
