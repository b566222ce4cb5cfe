"""Step 7, report: the student's results JSON in the study's schema, plus where its data came
from, its speed against the pruned task-MoE, and what each path costs beyond the large MoE."""

import shlex
import sys
import time

from research.common import hms, read_json, rel, write_json
from research.distill.config import TEACHER_RUN, Stop, log


def study_pruning_seconds(args):
    """{run: {pair: seconds}} of taskmoe-prune as timed by the study's task-routed runs."""
    out = {}
    for path in sorted(args.results.glob("*.json")):
        r = read_json(path)
        steps = (r.get("wall_seconds") or {}).get("evaluation_steps") or {}
        prune = {k.split(" ", 1)[1]: v for k, v in steps.items() if k.startswith("prune ")}
        if prune:
            out[r.get("run", path.stem)] = prune
    return out


def step_report(args, decode, binarized, init, evaluation, speed):
    if evaluation is None:
        raise Stop("report: no evaluation yet; run the evaluate step")
    teacher_json = args.results / f"{TEACHER_RUN}.json"
    out = dict(evaluation)
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    out["commands"] = {**out["commands"], "study": f"-m research.distill {argv}".strip(),
                       "prepare": (f"-m research.distill (teacher: {decode['command_example']}; "
                                   "fairseq-preprocess of its hypotheses)")}
    train_s = out["wall_seconds"]["training"]
    pruning = study_pruning_seconds(args)
    measured = {speed["pair"]: speed["prune_seconds"]} if speed else {}
    out["distillation"] = {
        "teacher": {**decode["teacher"], "run": TEACHER_RUN,
                    "results": rel(teacher_json) if teacher_json.exists() else None},
        "beam": decode["beam"], "shards_per_direction": decode["shards_per_direction"],
        "student_init": init, "data": binarized,
    }
    out["speed"] = speed or {"skipped": f"task-MoE {rel(args.pruned_from)} not trained yet; "
                                        "run `python -m research.distill` again once it is"}
    total = decode["seconds"] + binarized["seconds"] + (init.get("seconds") or 0) + train_s
    out["cost"] = {
        "teacher_decode_seconds": decode["seconds"],
        "binarize_seconds": binarized["seconds"],
        "init_seconds": init.get("seconds", 0.0),
        "student_training_seconds": train_s,
        "distillation_total_seconds": round(total, 1),
        "pruning_seconds_measured_here": measured,
        "pruning_seconds_from_study_runs": pruning,
        "teacher_training_seconds": decode["teacher"]["training_seconds"],
        "note": "both paths first train a large MoE (the teacher, or the task-MoE); beyond that "
                "distillation costs teacher decoding + student training, task-MoE costs one "
                "taskmoe-prune per direction. Seconds of completed work (a chunk or training "
                "interrupted by a kill is redone and counted once).",
    }
    out["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.run_name}.json"
    write_json(path, out)
    avg = out["averages"]
    line = f"report: wrote {rel(path)}: trained avg BLEU {avg['trained']['bleu']}"
    if teacher_json.exists() and avg["trained"]["bleu"] is not None:
        dense = [read_json(p)["averages"]["trained"]["bleu"]
                 for p in sorted(args.results.glob("dense-s*.json"))]
        tt = read_json(teacher_json)["averages"]["trained"]["bleu"]
        dense = [d for d in dense if d is not None]
        if dense and tt is not None and tt != sum(dense) / len(dense):
            d = sum(dense) / len(dense)
            line += f", {(avg['trained']['bleu'] - d) / (tt - d):.0%} of token / token's gain"
    log(line + f"; cost: teacher decoding {hms(decode['seconds'])} + student training "
        f"{hms(train_s)}" + (f" vs pruning {measured[speed['pair']]:.1f}s for {speed['pair']}"
                             if measured else ""))
    return out
