"""The recipe's runs and steps, its command line, its log and the error that stops a step."""

import argparse
from pathlib import Path

import research.distill
from research.common import REPO, logger
from research.study import grid, runner
from research.study.grid import TRAINED

TEACHER_RUN = "token_token-s1"
PRUNED_RUN = "target_target-s1"
STEPS = ["teacher", "binarize", "init", "train", "evaluate", "speed", "report"]

log = logger("distill")


class Stop(RuntimeError):
    """A step cannot run (missing input); the message says what to do."""


def parse_args(argv=None):
    defaults = runner.parse_args([])
    doc = research.distill.__doc__
    p = argparse.ArgumentParser(prog="python -m research.distill",
                                description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study-work", default=str(REPO / "work" / "study"),
                   help="the study's work folder: its data and runs (default: work/study)")
    p.add_argument("--teacher", default=None,
                   help=f"teacher checkpoint (default: <study-work>/runs/{TEACHER_RUN}/"
                        "checkpoints/checkpoint_last.pt)")
    p.add_argument("--work", default=str(REPO / "work" / "distill"),
                   help="translations, distilled data, student runs (default: work/distill)")
    p.add_argument("--results", default=str(REPO / "results" / "study"),
                   help="where the student's results JSON goes (default: results/study)")
    p.add_argument("--beam", type=int, default=grid.BEAM,
                   help="teacher beam size (default: %(default)s)")
    p.add_argument("--shards", type=int, default=4,
                   help="chunks per direction of the teacher's decoding; a kill loses at most "
                        "one chunk (default: %(default)s, ~7,250 sentences each)")
    p.add_argument("--init", choices=["teacher", "random"], default="teacher",
                   help="student initialisation: the teacher's non-expert weights and, per MoE "
                        "layer, its two most used experts merged (default), or fairseq's random "
                        "init. Run names: distilled-s<seed> / distilled_random-s<seed>")
    p.add_argument("--seed", type=int, default=1, help="student seed (default: %(default)s)")
    p.add_argument("--max-update", type=int, default=defaults.max_update,
                   help="student budget, as the study's (default: %(default)s)")
    p.add_argument("--save-interval", type=int, default=defaults.save_interval,
                   help="save checkpoint_last.pt every N updates (default: %(default)s)")
    p.add_argument("--only-steps", default=None,
                   help=f"comma-separated subset of {','.join(STEPS)} (default: all)")
    p.add_argument("--pruned-from", default=None,
                   help=f"task-MoE whose pruned sub-network the speed step times (default: "
                        f"<study-work>/runs/{PRUNED_RUN}/checkpoints/checkpoint_last.pt)")
    p.add_argument("--speed-pair", default="en-de",
                   help="direction of the speed comparison (default: %(default)s)")
    p.add_argument("--speed-rounds", type=int, default=2,
                   help="student/pruned generations alternated this many times; the median "
                        "is reported (default: %(default)s)")
    p.add_argument("--train-size", type=int, default=None,
                   help="as research.study: training lines per direction (smoke tests only)")
    p.add_argument("--directions", default=",".join(grid.DIRECTIONS),
                   help="directions to evaluate (default: all 12; fewer only for smoke tests)")
    p.add_argument("--max-len-b", type=int, default=None,
                   help="cap on generated length, teacher and evaluation alike (smoke tests "
                        "only)")
    p.add_argument("--multi30k-dir", default=None, help="raw Multi30k, as research.study")
    args = p.parse_args(argv)
    args.study_work, args.work = Path(args.study_work).resolve(), Path(args.work).resolve()
    args.results = Path(args.results).resolve()
    runs = args.study_work / "runs"
    args.teacher = Path(args.teacher or runs / TEACHER_RUN / "checkpoints" /
                        "checkpoint_last.pt").resolve()
    args.pruned_from = Path(args.pruned_from or runs / PRUNED_RUN / "checkpoints" /
                            "checkpoint_last.pt").resolve()
    args.directions = [d for d in args.directions.split(",") if d]
    bad = [d for d in args.directions if d not in grid.DIRECTIONS]
    if bad:
        p.error(f"unknown direction(s) {bad}; choose from {','.join(grid.DIRECTIONS)}")
    if args.speed_pair not in TRAINED:
        p.error(f"--speed-pair must be a trained direction ({','.join(TRAINED)})")
    args.steps = STEPS if not args.only_steps else [s for s in args.only_steps.split(",") if s]
    bad = [s for s in args.steps if s not in STEPS]
    if bad:
        p.error(f"unknown step(s) {bad}; choose from {','.join(STEPS)}")
    if args.shards < 1 or args.beam < 1 or args.speed_rounds < 1:
        p.error("--shards, --beam and --speed-rounds must be at least 1")
    args.variant = "distilled" if args.init == "teacher" else "distilled_random"
    args.run_name = f"{args.variant}-s{args.seed}"
    args.keep_pruned = False
    args.preset = "cpu"  # the study's scale (grid.PRESETS); distillation runs at that one only
    args.img_dir = args.work / "img"  # unused: the student has no routing
    return args
