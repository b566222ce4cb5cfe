"""The stages of one row of the upcycling study, each writing its result file atomically and
skipped when it exists: taskmoe-upcycle, the step-0 check, training (research.study.training's
resumable fairseq-train with its compute ledger), the curve points, the final evaluation."""

import hashlib
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

from research.common import logger, read_json, rel, run, show, write_json
from research.study import training
from research.study.grid import PRESETS
from research.upcycle_study import evaluation
from research.upcycle_study.folders import (checked, dense_eval_dir, dense_train_dir, files_dir,
                                            result_path, stamp, train_dir)
from research.upcycle_study.plan import (DENSE, ROWS, continuation_schedule, row_compute,
                                         row_updates, training_command, upcycle_command)

log = logger("upcycle")


def measured_run(cmd, log_path: Path):
    """research.common.run with the child's CPU seconds (getrusage of reaped children) and wall
    seconds."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    run(cmd, log_path=log_path)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"cpu_seconds": round(cpu, 1), "wall_seconds": round(time.time() - start, 1)}


def model_digest(path: Path) -> str:
    """sha256 of a checkpoint's model tensors (names, shapes, bytes): equal for equal weights."""
    import torch

    from fairseq_taskmoe.integration.compat import load_checkpoint

    h = hashlib.sha256()
    for key, value in sorted(load_checkpoint(str(path))["model"].items()):
        if isinstance(value, torch.Tensor):
            h.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
            h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stage_upcycle(args, row, dense_ckpt: Path, prefix: str):
    """taskmoe-upcycle of the dense checkpoint: files/upcycled.pt and upcycle-<row>.json."""
    path = result_path(args, row, "upcycle")
    out = files_dir(args, row) / "upcycled.pt"
    record = checked(args, row, path)
    if record is not None and out.exists():
        return record
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = upcycle_command(row, dense_ckpt, out, args.preset) + ["--force"]
    log(f"{prefix}: taskmoe-upcycle {rel(dense_ckpt)} -> {rel(out)} ...")
    spent = measured_run(cmd, files_dir(args, row) / "upcycle.log")
    report = (files_dir(args, row) / "upcycle.log").read_text()
    record = {"run": row.name, **stamp(args, row), "command": show(cmd),
              **spent, "exact": "step 0: exact" in report,
              "report": [line for line in report.splitlines()
                         if not line.startswith(("continue", "INFO:"))],
              "model_digest": model_digest(out)}
    write_json(path, record)
    log(f"{prefix}: upcycled in {spent['cpu_seconds']} CPU s; step 0 "
        f"{'exact' if record['exact'] else 'NOT exact (perturbed)'}")
    return record


def stage_step0(args, prep: Path, row, upcycle: dict, prefix: str):
    """An upcycled task-MoE at step 0, on the whole test set: the model and each direction's
    pruned sub-network against the dense model's hypotheses. A row whose upcycled tensors equal
    an earlier row's (target routing is seed-independent) reuses that row's check."""
    path = result_path(args, row, "step0")
    record = checked(args, row, path)
    if record is not None or not row.task_routed:
        return record
    for other in ROWS:
        if other is row:
            break
        done, up = (result_path(args, other, s) for s in ("step0", "upcycle"))
        if done.exists() and up.exists() and \
                read_json(up).get("model_digest") == upcycle["model_digest"]:
            record = dict(read_json(done), run=row.name, same_as=other.name)
            write_json(path, record)
            log(f"{prefix}: step 0: the same tensors as {other.name}'s upcycled checkpoint: its "
                f"check holds")
            return record
    log(f"{prefix}: step 0: upcycled and pruned vs dense hypotheses, whole test set ...")
    check = evaluation.step0_check(args, prep, files_dir(args, row) / "upcycled.pt",
                                   dense_eval_dir(args), files_dir(args, row) / "eval-step0")
    record = {"run": row.name, **stamp(args, row), **check}
    write_json(path, record)
    log(f"{prefix}: step 0: " + ("every direction identical to dense, full and pruned"
                                 if check["all_identical"] else "NOT identical: see "
                                 f"{rel(path)}"))
    return record


def curve_linker(args, row, last_update: int):
    """on_save for training: each checkpoint saved at a multiple of --curve-every (but the last,
    which stays as checkpoint_last.pt) kept under files/curve/ for the curves' points. An
    interval checkpoint is hard-linked (no copy; fairseq writes it by rename and later deletes
    its own name). At an epoch's end fairseq saves only checkpoint_last.pt, which it later
    overwrites in place (a copy onto it): that one is copied."""
    curve = files_dir(args, row) / "curve"

    def keep(update, path):
        if update == last_update or update % args.curve_every or \
                not path.name.startswith("checkpoint_"):
            return
        curve.mkdir(parents=True, exist_ok=True)
        tmp, dest = curve / f".u{update}.pt", curve / f"u{update}.pt"
        if tmp.exists():
            tmp.unlink()
        if path.name == "checkpoint_last.pt":
            shutil.copyfile(path, tmp)
        else:
            os.link(path, tmp)
        os.replace(tmp, dest)
    return keep


def stage_train(args, row, prefix: str, init: Path = None):
    run_dir = train_dir(args, row)
    run_dir.mkdir(parents=True, exist_ok=True)
    updates = row_updates(row, args.dense_updates, args.upcycle_updates)
    cmd = training_command(row, args.train_data, run_dir / "checkpoints", args.dense_updates,
                           args.upcycle_updates, args.preset, args.corpus_spec.langs,
                           args.corpus_spec.trained, args.curve_every, init)
    done = training.fairseq_train(cmd, run_dir, updates, prefix,
                                  on_save=curve_linker(args, row, updates))
    return cmd, done


def own_compute(args, row, update: int):
    """{"updates", "cpu_seconds", "wall_seconds"} the row's own training spent to `update`."""
    ledger = training.ComputeLedger(train_dir(args, row) / "compute.json")
    spent = ledger.at(update) or {"cpu_seconds": None, "wall_seconds": None}
    return {"updates": update, **spent}


def stage_curve(args, row, offset: dict, prefix: str, start: dict = None):
    """BLEU on the curves' sample at every kept checkpoint of the row (files/curve/u<N>.pt,
    deleted once its point is written) and its last, each point with the row's own compute and
    its total (offset: the dense pre-training and the upcycling, for rows that start from them).
    start: the update-0 point (the dense model's last point for the continued rows); an
    upcycled row's is measured on upcycled.pt."""
    path = result_path(args, row, "curve")
    record = checked(args, row, path) or {
        "run": row.name, "kind": row.kind, "seed": row.seed, **stamp(args, row),
        "cap": args.curve_cap, "sentences": args.sample_sentences,
        "directions": args.directions, "offset": offset, "points": []}
    done = {p["update"] for p in record["points"]}
    files = files_dir(args, row)
    last = row_updates(row, args.dense_updates, args.upcycle_updates)
    todo = {int(p.stem[1:]): p for p in (files / "curve").glob("u*.pt")}
    todo[last] = train_dir(args, row) / "checkpoints" / "checkpoint_last.pt"
    if row.from_dense:
        todo[0] = files / "upcycled.pt" if row.kind == "upcycled" else None
    for update in sorted(todo):
        if update in done:
            continue
        if update == 0 and start is not None:
            bleu = {k: start[k] for k in ("bleu", "avg_bleu")}
            bleu["same_checkpoint_as"] = start["from"]
        else:
            log(f"{prefix}: curve point at update {update} ({args.sample_sentences} sentences "
                f"per direction) ...")
            bleu = evaluation.curve_bleu(args, args.sample, todo[update], files / "curve-gen",
                                         f"u{update}")
        own = own_compute(args, row, update)
        record["points"].append({"update": update, "own": own,
                                 "total": row_compute(row, own, *offset_parts(offset))["total"],
                                 **bleu})
        record["points"].sort(key=lambda p: p["update"])
        write_json(path, record)
        log(f"{prefix}: update {update}: sample BLEU {bleu['avg_bleu']}")
        if todo[update] is not None and todo[update].parent.name == "curve":
            todo[update].unlink()
    return record


def offset_parts(offset):
    return (offset or {}).get("dense"), (offset or {}).get("upcycle")


def environment():
    import fairseq
    import sacrebleu
    import torch

    info = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                if line.startswith("model name")), None) if info.exists() else platform.processor()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "fairseq": fairseq.__version__, "sacrebleu": sacrebleu.__version__, "cpu": cpu,
            "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def stage_final(args, prep, row, cmd, done: dict, offset: dict, upcycle, init, prefix):
    path = result_path(args, row)
    record = checked(args, row, path)
    if record is not None:
        return record
    updates = row_updates(row, args.dense_updates, args.upcycle_updates)
    log(f"{prefix}: evaluate on the whole test set ({len(args.directions)} directions"
        + (", each pruned and compared" if row.task_routed else "") + ") ...")
    ckpt = train_dir(args, row) / "checkpoints" / "checkpoint_last.pt"
    scores = evaluation.evaluate_final(args, prep, ckpt, files_dir(args, row) / f"eval-u{updates}",
                                       row.task_routed)
    own = own_compute(args, row, done["num_updates"])
    flags = PRESETS[args.preset]["flags"]
    schedule = (continuation_schedule(args.preset, args.dense_updates, args.upcycle_updates)
                if row.from_dense else {k: flags[k] for k in ("--lr-scheduler", "--lr",
                                                               "--warmup-updates")})
    sittings = read_json(train_dir(args, row) / "compute.json")["sittings"] \
        if (train_dir(args, row) / "compute.json").exists() else []
    record = {
        "run": row.name, "kind": row.kind, "variant": row.variant, "label": row.label,
        "seed": row.seed, **stamp(args, row), "task_routed": row.task_routed,
        "start": ("the dense checkpoint at update "
                  f"{args.dense_updates} ({'upcycled' if row.kind == 'upcycled' else 'as is'})"
                  if row.from_dense else "random initialisation"),
        "init_checkpoint": rel(init) if init else None,
        "run_dir": (dense_train_dir(args)[1] if row is DENSE else rel(train_dir(args, row))),
        "commands": {"study": "-m research.upcycle_study " + " ".join(sys.argv[1:]),
                     "prepare": args.prepare_command,
                     "upcycle": upcycle["command"] if upcycle else None,
                     "train": show(cmd)},
        "schedule": {k: str(v) for k, v in schedule.items()},
        "compute": row_compute(row, own, *offset_parts(offset)),
        "sittings": sittings,
        "trained_updates": done["num_updates"],
        "data": {"corpus": args.corpus_spec.test_set, "train_size": args.train_size,
                 "evaluated_directions": args.directions},
        **scores, "environment": environment(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    write_json(path, record)
    log(f"{prefix}: done: avg BLEU {record['averages']['bleu']}"
        + (f", pruned identical {scores['pruned_identical']}/{len(scores['pruned'])}"
           if row.task_routed else "")
        + f"; total CPU s {record['compute']['total']['cpu_seconds']}; wrote {rel(path)}")
    return record
