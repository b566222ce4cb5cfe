"""How well the language detector knows LoHelp's languages: accuracy per language on the
references of the many-way test set, as the off-target rates of `research.pivot_eval --corpus
lohelp` use it.

    .venv/bin/python -m research.langid_eval            # results/langid-lohelp.{json,md}

Each language's test paragraphs (its column of work/lohelp/text/test.many.tsv: English's every
row, another language's those its pair kept) are detected three ways: py3langid restricted to
the corpus's languages (what pivot_eval counts off-target with: fairseq_taskmoe.langid's
detector_for), py3langid over all its 140 languages, and, for en / de / fr / cs, the stop-word
detector the Multi30k figures use. Accuracy is the share detected as the language itself; the
most frequent wrong answers are listed.
"""

import argparse
import importlib.util
import json
import sys
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

from fairseq_taskmoe.atomic import write_text_atomically
from fairseq_taskmoe.langid import LANGS, Detector, detect, identify
from research.common import REPO
from research.study.corpus import LOHELP_DIR, read_many_way


def scores(texts, lang, detector) -> dict:
    """Accuracy of `detector` on `texts`, all in `lang`: {"accuracy", "n", "wrong": the most
    frequent wrong answers {language or "none": count}}."""
    found = Counter(detector(t) or "none" for t in texts)
    n = sum(found.values())
    wrong = {k: v for k, v in found.most_common() if k != lang}
    return {"accuracy": round(found[lang] / n, 4) if n else None, "n": n,
            "wrong": dict(list(wrong.items())[:3])}


def evaluate(columns, limit=None) -> dict:
    """{language: {method: scores}} over the many-way test set's columns (read_many_way)."""
    langs = tuple(columns)
    restricted = Detector("py3langid", langs)
    out = {}
    for lang, column in columns.items():
        texts = [t for t in column if t][:limit]
        out[lang] = {"restricted": scores(texts, lang, restricted),
                     "all": scores(texts, lang, lambda t: identify(t))}
        if lang in LANGS:
            out[lang]["stop_words"] = scores(texts, lang, detect)
    return out


def markdown(record) -> str:
    def cell(s):
        if s is None:
            return "–"
        wrong = ", ".join(f"{k} {v}" for k, v in s["wrong"].items())
        return f"{s['accuracy']:.1%}" + (f" ({wrong})" if wrong else "")

    rows = ["| language | paragraphs | py3langid, corpus languages | py3langid, all 140 | "
            "stop words (en, de, fr, cs) |", "|---|--:|---|---|---|"]
    for lang, r in record["languages"].items():
        rows.append(f"| {lang} | {r['restricted']['n']:,} | {cell(r['restricted'])} | "
                    f"{cell(r['all'])} | {cell(r.get('stop_words'))} |")
    m = record["mean"]
    rows.append(f"| **mean** | | **{m['restricted']:.1%}** | {m['all']:.1%} | |")
    return (f"# Language detection on LoHelp's references\n\n"
            f"Written by `python -m research.langid_eval` (py3langid {record['py3langid']}). "
            f"Each language's test paragraphs ({record['source']}) detected by "
            "fairseq_taskmoe.langid: py3langid restricted to the corpus's "
            f"{len(record['languages'])} languages (what `research.pivot_eval --corpus lohelp` "
            "counts off-target with), over all its languages, and the stop-word detector of the "
            "Multi30k figures. Accuracy: the share detected as the language itself; in brackets "
            "the most frequent wrong answers (none: no letter in the paragraph).\n\n"
            f"Command: `{record['command']}`\n\n" + "\n".join(rows) +
            f"\n\nTime: {record['seconds']:.0f} s.\n")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.langid_eval",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--text", type=Path, default=LOHELP_DIR / "text",
                   help="LoHelp's text/ folder, with test.many.tsv (default: work/lohelp/text)")
    p.add_argument("--limit", type=int, default=None,
                   help="first N paragraphs per language only (a quick look)")
    p.add_argument("--name", default="lohelp", help="results/langid-NAME.{json,md}")
    p.add_argument("--out", type=Path, default=REPO / "results")
    args = p.parse_args(argv)
    if importlib.util.find_spec("py3langid") is None:
        sys.exit("research.langid_eval needs py3langid: pip install 'fairseq-taskmoe[langid]' "
                 "(`make venv` installs it)")

    start = time.time()
    columns = read_many_way(args.text)
    languages = evaluate(columns, args.limit)
    record = {
        "name": args.name, "py3langid": version("py3langid"),
        "source": "the many-way test set, text/test.many.tsv"
                  + (f", first {args.limit} per language" if args.limit else ""),
        "languages": languages,
        "mean": {m: round(sum(r[m]["accuracy"] for r in languages.values()) / len(languages), 4)
                 for m in ("restricted", "all")},
        "seconds": round(time.time() - start, 1),
        "command": " ".join([".venv/bin/python", "-m", "research.langid_eval",
                             *(sys.argv[1:] if argv is None else argv)]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out / f"langid-{args.name}.json",
                          json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    write_text_atomically(args.out / f"langid-{args.name}.md", markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
