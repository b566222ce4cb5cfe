"""Training a study run: fairseq-train to --max-update in a child process, resumed from
checkpoint_last.pt (repaired first if a kill truncated it), progress streamed to our log and the
run's train.log; train.done.json records what was trained. Killing the runner (SIGTERM, or
SIGKILL on Linux) stops the child; its checkpoint_last.pt survives for the next sitting."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from research.common import REPO, hms, logger, read_json, show, write_json
from research.study.grid import train_command

log = logger("study")
# the fairseq process running now: fairseq-train here, the teacher's fairseq-generate in
# research.distill (which sets it too); SIGTERM on the runner stops it
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
    corpus = args.corpus_spec
    cmd = train_command(data, variant, seed, save_dir, args.max_update, args.save_interval,
                        args.preset, corpus.langs, corpus.trained)
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
    from fairseq_taskmoe.integration.compat import load_checkpoint

    state = load_checkpoint(str(path))
    extra = state.get("extra_state") or {}
    return {"num_updates": int(state["optimizer_history"][-1]["num_updates"]),
            "training_seconds": round(float(extra.get("previous_training_time", 0.0)), 1)}
