#!/usr/bin/env python3
"""Sequence-level distillation baseline (issue 10): is task-MoE really "beyond distillation" here?

    .venv/bin/python scripts/study.py --only token_token-s1      # the teacher (and its row)
    .venv/bin/python scripts/study.py --only target_target-s1    # the pruned task-MoE to beat
    .venv/bin/python scripts/distill.py                          # this recipe (hours on 2 cores)
    .venv/bin/python scripts/study_report.py                     # docs/results.md

The teacher is the study's token-routed MoE (token / token, seed 1). The student is a dense model
of the study's backbone (SHARED_FLAGS with --moe-freq 0: d=256, 3+3 layers, FFN 1024), which is
exactly the size of one pruned task-MoE sub-network of the study (its merged MoE layer is the
top-2 experts, 2 x 512 = 1024 wide), trained with the study's recipe and budget on the teacher's
translations. Steps, each skipped when its output exists (kill it at any point and start the
same command again):

  1. teacher   beam search (--beam, default 5) over the training source side of the 6 trained
               directions with fairseq-generate --gen-subset train, in --shards chunks per
               direction. fairseq-generate 0.12 parses --num-shards/--shard-id but ignores them
               (it shards its batches by --distributed-world-size/--distributed-rank, which it
               never uses to start a process group), so the chunks are made with those two.
               Every chunk is <work>/teacher/<pair>/chunk-<i>-of-<K>.tsv (id, score, pieces),
               written atomically; a killed run resumes at the next missing chunk. Decoding
               seconds are summed over chunks in <work>/teacher/decode.json. After the last chunk
               of a direction every training sentence must have exactly one hypothesis.
  2. binarize  the hypotheses (SentencePiece pieces; a leading target-language tag is stripped)
               become the new targets, the original sources unchanged (re-binarized and checked
               byte-identical), with fairseq-preprocess and the study's dictionary
               (<study data>/bin/dict.<lang>.txt). valid/test of all 12 directions (the zero-shot
               ones included: study.prepare_data's copies), the dictionaries and the test
               references are copied from the study data. -> <work>/data/bin (/.done last)
  3. init      (--init teacher, the default) the student starts from the teacher: every
               non-expert weight is copied (embeddings, attention, layer norms, the dense FFNs);
               each MoE layer's FFN becomes merge_ffns([expert_a, expert_b], [0.5, 0.5]), one
               1024-wide FFN computing exactly 0.5 * (expert_a(x) + expert_b(x)), where a and b
               are the two experts the teacher's router sends most (token, expert) assignments
               to in that layer on the validation set (fairseq_taskmoe.analysis; experts 0 and 1
               if it yields no counts); the routers are dropped. Written as a fairseq checkpoint
               with a fresh optimizer history, which `fairseq-train --finetune-from-model`
               loads (checked here by loading it with fairseq). --init random skips this.
  4. train     fairseq-train with the study's exact recipe and budget (study.train_command:
               SHARED_FLAGS, --moe-freq 0, --max-update, --seed), resumable from
               checkpoint_last.pt, progress shown (study.train).
  5. evaluate  study.evaluate: 12 directions, beam 5, BLEU/chrF/off-target.
  6. speed     decode speed of the student and the pruned task-MoE (target / target seed 1,
               pruned for --speed-pair with taskmoe-prune, timed) measured in one sitting on
               the same test set, alternating --speed-rounds times. Waits (skipped, retried on
               the next run) while that task-MoE is not trained.
  7. report    results/study/<run>.json in the study's schema (variant "distilled") plus the
               "distillation", "speed" and "cost" blocks: teacher decoding + student training
               seconds against the pruning seconds (measured here and recorded by the study's
               task-routed runs). Rewritten on every run (cheap), so a later speed step lands.

Smoke test (a tiny teacher first; minutes, never into results/ or docs/):

    OMP_NUM_THREADS=1 .venv/bin/python scripts/study.py --work /tmp/d/work --results /tmp/d/res \\
        --img-dir /tmp/d/img --only token_token-s1,target_target-s1 --max-update 20 \\
        --save-interval 10 --train-size 500 --directions en-de,de-en --max-len-b 20
    OMP_NUM_THREADS=1 .venv/bin/python scripts/distill.py --study-work /tmp/d/work \\
        --work /tmp/d/distill --results /tmp/d/res --train-size 500 --directions en-de,de-en \\
        --max-len-b 20 --shards 2 --max-update 20 --save-interval 10
"""

import argparse
import copy
import filecmp
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import study  # sibling; sets up sys.path, warnings and fairseq's log level
from demo import BIN, REPO, generate_command, run
from study import LANGS, TRAINED, hms, read_json, show, write_json

from fairseq_taskmoe.atomic import atomic_file, write_atomically  # noqa: E402
from fairseq_taskmoe.experts import merge_ffns  # noqa: E402

TEACHER_RUN = "token_token-s1"
PRUNED_RUN = "target_target-s1"
STEPS = ["teacher", "binarize", "init", "train", "evaluate", "speed", "report"]
TEACHER_MAX_TOKENS = 8000  # as the study's generation
PROGRESS_EVERY = 60  # seconds between progress lines inside one chunk
LANGTOK = re.compile(r"^__[a-z_]+__$")
# <layer prefix>.ffn.experts.experts.<unit>.<fc1|fc2>.<weight|bias>
EXPERT_KEY = re.compile(r"^(?P<layer>.+)\.ffn\.experts\.experts\.(?P<unit>\d+)\."
                        r"(?P<name>fc[12]\.(?:weight|bias))$")
MOE_KEY = re.compile(r"^(?P<layer>.+)\.ffn\.(?:router|experts|merged)\.")
TRANSLATED = re.compile(r"Translated ([\d,]+) sentences .*\(([\d.]+) sentences/s, ([\d.]+) "
                        r"tokens/s\)")


def log(msg):
    print(f"[distill] {msg}", flush=True)


class Stop(RuntimeError):
    """A step cannot run (missing input); the message says what to do."""


# ---------------------------------------------------------------- arguments


def parse_args(argv=None):
    defaults = study.parse_args([])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
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
    p.add_argument("--beam", type=int, default=study.BEAM,
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
                   help="as study.py: training lines per direction (smoke tests only)")
    p.add_argument("--directions", default=",".join(study.DIRECTIONS),
                   help="directions to evaluate (default: all 12; fewer only for smoke tests)")
    p.add_argument("--max-len-b", type=int, default=None,
                   help="cap on generated length, teacher and evaluation alike (smoke tests "
                        "only)")
    p.add_argument("--multi30k-dir", default=None, help="raw Multi30k, as study.py")
    args = p.parse_args(argv)
    args.study_work, args.work = Path(args.study_work).resolve(), Path(args.work).resolve()
    args.results = Path(args.results).resolve()
    runs = args.study_work / "runs"
    args.teacher = Path(args.teacher or runs / TEACHER_RUN / "checkpoints" /
                        "checkpoint_last.pt").resolve()
    args.pruned_from = Path(args.pruned_from or runs / PRUNED_RUN / "checkpoints" /
                            "checkpoint_last.pt").resolve()
    args.directions = [d for d in args.directions.split(",") if d]
    bad = [d for d in args.directions if d not in study.DIRECTIONS]
    if bad:
        p.error(f"unknown direction(s) {bad}; choose from {','.join(study.DIRECTIONS)}")
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
    args.preset = "cpu"  # the study's scale (study.PRESETS); distillation runs at that one only
    args.img_dir = args.work / "img"  # unused: the student has no routing
    return args


def rel(path) -> str:
    return str(path).replace(f"{REPO}/", "")


# ---------------------------------------------------------------- teacher


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
                   f".venv/bin/python scripts/study.py --only {TEACHER_RUN}")
    state = study.checkpoint_extra(args.teacher)
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
                                preexec_fn=study._die_with_parent)
        study._CHILD = proc  # study's SIGTERM handler stops it too
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
        study._CHILD = None
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


# ---------------------------------------------------------------- binarize


def copy_atomic(src: Path, dst: Path):
    if dst.exists():
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def step_binarize(args, prep: Path):
    data = args.work / "data"
    bindir = data / "bin"
    if (bindir / ".done").exists():
        log(f"binarize: {rel(bindir)} exists, skipped")
        return read_json(data / "binarize.json")
    missing = [c for c in [(p, i) for p in TRAINED for i in range(args.shards)]
               if not chunk_path(args, *c).exists()]
    if missing:
        raise Stop(f"binarize: {len(missing)} teacher chunks missing; run the teacher step")
    start = time.time()
    bindir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for pair in TRAINED:
        src, tgt = pair.split("-")
        names = [f"train.{pair}.{lang}.{ext}" for lang in (src, tgt) for ext in ("bin", "idx")]
        texts = data / "spm" / pair
        hyps = {}
        for i in range(args.shards):
            hyps.update(read_chunk(chunk_path(args, pair, i)))
        stripped, targets = 0, []
        for sid in range(len(hyps)):
            pieces = hyps[sid][1].split()
            if pieces and LANGTOK.match(pieces[0]):  # the forced target-language tag
                pieces, stripped = pieces[1:], stripped + 1
            targets.append(" ".join(pieces))
        refs = (prep / "spm" / f"train.{tgt}").read_text().splitlines()
        stats[pair] = {
            "sentences": len(targets), "empty_hypotheses": sum(not t for t in targets),
            "stripped_language_tags": stripped,
            "mean_pieces_teacher": round(sum(len(t.split()) for t in targets) / len(targets), 2),
            "mean_pieces_reference": round(sum(len(r.split()) for r in refs) / len(refs), 2),
            "identical_to_reference": sum(t == r for t, r in zip(targets, refs))}
        if all((bindir / n).exists() for n in names):
            log(f"binarize {pair}: exists, skipped")
            continue
        texts.mkdir(parents=True, exist_ok=True)
        copy_atomic(prep / "spm" / f"train.{src}", texts / f"train.{src}")
        with atomic_file(str(texts / f"train.{tgt}"), "w") as f:
            f.write("".join(t + "\n" for t in targets))
        tmp = data / f".bin.tmp.{pair}"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"binarize {pair}: fairseq-preprocess ({len(targets):,} teacher targets, "
            f"{stats[pair]['empty_hypotheses']} empty)")
        (data / "logs").mkdir(exist_ok=True)
        run([BIN / "fairseq-preprocess", "--source-lang", src, "--target-lang", tgt,
             "--trainpref", texts / "train", "--srcdict", prep / "bin" / f"dict.{src}.txt",
             "--tgtdict", prep / "bin" / f"dict.{tgt}.txt", "--destdir", tmp, "--workers", 1],
            log_path=data / "logs" / f"preprocess.{pair}.log")
        for ext in ("bin", "idx"):  # the sources must be the study's, byte for byte
            name = f"train.{pair}.{src}.{ext}"
            if not filecmp.cmp(tmp / name, prep / "bin" / name, shallow=False):
                raise RuntimeError(f"{pair}: re-binarized source {name} differs from the study's")
        for name in names:
            os.replace(tmp / name, bindir / name)
        shutil.rmtree(tmp)
    for f in sorted((prep / "bin").iterdir()):  # valid/test of all 12 directions, dictionaries
        if f.name.startswith(("valid.", "test.", "dict.")) or f.name == "langs.txt":
            copy_atomic(f, bindir / f.name)
    (data / "text").mkdir(exist_ok=True)
    for f in sorted((prep / "text").glob("test.*")):  # references for study.score
        copy_atomic(f, data / "text" / f.name)
    record = {"data": rel(bindir), "dictionary": rel(prep / "bin" / "dict.<lang>.txt"),
              "sources": "the study's, unchanged (re-binarized, checked byte-identical)",
              "valid_test": f"copied from {rel(prep / 'bin')}", "directions": stats,
              "seconds": round(time.time() - start, 1)}
    write_json(data / "binarize.json", record)
    with atomic_file(str(bindir / ".done"), "w") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S") + "\n")
    log(f"binarize: done in {hms(record['seconds'])}; " + ", ".join(
        f"{p} {s['mean_pieces_teacher']:.1f} pieces/sentence (references "
        f"{s['mean_pieces_reference']:.1f})" for p, s in stats.items()))
    return record


# ---------------------------------------------------------------- student init


def student_state(teacher_model: dict, experts: dict, weights=(0.5, 0.5)):
    """The dense student's state dict from a token-MoE teacher's.

    teacher_model: the teacher's model state dict; experts: {MoE layer prefix (e.g.
    "encoder.layers.1"): (a, b)}, experts 0 and 1 for a layer not listed. Every key outside the
    MoE layers' FFNs is copied as it is; each MoE layer's router is dropped and its FFN becomes
    `<prefix>.ffn.fc1/fc2` = merge_ffns([expert a, expert b], weights). Returns (state dict,
    {prefix: [a, b]})."""
    units = defaultdict(lambda: defaultdict(dict))
    out = {}
    for key, value in teacher_model.items():
        m = EXPERT_KEY.match(key)
        if m:
            units[m["layer"]][int(m["unit"])][m["name"]] = value
        elif not MOE_KEY.match(key):
            out[key] = value  # shared embeddings stay one tensor
    used = {}
    for layer, by_unit in units.items():
        a, b = experts.get(layer, (0, 1))
        for name, tensor in merge_ffns([by_unit[a], by_unit[b]], weights).items():
            out[f"{layer}.ffn.{name}"] = tensor.contiguous()
        used[layer] = [int(a), int(b)]
    return out, used


def layer_prefix(name: str) -> str:
    """analysis' layer names (enc1, dec1) -> state-dict prefixes (encoder.layers.1, ...)."""
    side = "encoder" if name.startswith("enc") else "decoder"
    return f"{side}.layers.{int(name[3:])}"


def most_used_experts(args, data: Path):
    """{layer prefix: (a, b)} the teacher's two most used experts per MoE layer on the
    validation set, and the assignment shares per expert."""
    import warnings

    import torch
    from fairseq import checkpoint_utils

    from fairseq_taskmoe import plugin  # noqa: F401

    warnings.filterwarnings("ignore", category=UserWarning)  # pin_memory, mask-type notes
    from fairseq_taskmoe.analysis import collect_routing_counts

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(args.teacher)], arg_overrides={"data": str(data)})
    with torch.no_grad():
        totals = collect_routing_counts(models[0], task, "valid")
    chosen, shares = {}, {}
    for name, counts in totals.items():
        per_expert = counts.sum(0).double()
        if per_expert.sum() <= 0:
            continue
        share = per_expert / per_expert.sum()
        top = torch.argsort(share, descending=True)[:2].tolist()
        chosen[layer_prefix(name)] = tuple(top)
        shares[layer_prefix(name)] = [round(float(s), 4) for s in share]
    return chosen, shares


def init_checkpoint(teacher_state: dict, model: dict, info: dict):
    """A fairseq checkpoint of the dense student: the teacher's config with --moe-freq 0, a fresh
    optimizer history (update 0) and no training time, for --finetune-from-model."""
    cfg = copy.deepcopy(teacher_state["cfg"])
    cfg["model"].moe_freq = 0
    last = teacher_state["optimizer_history"][-1]
    return {"args": None, "cfg": cfg, "model": model, "criterion": teacher_state.get("criterion"),
            "optimizer_history": [{"criterion_name": last["criterion_name"],
                                   "optimizer_name": last["optimizer_name"],
                                   "lr_scheduler_state": {"best": None}, "num_updates": 0}],
            "task_state": teacher_state.get("task_state") or {},
            "extra_state": {"train_iterator": {"version": 2, "epoch": 1,
                                               "iterations_in_epoch": 0, "shuffle": True}},
            "distill_init": info}


def step_init(args, prep: Path):
    out_dir = args.work / "init"
    path, record_path = out_dir / "student_init.pt", out_dir / "student_init.json"
    if args.init == "random":
        log("init: --init random, the student starts from fairseq's initialisation")
        return {"init": "random"}
    if path.exists() and record_path.exists():
        log(f"init: {rel(path)} exists, skipped")
        return read_json(record_path)
    from fairseq import checkpoint_utils

    from fairseq_taskmoe.compat import load_checkpoint
    from fairseq_taskmoe.pruning import count_parameters

    start = time.time()
    teacher = teacher_identity(args)
    check_settings(args, teacher)
    log("init: count the teacher's expert use on the validation set ...")
    chosen, shares = most_used_experts(args, prep / "bin")
    how = "the two experts with most (token, expert) assignments on the validation set"
    if not chosen:
        how = "experts 0 and 1 (the teacher gave no routing counts)"
    state = load_checkpoint(str(args.teacher))
    model_args = state["cfg"]["model"]
    model, used = student_state(state["model"], chosen)
    for layer, (a, b) in used.items():
        side = "encoder" if layer.startswith("encoder") else "decoder"
        width = model[f"{layer}.ffn.fc1.weight"].shape[0]
        dense = getattr(model_args, f"{side}_ffn_embed_dim")
        if width != dense:
            raise Stop(f"{layer}: two merged experts are {width} wide but the student's FFN is "
                       f"{dense}: the student would not be the pruned sub-network's size")
        sh = shares.get(layer)
        log(f"init: {layer}: FFN = 0.5 * (expert {a} + expert {b})"
            + (f" (they get {sh[a]:.1%} and {sh[b]:.1%} of the assignments)" if sh else ""))
    info = {"init": "teacher", "teacher": teacher,
            "copied": "every weight outside the MoE layers' FFNs (embeddings, attention, layer "
                      "norms, dense FFNs)",
            "moe_ffn": "merge_ffns([expert_a, expert_b], [0.5, 0.5]): one FFN of twice the "
                       "expert width computing 0.5 * (expert_a(x) + expert_b(x)); routers "
                       "dropped",
            "experts_chosen_by": how, "experts": used, "expert_shares_valid": shares,
            "params": count_parameters(model)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(init_checkpoint(state, model, info), str(path))
    # what fairseq-train --finetune-from-model does: build the model from the config and load
    # the weights strictly
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": str(prep / "bin")})
    info["loads_in_fairseq"] = type(models[0]).__name__
    info["seconds"] = round(time.time() - start, 1)
    write_json(record_path, info)
    log(f"init: wrote {rel(path)} ({info['params']:,} parameters; loads strictly in fairseq)")
    return info


# ---------------------------------------------------------------- train, evaluate


def register_variant(args):
    """The student as a study variant: study.train/evaluate then run it like any other."""
    flags = ["--moe-freq", 0]
    if args.init == "teacher":
        flags += ["--finetune-from-model", args.work / "init" / "student_init.pt"]
    label = f"dense student distilled from {study.VARIANTS['token_token']['label']}" + (
        "" if args.init == "teacher" else " (random init)")
    study.VARIANTS[args.variant] = dict(label=label, flags=flags, seeds=(args.seed,),
                                        routing=None)


def step_train(args):
    data = args.work / "data" / "bin"
    if not (data / ".done").exists():
        raise Stop("train: no distilled data yet; run the teacher and binarize steps")
    if args.init == "teacher" and not (args.work / "init" / "student_init.pt").exists():
        raise Stop("train: no student_init.pt yet; run the init step")
    run_dir = args.work / "runs" / args.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    return study.train(args, data, run_dir, args.variant, args.seed, args.run_name)


def step_evaluate(args, prep: Path, train_cmd):
    run_dir = args.work / "runs" / args.run_name
    done = run_dir / "train.done.json"
    if not done.exists() or read_json(done).get("max_update") != args.max_update:
        raise Stop("evaluate: the student is not trained yet; run the train step")
    path = run_dir / "evaluation.json"
    trained = read_json(done)["num_updates"]
    if path.exists() and read_json(path)["budget"]["updates_done"] == trained:
        log(f"evaluate: {rel(path)} exists, skipped")
        return read_json(path)
    if train_cmd is None:
        train_cmd = study.train_command(args.work / "data" / "bin", args.variant, args.seed,
                                        run_dir / "checkpoints", args.max_update,
                                        args.save_interval)
    args.langid_accuracy = study.langid_accuracy(prep)
    out = study.evaluate(args, args.work / "data", args.run_name, args.variant, args.seed,
                         run_dir, train_cmd)
    write_json(path, out)
    return out


# ---------------------------------------------------------------- speed


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
                   f".venv/bin/python scripts/study.py --only {PRUNED_RUN}, then run this again "
                   "(the other steps are kept)")
    from fairseq_taskmoe.compat import load_checkpoint
    from fairseq_taskmoe.pruning import count_parameters

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
            cmd = generate_command(prep / "bin", ckpt, pair, beam=study.BEAM,
                                   langs=",".join(LANGS), pairs=",".join(TRAINED))
            if args.max_len_b is not None:
                cmd += ["--max-len-a", 0, "--max-len-b", args.max_len_b]
            text = run(cmd, log_path=out_dir / f"gen.{args.run_name}.{who}.{pair}.r{r}.txt")
            rounds.append({"round": r, "model": who, **generation_speed(text)})
            log(f"speed: round {r + 1}/{args.speed_rounds} {who}: "
                f"{rounds[-1]['tokens_per_s']:.1f} tokens/s")
    record = {"pair": pair, "test_set": "Multi30k test_2016_flickr", "beam": study.BEAM,
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


# ---------------------------------------------------------------- report


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
    out["commands"] = {**out["commands"], "study": f"scripts/distill.py {argv}".strip(),
                       "prepare": (f"scripts/distill.py (teacher: {decode['command_example']}; "
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
                                        "run scripts/distill.py again once it is"}
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


# ---------------------------------------------------------------- driver


def study_data(args) -> Path:
    """The study's data folder (the teacher's training data), prepared if it is not there."""
    ns = SimpleNamespace(work=args.study_work, train_size=args.train_size,
                         multi30k_dir=args.multi30k_dir)
    prep = study.prepare_data(ns)
    args.prepare_command = ns.prepare_command
    return prep


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, study._terminate_child)
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


if __name__ == "__main__":
    sys.exit(main())
