"""Pivot vs direct zero-shot, as `taskmoe-serve` serves them, on Multi30k test_2016_flickr.

Multi30k is 4-way parallel, so every untrained direction (de-fr, when only en-* and *-en were
trained) has references. For each direction that `--pivot auto` serves through a pivot, the
test set is translated twice by the service itself (routes, registry, batcher: the code behind
the HTTP API, without HTTP): through the pivot (two trained legs), and direct zero-shot (the
route `--pivot none` gives). Scored with sacreBLEU (corpus_bleu defaults, as demo.py and
research.study score) and chrF, and the share of hypotheses detected in another language than the
target (fairseq_taskmoe.langid; its accuracy on these references is printed next to it).

    .venv/bin/python -m research.pivot_eval work/demo/checkpoints/checkpoint_last.pt \
        --data work/demo/multi30k/bin --spm-model work/demo/multi30k/spm.model \
        --text work/demo/multi30k/text --name demo

Writes results/pivot_eval-NAME.json and .md (atomically); --limit N scores the first N
sentences only (a quick look, not a result).
"""

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from fairseq_taskmoe.atomic import write_text_atomically
from fairseq_taskmoe.langid import detect, language_shares
from research.common import REPO

CHUNK = 64  # sentences per service call: the batcher batches them as one request's texts


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.pivot_eval",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="task-MoE checkpoint (file or sharded prefix)")
    p.add_argument("--data", required=True, help="fairseq data-bin folder of the model")
    p.add_argument("--spm-model", required=True, help="SentencePiece model of the data")
    p.add_argument("--text", required=True, type=Path,
                   help="folder with the raw test.{lang} files (prepare_multi30k's text/)")
    p.add_argument("--name", required=True, help="results/pivot_eval-NAME.{json,md}")
    p.add_argument("--backend", default="ctranslate2", choices=("ctranslate2", "fairseq"))
    p.add_argument("--quantization", default="int8")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=str(REPO / "work" / "serve-cache"))
    p.add_argument("--limit", type=int, default=None, help="first N test sentences only")
    p.add_argument("--skip-trained", action="store_true",
                   help="do not also score the trained (direct) directions as served")
    p.add_argument("--out", type=Path, default=REPO / "results")
    return p.parse_args(argv)


def service_for(args, pivot: str):
    """The service exactly as `taskmoe-serve ... --pivot PIVOT` builds it."""
    from fairseq_taskmoe.cli.serve import build_parser, make_service

    serve_args = build_parser().parse_args([
        str(args.checkpoint), "--data", args.data, "--spm-model", args.spm_model,
        "--backend", args.backend, "--quantization", args.quantization, "--pivot", pivot,
        "--beam", str(args.beam), "--threads", str(args.threads), "--cache-dir", args.cache_dir,
        "--max-wait-ms", "0", "--timeout", "3600"])
    service, _ = make_service(serve_args)
    return service


async def translate_all(service, texts, src, tgt):
    out = []
    for start in range(0, len(texts), CHUNK):
        hyps, _, route = await service.translate(texts[start:start + CHUNK], src, tgt)
        out += hyps
    return out, route


def score(hyps, refs, tgt):
    from sacrebleu.metrics import BLEU, CHRF

    shares = language_shares(hyps, tgt)
    return {"bleu": round(BLEU().corpus_score(hyps, [refs]).score, 2),
            "chrf": round(CHRF().corpus_score(hyps, [refs]).score, 2),
            "off_target": round(shares["off_target"], 4),
            "undetected": round(shares["undetected"], 4)}


def langid_accuracy(text_dir: Path, langs, limit):
    acc = {}
    for lang in langs:
        lines = (text_dir / f"test.{lang}").read_text().splitlines()[:limit]
        acc[lang] = round(sum(detect(s) == lang for s in lines) / len(lines), 4)
    return acc


def markdown(result) -> str:
    rows = ["| direction | pivot BLEU | pivot chrF | pivot off-target | zero-shot BLEU | "
            "zero-shot chrF | zero-shot off-target |", "|---|---|---|---|---|---|---|"]
    for d in result["directions"]:
        p, z = d["pivot"], d["zero_shot"]
        rows.append(f"| {d['pair']} (via {d['via']}) | {p['bleu']:.2f} | {p['chrf']:.1f} | "
                    f"{p['off_target']:.1%} | {z['bleu']:.2f} | {z['chrf']:.1f} | "
                    f"{z['off_target']:.1%} |")
    a = result["average"]
    rows.append(f"| **average** | **{a['pivot']['bleu']:.2f}** | {a['pivot']['chrf']:.1f} | "
                f"{a['pivot']['off_target']:.1%} | **{a['zero_shot']['bleu']:.2f}** | "
                f"{a['zero_shot']['chrf']:.1f} | {a['zero_shot']['off_target']:.1%} |")
    if result.get("trained"):
        rows += ["", "Trained directions as served (direct):", "",
                 "| direction | BLEU | chrF | off-target |", "|---|---|---|---|"]
        rows += [f"| {d['pair']} | {d['served']['bleu']:.2f} | {d['served']['chrf']:.1f} | "
                 f"{d['served']['off_target']:.1%} |" for d in result["trained"]]
    acc = ", ".join(f"{k} {v:.1%}" for k, v in result["langid_accuracy"].items())
    return (f"# Pivot vs direct zero-shot: {result['name']}\n\n"
            f"Checkpoint `{result['checkpoint']}`, {result['sentences']} sentences of "
            f"Multi30k test_2016_flickr per direction, served by taskmoe-serve's code "
            f"(backend {result['backend']}, {result['quantization']}, beam {result['beam']}).\n"
            f"Command: `{result['command']}`\n\n" + "\n".join(rows) +
            f"\n\nOff-target: hypotheses detected as another language (fairseq_taskmoe.langid, "
            f"accuracy on the references: {acc}). Time: {result['seconds']:.0f} s.\n")


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    pivoted, direct = service_for(args, "auto"), service_for(args, "none")
    langs = pivoted.langs
    directions = []
    for (src, tgt), route in sorted(pivoted.routes.items()):
        if route.kind != "pivot":
            continue
        zero = direct.route(src, tgt)
        if zero.kind != "zero-shot":
            print(f"{src}-{tgt}: no direct zero-shot route ({zero.why}); skipped", flush=True)
            continue
        sources = (args.text / f"test.{src}").read_text().splitlines()[:args.limit]
        refs = (args.text / f"test.{tgt}").read_text().splitlines()[:args.limit]
        t0 = time.time()
        pivot_hyps, _ = asyncio.run(translate_all(pivoted, sources, src, tgt))
        zero_hyps, _ = asyncio.run(translate_all(direct, sources, src, tgt))
        row = {"pair": f"{src}-{tgt}", "via": route.via, "pivot": score(pivot_hyps, refs, tgt),
               "zero_shot": score(zero_hyps, refs, tgt),
               "examples": [{"source": sources[i], "pivot": pivot_hyps[i],
                             "zero_shot": zero_hyps[i], "reference": refs[i]}
                            for i in range(min(3, len(sources)))]}
        directions.append(row)
        print(f"{src}-{tgt}: pivot via {route.via} BLEU {row['pivot']['bleu']:.2f} "
              f"(off-target {row['pivot']['off_target']:.1%}), zero-shot BLEU "
              f"{row['zero_shot']['bleu']:.2f} (off-target {row['zero_shot']['off_target']:.1%})"
              f"; {time.time() - t0:.0f} s", flush=True)
    trained = []
    for (src, tgt), route in sorted(pivoted.routes.items()):
        if route.kind != "direct" or args.skip_trained:
            continue
        sources = (args.text / f"test.{src}").read_text().splitlines()[:args.limit]
        refs = (args.text / f"test.{tgt}").read_text().splitlines()[:args.limit]
        hyps, _ = asyncio.run(translate_all(pivoted, sources, src, tgt))
        trained.append({"pair": f"{src}-{tgt}", "served": score(hyps, refs, tgt)})
        print(f"{src}-{tgt}: direct BLEU {trained[-1]['served']['bleu']:.2f}", flush=True)
    for service in (pivoted, direct):
        service.batcher.close()
    if not directions:
        sys.exit("no direction is served through a pivot by this model: nothing to compare")

    def mean(kind, key):
        return round(sum(d[kind][key] for d in directions) / len(directions), 4)

    result = {
        "name": args.name, "checkpoint": str(args.checkpoint), "backend": args.backend,
        "quantization": args.quantization, "beam": args.beam,
        "sentences": len(sources), "directions": directions, "trained": trained,
        "average": {k: {m: mean(k, m) for m in ("bleu", "chrf", "off_target")}
                    for k in ("pivot", "zero_shot")},
        "langid_accuracy": langid_accuracy(args.text, langs, args.limit),
        "seconds": round(time.time() - started, 1),
        "command": " ".join([".venv/bin/python", "-m", "research.pivot_eval", *sys.argv[1:]]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.limit is None else f"-first{args.limit}"
    write_text_atomically(args.out / f"pivot_eval-{args.name}{suffix}.json",
                          json.dumps(result, indent=1) + "\n")
    write_text_atomically(args.out / f"pivot_eval-{args.name}{suffix}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
