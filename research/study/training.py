"""Training a study run: fairseq-train to --max-update in a child process, resumed from
checkpoint_last.pt (repaired first if a kill truncated it), progress streamed to our log and the
run's train.log; train.done.json records what was trained. Killing the runner (SIGTERM, or
SIGKILL on Linux) stops the child; its checkpoint_last.pt survives for the next sitting.

Compute is recorded as it goes (ComputeLedger, the run's compute.json): at every checkpoint
save, the child's CPU seconds (user + system, all its threads, read from /proc) and wall seconds
since it started, added to what the checkpoint it resumed from had cost. A checkpoint's figure
is therefore the compute that produced it: work lost to a kill after the last save is not
counted (it is done again), each sitting's start-up is."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from research.common import REPO, hms, logger, read_json, show, write_json
from research.study.corpus import MULTI30K
from research.study.grid import train_command

log = logger("study")
# the fairseq process running now: fairseq-train here, the teacher's fairseq-generate in
# research.distill (which sets it too); SIGTERM on the runner stops it
_CHILD = None
SAVED = re.compile(r"Saved checkpoint (\S+) \(epoch \d+ @ (\d+) updates")
LOADED = re.compile(r"[Ll]oaded checkpoint .*@ (\d+) updates")


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


def process_cpu_seconds(pid: int):
    """User + system CPU seconds of a live process, every thread, plus its waited-for children
    (/proc/PID/stat utime, stime, cutime, cstime); None where /proc cannot tell."""
    try:
        # fields after the command name, which may hold spaces: field 3 (state) is index 0
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class ComputeLedger:
    """compute.json of a run: {"checkpoints": {update: {"cpu_seconds", "wall_seconds"}},
    "sittings": [...]}, the compute that produced each saved checkpoint (cumulative over the
    sittings that led to it) and one entry per fairseq-train process."""

    def __init__(self, path: Path):
        self.path = path
        self.data = read_json(path) if path.exists() else {"checkpoints": {}, "sittings": []}

    def at(self, update: int):
        """{"cpu_seconds", "wall_seconds"} of the checkpoint at `update`; zero at update 0;
        None when not recorded (saved by a process that kept no ledger)."""
        if update == 0:
            return {"cpu_seconds": 0.0, "wall_seconds": 0.0}
        return self.data["checkpoints"].get(str(update))

    def record(self, update: int, cpu_seconds: float, wall_seconds: float):
        self.data["checkpoints"][str(update)] = {"cpu_seconds": round(cpu_seconds, 1),
                                                 "wall_seconds": round(wall_seconds, 1)}
        write_json(self.path, self.data)

    def sitting(self, entry: dict):
        self.data["sittings"].append(entry)
        write_json(self.path, self.data)


def train(args, data: Path, run_dir: Path, variant: str, seed: int, prefix: str):
    """fairseq-train to --max-update (resuming from checkpoint_last.pt), streaming progress."""
    corpus = getattr(args, "corpus_spec", None) or MULTI30K  # research.distill's args have none
    cmd = train_command(data, variant, seed, run_dir / "checkpoints", args.max_update,
                        args.save_interval, args.preset, corpus.langs, corpus.trained)
    fairseq_train(cmd, run_dir, args.max_update, prefix)
    return cmd


def fairseq_train(cmd, run_dir: Path, max_update: int, prefix: str, on_save=None):
    """Run a fairseq-train command whose --save-dir is run_dir/checkpoints to max_update,
    resuming from its checkpoint_last.pt; skipped when train.done.json records max_update.
    on_save(update, path) is called at every checkpoint fairseq saves (path: the first file it
    names, e.g. checkpoint_1_200.pt), after the ledger has recorded it. Returns the
    train.done.json record: max_update, num_updates, training_seconds (fairseq's own clock,
    which a --finetune-from-model run inherits from its initial checkpoint), and cpu_seconds /
    wall_seconds from the ledger (None when a sitting resumed from a checkpoint it has no
    record of)."""
    global _CHILD
    save_dir = run_dir / "checkpoints"
    done = run_dir / "train.done.json"
    if done.exists() and read_json(done).get("max_update") == max_update:
        return read_json(done)
    save_dir.mkdir(parents=True, exist_ok=True)
    repair_last_checkpoint(save_dir, prefix)
    resumed = (save_dir / "checkpoint_last.pt").exists()
    ledger = ComputeLedger(run_dir / "compute.json")
    if resumed:  # stopped right at a save of max_update: nothing left to train
        at = checkpoint_extra(save_dir / "checkpoint_last.pt")["num_updates"]
        if at > max_update:
            raise RuntimeError(f"{save_dir}/checkpoint_last.pt is at update {at}, past "
                               f"--max-update {max_update}: raise --max-update, or move the "
                               "run's folder away to train it afresh")
        if at == max_update:
            log(f"{prefix}: checkpoint_last.pt is at update {max_update} already")
            return _finished(save_dir, ledger, max_update, done, prefix)
    log(f"{prefix}: train to {max_update} updates"
        + (" (resuming from checkpoint_last.pt)" if resumed else "") + f"; log {run_dir}/train.log")
    # a fresh start (or --finetune-from-model's) costs nothing before it; a resumed one what
    # its checkpoint cost, read when fairseq says which update it loaded
    base = None if resumed else ledger.at(0)
    start, start_update, tail, last_saved = time.time(), None, [], None
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
            loaded = LOADED.search(line)
            if loaded:
                start_update = int(loaded.group(1))
                if resumed:
                    base = ledger.at(start_update)
                    log(f"{prefix}: resumed at update {start_update}" + (
                        "" if base is not None else
                        "; its compute is not in the ledger: CPU seconds will be unknown"))
                else:  # --finetune-from-model's checkpoint: a fresh start from its weights
                    log(f"{prefix}: started from the weights of the initial checkpoint")
            saved = SAVED.search(line)
            if saved:
                update = int(saved.group(2))
                cpu = process_cpu_seconds(_CHILD.pid)
                if base is not None and cpu is not None:
                    ledger.record(update, base["cpu_seconds"] + cpu,
                                  base["wall_seconds"] + time.time() - start)
                last_saved = update
                log(f"{prefix}: checkpoint saved at update {update}")
                if on_save is not None:
                    on_save(update, Path(saved.group(1)))
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
                eta = (max_update - updates) / rate if rate > 0 else float("nan")
                log(f"{prefix}: update {updates}/{max_update} loss "
                    f"{loss.group(1) if loss else '?'} | {hms(elapsed)} this sitting, "
                    f"ETA {hms(eta) if eta == eta else '?'}")
        rc = _CHILD.wait()
        _CHILD = None
    ledger.sitting({"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
                    "from_update": start_update or 0, "last_saved_update": last_saved,
                    "exit_code": rc, "wall_seconds": round(time.time() - start, 1),
                    "omp_num_threads": env.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
                    "compute_known": base is not None})
    if rc != 0:
        raise RuntimeError(f"fairseq-train failed (exit {rc}); last lines:\n" + "".join(tail))
    return _finished(save_dir, ledger, max_update, done, prefix)


def _finished(save_dir: Path, ledger, max_update: int, done: Path, prefix: str):
    """A trained run: interval checkpoints removed, train.done.json written and returned."""
    for interval in save_dir.glob("checkpoint_*_*.pt"):  # checkpoint_last.pt is what we use
        interval.unlink()
    state = checkpoint_extra(save_dir / "checkpoint_last.pt")
    spent = ledger.at(state["num_updates"]) or {"cpu_seconds": None, "wall_seconds": None}
    record = {"max_update": max_update, **state, **spent}
    write_json(done, record)
    log(f"{prefix}: trained, {state['num_updates']} updates, "
        f"{hms(state['training_seconds'])} of training in total"
        + (f", {spent['cpu_seconds']:,.0f} CPU seconds" if spent["cpu_seconds"] is not None
           else ""))
    return record


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
    from fairseq_taskmoe.integration.compat import load_checkpoint

    state = load_checkpoint(str(path))
    extra = state.get("extra_state") or {}
    return {"num_updates": int(state["optimizer_history"][-1]["num_updates"]),
            "training_seconds": round(float(extra.get("previous_training_time", 0.0)), 1)}
