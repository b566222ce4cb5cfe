#!/usr/bin/env python3
"""Prepare LoHelp: a many-way parallel corpus from LibreOffice's translated help (Debian's
libreoffice-help-* packages), as fairseq binary data for English-centric multilingual MT.

Usage (from the repository root, after `make venv`; `make lohelp` runs the first line):

    .venv/bin/python scripts/prepare_lohelp.py
    .venv/bin/python scripts/prepare_lohelp.py --coverage-only --langs de,fr,fi,ja,zh

The help is the same HTML pages in every language, and a paragraph carries the same id in every
language (<p id="par_id881605975490097">, <h2 id="hd_id3146944">), so (page, id) aligns the
languages. An untranslated paragraph is the English text itself.

Steps (each is skipped when its outputs exist, so a re-run is fast and an interrupted run
resumes; every file is written under a temporary name and renamed when complete):

  1. download  <work>/debs/*.deb, <work>/pkg/<lang>/   apt-get download + dpkg -x, per language
  2. extract   <work>/extract/<lang>.tsv               page, key, text of every paragraph
  3. align     <work>/text/{train,valid,test}.en-X.{en,X}, <work>/pages.tsv, <work>/stats.json,
               and the table <results>/corpus.{md,json} and the split <results>/split.tsv;
               then the many-way test set <work>/text/test.many.tsv and its table
               <results>/test_many.{md,json} (test paragraphs per X-Y direction)
  4. spm       <work>/spm.model, <work>/spm.vocab       one joint SentencePiece model
  5. encode    <work>/spm/{split}.en-X.{en,X}           space-separated pieces
  6. bin       <work>/bin/                              fairseq-preprocess, one run per en-X
                                                        (X-en's files are copies of en-X's)
  7. done      <work>/bin/langs.txt, <work>/bin/.done

<work>/bin is the fairseq data directory, laid out as scripts/prepare_multi30k.py's: pass it
as DATA with --langs "$(cat <work>/bin/langs.txt)" and --lang-pairs en-X,X-en,... Unlike
Multi30k the languages do not share one set of lines: each pair en-X has its own paragraphs
(those translated into X), hence text/ and spm/ files per pair.

Extraction (step 2) keeps the text of inline markup, decodes entities, drops images and the
hidden variants of inline switches (macOS keys, another module's wording), and skips code
paragraphs (class code, codeintable, smathcode). Filters (step 3): a paragraph is dropped when
its English has fewer than --min-words words; per pair, when it is untranslated (equal to the
English up to case, spacing and punctuation; for a language written in another script, when
fewer than --min-script-share of its words are in that script), holds a failed embed, or its
English was seen before (the first occurrence, in page order, is kept). The split is by help
page (a hash of the page path): an English text that occurs on a test page is test in every
pair, else valid when on a valid page, else train; English texts are compared case- and
punctuation-blind for this, so no test or valid paragraph's English (nearly) appears in any
pair's training data. docs/corpus-lohelp.md has the details, the choice of languages and the
measured corpus.

The many-way test set (step 3, for the directions nobody trained, X-Y): one row per test
paragraph (page, key) that any pair kept, with its English and every language's translation in
that pair's test set (an empty cell where the pair dropped or lacks it), so X-Y's test set is
the rows where both X and Y are filled: same filters, same test pages and caps as en-X and
en-Y. The en and X columns of the rows with X filled are test.en-X.{en,X}, line for line (the
script checks it).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import unicodedata
from contextlib import contextmanager
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The chosen languages, after measuring 21 candidates' coverage (docs/corpus-lohelp.md):
# Multi30k's de, fr, cs; well covered it, nl, el, es, pl (77-98%); zh, tr, ru around 60%;
# sv, ja, fi around 45-50%. Scripts: Latin, Greek, Cyrillic, Han, Han + kana.
DEFAULT_LANGS = "de,fr,cs,it,nl,el,es,pl,zh,tr,ru,sv,ja,fi"

# Our language code (a fairseq language: no "-", since fairseq splits pairs on it) ->
# (Debian package suffix, folder under usr/share/libreoffice/help). Others: code = both.
LANG_NAMES = {"en": ("en-us", "en-US"), "zh": ("zh-cn", "zh-CN"), "zhtw": ("zh-tw", "zh-TW"),
              "ptbr": ("pt-br", "pt-BR"), "engb": ("en-gb", "en-GB")}

# Languages written in another script than English: the Unicode script names (the first word
# of a character's name) most of a translated paragraph's words must be in (script_share).
SCRIPTS = {
    "ru": {"CYRILLIC"}, "uk": {"CYRILLIC"}, "bg": {"CYRILLIC"}, "el": {"GREEK"},
    "ja": {"CJK", "IDEOGRAPHIC", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA", "HALFWIDTH"},
    "zh": {"CJK", "IDEOGRAPHIC"}, "zhtw": {"CJK", "IDEOGRAPHIC"}, "ko": {"HANGUL", "CJK"},
    "hi": {"DEVANAGARI"}, "km": {"KHMER"}, "dz": {"TIBETAN"},
}

# What a page holds where an embedded section could not be found when the help was built.
BROKEN_EMBED = re.compile(r"\[\S+\.xhp#\S* not found\]")
# For the tables: the script a language is written in, in words.
SCRIPT_LABELS = {"ru": "Cyrillic", "uk": "Cyrillic", "bg": "Cyrillic", "el": "Greek",
                 "ja": "Han + kana", "zh": "Han", "zhtw": "Han", "ko": "Hangul (+ Han)",
                 "hi": "Devanagari", "km": "Khmer", "dz": "Tibetan"}
# Scripts whose every character counts as a word in script_share.
CHARACTER_WORDS = {"CJK", "IDEOGRAPHIC", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA",
                   "HALFWIDTH", "HANGUL"}

SPLITS = ("train", "valid", "test")
# The many-way test set: page, key, en, then every language of --langs (header row first).
MANY_WAY = "test.many.tsv"
# Paragraph classes that hold code, formulas or math input, not prose.
CODE_CLASSES = {"code", "codeintable", "smathcode"}
VOID_TAGS = {"br", "img", "input", "meta", "hr", "wbr", "link", "area", "base", "col", "embed",
             "source", "track", "param"}
PARAGRAPH_TAGS = {"p", "h", "h1", "h2", "h3", "h4", "h5", "h6"}

SPM_SEED = 1234
# fairseq's Dictionary adds these itself; listing them again in dict.txt would duplicate them.
FAIRSEQ_SPECIALS = {"<unk>", "<s>", "</s>", "<pad>"}
DUMMY_COUNT = 100


def log(msg):
    print(f"[lohelp] {msg}", flush=True)


def fail(msg):
    sys.exit(f"[lohelp] error: {msg}")


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
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def write_lines(path, lines):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def package_name(lang):
    return "libreoffice-help-" + LANG_NAMES.get(lang, (lang, lang))[0]


def help_folder(lang):
    return LANG_NAMES.get(lang, (lang, lang))[1]


# ---------------------------------------------------------------- arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Prepare LoHelp (LibreOffice's translated help, from Debian's "
                    "libreoffice-help-* packages) as SentencePiece-encoded fairseq binary data "
                    "for the English-centric directions en-X and X-en.",
        epilog="Steps: download, extract, align (filter + split by page, writes the table), "
               "spm, encode, bin; each is skipped when its outputs exist.")
    p.add_argument("--work-dir", default=str(REPO / "work" / "lohelp"),
                   help="output folder (default: work/lohelp in the repository)")
    p.add_argument("--results-dir", default=str(REPO / "results" / "lohelp"),
                   help="where the table (corpus.md, corpus.json; candidates.* with "
                        "--coverage-only) and the split (split.tsv) go (default: results/lohelp)")
    p.add_argument("--langs", default=DEFAULT_LANGS,
                   help="comma-separated languages besides English, in the order written to "
                        "bin/langs.txt after en (codes without '-': zh is zh-CN, zhtw zh-TW, "
                        "ptbr pt-BR) (default: %(default)s)")
    p.add_argument("--coverage-only", action="store_true",
                   help="download and extract --langs, then write their coverage to "
                        "<results>/candidates.{md,json} and stop (to choose the languages)")
    p.add_argument("--min-words", type=int, default=4,
                   help="drop paragraphs whose English has fewer words (default: %(default)s)")
    p.add_argument("--min-script-share", type=float, default=0.5,
                   help="for a language in another script than English: the share of a "
                        "paragraph's words that must be in it, a CJK character counting as a "
                        "word (default: %(default)s)")
    p.add_argument("--valid-pages", type=float, default=0.02,
                   help="fraction of help pages in the valid split (default: %(default)s)")
    p.add_argument("--test-pages", type=float, default=0.05,
                   help="fraction of help pages in the test split (default: %(default)s)")
    p.add_argument("--max-valid", type=int, default=1000,
                   help="at most this many valid paragraphs per pair, whole pages in hash order "
                        "(default: %(default)s)")
    p.add_argument("--max-test", type=int, default=2000,
                   help="at most this many test paragraphs per pair, whole pages in hash order "
                        "(default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=24000,
                   help="joint SentencePiece vocabulary size (default: %(default)s)")
    p.add_argument("--spm-lines-per-lang", type=int, default=12000,
                   help="training paragraphs per language in SentencePiece's balanced sample "
                        "(default: %(default)s)")
    p.add_argument("--character-coverage", type=float, default=1.0,
                   help="SentencePiece's character_coverage (default: %(default)s: the 14 "
                        "languages' sample has only about 2,300 distinct characters, and 0.9995 "
                        "left 1.8%% of the Chinese training pieces <unk>)")
    p.add_argument("--threads", type=int, default=1,
                   help="SentencePiece threads and fairseq-preprocess workers "
                        "(default: %(default)s)")
    args = p.parse_args(argv)

    args.langs = [x.strip() for x in args.langs.split(",") if x.strip()]
    if not args.langs:
        p.error("--langs is empty")
    bad = [x for x in args.langs if "-" in x or x == "en"]
    if bad:
        p.error(f"bad language(s) {bad}: en is always included; write codes without '-' "
                f"(zh, zhtw, ptbr)")
    if len(set(args.langs)) != len(args.langs):
        p.error("--langs lists a language twice")
    if not (0 <= args.valid_pages and 0 < args.test_pages and
            args.valid_pages + args.test_pages < 1):
        p.error("--valid-pages and --test-pages must be fractions that sum to under 1")
    if args.min_words < 1 or args.vocab_size < 100 or args.spm_lines_per_lang < 1:
        p.error("--min-words, --vocab-size or --spm-lines-per-lang is too small")
    args.work_dir = Path(args.work_dir).resolve()
    args.results_dir = Path(args.results_dir).resolve()
    args.all_langs = ["en", *args.langs]
    args.pairs = [("en", x) for x in args.langs]
    return args


def settings_of(args):
    keys = ("langs", "min_words", "min_script_share", "valid_pages", "test_pages", "max_valid",
            "max_test", "vocab_size", "spm_lines_per_lang", "character_coverage")
    return {k: getattr(args, k) for k in keys}


def check_settings(args):
    """Refuse to mix outputs made with different settings in one --work-dir (downloads and
    extractions are per language and shared by any settings; --coverage-only writes none)."""
    settings = settings_of(args)
    path = args.work_dir / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            diff = ", ".join(f"{k}: {old.get(k)} -> {v}" for k, v in settings.items()
                             if old.get(k) != v)
            fail(f"{args.work_dir} was prepared with other settings ({diff}); use a new "
                 f"--work-dir, or delete its settings.json and the outputs of steps 3-7 (text/, "
                 f"spm*, dict.txt, bin/, pages.tsv, stats.json)")
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


class Timer:
    """Seconds per step, kept across sittings in <work>/times.json (a skipped step keeps its
    time from the sitting that ran it)."""

    def __init__(self, path):
        self.path = path
        self.times = json.loads(path.read_text()) if path.exists() else {}

    def record(self, name, seconds):
        self.times[name] = round(seconds, 1)
        write_json(self.path, self.times)


# ---------------------------------------------------------------- 1. download


def step_download(args, langs):
    debs, pkg = args.work_dir / "debs", args.work_dir / "pkg"
    todo = [lang for lang in langs if not (pkg / lang).is_dir()]
    if not todo:
        log("step 1/6 download: exists, skipped")
        return
    debs.mkdir(parents=True, exist_ok=True)
    pkg.mkdir(parents=True, exist_ok=True)
    for i, lang in enumerate(todo, 1):
        name = package_name(lang)
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            log(f"step 1/6 download {i}/{len(todo)}: apt-get download {name}")
            # Into a scratch folder (apt-get download writes to the current folder), moved in
            # when complete. The sandbox option silences apt's warning when run as root.
            tmp = debs / f".download.{name}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            cmd = ["apt-get", "download", "-q", name]
            if os.geteuid() == 0:
                cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
            try:
                res = subprocess.run(cmd, cwd=tmp, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
                got = sorted(tmp.glob("*.deb"))
                if res.returncode != 0 or len(got) != 1:
                    fail(f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n{res.stdout}\n"
                         f"  Is there such a package (`apt-cache search libreoffice-help`)? If "
                         f"apt knows no packages, run `apt-get update` first (as root).")
                os.replace(got[0], debs / got[0].name)
                found = [debs / got[0].name]
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        log(f"step 1/6 unpack {lang}: dpkg -x {found[-1].name}")
        with atomic_path(pkg / lang) as tmp:
            subprocess.run(["dpkg", "-x", str(found[-1]), str(tmp)], check=True)
            folder = tmp / "usr/share/libreoffice/help" / help_folder(lang)
            if folder.is_symlink():  # e.g. Debian's Slovak help is a link to the Czech one
                fail(f"{found[-1].name}'s usr/share/libreoffice/help/{help_folder(lang)} is a "
                     f"link to {os.readlink(folder)}: another language's help, not {lang}")
            if not folder.is_dir():
                fail(f"{found[-1].name} has no usr/share/libreoffice/help/{help_folder(lang)}")


def package_versions(args, langs):
    """{lang: the .deb file unpacked} for the record."""
    out = {}
    for lang in langs:
        found = sorted((args.work_dir / "debs").glob(f"{package_name(lang)}_*.deb"))
        out[lang] = found[-1].name.replace("%3a", ":") if found else None
    return out


# ---------------------------------------------------------------- 2. extract


def normalise_space(text):
    return " ".join(text.split())


class HelpPageParser(HTMLParser):
    """The paragraphs of one help page: [(key, text)] in document order.

    A paragraph is a <p> or heading whose id starts with par_ or hd_; its key is the id, with
    "#2", "#3", ... appended to a later occurrence of the same id on the page (embedded
    sections repeat ids). Entities are decoded; inline elements (<span>, <a>, <sup>, ...) keep
    their text; <br> is a space; images have none. Inside a paragraph, an inline switch's
    hidden variants (macOS keys, another module's wording) are dropped and only its default
    variant kept. Code paragraphs (CODE_CLASSES) are skipped.
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs = []
        self.seen = {}
        self.current = None  # (tag, key, parts, stack of open inline tags) of the open paragraph
        self.skip_depth = 0  # >0 inside a dropped hidden variant (its own depth in the stack)

    def _finish(self):
        tag, key, parts, _ = self.current
        self.current = None
        self.skip_depth = 0
        if key is not None:
            self.paragraphs.append((key, normalise_space("".join(parts))))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in PARAGRAPH_TAGS:
            if self.current is not None:  # an unclosed paragraph ends where the next begins
                self._finish()
            pid = attrs.get("id") or ""
            if pid.startswith(("par_", "hd_")):
                n = self.seen[pid] = self.seen.get(pid, 0) + 1
                key = pid if n == 1 else f"{pid}#{n}"
                classes = set((attrs.get("class") or "").split())
                if classes & CODE_CLASSES:
                    key = None  # parsed, so that its end is found, but not kept
                self.current = (tag, key, [], [])
            return
        if self.current is None:
            return
        parts, stack = self.current[2], self.current[3]
        if tag == "br" and not self.skip_depth:
            parts.append(" ")
        if tag in VOID_TAGS:
            return
        stack.append(tag)
        if (not self.skip_depth and "hidden" in attrs
                and not (attrs.get("id") or "").startswith("default")):
            self.skip_depth = len(stack)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID_TAGS and self.current is not None and tag not in PARAGRAPH_TAGS:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if self.current is None:
            return
        if tag == self.current[0]:
            self._finish()
            return
        stack = self.current[3]
        if tag in stack:  # close it and anything left open inside it
            while stack:
                if self.skip_depth and len(stack) == self.skip_depth:
                    self.skip_depth = 0
                if stack.pop() == tag:
                    break

    def handle_data(self, data):
        if self.current is not None and not self.skip_depth:
            self.current[2].append(data)

    def close(self):
        super().close()
        if self.current is not None:
            self._finish()


def parse_page(html):
    parser = HelpPageParser()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def help_root(args, lang):
    return args.work_dir / "pkg" / lang / "usr/share/libreoffice/help" / help_folder(lang)


def step_extract(args, langs):
    out = args.work_dir / "extract"
    out.mkdir(parents=True, exist_ok=True)
    todo = [lang for lang in langs if not (out / f"{lang}.tsv").exists()]
    if not todo:
        log("step 2/6 extract: exists, skipped")
        return
    for i, lang in enumerate(todo, 1):
        start = time.time()
        root = help_root(args, lang)
        pages = sorted(p.relative_to(root).as_posix() for p in (root / "text").rglob("*.html"))
        rows = []
        for page in pages:
            for key, text in parse_page((root / page).read_text(encoding="utf-8")):
                rows.append(f"{page}\t{key}\t{text}")
        write_lines(out / f"{lang}.tsv", rows)
        log(f"step 2/6 extract {i}/{len(todo)} {lang}: {len(pages)} pages, {len(rows)} "
            f"paragraphs ({time.time() - start:.0f}s)")


def read_extract(args, lang):
    """{(page, key): text} and the pages in order, from <work>/extract/<lang>.tsv."""
    paragraphs, pages = {}, {}
    for line in read_lines(args.work_dir / "extract" / f"{lang}.tsv"):
        page, key, text = line.split("\t", 2)
        paragraphs[(page, key)] = text
        pages[page] = None
    return paragraphs, list(pages)


# ---------------------------------------------------------------- 3. align


@lru_cache(maxsize=None)
def script_of(ch):
    """The first word of a character's Unicode name: LATIN, CYRILLIC, CJK, HIRAGANA, ..."""
    return unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]


def script_share(text, lang):
    """Share of the words of `text` in `lang`'s script (1.0 for a Latin-script language).

    A word is a run of letters of one script, except that every CJK, kana and hangul character
    is a word of its own (so that "LibreOffice" weighs as much as one ideograph, not eleven).
    """
    scripts = SCRIPTS.get(lang)
    if scripts is None:
        return 1.0
    words = ours = 0
    prev = None  # the script of the run of letters we are in
    for ch in text:
        if not ch.isalpha():
            prev = None
            continue
        sc = script_of(ch)
        if sc in CHARACTER_WORDS or sc != prev:
            words += 1
            ours += sc in scripts
        prev = sc
    return ours / words if words else 0.0


def broken(text):
    """Whether a paragraph holds a failed embed ("[text/scalc/01/func_imcos.xhp#imcos_head not
    found]."), which some languages' pages have where the English has the embedded text."""
    return BROKEN_EMBED.search(text) is not None


def translated(english, text, lang, min_script_share):
    """Whether `text` is a translation of `english` into `lang`, as far as we can tell: not
    the English (compared case- and punctuation-blind: an untranslated copy may differ in
    spacing) and, for another script than Latin, mostly in that script."""
    if not text or norm_key(text) == norm_key(english) or broken(text):
        return False
    return lang not in SCRIPTS or script_share(text, lang) >= min_script_share


def norm_key(english):
    """English compared for leakage: case-folded, letters and digits only."""
    return "".join(ch for ch in english.casefold() if ch.isalnum())


def page_hash(page):
    """A deterministic number in [0, 1) from the page path (relative to the language folder)."""
    return int.from_bytes(hashlib.sha256(page.encode("utf-8")).digest()[:8], "big") / 2 ** 64


def page_split(page, valid_pages, test_pages):
    u = page_hash(page)
    return "test" if u < test_pages else "valid" if u < test_pages + valid_pages else "train"


def word_count(text):
    return len(text.split())


def english_units(args, english, pages):
    """The eligible English paragraphs [(page, key, text)] in page order, and each English
    text's split: the most held-out split of any page it occurs on (by norm_key)."""
    splits = {page: page_split(page, args.valid_pages, args.test_pages) for page in pages}
    rank = {"train": 0, "valid": 1, "test": 2}
    units, text_split = [], {}
    for (page, key), text in english.items():  # dict order: page order, then document order
        if not text or word_count(text) < args.min_words or broken(text):
            continue
        units.append((page, key, text))
        k = norm_key(text)
        if k not in text_split or rank[splits[page]] > rank[text_split[k]]:
            text_split[k] = splits[page]
    return units, splits, text_split


def cap_pages(items, limit):
    """Whole pages of `items` [(page, ...)] in page-hash order while they fit under `limit`."""
    by_page = {}
    for item in items:
        by_page.setdefault(item[0], []).append(item)
    kept, total = set(), 0
    for page in sorted(by_page, key=page_hash):
        if total + len(by_page[page]) > limit:
            break
        kept.add(page)
        total += len(by_page[page])
    return [item for item in items if item[0] in kept]


def align_pair(args, lang, units, splits, text_split, other):
    """One pair's paragraphs {split: [(page, key, english, translation)]} and its counts."""
    counts = {"eligible": len(units), "untranslated": 0, "wrong_script": 0, "broken": 0,
              "duplicate": 0,
              "off_split": 0, "capped": 0}
    seen, out = set(), {s: [] for s in SPLITS}
    for page, key, english in units:
        text = other.get((page, key), "")
        if not text or norm_key(text) == norm_key(english):
            counts["untranslated"] += 1
            continue
        if not translated(english, text, lang, args.min_script_share):
            counts["broken" if broken(text) else "wrong_script"] += 1
            continue
        split = text_split[norm_key(english)]
        if splits[page] != split:
            # this English also occurs on a page of a more held-out split: it is taken from
            # there (if translated there), never from this page
            counts["off_split"] += 1
            continue
        if english in seen:
            counts["duplicate"] += 1
            continue
        seen.add(english)
        out[split].append((page, key, english, text))
    for split, limit in (("valid", args.max_valid), ("test", args.max_test)):
        kept = cap_pages(out[split], limit)
        counts["capped"] += len(out[split]) - len(kept)
        out[split] = kept
    return out, counts


def coverage(args, units, lang, other):
    """Distinct eligible English texts translated (somewhere) into `lang`, over all of them."""
    total, covered = set(), set()
    for page, key, english in units:
        total.add(english)
        if translated(english, other.get((page, key), ""), lang, args.min_script_share):
            covered.add(english)
    return len(covered), len(total)


def align_outputs(args):
    """The step's files under --work-dir (stats.json last), and the table's under --results-dir."""
    text = args.work_dir / "text"
    work = [text / f"{s}.en-{x}.{l}" for x in args.langs for s in SPLITS for l in ("en", x)]
    work += [args.work_dir / "pages.tsv", args.work_dir / "stats.json"]
    table = [args.results_dir / n for n in ("corpus.md", "corpus.json", "split.tsv")]
    return work, table


def step_align(args):
    work, table = align_outputs(args)
    if all(p.exists() for p in work):
        stats = json.loads((args.work_dir / "stats.json").read_text())
        if all(p.exists() for p in table):
            log("step 3/6 align: exists, skipped")
        else:
            log(f"step 3/6 align: exists; the table written again into {args.results_dir}")
            write_table(args, stats)
        return stats
    start = time.time()
    english, pages = read_extract(args, "en")
    units, splits, text_split = english_units(args, english, pages)
    distinct = len({u[2] for u in units})
    log(f"step 3/6 align: {len(pages)} pages, {len(units)} English paragraphs of >= "
        f"{args.min_words} words, {distinct} distinct")
    text = args.work_dir / "text"
    text.mkdir(parents=True, exist_ok=True)
    stats = {"pages": {s: sum(v == s for v in splits.values()) for s in SPLITS},
             "english_paragraphs": len(units), "english_distinct": distinct, "langs": {}}
    for lang in args.langs:
        other, _ = read_extract(args, lang)
        out, counts = align_pair(args, lang, units, splits, text_split, other)
        covered, total = coverage(args, units, lang, other)
        for split in SPLITS:
            write_lines(text / f"{split}.en-{lang}.en", (r[2] for r in out[split]))
            write_lines(text / f"{split}.en-{lang}.{lang}", (r[3] for r in out[split]))
        stats["langs"][lang] = {**{s: len(out[s]) for s in SPLITS}, "covered": covered,
                                "coverage": round(covered / max(total, 1), 4), **counts}
        log(f"step 3/6 align en-{lang}: " + ", ".join(f"{s} {len(out[s])}" for s in SPLITS)
            + f"; coverage {covered / max(total, 1):.1%}")
    stats["english_held_out"] = check_no_leak(args)
    stats["seconds"] = round(time.time() - start, 1)
    write_lines(args.work_dir / "pages.tsv", (f"{p}\t{s}" for p, s in splits.items()))
    write_json(args.work_dir / "stats.json", stats)
    write_table(args, stats)
    return stats


def check_no_leak(args):
    """No valid or test paragraph's English (by norm_key) is in any pair's training data, and no
    test paragraph's English in any valid data."""
    text = args.work_dir / "text"
    held = {s: set() for s in SPLITS}
    for lang in args.langs:
        for split in SPLITS:
            held[split] |= {norm_key(t) for t in read_lines(text / f"{split}.en-{lang}.en")}
    leaks = (held["train"] & (held["valid"] | held["test"])) | (held["valid"] & held["test"])
    if leaks:
        fail(f"{len(leaks)} English texts are in two splits (a bug): {sorted(leaks)[:3]}")
    return {"valid": len(held["valid"]), "test": len(held["test"])}


# ---------------------------------------------------------------- 3. align: many-way test


def many_way_outputs(args):
    return (args.work_dir / "text" / MANY_WAY,
            [args.results_dir / n for n in ("test_many.md", "test_many.json")])


def step_many_way(args):
    """<work>/text/test.many.tsv (module docstring) and its table; skipped when they exist (the
    table alone is written again from the TSV)."""
    path, table = many_way_outputs(args)
    if path.exists():
        if all(p.exists() for p in table):
            log("step 3/6 many-way test: exists, skipped")
        else:
            log(f"step 3/6 many-way test: exists; its table written again into "
                f"{args.results_dir}")
            write_many_table(args, read_lines(path))
        return
    start = time.time()
    english, pages = read_extract(args, "en")
    units, splits, text_split = english_units(args, english, pages)
    kept = {}  # lang -> {(page, key): translation} of the pair's test set
    for i, lang in enumerate(args.langs, 1):
        other, _ = read_extract(args, lang)
        out, _ = align_pair(args, lang, units, splits, text_split, other)
        kept[lang] = {(page, key): text for page, key, _english, text in out["test"]}
        log(f"step 3/6 many-way test {i}/{len(args.langs)} {lang}: {len(kept[lang])} test "
            f"paragraphs")
    rows = ["\t".join(["page", "key", "en", *args.langs])]
    for page, key, english in units:  # page order, as the pairs' test files
        cells = [kept[lang].get((page, key), "") for lang in args.langs]
        if any(cells):
            rows.append("\t".join([page, key, english, *cells]))
    check_many_way(args, rows)
    write_lines(path, rows)
    write_many_table(args, rows)
    log(f"step 3/6 many-way test: {len(rows) - 1} paragraphs ({time.time() - start:.0f}s)")


def many_way_columns(rows):
    """The TSV's rows (header first) -> {language: its column}, en included."""
    header = rows[0].split("\t")
    cells = [row.split("\t") for row in rows[1:]]
    return {lang: [c[i] for c in cells] for i, lang in enumerate(header) if i >= 2}


def check_many_way(args, rows):
    """Each pair's columns, where filled, must be its test files line for line."""
    columns = many_way_columns(rows)
    text = args.work_dir / "text"
    for lang in args.langs:
        filled = [i for i, t in enumerate(columns[lang]) if t]
        for side in ("en", lang):
            got = [columns[side][i] for i in filled]
            if got != read_lines(text / f"test.en-{lang}.{side}"):
                fail(f"the many-way test set's {side} column of en-{lang} differs from "
                     f"text/test.en-{lang}.{side} (a bug, or text/ from other settings)")


def write_many_table(args, rows):
    """<results>/test_many.{md,json}: test paragraphs of every direction X-Y (either order)."""
    columns = many_way_columns(rows)
    langs = [lang for lang in columns if lang != "en"]
    filled = {lang: {i for i, t in enumerate(columns[lang]) if t} for lang in langs}
    counts = {f"{x}-{y}": len(filled[x] & filled[y]) for x in langs for y in langs if x != y}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.results_dir / "test_many.json",
               {"paragraphs": len(rows) - 1, "langs": langs, "directions": counts})
    table = ["| | " + " | ".join(langs) + " |", "|---|" + "--:|" * len(langs)]
    for x in langs:
        table.append(f"| **{x}** | " + " | ".join(
            "" if x == y else f"{counts[f'{x}-{y}']:,}" for y in langs) + " |")
    write_lines(args.results_dir / "test_many.md", [
        "# LoHelp: the many-way test set, paragraphs per direction", "",
        "Written by `scripts/prepare_lohelp.py` (see docs/corpus-lohelp.md). Test paragraphs of "
        "X-Y (the same for Y-X): those in both en-X's and en-Y's test sets, aligned by help page "
        f"and paragraph id; {len(rows) - 1:,} paragraphs in all.", "", *table])
    print("\n".join(table), flush=True)


# ---------------------------------------------------------------- the table


def write_table(args, stats):
    """<results>/corpus.{md,json} and <results>/split.tsv (metadata: no text)."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_lines(args.results_dir / "split.tsv",
                ["page\tsplit", *read_lines(args.work_dir / "pages.tsv")])
    record = {"source": "Debian libreoffice-help-* packages",
              "packages": package_versions(args, args.all_langs),
              "settings": settings_of(args), **stats}
    write_json(args.results_dir / "corpus.json", record)
    langs = stats["langs"]
    held = stats["english_held_out"]
    rows = ["| pair | script | train | valid | test | coverage |", "|---|---|--:|--:|--:|--:|"]
    for lang, s in langs.items():
        rows.append(f"| en-{lang} | {SCRIPT_LABELS.get(lang, 'Latin')} | {s['train']:,} | "
                    f"{s['valid']:,} | {s['test']:,} | {s['coverage']:.1%} |")
    tot = {sp: sum(s[sp] for s in langs.values()) for sp in SPLITS}
    rows.append(f"| all {len(langs)} | | {tot['train']:,} | {tot['valid']:,} | {tot['test']:,} "
                "| |")
    pages = stats["pages"]
    md = [
        "# LoHelp: paragraphs per pair and split",
        "",
        "Written by `scripts/prepare_lohelp.py` (see docs/corpus-lohelp.md). Paragraphs of the "
        "LibreOffice help, English and its translation, per English-centric pair (en-X and X-en "
        "use the same paragraphs). Coverage: the share of the "
        f"{stats['english_distinct']:,} distinct English paragraphs of >= {args.min_words} words "
        "that are translated into the language. Split by help page "
        f"({pages['train']:,} train, {pages['valid']:,} valid, {pages['test']:,} test pages; "
        "split.tsv), valid and test capped per pair at "
        f"{args.max_valid:,} and {args.max_test:,} paragraphs.",
        "",
        *rows,
        "",
        f"Held out: {held['test']:,} test and {held['valid']:,} valid English paragraphs "
        "(distinct, of every pair together); no training paragraph's English equals one of "
        "them up to case and punctuation.",
        "",
        f"Source: Debian's {packages_line(record['packages'])}.",
    ]
    write_lines(args.results_dir / "corpus.md", md)
    print("\n".join(rows), flush=True)


def packages_line(packages):
    """{lang: .deb file} -> "libreoffice-help-{en-us,de} 4:7.4.7-1+deb12u14" (per version)."""
    by_version = {}
    for name in packages.values():
        if name:
            package, version = name[: -len("_all.deb")].split("_", 1)
            by_version.setdefault(version, []).append(package[len("libreoffice-help-"):])
    return "; ".join(f"libreoffice-help-{{{','.join(names)}}} {version}"
                     for version, names in by_version.items())


def coverage_only(args):
    """Coverage of --langs, for choosing the languages: <results>/candidates.{md,json}."""
    english, pages = read_extract(args, "en")
    units, _, _ = english_units(args, english, pages)
    res = {}
    for lang in args.langs:
        other, _ = read_extract(args, lang)
        covered, total = coverage(args, units, lang, other)
        same = sum(1 for p, k, e in units if norm_key(other.get((p, k), "")) == norm_key(e))
        bad = [other[(p, k)] for p, k, e in units if other.get((p, k))
               and norm_key(other[(p, k)]) != norm_key(e)
               and not translated(e, other[(p, k)], lang, args.min_script_share)]
        n_broken = sum(map(broken, bad))
        res[lang] = {"covered": covered, "coverage": round(covered / max(total, 1), 4),
                     "untranslated_paragraphs": same,
                     "wrong_script_paragraphs": len(bad) - n_broken,
                     "broken_embed_paragraphs": n_broken,
                     "script": SCRIPT_LABELS.get(lang, "Latin")}
    distinct = len({u[2] for u in units})
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.results_dir / "candidates.json",
               {"english_paragraphs": len(units), "english_distinct": distinct,
                "min_words": args.min_words, "min_script_share": args.min_script_share,
                "packages": package_versions(args, args.all_langs), "langs": res})
    rows = ["| language | package | script | distinct English translated | coverage |",
            "|---|---|---|--:|--:|"]
    for lang, r in sorted(res.items(), key=lambda kv: -kv[1]["coverage"]):
        rows.append(f"| {lang} | {package_name(lang)} | {r['script']} | {r['covered']:,} | "
                    f"{r['coverage']:.1%} |")
    write_lines(args.results_dir / "candidates.md", [
        "# LoHelp: coverage of the candidate languages", "",
        "Written by `scripts/prepare_lohelp.py --coverage-only`. Coverage: the share of the "
        f"{distinct:,} distinct English paragraphs of >= {args.min_words} words ({len(units):,} "
        "paragraphs in all) translated into the language: not equal to the English and, for "
        f"another script, with >= {args.min_script_share:.0%} of its words in it (a CJK character "
        "counting as a word).", "", *rows])
    print("\n".join(rows), flush=True)


# ---------------------------------------------------------------- 4-6. spm, encode, bin


def spread(lines, n):
    """At most n of `lines`, evenly spaced, in order."""
    if len(lines) <= n:
        return lines
    return [lines[i * len(lines) // n] for i in range(n)]


def step_spm(args):
    model, vocab = args.work_dir / "spm.model", args.work_dir / "spm.vocab"
    if model.exists() and vocab.exists():
        log("step 4/6 spm: exists, skipped")
        return
    import sentencepiece as spm

    # A balanced sample: the same number of training paragraphs per language (all of a smaller
    # language's), English once (its distinct training paragraphs over all pairs).
    text = args.work_dir / "text"
    # Evenly spaced over the (page-ordered) training data, so every module of the help is in.
    english = list(dict.fromkeys(t for x in args.langs
                                 for t in read_lines(text / f"train.en-{x}.en")))
    sample = spread(english, args.spm_lines_per_lang)
    for lang in args.langs:
        sample += spread(read_lines(text / f"train.en-{lang}.{lang}"), args.spm_lines_per_lang)
    log(f"step 4/6 spm: unigram, vocab {args.vocab_size}, {len(sample)} paragraphs "
        f"(<= {args.spm_lines_per_lang} per language), {args.threads} thread(s)")
    start = time.time()
    # No pid in the name: spm stores these paths in the model, and reruns should match.
    prefix = str(args.work_dir / ".spm.tmp")
    corpus = Path(prefix + ".txt")
    write_lines(corpus, sample)
    try:
        spm.set_random_generator_seed(SPM_SEED)
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=prefix, model_type="unigram",
            vocab_size=args.vocab_size, character_coverage=args.character_coverage,
            input_sentence_size=0,  # all of the sample (0: no limit)
            # help paragraphs can be long; spm skips longer ones
            max_sentence_length=16384, num_threads=args.threads, minloglevel=1,
            # a small corpus (the tests') may not support the vocabulary: shrink, do not die
            hard_vocab_limit=False)
        os.replace(prefix + ".vocab", vocab)
        os.replace(prefix + ".model", model)
    finally:
        for suffix in (".txt", ".vocab", ".model"):
            Path(prefix + suffix).unlink(missing_ok=True)
    log(f"step 4/6 spm: done ({time.time() - start:.0f}s)")


def pair_text_files(args):
    return [(s, x, l) for x in args.langs for s in SPLITS for l in ("en", x)]


def step_encode(args):
    enc = args.work_dir / "spm"
    enc.mkdir(parents=True, exist_ok=True)
    todo = [(s, x, l) for s, x, l in pair_text_files(args)
            if not (enc / f"{s}.en-{x}.{l}").exists()]
    if not todo:
        log("step 5/6 encode: exists, skipped")
        return
    import sentencepiece as spm

    log(f"step 5/6 encode: {len(todo)} files")
    sp = spm.SentencePieceProcessor(model_file=str(args.work_dir / "spm.model"))
    for split, x, lang in todo:
        pieces = sp.encode(read_lines(args.work_dir / "text" / f"{split}.en-{x}.{lang}"),
                           out_type=str)
        write_lines(enc / f"{split}.en-{x}.{lang}", (" ".join(p) for p in pieces))


def write_dict(args):
    """fairseq dictionary from the SentencePiece vocabulary, the same for every language."""
    path = args.work_dir / "dict.txt"
    if path.exists():
        return path
    pieces = [line.split("\t")[0] for line in read_lines(args.work_dir / "spm.vocab")]
    bad = [p for p in pieces if len(p.split()) != 1]
    if bad:
        fail(f"SentencePiece pieces with whitespace: {bad!r}")
    write_lines(path, (f"{p} {DUMMY_COUNT}" for p in pieces if p not in FAIRSEQ_SPECIALS))
    return path


def find_preprocess():
    here = Path(sys.executable).parent / "fairseq-preprocess"
    exe = str(here) if here.exists() else shutil.which("fairseq-preprocess")
    if not exe:
        fail("fairseq-preprocess not found; run `make venv` and use .venv/bin/python")
    return exe


def pair_files(src, tgt):
    return [f"{s}.{src}-{tgt}.{l}.{ext}" for s in SPLITS for l in (src, tgt)
            for ext in ("bin", "idx")]


def binarize_pair(args, exe, dict_path, lang):
    pair = f"en-{lang}"
    bindir = args.work_dir / "bin"
    tmp = args.work_dir / f".bin.tmp.{pair}"
    shutil.rmtree(tmp, ignore_errors=True)
    enc = args.work_dir / "spm"
    cmd = [exe, "--source-lang", "en", "--target-lang", lang,
           "--trainpref", str(enc / f"train.{pair}"), "--validpref", str(enc / f"valid.{pair}"),
           "--testpref", str(enc / f"test.{pair}"),
           "--srcdict", str(dict_path), "--tgtdict", str(dict_path),
           "--destdir", str(tmp), "--workers", str(args.threads)]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        tail = "\n".join(res.stdout.splitlines()[-20:])
        fail(f"fairseq-preprocess failed for {pair} (exit {res.returncode}):\n"
             f"  {' '.join(cmd)}\n{tail}")
    logs = args.work_dir / "logs"
    logs.mkdir(exist_ok=True)
    shutil.move(tmp / "preprocess.log", logs / f"preprocess.{pair}.log")
    for name in pair_files("en", lang):
        os.replace(tmp / name, bindir / name)
    shutil.rmtree(tmp)


def step_bin(args):
    bindir = args.work_dir / "bin"
    if (bindir / ".done").exists():
        log("step 6/6 bin: exists, skipped")
        return
    bindir.mkdir(parents=True, exist_ok=True)
    dict_path = write_dict(args)
    exe = None
    for i, lang in enumerate(args.langs, 1):
        if all((bindir / n).exists() for n in pair_files("en", lang)):
            log(f"step 6/6 bin {i}/{len(args.langs)} en-{lang}: exists, skipped")
        else:
            exe = exe or find_preprocess()
            start = time.time()
            binarize_pair(args, exe, dict_path, lang)
            log(f"step 6/6 bin {i}/{len(args.langs)} en-{lang}: fairseq-preprocess "
                f"({time.time() - start:.0f}s)")
        # X-en reads the same paragraphs: its files are en-X's, renamed.
        for name in pair_files(lang, "en"):
            if not (bindir / name).exists():
                split, _, side, ext = name.split(".")
                with atomic_path(bindir / name) as tmp:
                    shutil.copyfile(bindir / f"{split}.en-{lang}.{side}.{ext}", tmp)
    # translation_multi_simple_epoch loads dict.{lang}.txt for every language in --langs.
    for lang in args.all_langs:
        with atomic_path(bindir / f"dict.{lang}.txt") as tmp:
            shutil.copyfile(dict_path, tmp)
    write_lines(bindir / "langs.txt", [",".join(args.all_langs)])
    write_lines(bindir / "pairs.txt", [",".join(f"en-{x},{x}-en" for x in args.langs)])
    write_lines(bindir / ".done", [time.strftime("%Y-%m-%d %H:%M:%S")])


# ---------------------------------------------------------------- main


def main(argv=None):
    start = time.time()
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(args.work_dir / "times.json")
    t = time.time()
    step_download(args, args.all_langs)
    step_extract(args, args.all_langs)
    if args.coverage_only:
        coverage_only(args)
        log(f"elapsed: {time.time() - start:.1f}s")
        return
    check_settings(args)
    if time.time() - t > 1:
        timer.record("download+extract", time.time() - t)
    for name, step in (("align", step_align), ("many-way test", step_many_way),
                       ("spm", step_spm), ("encode", step_encode), ("bin", step_bin)):
        t = time.time()
        step(args)
        if time.time() - t > 1:  # a skipped step keeps the time of the sitting that ran it
            timer.record(name, time.time() - t)
    stats = json.loads((args.work_dir / "stats.json").read_text())
    vocab = len(read_lines(args.work_dir / "dict.txt")) + 4  # + fairseq's <s> <pad> </s> <unk>
    log(f"pairs: {','.join(f'en-{x},{x}-en' for x in args.langs)}")
    log("paragraphs: " + ", ".join(
        f"{s} {sum(v[s] for v in stats['langs'].values()):,}" for s in SPLITS)
        + f" over {len(args.langs)} pairs")
    log(f"fairseq vocabulary: {vocab} symbols")
    log(f"step times (s): {json.dumps(timer.times)}")
    log(f"elapsed: {time.time() - start:.1f}s")
    log(f"fairseq data directory: {args.work_dir / 'bin'}")


if __name__ == "__main__":
    main()
