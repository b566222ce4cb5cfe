#!/usr/bin/env python3
"""Does one large request hold its pair for everyone? taskmoe-serve on 127.0.0.1 (this checkout's
code, or --code DIR's: another checkout, e.g. a git worktree of an older commit, put first on
PYTHONPATH), a warm-up request, then a request of --texts texts to --pair and, from --after
seconds into it, --smalls one-sentence requests to the same pair, one every --gap seconds, each
sent when the one before was answered. Prints each small request's latency and the large
request's time; the server is stopped by its process id at the end.

    .venv/bin/python -m research.bench.large_request work/demo/checkpoints/checkpoint_last.pt \\
        --data work/demo/multi30k/bin --spm-model work/demo/multi30k/spm.model \\
        --text work/demo/multi30k/text/test.en
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from research.bench.load import HOST, Server, free_port, serve_command


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.bench.large_request",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="the fairseq data folder (dictionaries)")
    p.add_argument("--spm-model", default=None, help="the SentencePiece model (default: none: "
                   "whitespace tokens, as the data folder's dictionaries have them)")
    p.add_argument("--text", required=True, help="source sentences, one per line")
    p.add_argument("--pair", default="en-de", help="SRC-TGT (default: en-de)")
    p.add_argument("--texts", type=int, default=20000, help="texts in the large request")
    p.add_argument("--smalls", type=int, default=12)
    p.add_argument("--after", type=float, default=2.0)
    p.add_argument("--gap", type=float, default=0.5)
    p.add_argument("--code", default=None, help="serve another checkout's code (default: this)")
    p.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    return p.parse_args(argv)


def main(argv=None):
    import httpx

    args = parse_args(argv)
    src, tgt = args.pair.split("-")
    lines = [s.strip() for s in Path(args.text).read_text().splitlines() if s.strip()]
    if len(lines) < args.smalls + 1:
        raise SystemExit(f"{args.text}: {len(lines)} sentences, need {args.smalls + 1}")
    env = {}
    if args.code:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(args.code).resolve()),
                                                          os.environ.get("PYTHONPATH")]))
    cache = args.cache_dir or tempfile.mkdtemp(prefix="large-request-")
    port = free_port()
    extra = [*(["--spm-model", Path(args.spm_model).resolve()] if args.spm_model else []),
             "--cache-dir", cache, "--batch-limit", args.texts,
             "--char-limit", sum(len(s) for s in lines) * (args.texts // len(lines) + 1),
             "--body-limit", "64MB", "--timeout", 900]
    server = Server(serve_command(Path(args.checkpoint).resolve(), Path(args.data).resolve(),
                                  port, *extra), f"http://{HOST}:{port}",
                    Path(cache) / "server.log", env=env)
    url = server.url
    try:
        server.start(timeout=600)
        body = {"source": src, "target": tgt}
        httpx.post(url + "/translate", json={**body, "q": lines[0]}, timeout=120)  # warm-up
        large = [lines[i % len(lines)] for i in range(args.texts)]
        out = {}

        def send_large():
            start = time.perf_counter()
            answer = httpx.post(url + "/translate", json={**body, "q": large}, timeout=1800)
            out["large"] = (answer.status_code, round(time.perf_counter() - start, 2))

        thread = threading.Thread(target=send_large)
        thread.start()
        time.sleep(args.after)
        latencies = []
        for k in range(args.smalls):
            start = time.perf_counter()
            answer = httpx.post(url + "/translate", json={**body, "q": lines[k + 1]},
                                timeout=1800)
            if answer.status_code != 200:
                raise SystemExit(f"a small request was answered {answer.status_code}")
            latencies.append(round(time.perf_counter() - start, 3))
            time.sleep(args.gap)
        thread.join()
    finally:
        server.stop()
    print(json.dumps({"code": args.code or "this checkout", "small_latencies_s": latencies,
                      "small_median_s": round(statistics.median(latencies), 3),
                      "small_max_s": max(latencies), "large": {"status": out["large"][0],
                                                               "seconds": out["large"][1]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
