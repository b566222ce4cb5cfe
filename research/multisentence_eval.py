"""Multi-sentence texts as `taskmoe-serve` serves them: split into sentences, or translated whole.

Models are trained on sentences. A client (a web page, a chat message) sends paragraphs. This
joins 2-4 consecutive Multi30k test sentences (seeded) into one text, with a space, and, every
third text, a blank line between two of them, and scores against the references joined the same
way (sacreBLEU corpus_bleu, chrF), twice through the service's own code (routes, registry,
batcher; no HTTP):

- **split** (the service since issue 26): each text cut into sentences, translated, put back;
- **whole** (the service before): each text one engine input, as `Service.translate` sent a text
  that fitted the model's positions. Made here with the same service's batcher, one Job per
  text, so the two differ only in the splitting.

    .venv/bin/python -m research.multisentence_eval work/demo/checkpoints/checkpoint_last.pt \
        --data work/demo/multi30k/bin --spm-model work/demo/multi30k/spm.model \
        --text work/demo/multi30k/text --name demo

Writes results/multisentence-NAME.json and .md (atomically).
"""

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from fairseq_taskmoe.atomic import write_text_atomically
from research.common import REPO
from research.pivot_eval import score, service_for

CHUNK = 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.multisentence_eval",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="task-MoE checkpoint (file or sharded prefix)")
    p.add_argument("--data", required=True, help="fairseq data-bin folder of the model")
    p.add_argument("--spm-model", required=True, help="SentencePiece model of the data")
    p.add_argument("--text", required=True, type=Path,
                   help="folder with the raw test.{lang} files (prepare_multi30k's text/)")
    p.add_argument("--name", required=True, help="results/multisentence-NAME.{json,md}")
    p.add_argument("--pairs", default="en-de,de-en,en-fr,fr-en,en-cs,cs-en")
    p.add_argument("--backend", default="ctranslate2", choices=("ctranslate2", "fairseq"))
    p.add_argument("--quantization", default="int8")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cache-dir", default=str(REPO / "work" / "serve-cache"))
    p.add_argument("--out", type=Path, default=REPO / "results")
    return p.parse_args(argv)


def join_groups(n: int, seed: int):
    """Consecutive groups of 2-4 sentence indices covering 0..n-1 (a last group of 1 joins the
    one before), and the separator inside each group (a blank line after the first sentence of
    every third group, spaces elsewhere)."""
    rng = random.Random(seed)
    groups, i = [], 0
    while i < n:
        size = rng.randint(2, 4)
        groups.append(list(range(i, min(n, i + size))))
        i += size
    if len(groups) > 1 and len(groups[-1]) == 1:
        groups[-2] += groups.pop()
    return [(g, "\n\n" if k % 3 == 2 else " ") for k, g in enumerate(groups)]


def joined(lines, groups):
    return [lines[g[0]] + sep + " ".join(lines[i] for i in g[1:]) for g, sep in groups]


async def split_translation(service, texts, src, tgt):
    out = []
    for start in range(0, len(texts), CHUNK):
        hyps, _, _ = await service.translate(texts[start:start + CHUNK], src, tgt)
        out += hyps
    return out


async def whole_translation(service, texts, src, tgt):
    """Each text one engine input: the pre-issue-26 service (direct routes only)."""
    from fairseq_taskmoe.serve.batcher import Job

    route = service.route(src, tgt)
    assert route.kind == "direct", route
    key = service.registry.key_of(route.legs[0])
    out = []
    for start in range(0, len(texts), CHUNK):
        part = texts[start:start + CHUNK]
        pieces = [service._encode(t) for t in part]
        job = Job(pieces, src, tgt, beam=service.limits.beam, nbest=1,
                  sizes=[len(p) + 2 for p in pieces])
        hyps = await asyncio.wrap_future(service.batcher.submit(key, job))
        out += [h[0] for h in hyps]
    return out


def markdown(result) -> str:
    rows = ["| direction | texts | split BLEU | split chrF | whole BLEU | whole chrF | "
            "sentences lost (whole) |", "|---|---|---|---|---|---|---|"]
    for d in result["directions"]:
        rows.append(f"| {d['pair']} | {d['texts']} | {d['split']['bleu']:.2f} | "
                    f"{d['split']['chrf']:.1f} | {d['whole']['bleu']:.2f} | "
                    f"{d['whole']['chrf']:.1f} | {d['whole_short']:.1%} |")
    a = result["average"]
    rows.append(f"| **average** | | **{a['split']['bleu']:.2f}** | {a['split']['chrf']:.1f} | "
                f"**{a['whole']['bleu']:.2f}** | {a['whole']['chrf']:.1f} | |")
    return (f"# Multi-sentence texts, split into sentences or translated whole: "
            f"{result['name']}\n\nCheckpoint `{result['checkpoint']}`; Multi30k "
            f"test_2016_flickr joined into texts of 2-4 sentences (seed {result['seed']}; a "
            "blank line inside every third text), scored against the references joined the "
            f"same way; served by taskmoe-serve's code (backend {result['backend']}, "
            f"{result['quantization']}, beam {result['beam']}).\nCommand: "
            f"`{result['command']}`\n\n" + "\n".join(rows) +
            "\n\n'sentences lost (whole)': share of texts whose whole translation has fewer "
            "sentence ends (. ! ?) than the source. Time: "
            f"{result['seconds']:.0f} s.\n")


def ends(text: str) -> int:
    return sum(text.count(c) for c in ".!?")


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    service = service_for(args, "auto")
    directions = []
    for pair in args.pairs.split(","):
        src, tgt = pair.split("-")
        sources = (args.text / f"test.{src}").read_text().splitlines()
        refs = (args.text / f"test.{tgt}").read_text().splitlines()
        groups = join_groups(len(sources), args.seed)
        texts, joined_refs = joined(sources, groups), joined(refs, groups)
        t0 = time.time()
        split_hyps = asyncio.run(split_translation(service, texts, src, tgt))
        whole_hyps = asyncio.run(whole_translation(service, texts, src, tgt))
        short = sum(ends(h) < ends(s) for h, s in zip(whole_hyps, texts)) / len(texts)
        row = {"pair": pair, "texts": len(texts),
               "split": score(split_hyps, joined_refs, tgt),
               "whole": score(whole_hyps, joined_refs, tgt), "whole_short": round(short, 4),
               "examples": [{"source": texts[i], "split": split_hyps[i], "whole": whole_hyps[i],
                             "reference": joined_refs[i]} for i in range(3)]}
        directions.append(row)
        print(f"{pair}: split BLEU {row['split']['bleu']:.2f}, whole BLEU "
              f"{row['whole']['bleu']:.2f} ({short:.1%} of whole translations lost a sentence "
              f"end); {time.time() - t0:.0f} s", flush=True)
    service.batcher.close()

    def mean(kind, key):
        return round(sum(d[kind][key] for d in directions) / len(directions), 4)

    result = {"name": args.name, "checkpoint": str(args.checkpoint), "backend": args.backend,
              "quantization": args.quantization, "beam": args.beam, "seed": args.seed,
              "directions": directions,
              "average": {k: {m: mean(k, m) for m in ("bleu", "chrf")}
                          for k in ("split", "whole")},
              "seconds": round(time.time() - started, 1),
              "command": " ".join([".venv/bin/python", "-m", "research.multisentence_eval",
                                   *sys.argv[1:]])}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out / f"multisentence-{args.name}.json",
                          json.dumps(result, indent=1) + "\n")
    write_text_atomically(args.out / f"multisentence-{args.name}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
