"""Step 6, speed: the student and the pruned task-MoE of its size decode the same test set,
alternated in one sitting; medians of fairseq-generate's own speed line."""

import os
import re
import time
from pathlib import Path

from research.common import BIN, generate_command, read_json, rel, run, write_json
from research.distill.config import PRUNED_RUN, Stop, log
from research.distill.teacher import run_finished
from research.study import grid
from research.study.grid import LANGS, TRAINED

TRANSLATED = re.compile(r"Translated ([\d,]+) sentences .*\(([\d.]+) sentences/s, ([\d.]+) "
                        r"tokens/s\)")


def generation_speed(text: str):
    m = TRANSLATED.search(text)
    if not m:
        raise RuntimeError("no 'Translated ...' line in fairseq-generate's output")
    return {"sentences": int(m.group(1).replace(",", "")),
            "sentences_per_s": float(m.group(2)), "tokens_per_s": float(m.group(3))}


def median(values):
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def step_speed(args, prep: Path):
    out_dir = args.work / "speed"
    path = out_dir / f"speed.{args.run_name}.json"
    if path.exists():
        log(f"speed: {rel(path)} exists, skipped")
        return read_json(path)
    student = args.work / "runs" / args.run_name / "checkpoints" / "checkpoint_last.pt"
    if not (args.work / "runs" / args.run_name / "train.done.json").exists():
        raise Stop("speed: the student is not trained yet; run the train step")
    why = run_finished(args.pruned_from)
    if why:
        raise Stop(f"speed: task-MoE {rel(args.pruned_from)} {why}; train it with "
                   f".venv/bin/python -m research.study --only {PRUNED_RUN}, then run this again "
                   "(the other steps are kept)")
    from fairseq_taskmoe.deploy.pruning import count_parameters
    from fairseq_taskmoe.integration.compat import load_checkpoint

    pair = args.speed_pair
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"gen.{args.run_name}.*"):  # one sitting measures both models
        old.unlink()
    pruned = out_dir / f"pruned.{pair}.pt"
    log(f"speed: prune {rel(args.pruned_from)} for {pair} (taskmoe-prune, timed) ...")
    start = time.time()
    run([BIN / "taskmoe-prune", args.pruned_from, "--lang-pair", pair, "--output", pruned,
         "--force"], log_path=out_dir / f"prune.{pair}.log")
    prune_seconds = time.time() - start
    models = {"student": student, "pruned": pruned}
    rounds = []
    for r in range(args.speed_rounds):
        for who, ckpt in models.items():
            cmd = generate_command(prep / "bin", ckpt, pair, beam=grid.BEAM,
                                   langs=",".join(LANGS), pairs=",".join(TRAINED))
            if args.max_len_b is not None:
                cmd += ["--max-len-a", 0, "--max-len-b", args.max_len_b]
            text = run(cmd, log_path=out_dir / f"gen.{args.run_name}.{who}.{pair}.r{r}.txt")
            rounds.append({"round": r, "model": who, **generation_speed(text)})
            log(f"speed: round {r + 1}/{args.speed_rounds} {who}: "
                f"{rounds[-1]['tokens_per_s']:.1f} tokens/s")
    record = {"pair": pair, "test_set": "Multi30k test_2016_flickr", "beam": grid.BEAM,
              "how": f"fairseq-generate --cpu, the student and the pruned sub-network alternated "
                     f"{args.speed_rounds} times in one sitting; medians",
              "pruned_from": rel(args.pruned_from),
              "prune_command": f"taskmoe-prune {rel(args.pruned_from)} --lang-pair {pair}",
              "prune_seconds": round(prune_seconds, 1), "rounds": rounds,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    for who, ckpt in models.items():
        mine = [x for x in rounds if x["model"] == who]
        record[who] = {"tokens_per_s": round(median([x["tokens_per_s"] for x in mine]), 1),
                       "sentences_per_s": round(median([x["sentences_per_s"] for x in mine]), 2),
                       "params": count_parameters(load_checkpoint(str(ckpt))["model"])}
    pruned.unlink()
    write_json(path, record)
    log(f"speed: {pair}: student {record['student']['tokens_per_s']} tokens/s, pruned task-MoE "
        f"{record['pruned']['tokens_per_s']} tokens/s (parameters {record['student']['params']:,}"
        f" / {record['pruned']['params']:,})")
    return record
