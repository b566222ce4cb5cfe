"""The recipe's driver: the study's data, then each step of --only-steps in order, each skipped
when its output exists; a Stop (missing input) ends the run with what to do next."""

import signal
from pathlib import Path
from types import SimpleNamespace

from research.common import read_json
from research.distill.binarize import step_binarize
from research.distill.config import Stop, log, parse_args
from research.distill.report import step_report
from research.distill.speed import step_speed
from research.distill.student import register_variant, step_evaluate, step_init, step_train
from research.distill.teacher import step_teacher
from research.study import runner, training


def study_data(args) -> Path:
    """The study's data folder (the teacher's training data), prepared if it is not there."""
    ns = SimpleNamespace(work=args.study_work, train_size=args.train_size,
                         multi30k_dir=args.multi30k_dir)
    prep = runner.prepare_data(ns)
    args.prepare_command = ns.prepare_command
    return prep


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, training._terminate_child)
    register_variant(args)
    try:
        prep = study_data(args)
        wanted = set(args.steps)
        decode = step_teacher(args, prep) if "teacher" in wanted else None
        binarized = step_binarize(args, prep) if "binarize" in wanted else None
        init = step_init(args, prep) if "init" in wanted else None
        train_cmd = step_train(args) if "train" in wanted else None
        evaluation = step_evaluate(args, prep, train_cmd) if "evaluate" in wanted else None
        speed = None
        if "speed" in wanted:
            try:
                speed = step_speed(args, prep)
            except Stop as err:
                if set(args.steps) == {"speed"}:
                    raise
                log(f"{err}")  # the report is written without it; a later run adds it
        if "report" in wanted:
            decode = decode or read_json(args.work / "teacher" / "decode.json")
            binarized = binarized or read_json(args.work / "data" / "binarize.json")
            if init is None:
                init = (read_json(args.work / "init" / "student_init.json")
                        if args.init == "teacher" else {"init": "random"})
            run_dir = args.work / "runs" / args.run_name
            if evaluation is None and (run_dir / "evaluation.json").exists():
                evaluation = read_json(run_dir / "evaluation.json")
            speed_path = args.work / "speed" / f"speed.{args.run_name}.json"
            if speed is None and speed_path.exists():
                speed = read_json(speed_path)
            step_report(args, decode, binarized, init, evaluation, speed)
    except Stop as err:
        log(f"stopped: {err}")
        return 2
    except FileNotFoundError as err:
        log(f"stopped: {err} (run the earlier steps first)")
        return 2
    return 0
