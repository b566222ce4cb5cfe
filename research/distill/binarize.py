"""Step 2, binarize: the teacher's hypotheses become the training targets (fairseq-preprocess
with the study's dictionaries, the study's sources unchanged, checked byte for byte)."""

import filecmp
import os
import re
import shutil
import time
from pathlib import Path

from fairseq_taskmoe.atomic import atomic_file
from research.common import BIN, hms, read_json, rel, run, write_json
from research.distill.config import Stop, log
from research.distill.teacher import chunk_path, read_chunk
from research.study.grid import TRAINED

LANGTOK = re.compile(r"^__[a-z_]+__$")


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
    for f in sorted((prep / "text").glob("test.*")):  # references for evaluation.score
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
