"""The study's corpora (--corpus): their languages and directions, where their data comes from,
the test references of each direction and how a direction's BLEU is tokenized.

- multi30k (default): en, de, fr, cs; trained on the six en<->{de,fr,cs} directions, the six
  de/fr/cs<->de/fr/cs directions zero-shot; one 4-way parallel test set (test_2016_flickr, 1,000
  sentences), scored as it always was (sacreBLEU's defaults, off-target rates by
  fairseq_taskmoe.langid).
- lohelp: English and the languages of work/lohelp (scripts/prepare_lohelp.py,
  docs/corpus-lohelp.md), read from its bin/langs.txt and bin/pairs.txt: the en<->X directions
  (28 for the 14 languages); the study evaluates no zero-shot direction (the many-way test set,
  text/test.many.tsv, gives X-Y references: read_many_way, many_way_pair, used by
  research.pivot_eval --corpus lohelp). Test sets differ per pair (712-1,744
  paragraphs); the study translates a seeded sample of at most --test-cap of them per pair (the
  same paragraphs for en-X and X-en), written as a capped copy of the test binaries and their
  references (build_capped_test). BLEU uses sacreBLEU's "zh" tokenizer for Chinese and
  "ja-mecab" for Japanese (sacrebleu[ja]); chrF is reported for every direction. Off-target
  rates use Corpus.detector (fairseq_taskmoe.langid.detector_for: py3langid restricted to the
  corpus's languages here, the stop-word detector for Multi30k), as research.pivot_eval does.
"""

import fcntl
import importlib.util
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from fairseq_taskmoe.langid import detector_for
from research.common import LANGS, REPO
from research.study.grid import TRAINED, ZERO_SHOT

CORPORA = ("multi30k", "lohelp")
LOHELP_DIR = REPO / "work" / "lohelp"  # scripts/prepare_lohelp.py's default --work-dir
# lohelp: test paragraphs per direction (sized, with the update budget, to fit the study in one
# 3-hour session: 28 directions, 56 more for a pruned model), the sample's seed
TEST_CAP, CAP_SEED = 200, 1
WELL_COVERED = 0.90  # a language translating at least this share of the English is well covered
MANY_WAY = "test.many.tsv"  # the many-way test set in LoHelp's text/ (prepare_lohelp.py)
BLEU_TOKENIZERS = {"zh": "zh", "ja": "ja-mecab"}  # sacreBLEU tokenizer per target; else 13a


@dataclass
class Corpus:
    """A corpus as the study sees it."""

    name: str
    langs: list
    trained: list
    zero_shot: list
    test_set: str
    coverage: dict = field(default_factory=dict)  # lohelp: {lang: share of English translated}

    @property
    def directions(self):
        return self.trained + self.zero_shot

    @property
    def detector(self):
        """The language detector for off-target rates (fairseq_taskmoe.langid.detector_for):
        the stop-word one for Multi30k's languages, py3langid restricted to LoHelp's."""
        return detector_for(self.langs)

    def reference(self, prep: Path, pair: str) -> Path:
        """The reference file of `pair`'s test set under the evaluation folder `prep`."""
        tgt = pair.split("-")[1]
        if self.name == "multi30k":
            return prep / "text" / f"test.{tgt}"  # 4-way parallel: one file per language
        return prep / "text" / f"test.{pair}.{tgt}"  # build_capped_test's per-direction copy

    def tokenizer(self, lang: str):
        """sacreBLEU's tokenizer for BLEU into `lang`: None for Multi30k (corpus_bleu's
        defaults, as every recorded run), else bleu_tokenizer(lang)."""
        return None if self.name == "multi30k" else bleu_tokenizer(lang)

    def well_covered(self):
        return [l for l in self.langs if self.coverage.get(l, 0) >= WELL_COVERED]

    def lower_coverage(self):
        return [l for l in self.langs if l in self.coverage and self.coverage[l] < WELL_COVERED]

    def groups(self):
        """{group: its trained directions} that a LoHelp record averages over: all trained,
        en->X, X->en, and each of these for the well-covered and the lower-coverage languages
        (coverage of the English at least WELL_COVERED, or less)."""
        def other(pair):
            src, tgt = pair.split("-")
            return tgt if src == "en" else src

        sides = {"trained": self.trained,
                 "en_x": [p for p in self.trained if p.startswith("en-")],
                 "x_en": [p for p in self.trained if p.endswith("-en")]}
        out = dict(sides)
        for cov, langs in (("well_covered", self.well_covered()),
                           ("lower_coverage", self.lower_coverage())):
            for side, pairs in sides.items():
                name = cov if side == "trained" else f"{side}_{cov}"
                out[name] = [p for p in pairs if other(p) in langs]
        return out


MULTI30K = Corpus("multi30k", list(LANGS), list(TRAINED), list(ZERO_SHOT),
                  "Multi30k test_2016_flickr (1,000 sentences)")


def _split_list(text):
    return [x for x in re.split(r"[\s,]+", text.strip()) if x]


def read_langs_pairs(bin_dir: Path):
    """(languages, directions) of a fairseq data folder: its langs.txt and pairs.txt (comma- or
    line-separated) when present, else what its file names hold: directions from
    train.{src}-{tgt}.{src}.idx (sorted), languages from dict.{lang}.txt (English first, then
    sorted). The language order fixes the task ids a model learns, hence langs.txt first."""
    bin_dir = Path(bin_dir)
    pairs_file, langs_file = bin_dir / "pairs.txt", bin_dir / "langs.txt"
    if pairs_file.exists():
        pairs = _split_list(pairs_file.read_text())
    else:
        pairs = sorted({m.group(1) for p in bin_dir.glob("train.*-*.*.idx")
                        if (m := re.fullmatch(r"train\.(([^.-]+)-[^.-]+)\.\2\.idx", p.name))})
    if langs_file.exists():
        langs = _split_list(langs_file.read_text())
    else:
        found = {p.name[len("dict."):-len(".txt")] for p in bin_dir.glob("dict.*.txt")}
        found |= {l for pair in pairs for l in pair.split("-")}
        langs = sorted(found, key=lambda l: (l != "en", l))
    if not pairs:
        raise ValueError(f"{bin_dir}: no pairs.txt and no train.SRC-TGT.SRC.idx files")
    unknown = sorted({l for pair in pairs for l in pair.split("-")} - set(langs))
    if unknown:
        raise ValueError(f"{bin_dir}: directions use languages not in langs.txt: {unknown}")
    return langs, pairs


def lohelp_default_langs():
    """English and scripts/prepare_lohelp.py's default languages (before the corpus exists)."""
    spec = importlib.util.spec_from_file_location("prepare_lohelp",
                                                  REPO / "scripts" / "prepare_lohelp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ["en"] + module.DEFAULT_LANGS.split(",")


def lohelp_corpus(lohelp_dir: Path = LOHELP_DIR, test_cap=TEST_CAP):
    """LoHelp's languages and directions: read from <lohelp_dir>/bin when it is built, else the
    preparation script's defaults (en<->X); coverage from its stats.json."""
    bin_dir = Path(lohelp_dir) / "bin"
    if (bin_dir / "langs.txt").exists() or (bin_dir / "pairs.txt").exists():
        langs, pairs = read_langs_pairs(bin_dir)
    else:
        langs = lohelp_default_langs()
        pairs = [p for x in langs[1:] for p in (f"en-{x}", f"{x}-en")]
    coverage = {}
    stats = Path(lohelp_dir) / "stats.json"
    if stats.exists():
        import json

        coverage = {l: v["coverage"] for l, v in json.loads(stats.read_text())["langs"].items()
                    if "coverage" in v}
    cap = f"a seeded sample of at most {test_cap:,}" if test_cap else "all"
    return Corpus("lohelp", langs, pairs, [],
                  f"LoHelp test (per pair, 712-1,744 paragraphs; {cap} per direction)",
                  coverage)


def bleu_tokenizer(lang: str):
    """sacreBLEU's tokenizer for BLEU into `lang`: "zh" for Chinese, "ja-mecab" for Japanese
    (None when sacrebleu's ja extra, MeCab and ipadic, is missing: no BLEU then, chrF only),
    "13a" (sacreBLEU's default) for the others."""
    tok = BLEU_TOKENIZERS.get(lang, "13a")
    if tok == "ja-mecab" and not ja_mecab_available():
        return None
    return tok


def ja_mecab_available() -> bool:
    try:
        from sacrebleu.metrics import BLEU

        BLEU(tokenize="ja-mecab").corpus_score(["テスト"], [["テスト"]])
        return True
    except Exception:  # ImportError of MeCab / ipadic, or their set-up failing
        return False


def lohelp_reference(text_dir: Path, pair: str) -> Path:
    """The reference file of an English-centric LoHelp direction in its text/ folder:
    test.en-X.X for en-X, test.en-X.en for X-en (both directions share the pair's paragraphs)."""
    src, tgt = pair.split("-")
    if "en" not in (src, tgt) or src == tgt:
        raise ValueError(f"{pair}: LoHelp has test sets for en-X and X-en only")
    other = tgt if src == "en" else src
    return Path(text_dir) / f"test.en-{other}.{tgt}"


def read_many_way(text_dir: Path):
    """{language: its column} of LoHelp's many-way test set <text_dir>/test.many.tsv
    (scripts/prepare_lohelp.py: one row per test paragraph, English and every language's
    translation, "" where a language's pair dropped it), English included."""
    path = Path(text_dir) / MANY_WAY
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run scripts/prepare_lohelp.py (make "
                                "lohelp) again, which adds it to a prepared corpus in a minute")
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    cells = [line.split("\t") for line in lines[1:]]
    return {lang: [c[i] for c in cells] for i, lang in enumerate(header) if i >= 2}


def many_way_pair(columns, src: str, tgt: str):
    """(sources, references) of direction src-tgt in the many-way test set (read_many_way): the
    paragraphs translated into both, in page order. en-X gives test.en-X's lines."""
    for lang in (src, tgt):
        if lang not in columns:
            raise ValueError(f"{lang} is not a language of the many-way test set "
                             f"({', '.join(columns)})")
    rows = [i for i, (a, b) in enumerate(zip(columns[src], columns[tgt])) if a and b]
    return [columns[src][i] for i in rows], [columns[tgt][i] for i in rows]


def sample_indices(n: int, cap, seed: int = CAP_SEED):
    """The test items kept when a set of n is capped at `cap`: all when n <= cap (or no cap),
    else a seeded sample, in their original order (so it spans every page of the set)."""
    if not cap or n <= cap:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), cap))


def build_capped_test(bin_dir: Path, text_dir: Path, out: Path, directions, cap, seed=CAP_SEED):
    """A data folder for fairseq-generate holding, per direction, the sampled test items
    (sample_indices; the same for en-X and X-en, which share their paragraphs) of bin_dir's
    test split, the dictionaries, and text/test.{direction}.{target} with the matching lines of
    the reference. Skipped when out/bin/.done records the same cap and seed. Returns
    {direction: sentences kept}."""
    out_bin, out_text = Path(out) / "bin", Path(out) / "text"
    out_bin.mkdir(parents=True, exist_ok=True)
    # two runs started side by side build it once: the second waits for the first
    with open(Path(out) / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_capped_test(bin_dir, text_dir, out_bin, out_text, directions, cap, seed)


def subset_binarized(src_bin: Path, out_bin: Path, prefix: str, keep, expected: int, what: str):
    """Write the items `keep` (indices) of fairseq's binarized `src_bin/prefix` as
    `out_bin/prefix` (.bin/.idx, each moved into place whole); RuntimeError unless the source
    has `expected` items (`what` says what they must match)."""
    from fairseq.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder

    data = MMapIndexedDataset(str(src_bin / prefix))
    if len(data) != expected:
        raise RuntimeError(f"{src_bin}/{prefix}: {len(data)} items for {expected} {what}")
    tmp = out_bin / f"{prefix}.tmp"
    builder = MMapIndexedDatasetBuilder(f"{tmp}.bin", dtype=data._index.dtype)
    for i in keep:
        builder.add_item(data[i])
    builder.finalize(f"{tmp}.idx")
    for ext in ("bin", "idx"):
        Path(f"{tmp}.{ext}").replace(out_bin / f"{prefix}.{ext}")


def sentences_if_built(done: Path, want: dict):
    """The sentence counts a capped test folder's `.done` records when it was built with
    `want` (cap, seed, directions); else None, and a `.done` of other settings is removed (the
    folder is rebuilt whole)."""
    import json

    if done.exists():
        got = json.loads(done.read_text())
        if {k: got.get(k) for k in want} == want:
            return got["sentences"]
        done.unlink()
    return None


def _build_capped_test(bin_dir, text_dir, out_bin, out_text, directions, cap, seed):
    import json

    from fairseq_taskmoe.atomic import atomic_file

    done = out_bin / ".done"
    want = {"cap": cap, "seed": seed, "directions": list(directions)}
    built = sentences_if_built(done, want)
    if built is not None:
        return built
    out_text.mkdir(parents=True, exist_ok=True)
    for d in Path(bin_dir).glob("dict.*.txt"):
        (out_bin / d.name).write_bytes(d.read_bytes())
    for name in ("langs.txt", "pairs.txt"):
        if (Path(bin_dir) / name).exists():
            (out_bin / name).write_bytes((Path(bin_dir) / name).read_bytes())
    sentences = {}
    for pair in directions:
        refs = lohelp_reference(text_dir, pair).read_text().splitlines()
        keep = sample_indices(len(refs), cap, seed)
        for lang in pair.split("-"):
            prefix = f"test.{pair}.{lang}"
            subset_binarized(Path(bin_dir), out_bin, prefix, keep, len(refs),
                             f"reference lines of {pair}")
        with atomic_file(str(out_text / f"test.{pair}.{pair.split('-')[1]}"), "w") as f:
            f.write("".join(refs[i] + "\n" for i in keep))
        sentences[pair] = len(keep)
    with atomic_file(str(done), "w") as f:
        json.dump({**want, "sentences": sentences}, f, indent=1)
    return sentences
