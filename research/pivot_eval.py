"""Pivot vs direct zero-shot, as `taskmoe-serve` serves them, on a many-way parallel test set.

Every untrained direction (de-fr, when only en-* and *-en were trained) has references when the
test set is many-way parallel. For each evaluated direction that `--pivot auto` serves through
a pivot, the test set is translated twice by the service itself (routes, registry, batcher: the
code behind the HTTP API, without HTTP): through the pivot (two trained legs), and direct
zero-shot (the route `--pivot none` gives; a lang-pair model reads its unseen pair with the
checkpoint's --moe-unseen-pairs policy, e.g. target_mean). Scored with sacreBLEU and chrF, and
the share of hypotheses detected in another language than the target
(fairseq_taskmoe.langid.detector_for the model's languages; its accuracy on the references of
each target language is recorded next to it).

Two corpora (--corpus):

- multi30k (default): test_2016_flickr, 4-way parallel (--text: the raw test.{lang} files),
  every direction served through a pivot, 1,000 sentences each; BLEU with sacreBLEU's corpus
  defaults, off-target by the stop-word detector (as every Multi30k figure).

      .venv/bin/python -m research.pivot_eval work/demo/checkpoints/checkpoint_last.pt \
          --data work/demo/multi30k/bin --spm-model work/demo/multi30k/spm.model \
          --text work/demo/multi30k/text --name demo

- lohelp: LoHelp's many-way test set (work/lohelp/text/test.many.tsv, scripts/prepare_lohelp.py;
  --data, --spm-model and --text default to work/lohelp's). Directions (--directions): by
  default the ring of the non-English languages in bin/langs.txt order, each to the next and
  the last to the first (de-fr, fr-cs, ..., ja-fi, fi-de for the 14 languages): every language
  once as source and once as target, Greek, Cyrillic, Han and Han + kana included. Each
  direction's paragraphs (those translated into both languages) are capped at a seeded sample
  of --cap (200, the study's cap and seed). BLEU with the target's sacreBLEU tokenizer (zh for Chinese,
  ja-mecab for Japanese, 13a otherwise: research.study.corpus.bleu_tokenizer), off-target by
  py3langid restricted to the model's languages (`python -m research.langid_eval` measures it).

      .venv/bin/python -m research.pivot_eval --corpus lohelp \
          work/study-lohelp/runs/target_target-s1/checkpoints/checkpoint_last.pt \
          --name lohelp-target_target-s1

Writes results/pivot_eval-NAME.json and .md (atomically); --limit N scores the first N
sentences of each direction's test set only (a quick look, not a result).
"""

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from fairseq_taskmoe.atomic import write_text_atomically
from fairseq_taskmoe.langid import detector_for, language_shares
from research.common import REPO
from research.study.corpus import (CAP_SEED, LOHELP_DIR, TEST_CAP, bleu_tokenizer,
                                   many_way_pair, read_langs_pairs, read_many_way, sample_indices)

CHUNK = 64  # sentences per service call: the batcher batches them as one request's texts
CORPORA = ("multi30k", "lohelp")
TEST_SETS = {"multi30k": "Multi30k test_2016_flickr",
             "lohelp": "LoHelp's many-way test set (work/lohelp/text/test.many.tsv)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.pivot_eval",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="task-MoE checkpoint (file or sharded prefix)")
    p.add_argument("--corpus", choices=CORPORA, default="multi30k",
                   help="multi30k (default) or lohelp (see above)")
    p.add_argument("--data", help="fairseq data-bin folder of the model (lohelp default: "
                   "work/lohelp/bin)")
    p.add_argument("--spm-model", help="SentencePiece model of the data (lohelp default: "
                   "work/lohelp/spm.model)")
    p.add_argument("--text", type=Path,
                   help="multi30k: the folder with the raw test.{lang} files (prepare_multi30k's "
                   "text/); lohelp: the folder with test.many.tsv (default work/lohelp/text)")
    p.add_argument("--name", required=True, help="results/pivot_eval-NAME.{json,md}")
    p.add_argument("--directions", default=None,
                   help="comma-separated directions to compare (e.g. de-fr,ja-zh); lohelp: also "
                   "'ring' (the default, see above) or 'all' (every X-Y); multi30k default: "
                   "every direction served through a pivot")
    p.add_argument("--cap", type=int, default=TEST_CAP,
                   help="lohelp: at most this many paragraphs per direction, a seeded sample "
                   "(seed %d, as the study's test sets; 0: all) (default: %%(default)s)"
                   % CAP_SEED)
    p.add_argument("--backend", default="ctranslate2", choices=("ctranslate2", "fairseq"))
    p.add_argument("--quantization", default="int8")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=str(REPO / "work" / "serve-cache"))
    p.add_argument("--limit", type=int, default=None,
                   help="first N test sentences of each direction only")
    p.add_argument("--skip-trained", action="store_true",
                   help="do not also score the trained (direct) directions as served")
    p.add_argument("--out", type=Path, default=REPO / "results")
    args = p.parse_args(argv)
    if args.corpus == "lohelp":
        args.data = args.data or str(LOHELP_DIR / "bin")
        args.spm_model = args.spm_model or str(LOHELP_DIR / "spm.model")
        args.text = args.text or LOHELP_DIR / "text"
    elif not (args.data and args.spm_model and args.text):
        p.error("--corpus multi30k needs --data, --spm-model and --text")
    if args.cap < 0:
        p.error("--cap must be >= 0")
    return args


def ring(langs):
    """The non-English languages in order, each to the next, the last to the first."""
    xs = [x for x in langs if x != "en"]
    return [f"{x}-{xs[(i + 1) % len(xs)]}" for i, x in enumerate(xs)] if len(xs) > 1 else []


def lohelp_plan(args):
    """(languages, the X-Y directions to compare, the trained directions) of a LoHelp model's
    data folder and --directions."""
    langs, trained = read_langs_pairs(Path(args.data))
    spec = args.directions or "ring"
    if spec == "ring":
        directions = ring(langs)
    elif spec == "all":
        directions = [f"{s}-{t}" for s in langs for t in langs
                      if s != t and "en" not in (s, t)]
    else:
        directions = [d.strip() for d in spec.split(",") if d.strip()]
    bad = [d for d in directions if len(d.split("-")) != 2 or not set(d.split("-")) <= set(langs)
           or d.split("-")[0] == d.split("-")[1]]
    if bad:
        sys.exit(f"--directions: {', '.join(bad)} not a pair of this model's languages "
                 f"({', '.join(langs)})")
    return langs, directions, trained


class TestSets:
    """Each direction's (sources, references): Multi30k's parallel files, or LoHelp's many-way
    test set capped at a seeded sample; then the first --limit of them."""

    def __init__(self, args):
        self.args = args
        self.columns = read_many_way(args.text) if args.corpus == "lohelp" else None

    def __call__(self, src, tgt):
        if self.columns is None:
            sources = (self.args.text / f"test.{src}").read_text().splitlines()
            refs = (self.args.text / f"test.{tgt}").read_text().splitlines()
        else:
            sources, refs = many_way_pair(self.columns, src, tgt)
            keep = sample_indices(len(refs), self.args.cap, CAP_SEED)
            sources, refs = [sources[i] for i in keep], [refs[i] for i in keep]
        return sources[:self.args.limit], refs[:self.args.limit]

    def references(self, lang):
        """Texts in `lang` to measure the detector on: the test file (Multi30k), or the
        language's paragraphs of the many-way test set, capped as a direction's."""
        if self.columns is None:
            return (self.args.text / f"test.{lang}").read_text().splitlines()[:self.args.limit]
        texts = [t for t in self.columns[lang] if t]
        return [texts[i] for i in sample_indices(len(texts), self.args.cap, CAP_SEED)
                ][:self.args.limit]


def service_for(args, pivot: str, pairs: str = "all"):
    """The service exactly as `taskmoe-serve ... --pivot PIVOT --pairs PAIRS` builds it."""
    from fairseq_taskmoe.cli.serve import build_parser, make_service

    serve_args = build_parser().parse_args([
        str(args.checkpoint), "--data", args.data, "--spm-model", args.spm_model,
        "--backend", args.backend, "--quantization", args.quantization, "--pivot", pivot,
        "--pairs", pairs, "--beam", str(args.beam), "--threads", str(args.threads),
        "--cache-dir", args.cache_dir, "--max-wait-ms", "0", "--timeout", "3600"])
    service, _ = make_service(serve_args)
    return service


async def translate_all(service, texts, src, tgt):
    out = []
    for start in range(0, len(texts), CHUNK):
        hyps, _, route = await service.translate(texts[start:start + CHUNK], src, tgt)
        out += hyps
    return out, route


def score(hyps, refs, tgt, detector, corpus="multi30k"):
    """BLEU, chrF and language shares. BLEU: sacreBLEU's corpus defaults on Multi30k (as every
    Multi30k figure); else the target's tokenizer (bleu_tokenizer: zh, ja-mecab, 13a), None
    when it is not installed."""
    from sacrebleu.metrics import BLEU, CHRF

    shares = language_shares(hyps, tgt, detector)
    out = {}
    if corpus == "multi30k":
        bleu = BLEU().corpus_score(hyps, [refs]).score
    else:
        tok = out["bleu_tokenize"] = bleu_tokenizer(tgt)
        bleu = BLEU(tokenize=tok).corpus_score(hyps, [refs]).score if tok else None
    return {"bleu": None if bleu is None else round(bleu, 2),
            "chrf": round(CHRF().corpus_score(hyps, [refs]).score, 2),
            "off_target": round(shares["off_target"], 4),
            "undetected": round(shares["undetected"], 4), **out}


def langid_accuracy(tests: TestSets, langs, detector):
    acc = {}
    for lang in langs:
        lines = tests.references(lang)
        acc[lang] = round(sum(detector(s) == lang for s in lines) / len(lines), 4)
    return acc


def mean_of(rows, kind, key):
    vals = [d[kind][key] for d in rows]
    if not vals or None in vals:
        return None
    return round(sum(vals) / len(vals), 4)


def fmt_bleu(x, bold=False):
    if x is None:
        return "–"
    return f"**{x:.2f}**" if bold else f"{x:.2f}"


def markdown(result) -> str:
    rows = ["| direction | pivot BLEU | pivot chrF | pivot off-target | zero-shot BLEU | "
            "zero-shot chrF | zero-shot off-target |", "|---|---|---|---|---|---|---|"]
    for d in result["directions"]:
        p, z = d["pivot"], d["zero_shot"]
        rows.append(f"| {d['pair']} (via {d['via']}) | {fmt_bleu(p['bleu'])} | {p['chrf']:.1f} | "
                    f"{p['off_target']:.1%} | {fmt_bleu(z['bleu'])} | {z['chrf']:.1f} | "
                    f"{z['off_target']:.1%} |")
    a = result["average"]
    rows.append(f"| **average** | {fmt_bleu(a['pivot']['bleu'], True)} | "
                f"{a['pivot']['chrf']:.1f} | {a['pivot']['off_target']:.1%} | "
                f"{fmt_bleu(a['zero_shot']['bleu'], True)} | {a['zero_shot']['chrf']:.1f} | "
                f"{a['zero_shot']['off_target']:.1%} |")
    if result.get("trained"):
        rows += ["", "Trained directions as served (direct):", "",
                 "| direction | BLEU | chrF | off-target |", "|---|---|---|---|"]
        rows += [f"| {d['pair']} | {fmt_bleu(d['served']['bleu'])} | "
                 f"{d['served']['chrf']:.1f} | {d['served']['off_target']:.1%} |"
                 for d in result["trained"]]
    acc = ", ".join(f"{k} {v:.1%}" for k, v in result["langid_accuracy"].items())
    counts = sorted({d["sentences"] for d in result["directions"]})
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    test_set = result.get("test_set", TEST_SETS["multi30k"])
    notes = ""
    if result.get("corpus") == "lohelp":
        toks = result["bleu_tokenizers"]
        notes = (f"Directions: {result['directions_chosen']}. Test paragraphs: a seeded sample "
                 f"(seed {result['cap_seed']}) of at most {result['cap']} per direction of "
                 "those translated into both languages. BLEU tokenizers: " + ", ".join(
                     f"{l} {t or 'not installed (no BLEU)'}" for l, t in toks.items()) + ".\n\n")
    method = result.get("langid_method", "stop-words")
    return (f"# Pivot vs direct zero-shot: {result['name']}\n\n"
            f"Checkpoint `{result['checkpoint']}`, {n} sentences of "
            f"{test_set} per direction, served by taskmoe-serve's code "
            f"(backend {result['backend']}, {result['quantization']}, beam {result['beam']}).\n"
            f"Command: `{result['command']}`\n\n" + notes + "\n".join(rows) +
            f"\n\nOff-target: hypotheses detected as another language (fairseq_taskmoe.langid, "
            f"{method}, accuracy on the references: {acc}). Time: {result['seconds']:.0f} s.\n")


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    tests = TestSets(args)
    if args.corpus == "lohelp":
        langs, wanted, trained_pairs = lohelp_plan(args)
        pairs = wanted + ([] if args.skip_trained else trained_pairs)
        pivoted = service_for(args, "auto", ",".join(pairs))
        direct = service_for(args, "none", ",".join(wanted))
        wanted = [tuple(d.split("-")) for d in wanted]
    else:
        pivoted, direct = service_for(args, "auto"), service_for(args, "none")
        langs = pivoted.langs
        wanted = ([tuple(d.split("-")) for d in args.directions.split(",")] if args.directions
                  else sorted(p for p, r in pivoted.routes.items() if r.kind == "pivot"))
        bad = ["-".join(p) for p in wanted if p not in pivoted.routes]
        if bad:
            sys.exit(f"--directions: {', '.join(bad)} not a pair of this model's languages")
    detector = detector_for(pivoted.langs)
    directions = []
    for src, tgt in wanted:
        route = pivoted.route(src, tgt)
        if route.kind != "pivot":
            print(f"{src}-{tgt}: served {route.kind}, not through a pivot; skipped", flush=True)
            continue
        zero = direct.route(src, tgt)
        if zero.kind != "zero-shot":
            print(f"{src}-{tgt}: no direct zero-shot route ({zero.why}); skipped", flush=True)
            continue
        sources, refs = tests(src, tgt)
        t0 = time.time()
        pivot_hyps, _ = asyncio.run(translate_all(pivoted, sources, src, tgt))
        zero_hyps, _ = asyncio.run(translate_all(direct, sources, src, tgt))
        row = {"pair": f"{src}-{tgt}", "via": route.via, "sentences": len(sources),
               "pivot": score(pivot_hyps, refs, tgt, detector, args.corpus),
               "zero_shot": score(zero_hyps, refs, tgt, detector, args.corpus),
               "examples": [{"source": sources[i], "pivot": pivot_hyps[i],
                             "zero_shot": zero_hyps[i], "reference": refs[i]}
                            for i in range(min(3, len(sources)))]}
        directions.append(row)
        print(f"{src}-{tgt}: pivot via {route.via} BLEU {fmt_bleu(row['pivot']['bleu'])} "
              f"(off-target {row['pivot']['off_target']:.1%}), zero-shot BLEU "
              f"{fmt_bleu(row['zero_shot']['bleu'])} (off-target "
              f"{row['zero_shot']['off_target']:.1%}); {len(sources)} sentences, "
              f"{time.time() - t0:.0f} s", flush=True)
    trained = []
    for (src, tgt), route in sorted(pivoted.routes.items()):
        if route.kind != "direct" or args.skip_trained:
            continue
        sources, refs = tests(src, tgt)
        hyps, _ = asyncio.run(translate_all(pivoted, sources, src, tgt))
        trained.append({"pair": f"{src}-{tgt}", "sentences": len(sources),
                        "served": score(hyps, refs, tgt, detector, args.corpus)})
        print(f"{src}-{tgt}: direct BLEU {fmt_bleu(trained[-1]['served']['bleu'])}", flush=True)
    for service in (pivoted, direct):
        service.batcher.close()
    if not directions:
        sys.exit("no direction is served through a pivot by this model: nothing to compare")

    targets = list(dict.fromkeys(t for _s, t in wanted))
    result = {
        "name": args.name, "checkpoint": str(args.checkpoint), "corpus": args.corpus,
        "test_set": TEST_SETS[args.corpus], "backend": args.backend,
        "quantization": args.quantization, "beam": args.beam,
        "sentences": directions[-1]["sentences"], "directions": directions, "trained": trained,
        "average": {k: {m: mean_of(directions, k, m) for m in ("bleu", "chrf", "off_target")}
                    for k in ("pivot", "zero_shot")},
        "langid_method": detector.method,
        "langid_accuracy": langid_accuracy(tests, langs if args.corpus == "multi30k"
                                           else targets, detector),
        "seconds": round(time.time() - started, 1),
        "command": " ".join([".venv/bin/python", "-m", "research.pivot_eval",
                             *(sys.argv[1:] if argv is None else argv)]),
    }
    if args.corpus == "lohelp":
        result.update({
            "directions_chosen": ("the ring of the non-English languages in langs.txt order"
                                  if (args.directions or "ring") == "ring" else args.directions),
            "cap": args.cap, "cap_seed": CAP_SEED,
            "bleu_tokenizers": {t: bleu_tokenizer(t) for t in targets}})
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.limit is None else f"-first{args.limit}"
    write_text_atomically(args.out / f"pivot_eval-{args.name}{suffix}.json",
                          json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    write_text_atomically(args.out / f"pivot_eval-{args.name}{suffix}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
