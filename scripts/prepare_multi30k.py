#!/usr/bin/env python3
"""Prepare Multi30k (Task 1: en, de, fr, cs) as fairseq binary data for multilingual MT.

Usage (from the repository root, after `make venv`):

    .venv/bin/python scripts/prepare_multi30k.py --out work/multi30k

Quick small run (a few seconds):

    .venv/bin/python scripts/prepare_multi30k.py --out /tmp/m30k --train-size 2000 --vocab-size 2000

Steps (each is skipped when its output already exists, so re-runs are fast and an
interrupted run resumes; every file is written under a temporary name and renamed
when complete, so a partial file is never mistaken for a finished one):

  1. text   <out>/text/{train,valid,test}.{lang}   stripped raw lines (train: first N)
  2. spm    <out>/spm.model, <out>/spm.vocab        one joint SentencePiece model
  3. encode <out>/spm/{split}.{lang}                space-separated pieces
  4. bin    <out>/bin/                              fairseq-preprocess, one run per pair
  5. done   <out>/bin/langs.txt, <out>/bin/.done

<out>/bin is the fairseq data directory (for translation_multi_simple_epoch: pass it as
DATA with --langs "$(cat <out>/bin/langs.txt)" and --lang-pairs from --pairs).

Raw data comes from --multi30k-dir, else $MULTI30K_DIR, else ../shared/data/multi30k
next to the repository, else it is downloaded from the Multi30k GitHub repository
into <out>/raw/.
"""

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Pinned so a download always gives the same bytes as /work/shared/data/multi30k.
M30K_COMMIT = "a3d2e0d26b56f3846f66a952536ffed4e401d05a"
M30K_URL = f"https://raw.githubusercontent.com/multi30k/dataset/{M30K_COMMIT}/data/task1/raw/"

# Our split name -> file stem in the Multi30k repository.
SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}

# sha256 of the gzipped originals (from the shared data README); used to check downloads.
SHA256 = {
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "train.cs.gz": "a65adb8b32e3bc664f21ecba7a6e7f6950fd1f405e135f7c312faabdb6255077",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
    "val.cs.gz": "b63226e05c4bd5dd6a42897d74b86a1b9d2c31498252c572b1ea7f7996927fcc",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
    "test_2016_flickr.cs.gz": "200a4a74cc9560f051924abb9803be008d1908d77f747e9141aeb86dfd2797f1",
}

# Total sentences SentencePiece trains on; keeps training well under a minute on 2 cores.
SPM_MAX_SENTENCES = 200_000
SPM_SEED = 1234
# fairseq's Dictionary adds these itself; listing them again in dict.txt would duplicate them.
FAIRSEQ_SPECIALS = {"<unk>", "<s>", "</s>", "<pad>"}
DUMMY_COUNT = 100


def log(msg):
    print(f"[prepare] {msg}", flush=True)


def fail(msg):
    sys.exit(f"[prepare] error: {msg}")


@contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; rename it to `path` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_lines(path, lines):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


# ---------------------------------------------------------------- arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Prepare Multi30k as SentencePiece-encoded fairseq binary data.")
    p.add_argument("--multi30k-dir", default=None,
                   help="folder with the raw {train,val,test_2016_flickr}.{lang}.gz files "
                        "(default: $MULTI30K_DIR, else ../shared/data/multi30k next to the "
                        "repository, else download into <out>/raw/)")
    p.add_argument("--out", default=str(REPO / "work" / "multi30k"),
                   help="output folder (default: work/multi30k in the repository)")
    p.add_argument("--langs", default="en,de,fr,cs",
                   help="comma-separated language list; its order is written to bin/langs.txt "
                        "(default: %(default)s)")
    p.add_argument("--pairs", default="en-de,de-en,en-fr,fr-en,en-cs,cs-en",
                   help="comma-separated src-tgt pairs to binarize (default: %(default)s)")
    p.add_argument("--train-size", type=int, default=None,
                   help="use only the first N training lines (default: all)")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="joint SentencePiece vocabulary size (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes for fairseq-preprocess (default: %(default)s)")
    args = p.parse_args(argv)

    args.langs = [x for x in args.langs.split(",") if x]
    args.pairs = [tuple(x.split("-")) for x in args.pairs.split(",") if x]
    for pair in args.pairs:
        if len(pair) != 2 or pair[0] == pair[1]:
            p.error(f"bad pair {'-'.join(pair)!r}; expected e.g. en-de")
        for lang in pair:
            if lang not in args.langs:
                p.error(f"pair {'-'.join(pair)} uses {lang!r}, which is not in --langs")
    if args.train_size is not None and args.train_size < 1:
        p.error("--train-size must be positive")
    if args.vocab_size < 10:
        p.error("--vocab-size is too small")
    # Text and the SentencePiece model only need languages some pair uses.
    used = {lang for pair in args.pairs for lang in pair}
    args.text_langs = [lang for lang in args.langs if lang in used]
    args.out = Path(args.out).resolve()
    return args


def check_settings(args):
    """Refuse to mix outputs made with different settings in one --out folder."""
    settings = {
        "langs": args.langs,
        "pairs": ["-".join(p) for p in args.pairs],
        "train_size": args.train_size,
        "vocab_size": args.vocab_size,
    }
    path = args.out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            diff = ", ".join(f"{k}: {old.get(k)} -> {v}" for k, v in settings.items()
                             if old.get(k) != v)
            fail(f"{args.out} was prepared with other settings ({diff}); "
                 f"use a new --out or delete {args.out}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1) + "\n")


# ---------------------------------------------------------------- raw data


def raw_names(langs):
    return [f"{stem}.{lang}.gz" for stem in SPLITS.values() for lang in langs]


def find_raw_dir(args):
    names = raw_names(args.text_langs)
    if args.multi30k_dir or os.environ.get("MULTI30K_DIR"):
        given = Path(args.multi30k_dir or os.environ["MULTI30K_DIR"])
        source = "--multi30k-dir" if args.multi30k_dir else "$MULTI30K_DIR"
        missing = [n for n in names if not (given / n).is_file()]
        if missing:
            fail(f"{source} = {given} lacks {', '.join(missing)}; point it (or set "
                 f"MULTI30K_DIR) to a folder with the raw Multi30k .gz files")
        return given
    shared = REPO.parent / "shared" / "data" / "multi30k"
    if all((shared / n).is_file() for n in names):
        return shared
    return download_raw(args.out / "raw", names)


def download_raw(dest, names):
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = dest / name
        if path.is_file():
            continue
        url = M30K_URL + name
        log(f"download {url}")
        try:
            with atomic_path(path) as tmp:
                with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
                digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
                if name in SHA256 and digest != SHA256[name]:
                    raise OSError(f"sha256 mismatch ({digest})")
        except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
            fail(f"could not download {url}: {e}\n"
                 f"  No local copy found. Set MULTI30K_DIR (or --multi30k-dir) to a folder "
                 f"with {', '.join(names[:2])}, ... from https://github.com/multi30k/dataset "
                 f"(data/task1/raw/).")
    return dest


# ---------------------------------------------------------------- steps


def missing_split_files(args, folder):
    """(split, lang) pairs whose `folder/{split}.{lang}` does not exist yet."""
    return [(s, l) for s in SPLITS for l in args.text_langs if not (folder / f"{s}.{l}").exists()]


def step_text(args, raw_dir):
    """Decompress, strip (some lines have stray spaces) and cut the training set."""
    text = args.out / "text"
    text.mkdir(parents=True, exist_ok=True)
    todo = missing_split_files(args, text)
    if not todo:
        log("step 1/4 text: exists, skipped")
        return
    log(f"step 1/4 text: {len(todo)} files from {raw_dir}")
    for split, lang in todo:
        with gzip.open(raw_dir / f"{SPLITS[split]}.{lang}.gz", "rt", encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        if split == "train" and args.train_size is not None:
            lines = lines[: args.train_size]
        write_lines(text / f"{split}.{lang}", lines)
    # The languages must stay line-aligned, otherwise every pair is garbage.
    for split in SPLITS:
        counts = {l: len(read_lines(text / f"{split}.{l}")) for l in args.text_langs}
        if len(set(counts.values())) != 1:
            fail(f"{split} is not line-aligned across languages: {counts}")


def step_spm(args):
    model, vocab = args.out / "spm.model", args.out / "spm.vocab"
    if model.exists() and vocab.exists():
        log("step 2/4 spm: exists, skipped")
        return
    import sentencepiece as spm

    # Same number of lines per language so no language dominates the joint vocabulary.
    per_lang = SPM_MAX_SENTENCES // len(args.text_langs)
    lines = []
    for lang in args.text_langs:
        lines += read_lines(args.out / "text" / f"train.{lang}")[:per_lang]
    log(f"step 2/4 spm: unigram, vocab {args.vocab_size}, {len(lines)} sentences")

    # Plain string: spm appends .model/.vocab itself, and Path.with_suffix would eat ".tmp".
    # No pid in the name: spm stores these paths in the model, and reruns should match.
    prefix = str(args.out / ".spm.tmp")
    corpus = Path(prefix + ".txt")
    write_lines(corpus, lines)
    try:
        spm.set_random_generator_seed(SPM_SEED)
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=prefix,
            model_type="unigram",
            vocab_size=args.vocab_size,
            character_coverage=1.0,
            input_sentence_size=SPM_MAX_SENTENCES,
            shuffle_input_sentence=True,
            # Small --train-size runs may not support the full vocabulary; shrink instead of dying.
            hard_vocab_limit=False,
            num_threads=2,
            minloglevel=1,
        )
        # vocab first: the skip check needs both, and model is the one renamed last.
        os.replace(prefix + ".vocab", vocab)
        os.replace(prefix + ".model", model)
    finally:
        for suffix in (".txt", ".vocab", ".model"):
            Path(prefix + suffix).unlink(missing_ok=True)


def step_encode(args):
    enc = args.out / "spm"
    enc.mkdir(parents=True, exist_ok=True)
    todo = missing_split_files(args, enc)
    if not todo:
        log("step 3/4 encode: exists, skipped")
        return
    import sentencepiece as spm

    log(f"step 3/4 encode: {len(todo)} files")
    sp = spm.SentencePieceProcessor(model_file=str(args.out / "spm.model"))
    for split, lang in todo:
        pieces = sp.encode(read_lines(args.out / "text" / f"{split}.{lang}"), out_type=str)
        write_lines(enc / f"{split}.{lang}", (" ".join(p) for p in pieces))


def write_dict(args):
    """fairseq dictionary from the SentencePiece vocabulary, same for every language."""
    path = args.out / "dict.txt"
    if path.exists():
        return path
    pieces = [line.split("\t")[0] for line in read_lines(args.out / "spm.vocab")]
    # fairseq splits lines on any whitespace, so such a piece could never be looked up.
    bad = [p for p in pieces if len(p.split()) != 1]
    if bad:
        fail(f"SentencePiece pieces with whitespace: {bad!r}")
    write_lines(path, (f"{p} {DUMMY_COUNT}" for p in pieces if p not in FAIRSEQ_SPECIALS))
    return path


def find_preprocess():
    # Prefer the binary of the running interpreter's environment (e.g. .venv/bin).
    here = Path(sys.executable).parent / "fairseq-preprocess"
    exe = str(here) if here.exists() else shutil.which("fairseq-preprocess")
    if not exe:
        fail("fairseq-preprocess not found; run `make venv` and use .venv/bin/python")
    return exe


def pair_files(src, tgt):
    return [f"{s}.{src}-{tgt}.{l}.{ext}"
            for s in SPLITS for l in (src, tgt) for ext in ("bin", "idx")]


def find_donor(bindir, name):
    """An existing file with the same content as `name`, from another pair.

    The binary of one language's split depends only on the text and the dictionary, not
    on the pair, so e.g. de-en can reuse en-de's files; this halves fairseq-preprocess runs.
    """
    split, _, lang, ext = name.split(".")
    for other in sorted(bindir.glob(f"{split}.*-*.{lang}.{ext}")):
        if other.name != name:
            return other
    return None


def binarize_pair(args, exe, dict_path, src, tgt):
    pair = f"{src}-{tgt}"
    bindir = args.out / "bin"
    # Binarize into a scratch folder and move finished files in one by one, so bin/
    # only ever holds complete files.
    tmp = args.out / f".bin.tmp.{pair}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [exe, "--source-lang", src, "--target-lang", tgt,
           "--trainpref", str(args.out / "spm" / "train"),
           "--validpref", str(args.out / "spm" / "valid"),
           "--testpref", str(args.out / "spm" / "test"),
           "--srcdict", str(dict_path), "--tgtdict", str(dict_path),
           "--destdir", str(tmp), "--workers", str(args.workers)]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        tail = "\n".join(res.stdout.splitlines()[-20:])
        fail(f"fairseq-preprocess failed for {pair} (exit {res.returncode}):\n"
             f"  {' '.join(cmd)}\n{tail}")
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    shutil.move(tmp / "preprocess.log", logs / f"preprocess.{pair}.log")
    for name in pair_files(src, tgt):
        os.replace(tmp / name, bindir / name)
    shutil.rmtree(tmp)


def step_bin(args):
    bindir = args.out / "bin"
    if (bindir / ".done").exists():
        log("step 4/4 bin: exists, skipped")
        return
    bindir.mkdir(parents=True, exist_ok=True)
    dict_path = write_dict(args)
    exe = None
    for src, tgt in args.pairs:
        pair = f"{src}-{tgt}"
        names = [n for n in pair_files(src, tgt) if not (bindir / n).exists()]
        if not names:
            log(f"step 4/4 bin {pair}: exists, skipped")
            continue
        donors = {n: find_donor(bindir, n) for n in names}
        if all(donors.values()):
            log(f"step 4/4 bin {pair}: copied from other pairs")
            for name, donor in donors.items():
                with atomic_path(bindir / name) as tmp:
                    shutil.copyfile(donor, tmp)
            continue
        exe = exe or find_preprocess()
        log(f"step 4/4 bin {pair}: fairseq-preprocess")
        binarize_pair(args, exe, dict_path, src, tgt)

    # translation_multi_simple_epoch loads dict.{lang}.txt for every language in --langs.
    for lang in args.langs:
        shutil.copyfile(dict_path, bindir / f"dict.{lang}.txt")
    write_lines(bindir / "langs.txt", [",".join(args.langs)])
    write_lines(bindir / ".done", [time.strftime("%Y-%m-%d %H:%M:%S")])


# ---------------------------------------------------------------- summary


def summary(args, start):
    text = args.out / "text"
    first = args.text_langs[0]
    counts = ", ".join(f"{s} {len(read_lines(text / f'{s}.{first}'))}" for s in SPLITS)
    # +4: fairseq's own <s> <pad> </s> <unk>.
    vocab = len(read_lines(args.out / "dict.txt")) + 4
    log(f"lines per language: {counts}")
    log(f"languages: {','.join(args.langs)}; pairs: {','.join('-'.join(p) for p in args.pairs)}")
    log(f"fairseq vocabulary: {vocab} symbols")
    log(f"elapsed: {time.time() - start:.1f}s")
    log(f"fairseq data directory: {args.out / 'bin'}")


def main(argv=None):
    start = time.time()
    args = parse_args(argv)
    check_settings(args)
    if not all((args.out / "text" / f"{s}.{l}").exists()
               for s in SPLITS for l in args.text_langs):
        raw_dir = find_raw_dir(args)
    else:
        raw_dir = None  # nothing to decompress, so do not look for (or download) raw data
    step_text(args, raw_dir)
    step_spm(args)
    step_encode(args)
    step_bin(args)
    summary(args, start)


if __name__ == "__main__":
    main()
