"""How much CTranslate2 gains from batching on one model: CPU time per sentence when the same
sentences are translated one at a time and in batches of 4, 16 and 64 (the ceiling of what
cross-request batching in taskmoe-serve can gain with that engine; docs/serving.md).

    .venv/bin/python -m research.bench.ct2_batch \\
        work/demo/serve-cache/*/ctranslate2-int8-*/all-de.ct2 \\
        --text work/demo/multi30k/text/test.en --compute-types int8,float32
"""

import argparse
import time
from pathlib import Path

from fairseq_taskmoe.ct2 import CT2Translator


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.bench.ct2_batch",
                                description=__doc__.split("\n")[0])
    p.add_argument("model", help="a CTranslate2 export (taskmoe-export or taskmoe-serve's cache)")
    p.add_argument("--text", required=True, help="source sentences, one per line")
    p.add_argument("--sentences", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,4,16,64")
    p.add_argument("--compute-types", default="int8")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    lines = Path(args.text).read_text().splitlines()[:args.sentences]
    print(f"{len(lines)} sentences of {args.text}, beam {args.beam}, {args.threads} thread(s); "
          "CPU ms per sentence (process time)")
    for compute_type in args.compute_types.split(","):
        mt = CT2Translator(args.model, compute_type=compute_type, intra_threads=args.threads)
        tokens = [mt.encode(s) for s in lines]
        mt.translate_tokens(tokens[:4], beam=args.beam)  # warm-up
        row = []
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            start = time.process_time()
            for i in range(0, len(tokens), bs):
                mt.translate_tokens(tokens[i:i + bs], beam=args.beam)
            row.append(f"batch {bs}: {1000 * (time.process_time() - start) / len(tokens):.1f}")
        print(f"{compute_type:8s} " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
