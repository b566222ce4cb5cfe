#!/usr/bin/env python3
"""What --engine-batch buys (issue 30): CTranslate2 on one export, two calls side by side (two
worker threads, inter_threads 2, one thread each, as taskmoe-serve runs a hot pair on 2 cores),
each call N sentences in arrival order (a seeded shuffle of the test sentences) sorted longest
first, translated as one batch or cut into batches of --engine-batches sentences; and the same
calls formed from sentences sorted by length over the whole set (what no server of arriving
requests can do). Sentences per second, the same decoding as the server (beam, decoding bound).

    .venv/bin/python -m research.bench.engine_batches work/demo/export.en-de.ct2 \\
        --text work/demo/multi30k/text/test.en --pair en-de
"""

import argparse
import random
import threading
import time
from pathlib import Path

from fairseq_taskmoe.ct2 import CT2Translator
from fairseq_taskmoe.serve.engines import output_bound


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.bench.engine_batches",
                                description=__doc__.split("\n")[0])
    p.add_argument("model", help="a CTranslate2 export (taskmoe-export, or taskmoe-serve's cache)")
    p.add_argument("--text", required=True, help="source sentences, one per line")
    p.add_argument("--pair", default="en-de", help="SRC-TGT: the language tokens (default en-de)")
    p.add_argument("--sentences", type=int, default=384)
    p.add_argument("--calls", default="8,16,32", help="sentences per call (default 8,16,32)")
    p.add_argument("--engine-batches", default="0,4,8",
                   help="sentences per engine batch within a call; 0: the call in one batch")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="calls side by side (default 2)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    src, tgt = args.pair.split("-")
    lines = Path(args.text).read_text().splitlines()[:args.sentences]
    mt = CT2Translator(args.model, intra_threads=1, inter_threads=args.workers)
    prefix, target = mt.tokens(src, tgt)
    sources = [prefix + mt.encode(s) for s in lines]

    def translate(batch):
        bound = output_bound(max(len(s) for s in batch) + 1, 1024)
        mt.translator.translate_batch(batch, target_prefix=[target] * len(batch),
                                      beam_size=args.beam, max_input_length=0,
                                      max_decoding_length=bound + len(target))

    def run(calls, engine_batch):
        pending, lock = iter(calls), threading.Lock()

        def worker():
            while True:
                with lock:
                    call = next(pending, None)
                if call is None:
                    return
                step = engine_batch or len(call)
                for i in range(0, len(call), step):
                    translate(call[i:i + step])

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(args.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(sources) / (time.perf_counter() - t0)

    translate(sources[:8])  # warm-up
    shuffled = sources[:]
    random.Random(args.seed).shuffle(shuffled)
    by_length = sorted(sources, key=len, reverse=True)
    batches = [int(b) for b in args.engine_batches.split(",")]
    print(f"{len(sources)} sentences of {args.text}, {args.pair}, beam {args.beam}, "
          f"{args.workers} calls side by side; sentences/s")
    print("call | " + " | ".join(f"arrival order, engine batch {b or 'whole'}" for b in batches)
          + " | sorted over the whole set, whole call")
    for n in (int(c) for c in args.calls.split(",")):
        arriving = [sorted(shuffled[i:i + n], key=len, reverse=True)
                    for i in range(0, len(shuffled), n)]
        ordered = [by_length[i:i + n] for i in range(0, len(by_length), n)]
        row = [f"{run(arriving, b):.1f}" for b in batches] + [f"{run(ordered, 0):.1f}"]
        print(f"{n} | " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
