"""Where the upcycling study's files are: the dense run's folder (the study's, or its own), each
row's work folder, its result files, and the stamp every record carries."""

from pathlib import Path

from research.common import read_json, rel
from research.upcycle_study.plan import DENSE


def dense_train_dir(args):
    """(folder, why): where the dense row trains: the study's dense-s1 when it is trained to the
    dense budget
    with its CPU seconds recorded, or not started, or part-trained with a compute ledger (it
    resumes there); else a run of its own under --work (the study's ran before the ledger, for
    another budget, or without it), which stays the source once started."""
    own, study = args.work / DENSE.name, args.study_work / "runs" / DENSE.name
    if (own / "checkpoints").exists():
        return own, f"{rel(own)} (this study's own dense run)"
    done = study / "train.done.json"
    if done.exists():
        record = read_json(done)
        if record.get("max_update") == args.dense_updates and record.get("cpu_seconds") is not None:
            return study, f"{rel(study)} (the study's dense-s1, reused)"
        why = ("another budget" if record.get("max_update") != args.dense_updates else
               "no CPU seconds recorded: trained before the compute ledger")
        return own, f"{rel(own)} (the study's dense-s1 has {why}: trained again, same command)"
    if (study / "checkpoints" / "checkpoint_last.pt").exists() and not \
            (study / "compute.json").exists():
        return own, (f"{rel(own)} (the study's dense-s1 is part-trained without a compute "
                     "ledger: trained again, same command)")
    return study, f"{rel(study)} (the study's dense-s1)"


def files_dir(args, row) -> Path:
    """The row's own work files (curve checkpoints, generations, the upcycled checkpoint);
    its training folder too, except for the dense row (dense_train_dir)."""
    return args.work / row.name if row is DENSE else args.m_work / row.name


def train_dir(args, row) -> Path:
    return dense_train_dir(args)[0] if row is DENSE else files_dir(args, row)


def result_path(args, row, stage=None) -> Path:
    return args.results / (f"{stage}-{row.name}.json" if stage else f"{row.name}.json")


def stamp(args, row) -> dict:
    """What every record of a row says it was made for (checked by `checked`)."""
    return {"upcycle_updates": None if row is DENSE else args.upcycle_updates,
            "dense_updates": args.dense_updates}


def checked(args, row, path: Path):
    """The record at `path`, None when absent; a record made for another --upcycle-updates or
    --dense-updates stops the row (never mixed, never overwritten)."""
    if not path.exists():
        return None
    record = read_json(path)
    for key, want in stamp(args, row).items():
        if record.get(key) != want:
            flag = "--" + key.replace("_", "-")
            raise RuntimeError(f"{rel(path)} was made with {flag} {record.get(key)}, not {want}: "
                               "give another --results (and --work), or delete it to redo the "
                               "row")
    return record


def dense_eval_dir(args) -> Path:
    return files_dir(args, DENSE) / f"eval-u{args.dense_updates}"
