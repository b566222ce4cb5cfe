"""The study's command line and driver: which runs, where their files go, and each run trained,
evaluated and written as results/<preset folder>/<run>.json, skipping what is done."""

import argparse
import logging
import re
import signal
import sys
import warnings
from pathlib import Path

import research.study
from fairseq_taskmoe.langid import language_shares
from research.common import REPO, hms, logger, read_json, run, show, write_json
from research.study.corpus import (CORPORA, LOHELP_DIR, MULTI30K, TEST_CAP, build_capped_test,
                                   lohelp_corpus)
from research.study.evaluation import evaluate
from research.study.grid import (CORPUS_PRESET, DIRECTIONS, LANGS, PRESET_CORPUS, PRESETS, runs,
                                 unmet_needs)
from research.study.training import _terminate_child, train

warnings.filterwarnings("ignore", category=FutureWarning)  # fairscale vs current torch
logging.getLogger("fairseq").setLevel(logging.WARNING)  # when this process imports fairseq
log = logger("study")
GROUP_NAMES = {"trained": "trained", "zero_shot": "zero-shot", "en_x": "en->X", "x_en": "X->en"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.study",
                                description=research.study.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=CORPORA, default="multi30k",
                   help="multi30k (default: en<->{de,fr,cs} and six zero-shot directions, what "
                        "results/study holds) or lohelp (work/lohelp, scripts/prepare_lohelp.py: "
                        "the en<->X directions of its languages, test sets capped by "
                        "--test-cap; preset lohelp, folders study-lohelp)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="scale: cpu (the default for multi30k; d=256 3+3 layers, 8 experts, "
                        "1,000 updates of 4,096 tokens, what results/study holds) or gpu (d=512 "
                        "6+6 layers, 32 experts, 30,000 updates of 16,384 tokens, --amp; folders "
                        "study-gpu; not run on a GPU yet); lohelp (the default and only preset "
                        "for --corpus lohelp)")
    p.add_argument("--work", default=None,
                   help="checkpoints, logs and generations (default: work/study, "
                        "work/study-gpu for --preset gpu, work/study-lohelp for lohelp)")
    p.add_argument("--results", default=None,
                   help="one JSON per finished run (default: results/study, results/study-gpu, "
                        "results/study-lohelp)")
    p.add_argument("--img-dir", default=None,
                   help="routing heatmaps <run>.png (default: docs/img, docs/img/study-gpu, "
                        "docs/img/study-lohelp)")
    p.add_argument("--only", default=None,
                   help="comma-separated variants (all their seeds) or runs, e.g. "
                        "dense,token_target-s2")
    p.add_argument("--list", action="store_true", help="list the runs and their state, then exit")
    p.add_argument("--max-update", type=int, default=None,
                   help="training budget in updates of at most --max-tokens tokens (default: "
                        f"the preset's: 1000 for cpu, 30000 for gpu, "
                        f"{PRESETS['lohelp']['max_update']} for lohelp)")
    p.add_argument("--save-interval", type=int, default=200,
                   help="save checkpoint_last.pt every N updates (default: %(default)s; a kill "
                        "loses at most that much training)")
    p.add_argument("--train-size", type=int, default=None,
                   help="training lines per direction (default: all 29,000; smaller values are "
                        "for smoke tests and go to their own data folder)")
    p.add_argument("--directions", default=None,
                   help="directions to evaluate (default: all of the corpus's: 12 for "
                        "multi30k, 28 for lohelp; fewer only for smoke tests)")
    p.add_argument("--test-cap", type=int, default=TEST_CAP,
                   help="lohelp: test paragraphs translated per direction, a seeded sample of "
                        "each pair's test set (default: %(default)s; 0: all). Multi30k's test "
                        "set is always whole")
    p.add_argument("--lohelp-dir", default=str(LOHELP_DIR),
                   help="lohelp: the corpus folder of scripts/prepare_lohelp.py, prepared "
                        "there when it has no bin/.done (default: work/lohelp, as make lohelp)")
    p.add_argument("--max-len-b", type=int, default=None,
                   help="cap on generated length (fairseq-generate --max-len-b; default: "
                        "fairseq's 200). Only for smoke tests of barely trained models")
    p.add_argument("--keep-pruned", action="store_true",
                   help="keep pruned checkpoints (default: delete each after its evaluation; "
                        "its size and parameter count are recorded)")
    p.add_argument("--multi30k-dir", default=None,
                   help="raw Multi30k (default: $MULTI30K_DIR, else ../shared/data/multi30k)")
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = CORPUS_PRESET[args.corpus]
    if PRESET_CORPUS[args.preset] != args.corpus:
        p.error(f"--preset {args.preset} is for --corpus {PRESET_CORPUS[args.preset]}, not "
                f"{args.corpus}")
    if args.corpus == "lohelp":
        if args.train_size is not None or args.multi30k_dir:
            p.error("--train-size and --multi30k-dir are for --corpus multi30k")
        args.lohelp_dir = Path(args.lohelp_dir).resolve()
        args.corpus_spec = lohelp_corpus(args.lohelp_dir, args.test_cap)
    else:
        args.corpus_spec = MULTI30K
    preset = PRESETS[args.preset]
    folder = preset["folder"]
    args.work = Path(args.work or REPO / "work" / folder).resolve()
    args.results = Path(args.results or REPO / "results" / folder).resolve()
    args.img_dir = Path(args.img_dir or (REPO / "docs" / "img" if args.preset == "cpu" else
                                         REPO / "docs" / "img" / folder)).resolve()
    if args.max_update is None:
        args.max_update = preset["max_update"]
    directions = args.corpus_spec.directions
    args.directions = ([d for d in args.directions.split(",") if d] if args.directions
                       is not None else list(directions))
    bad = [d for d in args.directions if d not in directions]
    if bad:
        p.error(f"unknown direction(s) {bad}; choose from {','.join(directions)}")
    args.selected = select_runs(p, args.only, args.corpus)
    return args


def select_runs(parser, only, corpus="multi30k"):
    all_runs = runs(corpus)
    if not only:
        return all_runs
    wanted = [w for w in only.split(",") if w]
    names, variants = {r[0] for r in all_runs}, {r[1] for r in all_runs}
    unknown = [w for w in wanted if w not in variants and w not in names]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; see --list")
    return [r for r in all_runs if r[0] in wanted or r[1] in wanted]


def prepare_data(args) -> Path:
    """The evaluation's data folder (bin/ and text/); args.train_data is the training data.
    LoHelp: prepare_lohelp (below). Multi30k for all 12 directions: training reads only the six
    trained pairs (--lang-pairs), the zero-shot pairs' binaries are copies of the per-language
    files (prepare_multi30k's donors), so fairseq-generate finds a test split for every
    direction."""
    if args.corpus == "lohelp":
        return prepare_lohelp(args)
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
    args.train_data = out / "bin"
    return out


def prepare_lohelp(args) -> Path:
    """LoHelp: scripts/prepare_lohelp.py when --lohelp-dir has no bin/.done (its own resumable
    steps), its languages and directions re-read, then the test sets capped at --test-cap per
    direction (research.study.corpus.build_capped_test) in <work>/lohelp-test<cap>: the
    evaluation's folder. Training reads <lohelp-dir>/bin itself."""
    cmd = [sys.executable, REPO / "scripts" / "prepare_lohelp.py", "--work-dir", args.lohelp_dir]
    if args.lohelp_dir != LOHELP_DIR.resolve():  # keep results/lohelp the default corpus's
        cmd += ["--results-dir", args.lohelp_dir / "results"]
    if not (args.lohelp_dir / "bin" / ".done").exists():
        log(f"prepare LoHelp into {args.lohelp_dir} (about 20 minutes) ...")
        run(cmd)
    args.prepare_command = show(cmd)
    spec = lohelp_corpus(args.lohelp_dir, args.test_cap)  # as built (bin/langs.txt, pairs.txt)
    if spec.directions != args.corpus_spec.directions or spec.langs != args.corpus_spec.langs:
        raise SystemExit(f"{args.lohelp_dir}/bin has other languages or directions than "
                         "expected: run again")
    args.corpus_spec = spec
    args.train_data = args.lohelp_dir / "bin"
    stats = args.lohelp_dir / "stats.json"
    if stats.exists():
        args.train_lines = {f"en-{l}": v["train"] for l, v in read_json(stats)["langs"].items()}
    out = args.work / (f"lohelp-test{args.test_cap}" if args.test_cap else "lohelp-test")
    if not (out / "bin" / ".done").exists():
        log(f"test sets capped at {args.test_cap or 'all'} paragraphs per direction into "
            f"{out} ...")
    args.test_sentences = build_capped_test(args.train_data, args.lohelp_dir / "text", out,
                                            spec.trained, args.test_cap)
    return out


def langid_accuracy(prep: Path, corpus=MULTI30K):
    """Shares the corpus's detector gives the test references of each language (its own error,
    next to off-target): {lang: {on_target, off_target, undetected}}, over every evaluated
    direction's references into that language."""
    files = {}  # lang -> its reference files (Multi30k: one, shared by the directions into it)
    for pair in corpus.trained:
        files.setdefault(pair.split("-")[1], set()).add(corpus.reference(prep, pair))
    out = {}
    for lang in corpus.langs:
        lines = [s for f in sorted(files.get(lang, ())) for s in f.read_text().splitlines()]
        shares = language_shares(lines, lang, corpus.detector)
        out[lang] = {k: round(v, 4) for k, v in shares.items()}
    return out


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
    args.langid_accuracy = langid_accuracy(prep, args.corpus_spec)
    log(f"language detector ({args.corpus_spec.detector.method}) accuracy on the test "
        "references: " + ", ".join(f"{l} {v['on_target']:.1%}"
                                   for l, v in args.langid_accuracy.items()))
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
            train_cmd = train(args, args.train_data, run_dir, variant, seed, prefix)
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
        groups = ("trained", "zero_shot") if args.corpus == "multi30k" else \
            ("trained", "en_x", "x_en")
        log(f"{prefix}: done: " + ", ".join(f"{GROUP_NAMES[g]} avg BLEU {shown[g]}"
                                            for g in groups)
            + f"; training {hms(out['wall_seconds']['training'])}, "
            f"evaluation {hms(out['wall_seconds']['evaluation'])}; wrote "
            f"{args.results / (name + '.json')}")
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0
