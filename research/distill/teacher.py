"""Step 1, teacher: beam search over the training sources of the trained directions, in chunks
written atomically (a kill loses at most one), with the settings of --work checked first."""

import os
import subprocess
import time
from pathlib import Path

from fairseq_taskmoe.atomic import atomic_file
from research.common import REPO, generate_command, hms, read_json, rel, show, write_json
from research.distill.config import TEACHER_RUN, Stop, log
from research.study import training
from research.study.grid import LANGS, TRAINED

TEACHER_MAX_TOKENS = 8000  # as the study's generation
PROGRESS_EVERY = 60  # seconds between progress lines inside one chunk


def run_finished(checkpoint: Path):
    """None when `checkpoint` may be used; else why not (a study run still training)."""
    if not checkpoint.exists():
        return "missing"
    run_dir = checkpoint.parent.parent
    if (run_dir / "train.log").exists() and not (run_dir / "train.done.json").exists():
        return "still training (its train.done.json is not written yet)"
    return None


def teacher_identity(args):
    why = run_finished(args.teacher)
    if why:
        raise Stop(f"teacher checkpoint {rel(args.teacher)}: {why}. Train it first: "
                   f".venv/bin/python -m research.study --only {TEACHER_RUN}")
    state = training.checkpoint_extra(args.teacher)
    return {"checkpoint": rel(args.teacher), "num_updates": state["num_updates"],
            "training_seconds": state["training_seconds"]}


def check_settings(args, teacher):
    """The teacher's outputs in --work belong to one teacher and one set of decoding options."""
    path = args.work / "settings.json"
    now = {"teacher": teacher["checkpoint"], "teacher_num_updates": teacher["num_updates"],
           "beam": args.beam, "shards": args.shards, "train_size": args.train_size,
           "max_len_b": args.max_len_b}
    if path.exists():
        old = read_json(path)
        diff = {k: (old.get(k), v) for k, v in now.items() if old.get(k) != v}
        if diff:
            raise Stop(f"{rel(args.work)} was started with other settings: " + ", ".join(
                f"{k} {a!r} (now {b!r})" for k, (a, b) in diff.items())
                + ". Use the same options, another --work, or delete it to start over")
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        write_json(path, now)


def chunk_path(args, pair, i):
    return args.work / "teacher" / pair / f"chunk-{i}-of-{args.shards}.tsv"


def train_lines(prep: Path, pair: str) -> int:
    with open(prep / "spm" / f"train.{pair.split('-')[0]}") as f:
        return sum(1 for _ in f)


def teacher_command(args, data: Path, pair: str, shard: int):
    cmd = generate_command(data, args.teacher, pair, beam=args.beam,
                           max_tokens=TEACHER_MAX_TOKENS, langs=",".join(LANGS),
                           pairs=",".join(TRAINED))
    cmd[cmd.index("--gen-subset") + 1] = "train"
    i = cmd.index("--post-process")  # H- lines stay SentencePiece pieces
    del cmd[i:i + 2]
    cmd += ["--required-batch-size-multiple", 1]  # fairseq's default 8 would pad batches
    if args.shards > 1:
        cmd += ["--distributed-world-size", args.shards, "--distributed-rank", shard]
    if args.max_len_b is not None:
        cmd += ["--max-len-a", 0, "--max-len-b", args.max_len_b]
    return cmd


def decode_chunk(args, cmd, out: Path, label: str, expected: float):
    """Run one fairseq-generate, streaming its H- lines into `out` (atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start, last_note, count, tail = time.time(), time.time(), 0, []
    with atomic_file(str(out), "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                                preexec_fn=training._die_with_parent)
        training._CHILD = proc  # study's SIGTERM handler stops it too
        for line in proc.stdout:
            if line.startswith("H-"):
                key, score, *hyp = line.rstrip("\n").split("\t")
                f.write(f"{key[2:]}\t{score}\t{hyp[0] if hyp else ''}\n")
                count += 1
                if time.time() - last_note >= PROGRESS_EVERY:
                    last_note = time.time()
                    rate = count / (last_note - start)
                    log(f"teacher: {label}: {count:,} of ~{expected:,.0f} sentences, "
                        f"{rate:.1f} sentences/s")
            elif line[:2] not in ("S-", "T-", "D-", "P-"):
                tail = (tail + [line])[-30:]
        rc = proc.wait()
        training._CHILD = None
        if rc != 0:
            raise RuntimeError(f"fairseq-generate failed (exit {rc}): {show(cmd)}\n"
                               + "".join(tail))
    return count, time.time() - start


def read_chunk(path: Path):
    """{sentence id: (score, pieces)} of one chunk file."""
    out = {}
    for line in path.read_text().splitlines():
        sid, score, pieces = line.split("\t")
        out[int(sid)] = (float(score), pieces)
    return out


def step_teacher(args, prep: Path):
    record_path = args.work / "teacher" / "decode.json"
    chunks = [(pair, i) for pair in TRAINED for i in range(args.shards)]
    todo = [c for c in chunks if not chunk_path(args, *c).exists()]
    if not todo:
        old = read_json(args.work / "settings.json")
        changed = [k for k in ("beam", "train_size", "max_len_b")
                   if old.get(k) != getattr(args, k)]
        if changed:
            raise Stop(f"{rel(args.work)} was decoded with other settings ("
                       + ", ".join(f"{k} {old.get(k)!r}" for k in changed)
                       + "); use the same options, another --work, or delete it to start over")
        log(f"teacher: all {len(chunks)} chunks exist, skipped")
        return read_json(record_path)
    teacher = teacher_identity(args)
    check_settings(args, teacher)
    for stale in (args.work / "teacher").glob("*/.chunk-*.tmp"):  # left by a kill
        stale.unlink()
    record = read_json(record_path) if record_path.exists() else {
        "teacher": teacher, "beam": args.beam, "shards_per_direction": args.shards,
        "max_tokens": TEACHER_MAX_TOKENS, "seconds": 0.0, "sentences": 0, "chunks": {}}
    lines = {pair: train_lines(prep, pair) for pair in TRAINED}
    log(f"teacher: {len(todo)} of {len(chunks)} chunks to decode ({args.shards} per direction, "
        f"beam {args.beam}, {sum(lines.values()):,} training sentences in all) with "
        f"{rel(args.teacher)} (update {teacher['num_updates']})")
    for n, (pair, i) in enumerate(todo):
        cmd = teacher_command(args, prep / "bin", pair, i)
        record["command_example"] = show(cmd)
        label = f"{pair} chunk {i + 1}/{args.shards}"
        count, seconds = decode_chunk(args, cmd, chunk_path(args, pair, i), label,
                                      lines[pair] / args.shards)
        record["chunks"][f"{pair}/{i}"] = {"sentences": count, "seconds": round(seconds, 1)}
        record["seconds"] = round(sum(c["seconds"] for c in record["chunks"].values()), 1)
        record["sentences"] = sum(c["sentences"] for c in record["chunks"].values())
        write_json(record_path, record)
        rate = record["sentences"] / max(record["seconds"], 1e-9)
        left = sum(lines[p] / args.shards for p, _ in todo[n + 1:])
        log(f"teacher: chunk {len(chunks) - len(todo) + n + 1}/{len(chunks)} done ({label}: "
            f"{count:,} sentences in {hms(seconds)}, {count / max(seconds, 1e-9):.1f}/s); "
            f"ETA {hms(left / rate) if rate > 0 else '?'}")
    for pair in TRAINED:  # every training sentence translated exactly once
        ids = [sid for i in range(args.shards) for sid in read_chunk(chunk_path(args, pair, i))]
        if sorted(ids) != list(range(lines[pair])):
            raise RuntimeError(f"{pair}: the chunks hold {len(ids)} hypotheses for "
                               f"{len(set(ids))} distinct ids of {lines[pair]} sentences; delete "
                               f"{rel(args.work / 'teacher' / pair)} and run again")
    log(f"teacher: done; {record['sentences']:,} sentences, {hms(record['seconds'])} of decoding "
        "in all sittings")
    return record
