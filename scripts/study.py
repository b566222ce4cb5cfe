#!/usr/bin/env python3
"""The routing quality study (issue 7): train and evaluate every model of the paper's Table 1 on
Multi30k, resumably, one results JSON per run.

    .venv/bin/python scripts/study.py --list     # the runs and how far each got
    .venv/bin/python scripts/study.py            # everything (hours on 2 cores)
    .venv/bin/python scripts/study.py --only dense,target_target
    .venv/bin/python scripts/study_report.py     # results/study/*.json -> docs/results.md

Every model shares the backbone and training recipe in SHARED_FLAGS (d=256, 3+3 layers, FFN 1024;
MoE models: 8 experts of FFN dim 512, top-2, in the middle layer of each side) and the same
budget of --max-update updates of at most 4096 tokens; only the routing and balance-loss flags of
VARIANTS differ. Trained on the six en<->{de,fr,cs} directions of the full Multi30k training set;
evaluated with beam 5 on test_2016_flickr in all 12 directions (the six de/fr/cs<->de/fr/cs ones
are zero-shot): detokenized sacreBLEU and chrF, plus the share of hypotheses in the wrong language
(fairseq_taskmoe.langid, whose own accuracy on the references is measured and recorded).
Task-routed models are also pruned per trained direction (taskmoe-prune) and re-evaluated;
lang_pair routing is evaluated on the zero-shot directions under both moe_unseen_pairs policies
(the checkpoint's own, the other by --model-overrides). Training runs with --disable-validation
(a validation pass at every 200-update save would cost more than it tells); test BLEU is the
measure.

Smoke test of the machinery (minutes; never into results/ or docs/):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/study.py --work /tmp/s/work --results /tmp/s/res \\
        --img-dir /tmp/s/img --only dense-s1,target_target --max-update 40 --save-interval 10 \\
        --train-size 2000 --directions en-de,de-en,de-fr --max-len-b 30

Resuming: a run whose results JSON exists is skipped; fairseq-train resumes from the run's
checkpoint_last.pt (saved every 200 updates); every evaluation step is skipped when its output
file exists. Kill it at any point and start the same command again.

Work files (checkpoints, logs, generations) go under --work (default work/study/, git-ignored);
results JSONs under --results (default results/study/), heatmaps under --img-dir (default
docs/img/).
"""

import argparse
import json
import logging
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from demo import BIN, REPO, bleu, generate_command, parse_generate, run, task_flags  # sibling

sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore", category=FutureWarning)  # fairscale vs current torch
logging.getLogger("fairseq").setLevel(logging.WARNING)  # when this process imports fairseq
from fairseq_taskmoe.atomic import atomic_file  # noqa: E402
from fairseq_taskmoe.langid import language_shares  # noqa: E402

LANGS = ["en", "de", "fr", "cs"]
TRAINED = ["en-de", "de-en", "en-fr", "fr-en", "en-cs", "cs-en"]
ZERO_SHOT = ["de-fr", "fr-de", "de-cs", "cs-de", "fr-cs", "cs-fr"]
DIRECTIONS = TRAINED + ZERO_SHOT
BEAM = 5
MAX_TOKENS = 4096

# The backbone and training recipe of every model in the study; VARIANTS only add routing and
# balance-loss flags. Values of None are switches.
SHARED_FLAGS = {
    "--arch": "task_moe",
    "--encoder-layers": 3, "--decoder-layers": 3,
    "--encoder-embed-dim": 256, "--decoder-embed-dim": 256,
    "--encoder-ffn-embed-dim": 1024, "--decoder-ffn-embed-dim": 1024,
    "--encoder-attention-heads": 4, "--decoder-attention-heads": 4,
    "--share-all-embeddings": None,
    "--moe-expert-count": 8, "--moe-expert-ffn-dim": 512, "--moe-top-k": 2,
    "--criterion": "moe_label_smoothed_cross_entropy", "--label-smoothing": 0.1,
    "--optimizer": "adam", "--adam-betas": "(0.9, 0.98)",
    "--lr-scheduler": "inverse_sqrt", "--lr": 0.002, "--warmup-updates": 400,
    "--dropout": 0.1,
    "--max-tokens": MAX_TOKENS,
}

# The scale of the study (--preset). "cpu" is what results/study/ holds: ~25-40 minutes per model
# on 2 CPU cores. "gpu" is the same study near Transformer-Base scale for one GPU (d=512, 6+6
# layers, 32 experts of width 1024 in every second layer, mixed precision, 30k updates of 16k
# tokens); it has its own work, results and image folders and has not been run here (no GPU was
# lent to this project), so its flags are a starting point, not a tuned recipe.
PRESETS = {
    "cpu": dict(flags=SHARED_FLAGS, max_update=1000, device=["--cpu"], folder="study"),
    "gpu": dict(flags={
        **SHARED_FLAGS,
        "--encoder-layers": 6, "--decoder-layers": 6,
        "--encoder-embed-dim": 512, "--decoder-embed-dim": 512,
        "--encoder-ffn-embed-dim": 2048, "--decoder-ffn-embed-dim": 2048,
        "--encoder-attention-heads": 8, "--decoder-attention-heads": 8,
        "--moe-freq": 2, "--moe-expert-count": 32, "--moe-expert-ffn-dim": 1024,
        "--lr": 0.0007, "--warmup-updates": 4000, "--dropout": 0.1,
        "--max-tokens": 16384, "--amp": None,
    }, max_update=30000, device=[], folder="study-gpu"),
}


def moe(enc, dec, gate_loss_wt=0.01, scope="tokens"):
    # the scope is explicit: the plugin's default became "tasks" (from this study's evidence)
    # after most runs had trained with "tokens", which every variant but one keeps
    return ["--encoder-moe-routing", enc, "--decoder-moe-routing", dec,
            "--moe-gate-loss-wt", gate_loss_wt, "--moe-balance-scope", scope]


# name -> label (encoder / decoder routing), flags, seeds, routing kinds, what the run needs
VARIANTS = {
    "dense": dict(label="dense", flags=["--moe-freq", 0], seeds=(1, 2), routing=None),
    "token_token": dict(label="token / token", flags=moe("token", "token"), seeds=(1, 2, 3),
                        routing=("token", "token")),
    "sentence_sentence": dict(label="sentence / sentence", flags=moe("sentence", "sentence"),
                              seeds=(1, 2), routing=("sentence", "sentence")),
    "target_target": dict(label="target / target", flags=moe("target", "target"), seeds=(1, 2, 3),
                          routing=("target", "target")),
    "lang_pair_lang_pair": dict(label="lang-pair / lang-pair",
                                flags=moe("lang_pair", "lang_pair"), seeds=(1, 2),
                                routing=("lang_pair", "lang_pair")),
    "token_target": dict(label="token / target", flags=moe("token", "target"), seeds=(1, 2, 3),
                         routing=("token", "target")),
    # balance-loss study on target / target (target_target itself is the 0.01 point)
    "target_target_gl0": dict(label="target / target, gate loss 0",
                              flags=moe("target", "target", 0), seeds=(1, 2),
                              routing=("target", "target")),
    "target_target_gl0.1": dict(label="target / target, gate loss 0.1",
                                flags=moe("target", "target", 0.1), seeds=(1, 2),
                                routing=("target", "target")),
    "target_target_tasks": dict(label="target / target, gate loss 0.01 over tasks",
                                flags=moe("target", "target", 0.01, "tasks"),
                                seeds=(1, 2, 3), routing=("target", "target"),
                                needs="moe_balance_scope"),
}
TASK_ROUTING = {"target", "lang_pair"}
# How lang_pair routing treats a pair never trained (a model option, overridable at generation):
# the study evaluates the zero-shot directions under each policy.
UNSEEN_OPTION, UNSEEN_POLICIES = "moe_unseen_pairs", ("own_row", "target_mean")


def runs():
    """[(run name, variant name, seed)] in study order."""
    return [(f"{v}-s{seed}", v, seed) for v, spec in VARIANTS.items() for seed in spec["seeds"]]


def flag_list(flags: dict):
    out = []
    for k, v in flags.items():
        out += [k] if v is None else [k, v]
    return out


def show(cmd):
    """A command as a shell line, paths inside the repository made relative to it."""
    return " ".join(shlex.quote(str(c)) for c in cmd).replace(f"{REPO}/", "")


def log(msg):
    print(f"[study] {msg}", flush=True)


def hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def write_json(path: Path, obj):
    with atomic_file(str(path), "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")


def read_json(path: Path):
    return json.loads(path.read_text())


# ---------------------------------------------------------------- arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="scale: cpu (default; d=256 3+3 layers, 8 experts, 1,000 updates of "
                        "4,096 tokens, what results/study holds) or gpu (d=512 6+6 layers, 32 "
                        "experts, 30,000 updates of 16,384 tokens, --amp; folders study-gpu; "
                        "not run on a GPU yet)")
    p.add_argument("--work", default=None,
                   help="checkpoints, logs and generations (default: work/study, "
                        "work/study-gpu for --preset gpu)")
    p.add_argument("--results", default=None,
                   help="one JSON per finished run (default: results/study, results/study-gpu)")
    p.add_argument("--img-dir", default=None,
                   help="routing heatmaps <run>.png (default: docs/img, docs/img/study-gpu)")
    p.add_argument("--only", default=None,
                   help="comma-separated variants (all their seeds) or runs, e.g. "
                        "dense,token_target-s2")
    p.add_argument("--list", action="store_true", help="list the runs and their state, then exit")
    p.add_argument("--max-update", type=int, default=None,
                   help="training budget in updates of at most --max-tokens tokens (default: "
                        "the preset's: 1000 for cpu, 30000 for gpu)")
    p.add_argument("--save-interval", type=int, default=200,
                   help="save checkpoint_last.pt every N updates (default: %(default)s; a kill "
                        "loses at most that much training)")
    p.add_argument("--train-size", type=int, default=None,
                   help="training lines per direction (default: all 29,000; smaller values are "
                        "for smoke tests and go to their own data folder)")
    p.add_argument("--directions", default=",".join(DIRECTIONS),
                   help="directions to evaluate (default: all 12; fewer only for smoke tests)")
    p.add_argument("--max-len-b", type=int, default=None,
                   help="cap on generated length (fairseq-generate --max-len-b; default: "
                        "fairseq's 200). Only for smoke tests of barely trained models")
    p.add_argument("--keep-pruned", action="store_true",
                   help="keep pruned checkpoints (default: delete each after its evaluation; "
                        "its size and parameter count are recorded)")
    p.add_argument("--multi30k-dir", default=None,
                   help="raw Multi30k (default: $MULTI30K_DIR, else ../shared/data/multi30k)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    folder = preset["folder"]
    args.work = Path(args.work or REPO / "work" / folder).resolve()
    args.results = Path(args.results or REPO / "results" / folder).resolve()
    args.img_dir = Path(args.img_dir or (REPO / "docs" / "img" if args.preset == "cpu" else
                                         REPO / "docs" / "img" / folder)).resolve()
    if args.max_update is None:
        args.max_update = preset["max_update"]
    args.directions = [d for d in args.directions.split(",") if d]
    bad = [d for d in args.directions if d not in DIRECTIONS]
    if bad:
        p.error(f"unknown direction(s) {bad}; choose from {','.join(DIRECTIONS)}")
    args.selected = select_runs(p, args.only)
    return args


def select_runs(parser, only):
    all_runs = runs()
    if not only:
        return all_runs
    wanted = [w for w in only.split(",") if w]
    names = {r[0] for r in all_runs}
    unknown = [w for w in wanted if w not in VARIANTS and w not in names]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; see --list")
    return [r for r in all_runs if r[0] in wanted or r[1] in wanted]


# ---------------------------------------------------------------- data


def prepare_data(args) -> Path:
    """Multi30k for all 12 directions: training reads only the six trained pairs (--lang-pairs),
    the zero-shot pairs' binaries are copies of the per-language files (prepare_multi30k's
    donors), so fairseq-generate finds a test split for every direction."""
    name = "multi30k" if args.train_size is None else f"multi30k-n{args.train_size}"
    out = args.work / name
    cmd = [sys.executable, REPO / "scripts" / "prepare_multi30k.py", "--out", out,
           "--langs", ",".join(LANGS), "--pairs", ",".join(DIRECTIONS)]
    if args.train_size is not None:
        cmd += ["--train-size", args.train_size]
    if args.multi30k_dir:
        cmd += ["--multi30k-dir", args.multi30k_dir]
    if not (out / "bin" / ".done").exists():
        log(f"prepare data into {out} ...")
        run(cmd)
    args.prepare_command = show(cmd)
    return out


def langid_accuracy(prep: Path):
    """Accuracy of the detector on the test references (its own error, next to off-target)."""
    out = {}
    for lang in LANGS:
        shares = language_shares((prep / "text" / f"test.{lang}").read_text().splitlines(), lang)
        out[lang] = {k: round(v, 4) for k, v in shares.items()}
    return out


def library_has(option: str) -> bool:
    """Whether the plugin has a model or criterion option (options other engineers add)."""
    from dataclasses import fields

    from fairseq_taskmoe.config import MoEConfig
    from fairseq_taskmoe.criterion import MoELabelSmoothedCrossEntropyConfig

    return any(option in {f.name for f in fields(cls)}
               for cls in (MoEConfig, MoELabelSmoothedCrossEntropyConfig))


# ---------------------------------------------------------------- training


def train_command(data: Path, variant: str, seed: int, save_dir: Path, max_update: int,
                  save_interval: int = 200, preset: str = "cpu"):
    return [BIN / "fairseq-train", *task_flags(data, ",".join(LANGS), ",".join(TRAINED)),
            *flag_list(PRESETS[preset]["flags"]), *VARIANTS[variant]["flags"],
            "--max-update", max_update, "--seed", seed, "--save-dir", save_dir,
            "--no-epoch-checkpoints", "--save-interval-updates", save_interval,
            "--keep-interval-updates", 1, "--disable-validation", "--num-workers", 0,
            "--log-format", "simple", "--log-interval", 25, *PRESETS[preset]["device"]]


def on_device(cmd, preset: str):
    """A fairseq command (built with --cpu) for the preset's device."""
    return cmd if "--cpu" in PRESETS[preset]["device"] else [c for c in cmd if c != "--cpu"]


_CHILD = None


def _terminate_child(signum, _frame):
    """Killing the runner kills its fairseq-train too (its checkpoint_last.pt survives)."""
    if _CHILD is not None and _CHILD.poll() is None:
        _CHILD.terminate()
        try:
            _CHILD.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _CHILD.kill()
    print(f"[study] stopped by signal {signum}; run the same command again to resume",
          flush=True)
    os._exit(128 + signum)  # not sys.exit: main() must not catch it as a failed run


def _die_with_parent():
    try:  # Linux: the child gets SIGTERM if the runner dies, even by SIGKILL
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def train(args, data: Path, run_dir: Path, variant: str, seed: int, prefix: str):
    """fairseq-train to --max-update (resuming from checkpoint_last.pt), streaming progress."""
    global _CHILD
    save_dir = run_dir / "checkpoints"
    done = run_dir / "train.done.json"
    cmd = train_command(data, variant, seed, save_dir, args.max_update, args.save_interval,
                        args.preset)
    if done.exists() and read_json(done).get("max_update") == args.max_update:
        return cmd
    save_dir.mkdir(parents=True, exist_ok=True)
    repair_last_checkpoint(save_dir, prefix)
    resumed = (save_dir / "checkpoint_last.pt").exists()
    log(f"{prefix}: train to {args.max_update} updates"
        + (" (resuming from checkpoint_last.pt)" if resumed else "") + f"; log {run_dir}/train.log")
    start, start_update, tail = time.time(), None, []
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    # the log is appended to across sittings, so it tells the whole story of a resumed run
    with open(run_dir / "train.log", "a") as logf:
        logf.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {show(cmd)}\n")
        _CHILD = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                                  preexec_fn=_die_with_parent)
        for line in _CHILD.stdout:
            logf.write(line)
            logf.flush()
            tail = (tail + [line])[-30:]
            loaded = re.search(r"[Ll]oaded checkpoint .*@ (\d+) updates", line)
            if loaded:
                start_update = int(loaded.group(1))
                log(f"{prefix}: resumed at update {start_update}")
            saved = re.search(r"Saved checkpoint \S+ \(epoch \d+ @ (\d+) updates", line)
            if saved:
                log(f"{prefix}: checkpoint saved at update {saved.group(1)}")
            if "| train_inner |" in line:
                upd = re.search(r"num_updates=(\d+)", line)
                loss = re.search(r"\bloss=([\d.]+)", line)
                if not upd:
                    continue
                updates = int(upd.group(1))
                if start_update is None:
                    start_update = 0
                elapsed = time.time() - start
                rate = (updates - start_update) / max(elapsed, 1e-9)
                eta = (args.max_update - updates) / rate if rate > 0 else float("nan")
                log(f"{prefix}: update {updates}/{args.max_update} loss "
                    f"{loss.group(1) if loss else '?'} | {hms(elapsed)} this sitting, "
                    f"ETA {hms(eta) if eta == eta else '?'}")
        rc = _CHILD.wait()
        _CHILD = None
    if rc != 0:
        raise RuntimeError(f"fairseq-train failed (exit {rc}); last lines:\n" + "".join(tail))
    for interval in save_dir.glob("checkpoint_*_*.pt"):  # checkpoint_last.pt is what we use
        interval.unlink()
    state = checkpoint_extra(save_dir / "checkpoint_last.pt")
    write_json(done, {"max_update": args.max_update, **state})
    log(f"{prefix}: trained, {state['num_updates']} updates, "
        f"{hms(state['training_seconds'])} of training in total")
    return cmd


def repair_last_checkpoint(save_dir: Path, prefix: str):
    """fairseq writes checkpoint_N_M.pt atomically but then *copies* it to checkpoint_last.pt;
    a kill during that copy leaves a truncated checkpoint_last.pt that fairseq cannot resume
    from. Replace it by the newest readable interval checkpoint (or drop it)."""
    last = save_dir / "checkpoint_last.pt"
    if not last.exists():
        return
    try:
        checkpoint_extra(last)
        return
    except Exception as err:  # truncated zip, EOF, ...
        log(f"{prefix}: {last} is unreadable ({type(err).__name__}); repairing")
    for candidate in sorted(save_dir.glob("checkpoint_*_*.pt"), key=lambda p: p.stat().st_mtime,
                            reverse=True):
        try:
            checkpoint_extra(candidate)
        except Exception:
            continue
        os.replace(candidate, last)
        log(f"{prefix}: resuming from {candidate.name} instead")
        return
    last.unlink()
    log(f"{prefix}: no readable checkpoint; training starts over")


def checkpoint_extra(path: Path):
    from fairseq_taskmoe.compat import load_checkpoint

    state = load_checkpoint(str(path))
    extra = state.get("extra_state") or {}
    return {"num_updates": int(state["optimizer_history"][-1]["num_updates"]),
            "training_seconds": round(float(extra.get("previous_training_time", 0.0)), 1)}


# ---------------------------------------------------------------- evaluation


class Timer:
    """Seconds spent per evaluation step, kept across sittings in eval/times.json."""

    def __init__(self, path: Path):
        self.path = path
        self.times = read_json(path) if path.exists() else {}

    def step(self, name, fn):
        start = time.time()
        out = fn()
        self.times[name] = round(self.times.get(name, 0.0) + time.time() - start, 1)
        write_json(self.path, self.times)
        return out


def generate(args, data, checkpoint, pair, out: Path, overrides=None):
    """Detokenized hypotheses {id: text} and tokens/s; skipped when `out` exists."""
    if not out.exists():
        cmd = on_device(generate_command(data, checkpoint, pair, beam=BEAM,
                                         langs=",".join(LANGS), pairs=",".join(TRAINED)),
                        args.preset)
        if args.max_len_b is not None:
            cmd += ["--max-len-a", 0, "--max-len-b", args.max_len_b]
        if overrides:
            cmd += ["--model-overrides", repr(overrides)]
        run(cmd, log_path=out)
    return parse_generate(out.read_text())


def score(hyps, prep: Path, pair: str):
    """BLEU (demo.bleu: sacreBLEU's corpus_bleu defaults), chrF, language shares and the two
    metric signatures (under the key "signatures")."""
    from sacrebleu.metrics import BLEU, CHRF

    tgt = pair.split("-")[1]
    ref_path = prep / "text" / f"test.{tgt}"
    refs = ref_path.read_text().splitlines()
    order = sorted(hyps)
    if len(order) != len(refs):
        raise RuntimeError(f"{pair}: {len(order)} hypotheses for {len(refs)} references")
    hyp_list, ref_lists = [hyps[i] for i in order], [[refs[i] for i in order]]
    bleu_metric, chrf_metric = BLEU(), CHRF()
    # for its signature and lengths; the score is demo.bleu's
    lengths = bleu_metric.corpus_score(hyp_list, ref_lists)
    chrf = chrf_metric.corpus_score(hyp_list, ref_lists).score
    shares = language_shares(hyp_list, tgt)
    # hypotheses over twice their reference's length: runaway decoding (repetition loops)
    long = sum(len(h.split()) > 2 * max(len(r.split()), 1) for h, r in zip(hyp_list, ref_lists[0]))
    return {"bleu": round(bleu(hyps, ref_path), 2), "chrf": round(chrf, 2),
            **{k: round(v, 4) for k, v in shares.items()},
            "length_ratio": round(lengths.sys_len / max(lengths.ref_len, 1), 4),
            "over_twice_reference": round(long / len(hyp_list), 4),
            "signatures": {"bleu": str(bleu_metric.get_signature()),
                           "chrf": str(chrf_metric.get_signature())}}


def parse_prune_log(text):
    """taskmoe-prune's report -> {layer: [[expert, gate weight], ...]} of the pruned layers."""
    kept = {}
    for line in text.splitlines():
        m = re.match(r"\s+(\S+)\s+(target|lang_pair)\s+pruned .*?\)\s+(.*)$", line)
        if m:
            kept[m.group(1)] = [[int(e), float(w)] for e, w in
                                re.findall(r"e(\d+)\*([\d.]+)", m.group(3))]
    return kept


def prune_and_evaluate(args, data, prep, ckpt, pair, eval_dir, full_hyps, timer):
    """Prune for `pair`, translate its test set with the pruned checkpoint, compare."""
    record = eval_dir / f"pruned.{pair}.json"
    if record.exists():
        return read_json(record)
    pruned = eval_dir / f"pruned.{pair}.pt"
    prune_log = eval_dir / f"prune.{pair}.log"
    if not prune_log.exists() or not pruned.exists():
        timer.step(f"prune {pair}", lambda: run([BIN / "taskmoe-prune", ckpt, "--lang-pair", pair,
                                                 "--output", pruned, "--force"],
                                                log_path=prune_log))
    hyps, speed = timer.step(f"generate pruned {pair}", lambda: generate(
        args, data, pruned, pair, eval_dir / f"gen.pruned.{pair}.txt"))
    from fairseq_taskmoe.compat import load_checkpoint
    from fairseq_taskmoe.params import active_parameters
    from fairseq_taskmoe.pruning import count_parameters

    model = load_checkpoint(str(pruned))["model"]
    out = {**score(hyps, prep, pair),
           "identical_hypotheses": hyps == full_hyps,
           "bytes": pruned.stat().st_size,
           "params": count_parameters(model),
           "params_active_per_token": active_parameters(model, preset_flags(args)["--moe-top-k"]),
           "tokens_per_s": speed,
           "kept_experts": parse_prune_log(prune_log.read_text())}
    write_json(record, out)
    if not args.keep_pruned:
        pruned.unlink()
    return out


def heatmap(args, data, ckpt, run_name, eval_dir, timer):
    """docs/img/<run>.png and the usage JSON it is drawn from (valid split)."""
    png, usage = args.img_dir / f"{run_name}.png", eval_dir / "routing.valid.json"
    if not (png.exists() and usage.exists()):
        args.img_dir.mkdir(parents=True, exist_ok=True)
        timer.step("heatmap", lambda: run(
            [sys.executable, REPO / "scripts" / "routing_heatmap.py", ckpt, "--data", data,
             "--out", png, "--json", usage, "--title", run_name],
            log_path=eval_dir / "heatmap.log"))
    return png, read_json(usage)


def preset_flags(args):
    """The backbone and recipe flags of the run's --preset (SHARED_FLAGS for cpu)."""
    return PRESETS[args.preset]["flags"]


def average(directions, names, key):
    vals = [directions[d][key] for d in names if d in directions]
    return round(sum(vals) / len(vals), 2) if vals and len(vals) == len(names) else None


def evaluate(args, prep, run_name, variant, seed, run_dir, train_cmd):
    data = prep / "bin"
    spec = VARIANTS[variant]
    ckpt = run_dir / "checkpoints" / "checkpoint_last.pt"
    trained = read_json(run_dir / "train.done.json")
    eval_dir = run_dir / f"eval-u{trained['num_updates']}"  # never mixes two trainings
    eval_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(eval_dir / "times.json")
    prefix = f"{run_name}"
    directions, full_hyps = {}, {}
    for pair in args.directions:
        log(f"{prefix}: generate {pair}{' (zero-shot)' if pair in ZERO_SHOT else ''} ...")
        hyps, speed = timer.step(f"generate {pair}", lambda: generate(
            args, data, ckpt, pair, eval_dir / f"gen.full.{pair}.txt"))
        full_hyps[pair] = hyps
        directions[pair] = {"zero_shot": pair in ZERO_SHOT, **score(hyps, prep, pair),
                            "tokens_per_s": speed}
        log(f"{prefix}: {pair} BLEU {directions[pair]['bleu']:.2f} chrF "
            f"{directions[pair]['chrf']:.2f} off-target {directions[pair]['off_target']:.1%}")

    from fairseq_taskmoe.compat import load_checkpoint
    from fairseq_taskmoe.params import active_parameters
    from fairseq_taskmoe.pruning import count_parameters

    full_state = load_checkpoint(str(ckpt))
    full_model = full_state["model"]
    cfg = full_state.get("cfg") or {}
    model_args = (cfg.get("model") if isinstance(cfg, dict) else None) or full_state.get("args")
    total = count_parameters(full_model)
    routing = spec["routing"]
    task_routed = routing is not None and bool(set(routing) & TASK_ROUTING)
    pruned = {}
    if task_routed:
        for pair in [d for d in args.directions if d in TRAINED]:
            log(f"{prefix}: prune for {pair} and translate with the pruned checkpoint ...")
            pruned[pair] = prune_and_evaluate(args, data, prep, ckpt, pair, eval_dir,
                                              full_hyps[pair], timer)
            log(f"{prefix}: pruned {pair}: BLEU {pruned[pair]['bleu']:.2f} (full "
                f"{directions[pair]['bleu']:.2f}), identical hypotheses "
                f"{pruned[pair]['identical_hypotheses']}, {pruned[pair]['bytes']:,} bytes")
    if task_routed and "en-de" in pruned:
        active = pruned["en-de"]["params_active_per_token"]
        active_how = "parameters of the checkpoint pruned for en-de (taskmoe-prune)"
    else:
        top_k, experts = (preset_flags(args)[k] for k in ("--moe-top-k", "--moe-expert-count"))
        active = active_parameters(full_model, top_k)
        active_how = (f"total minus {experts - top_k} idle experts per MoE layer"
                      if routing else "dense: every parameter is active")

    unseen = {}
    if routing == ("lang_pair", "lang_pair"):
        default = (model_args.get(UNSEEN_OPTION) if isinstance(model_args, dict)
                   else getattr(model_args, UNSEEN_OPTION, None))
        if library_has(UNSEEN_OPTION) and default is not None:
            # the plain generations above used the checkpoint's own policy; the others by
            # --model-overrides
            by_policy = {default: {p: directions[p] for p in args.directions if p in ZERO_SHOT}}
            for policy in [p for p in UNSEEN_POLICIES if p != default]:
                by_policy[policy] = {}
                for pair in [d for d in args.directions if d in ZERO_SHOT]:
                    log(f"{prefix}: generate {pair} with {UNSEEN_OPTION}={policy} ...")
                    hyps, speed = timer.step(f"generate {policy} {pair}", lambda: generate(
                        args, data, ckpt, pair, eval_dir / f"gen.{policy}.{pair}.txt",
                        overrides={UNSEEN_OPTION: policy}))
                    by_policy[policy][pair] = {**score(hyps, prep, pair), "tokens_per_s": speed}
                    got = by_policy[policy][pair]
                    log(f"{prefix}: {pair} with {policy}: BLEU {got['bleu']:.2f} off-target "
                        f"{got['off_target']:.1%}")
            unseen = {"option": UNSEEN_OPTION, "checkpoint_default": default,
                      "override": f"--model-overrides \"{{'{UNSEEN_OPTION}': POLICY}}\"",
                      "directions": by_policy}
        else:
            note = (f"skipped: the plugin (or this checkpoint) has no model option "
                    f"{UNSEEN_OPTION}, so zero-shot pairs were routed by their own untrained row "
                    "only")
            log(f"{prefix}: {note}")
            unseen = {"skipped": note}

    sigs = []  # the same for every direction; kept once
    extra = [r for d in (unseen.get("directions") or {}).values() for r in d.values()]
    for record in [*directions.values(), *pruned.values(), *extra]:
        sig = record.pop("signatures", None)
        if sig is None:  # a dict listed twice (the default policy's zero-shot records)
            continue
        if sig not in sigs:
            sigs.append(sig)
    png, usage = (heatmap(args, data, ckpt, run_name, eval_dir, timer) if routing
                  else (None, None))
    times = timer.times
    import fairseq
    import sacrebleu
    import torch

    gen_example = on_device(generate_command(data, ckpt, "en-de", beam=BEAM,
                                             langs=",".join(LANGS), pairs=",".join(TRAINED)),
                            args.preset)
    max_tokens = preset_flags(args)["--max-tokens"]
    return {
        "run": run_name, "variant": variant, "label": spec["label"], "seed": seed,
        "routing": {"encoder": routing[0], "decoder": routing[1]} if routing else None,
        "task_routed": task_routed,
        "config": {"shared_flags": dict(preset_flags(args)),
                   "variant_flags": [str(f) for f in spec["flags"]]},
        "budget": {"max_update": args.max_update, "updates_done": trained["num_updates"],
                   "max_tokens": max_tokens,
                   "updates_x_max_tokens": trained["num_updates"] * max_tokens},
        "data": {"train_lines_per_direction": args.train_size or "all (29,000)",
                 "trained_directions": TRAINED, "zero_shot_directions": ZERO_SHOT,
                 "test_set": "Multi30k test_2016_flickr (1,000 sentences)",
                 "evaluated_directions": args.directions},
        "commands": {"study": "scripts/study.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                     "prepare": args.prepare_command,
                     "train": show(train_cmd),
                     "generate_example": show(gen_example),
                     "generate_max_len_b": args.max_len_b},
        "wall_seconds": {"training": trained["training_seconds"],
                         "evaluation": round(sum(times.values()), 1),
                         "evaluation_steps": times},
        "params": {"total": total, "active_per_token": active, "active_how": active_how},
        "checkpoint_bytes": ckpt.stat().st_size,
        "signatures": sigs[0] if len(sigs) == 1 else sigs,
        "langid": {"method": "fairseq_taskmoe.langid: stop-word and unique-letter voting",
                   "accuracy_on_test_references": args.langid_accuracy},
        "directions": directions,
        "averages": {
            "trained": {k: average(directions, TRAINED, k) for k in ("bleu", "chrf")},
            "zero_shot": {k: average(directions, ZERO_SHOT, k)
                          for k in ("bleu", "chrf", "off_target")},
        },
        "pruned": pruned,
        "unseen_pairs": unseen,
        "heatmap": str(png) if png else None,
        "routing_usage_valid": usage,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "fairseq": fairseq.__version__, "sacrebleu": sacrebleu.__version__,
                        "cpu_count": os.cpu_count(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ---------------------------------------------------------------- driver


def run_state(args, run_name):
    result = args.results / f"{run_name}.json"
    if result.exists():
        return "done", result
    run_dir = args.work / "runs" / run_name
    done = run_dir / "train.done.json"
    if done.exists():
        return f"trained ({read_json(done)['num_updates']} updates), evaluation pending", None
    log_path = run_dir / "train.log"
    if log_path.exists():
        text = log_path.read_text()
        ups = [int(u) for u in re.findall(r"num_updates=(\d+)", text)]
        saved = [int(u) for u in
                 re.findall(r"Saved checkpoint \S+ \(epoch \d+ @ (\d+) updates", text)]
        return (f"training started (last logged update {max(ups, default=0)}, last checkpoint "
                f"at update {max(saved, default=0)})"), None
    return "not started", None


def unmet_needs(variant):
    needs = VARIANTS[variant].get("needs")
    if needs and not library_has(needs):
        return f"the plugin has no option {needs} yet"
    return None


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for i, (name, _variant, _seed) in enumerate(args.selected, 1):
            print(f"{i:2d}. {name:24s} {run_state(args, name)[0]}")
        return 0
    signal.signal(signal.SIGTERM, _terminate_child)
    todo = [r for r in args.selected if not (args.results / f"{r[0]}.json").exists()]
    if not todo:  # nothing to train or evaluate: do not even look at the data
        for name, _variant, _seed in args.selected:
            log(f"{name}: {args.results / (name + '.json')} exists, skipped")
        log("every selected run is finished")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    prep = prepare_data(args)
    args.langid_accuracy = langid_accuracy(prep)
    log("language detector accuracy on the test references: " + ", ".join(
        f"{l} {v['on_target']:.1%}" for l, v in args.langid_accuracy.items()))
    failed, n = [], len(args.selected)
    for i, (name, variant, seed) in enumerate(args.selected, 1):
        prefix = f"run {i}/{n} {name}"
        state, result = run_state(args, name)
        if result is not None:
            old = read_json(result)["budget"]["max_update"]
            if old != args.max_update:
                log(f"{prefix}: {result} exists with --max-update {old}, not "
                    f"{args.max_update}; skipped (delete it to redo the run)")
            else:
                log(f"{prefix}: {result} exists, skipped")
            continue
        missing = unmet_needs(variant)
        if missing:
            log(f"{prefix}: skipped: {missing}")
            continue
        run_dir = args.work / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            train_cmd = train(args, prep / "bin", run_dir, variant, seed, prefix)
            log(f"{prefix}: evaluate ...")
            out = evaluate(args, prep, name, variant, seed, run_dir, train_cmd)
        except (RuntimeError, SystemExit) as err:
            if isinstance(err, SystemExit) and err.code in (0, None):
                raise
            log(f"{prefix}: FAILED: {err}")
            failed.append(name)
            continue
        write_json(args.results / f"{name}.json", out)
        avg = out["averages"]
        shown = {k: "- (directions subset)" if avg[k]["bleu"] is None else avg[k]["bleu"]
                 for k in avg}
        log(f"{prefix}: done: trained avg BLEU {shown['trained']}, zero-shot avg BLEU "
            f"{shown['zero_shot']}; training {hms(out['wall_seconds']['training'])}, "
            f"evaluation {hms(out['wall_seconds']['evaluation'])}; wrote "
            f"{args.results / (name + '.json')}")
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
