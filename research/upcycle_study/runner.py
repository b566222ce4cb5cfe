"""The upcycling study's command line and driver: the data, then each row's stages in order
(stages.py: upcycle, step-0 check, training, curve points, final evaluation), each skipped when
its result file exists."""

import argparse
import logging
import signal
import warnings
from pathlib import Path
from types import SimpleNamespace

import research.upcycle_study
from research.common import REPO, logger, read_json, rel
from research.study import runner as study_runner
from research.study import training
from research.study.corpus import MULTI30K, Corpus, read_langs_pairs
from research.study.grid import PRESET_CORPUS, PRESETS
from research.upcycle_study import evaluation
from research.upcycle_study.folders import dense_train_dir, files_dir, result_path, train_dir
from research.upcycle_study.plan import CURVE_EVERY, DEFAULT_CONTINUATION, DENSE, select
from research.upcycle_study.stages import (stage_curve, stage_final, stage_step0, stage_train,
                                           stage_upcycle)

warnings.filterwarnings("ignore", category=FutureWarning)  # fairscale vs current torch
logging.getLogger("fairseq").setLevel(logging.WARNING)
log = logger("upcycle")


def parse_args(argv=None):
    doc = research.upcycle_study.__doc__
    p = argparse.ArgumentParser(prog="python -m research.upcycle_study",
                                description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upcycle-updates", type=int, default=DEFAULT_CONTINUATION, metavar="M",
                   help="updates of every continued row (upcycled, dense continued); the "
                        "scratch run trains the dense run's updates plus M (default: "
                        "%(default)s)")
    p.add_argument("--only", default=None,
                   help="comma-separated rows, kinds (upcycled, continued, scratch) or variants "
                        "(target_target, token_token); the dense row always runs first. See "
                        "--list")
    p.add_argument("--list", action="store_true", help="list the rows and their state, then exit")
    p.add_argument("--preset", default="cpu",
                   choices=sorted(n for n, c in PRESET_CORPUS.items() if c == "multi30k"),
                   help="the study's scale (research.study.grid.PRESETS; default: %(default)s, "
                        "what results/study holds)")
    p.add_argument("--dense-updates", type=int, default=None,
                   help="the dense pre-training's updates (default: the preset's budget, 1000 "
                        "for cpu; fewer only for smoke tests)")
    p.add_argument("--study-work", default=str(REPO / "work" / "study"),
                   help="the study's work folder: its Multi30k data and its dense-s1 run, "
                        "reused when trained with CPU seconds recorded (default: work/study)")
    p.add_argument("--work", default=str(REPO / "work" / "upcycle"),
                   help="checkpoints, logs, generations (default: work/upcycle; runs that "
                        "depend on M under m<M>/)")
    p.add_argument("--results", default=str(REPO / "results" / "upcycle"),
                   help="the result files (default: results/upcycle)")
    p.add_argument("--curve-every", type=int, default=CURVE_EVERY,
                   help="checkpoint saved (and evaluated for the curves) every N updates "
                        "(default: %(default)s)")
    p.add_argument("--curve-cap", type=int, default=evaluation.CURVE_CAP,
                   help="test sentences per direction for the curves' points, a seeded sample "
                        "(default: %(default)s; 0: all). Final rows use the whole test set")
    p.add_argument("--directions", default=None,
                   help="directions to evaluate (default: the trained ones, six for Multi30k; "
                        "fewer only for smoke tests)")
    p.add_argument("--prepared", default=None,
                   help="a prepared data folder (bin/, text/test.LANG) to use instead of the "
                        "study's Multi30k; languages and pairs read from bin/ (smoke tests)")
    p.add_argument("--train-size", type=int, default=None,
                   help="as research.study: training lines per direction (smoke tests only)")
    p.add_argument("--multi30k-dir", default=None, help="raw Multi30k, as research.study")
    p.add_argument("--max-len-b", type=int, default=None,
                   help="cap on generated length (smoke tests of barely trained models)")
    args = p.parse_args(argv)
    try:
        args.rows = select(args.only)
    except ValueError as err:
        p.error(str(err))
    if args.upcycle_updates < 1 or args.curve_every < 1:
        p.error("--upcycle-updates and --curve-every must be at least 1")
    args.dense_updates = args.dense_updates or PRESETS[args.preset]["max_update"]
    for name in ("study_work", "work", "results"):
        setattr(args, name, Path(getattr(args, name)).resolve())
    args.m_work = args.work / f"m{args.upcycle_updates}"
    if args.prepared:
        args.prepared = Path(args.prepared).resolve()
        langs, pairs = read_langs_pairs(args.prepared / "bin")
        args.corpus_spec = Corpus("multi30k", langs, pairs, [], f"{args.prepared} test set")
    else:
        args.corpus_spec = MULTI30K
    trained = args.corpus_spec.trained
    args.directions = ([d for d in args.directions.split(",") if d] if args.directions
                       else list(trained))
    bad = [d for d in args.directions if d not in trained]
    if bad:
        p.error(f"unknown or untrained direction(s) {bad}; choose from {','.join(trained)}")
    # what research.study.evaluation reads
    args.keep_pruned, args.langid_accuracy = False, None
    return args


def prepare(args) -> Path:
    """The evaluation's data folder (bin/, text/) and args.train_data; the curves' sample."""
    if args.prepared:
        prep = args.prepared
        args.prepare_command = f"(prepared folder {rel(prep)})"
        args.train_data = prep / "bin"
    else:
        ns = SimpleNamespace(corpus="multi30k", work=args.study_work, train_size=args.train_size,
                             multi30k_dir=args.multi30k_dir)
        prep = study_runner.prepare_data(ns)
        args.prepare_command, args.train_data = ns.prepare_command, ns.train_data
    args.sample = args.work / (f"test-sample{args.curve_cap}" + (
        f"-n{args.train_size}" if args.train_size else "") + ("-prepared" if args.prepared
                                                               else ""))
    args.sample_sentences = evaluation.build_sample(prep, args.sample, args.corpus_spec.langs,
                                                    args.corpus_spec.trained, args.curve_cap)
    return prep


def run_row(args, prep, row, dense: dict, i: int, n: int):
    """Every stage of one row; dense: the dense row's outcome (checkpoint, compute, curve)."""
    prefix = f"row {i}/{n} {row.name}"
    upcycle, init = None, None
    if row.from_dense:
        init = dense["checkpoint"]
        if row.kind == "upcycled":
            upcycle = stage_upcycle(args, row, init, prefix)
            stage_step0(args, prep, row, upcycle, prefix)
            init = files_dir(args, row) / "upcycled.pt"
    offset = ({"dense": dense["compute"],
               "upcycle": ({k: upcycle[k] for k in ("cpu_seconds", "wall_seconds")}
                           if upcycle else None)} if row.from_dense else None)
    cmd, done = stage_train(args, row, prefix, init)
    start = None
    if row.kind == "continued":  # update 0 is the dense checkpoint itself
        last = dense["curve"]["points"][-1]
        start = {**last, "from": f"{DENSE.name} at update {last['update']}"}
    curve = stage_curve(args, row, offset, prefix, start)
    final = stage_final(args, prep, row, cmd, done, offset, upcycle, init, prefix)
    return {"checkpoint": train_dir(args, row) / "checkpoints" / "checkpoint_last.pt",
            "compute": final["compute"]["own"], "curve": curve}


def row_state(args, row) -> str:
    if result_path(args, row).exists():
        r = read_json(result_path(args, row))
        return f"done: avg BLEU {r['averages']['bleu']}, total CPU s " \
               f"{r['compute']['total']['cpu_seconds']}"
    run_dir = train_dir(args, row)
    if (run_dir / "train.done.json").exists():
        return "trained; curve or final evaluation pending"
    ledger = run_dir / "compute.json"
    if ledger.exists():
        saved = sorted(int(u) for u in read_json(ledger)["checkpoints"])
        return f"training (last checkpoint at update {saved[-1] if saved else 0})"
    if result_path(args, row, "upcycle").exists():
        return "upcycled; training not started"
    return "not started"


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        print(f"dense run: {dense_train_dir(args)[1]}; M = {args.upcycle_updates}")
        for i, row in enumerate(args.rows, 1):
            print(f"{i}. {row.name:28s} {row_state(args, row)}")
        return 0
    signal.signal(signal.SIGTERM, training._terminate_child)
    args.results.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    prep = prepare(args)
    log(f"dense run: {dense_train_dir(args)[1]}; M = {args.upcycle_updates} updates; curves on "
        f"{args.sample_sentences} sentences per direction every {args.curve_every} updates")
    failed, n = [], len(args.rows)
    dense = None
    for i, row in enumerate(args.rows, 1):
        try:
            outcome = run_row(args, prep, row, dense, i, n)
        except (RuntimeError, SystemExit) as err:
            if isinstance(err, SystemExit) and err.code in (0, None):
                raise
            log(f"row {i}/{n} {row.name}: FAILED: {err}")
            failed.append(row.name)
            if row is DENSE:
                log("every other row starts from, or is measured against, the dense row: stop")
                break
            continue
        if row is DENSE:
            dense = outcome
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    log("every selected row is finished; the page: python -m research.upcycle_study.report")
    return 0
