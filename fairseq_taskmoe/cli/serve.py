"""taskmoe-serve: one HTTP translation service for every pair of a task-MoE checkpoint.

    taskmoe-serve work/demo/ckpt/checkpoint_best.pt --data work/demo/multi30k/bin \\
        --spm-model work/demo/multi30k/spm.model --memory-budget 200MB

Each pair is served by its own pruned sub-network (built once, cached under --cache-dir, loaded
on first use, evicted least-recently-used under --memory-budget); untrained pairs through a pivot
language. The API is LibreTranslate's (POST /translate, GET /languages, POST /detect, ...);
see docs/serving.md.
"""

import argparse
import logging
import os
import signal
import sys
from typing import Dict, List

from ..ct2 import QUANTIZATIONS  # not cli/export.py: that imports torch and fairseq

# A request's worst case at these limits is a few seconds of engine time on a CPU: 20,000
# characters are about 150-250 sentences (LibreTranslate leaves both unlimited by default, which
# lets one request hold a pair for minutes). Raise them for batch clients you trust.
DEFAULT_CHAR_LIMIT = 20000
DEFAULT_BATCH_LIMIT = 256


def build_parser():
    p = argparse.ArgumentParser(
        prog="taskmoe-serve",
        description="Serve every language pair of a task-MoE checkpoint over HTTP "
        "(LibreTranslate-compatible API), each pair through its own pruned sub-network.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="full task-MoE checkpoint file, or a sharded checkpoint "
                   "prefix (P for P-shared.pt + P-rank-*.pt)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="the fairseq data folder with the dictionaries (dict.LANG.txt)")
    p.add_argument("--spm-model", metavar="FILE", help="SentencePiece model: raw text in and out "
                   "(without it, input and output are space-separated dictionary tokens)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the "
                   "server to the network")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend", choices=("ctranslate2", "fairseq"), default="ctranslate2",
                   help="ctranslate2: each sub-network exported (taskmoe-export) and run by "
                   "CTranslate2; fairseq: the pruned checkpoint run by fairseq. Checkpoints with "
                   "token- or sentence-routed MoE layers have no dense export and use fairseq")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="int8",
                   help="ctranslate2 weight type")
    p.add_argument("--pairs", default="all", help="pairs to serve: all, or e.g. en-de,de-en,*-fr")
    p.add_argument("--pivot", default="auto", help="untrained pairs: auto (through the language "
                   "whose two legs are trained, preferring the one in most trained pairs), a "
                   "language code, or none (zero-shot direct where the gate rows were trained, "
                   "labelled zero-shot; otherwise refused)")
    p.add_argument("--memory-budget", metavar="SIZE", help="memory for loaded sub-networks, "
                   "e.g. 200MB or 1.5GB; least recently used ones are evicted (default: no limit)")
    p.add_argument("--cache-dir", default="work/serve-cache",
                   help="where built sub-networks are kept, keyed by the checkpoint's content")
    p.add_argument("--api-keys", metavar="FILE", help="API keys (JSON or lines 'KEY [REQ_PER_MIN] "
                   "[CHAR_LIMIT]'); when given, every request needs a known api_key")
    p.add_argument("--char-limit", type=int, default=DEFAULT_CHAR_LIMIT,
                   help="characters per request, all texts together")
    p.add_argument("--batch-limit", type=int, default=DEFAULT_BATCH_LIMIT,
                   help="texts per request (with format=html, text nodes)")
    p.add_argument("--alternatives-limit", type=int, default=3,
                   help="most alternatives a request may ask for; at most --beam - 1, so that "
                   "asking for alternatives never changes the translation")
    p.add_argument("--body-limit", default="1MB", metavar="SIZE", help="request body size limit")
    p.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="source tokens per engine call: requests are batched together up to it, "
                   "and a larger request is translated in chunks of it, other requests' "
                   "sentences taking turns with it")
    p.add_argument("--engine-batch", type=int, default=None,
                   help="sentences per engine batch: a call's sentences are translated longest "
                   "first in batches of at most this many, so that similar lengths are padded "
                   "together; 0: each call in one batch (default: 8 with CTranslate2, the demo "
                   "model's best on 2 cores, docs/serving.md; 0 with fairseq, not measured)")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="extra time a request may wait for others to share its engine call "
                   "(default 0: batching is continuous, a request starts at once when its "
                   "sub-network has a thread free, and those that arrive meanwhile share the "
                   "next call)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="request legs waiting at most; beyond it 503 with Retry-After; under "
                   "--engine ray, per replica, and also the requests a replica takes at once "
                   "(/health and /metrics aside)")
    p.add_argument("--no-cross-batching", action="store_true",
                   help="one request per engine call (for comparisons)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--threads", type=int, default=None,
                   help="engine threads of the whole server (default: the cores this process "
                   "may use): CTranslate2 runs up to this many calls at once, one thread each, "
                   "so one busy pair uses every core and many busy pairs share them; fairseq "
                   "runs one call on this many torch threads. Under --engine ray: per replica "
                   "(default: the cores / --replicas), each replica reserving as many CPUs")
    p.add_argument("--beam", type=int, default=4, help="beam size")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    scale = p.add_argument_group("scale-out on Ray Serve (needs the `ray` extra: pip install "
                               "'fairseq-taskmoe[ray]'; docs/serving.md)")
    scale.add_argument("--engine", choices=("embedded", "ray"), default="embedded",
                       help="embedded: this process serves; ray: the same API on Ray Serve, the "
                       "sub-networks spread over --replicas replicas (model multiplexing)")
    scale.add_argument("--ray-address", metavar="ADDRESS", help="the Ray cluster to join (auto: "
                       "the one `ray start` runs on this machine; HOST:6379); default: start a "
                       "local one")
    scale.add_argument("--replicas", type=int, default=1, help="Translator replicas, each "
                       "serving the whole API with --threads engine threads (and as many CPUs "
                       "reserved on the cluster)")
    scale.add_argument("--pairs-per-replica", type=int, default=3, metavar="K",
                       help="sub-networks one replica keeps loaded (least recently used evicted); "
                       "a replica translates a leg itself when it holds the leg's sub-network "
                       "or has room for it, else hands it to a replica that holds it; replaces "
                       "--memory-budget under --engine ray")
    return p


def _fail(message: str):
    print(f"taskmoe-serve: error: {message}", file=sys.stderr)
    sys.exit(2)


def make_service(args):
    """serve.factory.make_service; an option or input that cannot be served ends the command
    with its message, exit status 2."""
    from ..serve.factory import ConfigError, make_service as build

    try:
        return build(args)
    except ConfigError as err:
        _fail(str(err))


def _exit_0(signum, frame):
    raise SystemExit(0)


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service, keys = make_service(args)
    if args.engine == "ray":
        # the sub-networks are now in --cache-dir: the replicas load them from there
        service.batcher.close()
        del service
        from ..serve.ray_engine import serve_forever

        return serve_forever(args)
    import uvicorn

    from ..serve.app import create_app

    app = create_app(service, keys)
    print(f"taskmoe-serve: serving {len([r for r in service.routes.values() if r.available])} "
          f"pairs on http://{args.host}:{args.port}/ (API docs: /docs)", flush=True)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, finish requests in flight, then the app's
    # lifespan drains the batcher. Afterwards it re-raises the signal under the handler that was
    # there before it started: this one, so that a graceful stop exits with status 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_0)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=False, timeout_graceful_shutdown=max(30, int(args.timeout) + 5))
    return 0


def builder_argv(options: Dict[str, object]) -> List[str]:
    """{"checkpoint": C, "data": D, "replicas": 2, "no_cross_batching": "true"} ->
    taskmoe-serve's argv (true/false options are flags)."""
    options = dict(options)
    argv = [str(options.pop("checkpoint"))]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or str(value).lower() in ("true", "false"):
            argv += [flag] if str(value).lower() == "true" else []
        else:
            argv += [flag, str(value)]
    return argv + ["--engine", "ray"]


def app_builder(options: Dict[str, object]):
    """For `serve run fairseq_taskmoe.cli.serve:app_builder checkpoint=C data=D ...` and
    KubeRay's RayService (`import_path` and `args` in serveConfigV2): the options are
    taskmoe-serve's flags, without dashes. Builds the sub-network cache first, as taskmoe-serve's
    start-up does (Serve's own HTTP options replace --host / --port)."""
    args = build_parser().parse_args(builder_argv(options))
    service, _ = make_service(args)
    service.batcher.close()
    from ..serve.ray_engine import application

    return application(args)


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
