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

from ..cli.export import QUANTIZATIONS

log = logging.getLogger("taskmoe.serve")
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
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a request may wait for others to share its batch")
    p.add_argument("--max-queue", type=int, default=256,
                   help="request legs waiting at most; beyond it 503 with Retry-After; under "
                   "--engine ray, also the requests the ingress takes at once (/health and "
                   "/metrics aside)")
    p.add_argument("--no-cross-batching", action="store_true",
                   help="one request per engine call (for comparisons)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--threads", type=int, default=1, help="threads per engine call")
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
    scale.add_argument("--replicas", type=int, default=1, help="Translator replicas (one "
                       "engine thread each, --threads)")
    scale.add_argument("--pairs-per-replica", type=int, default=3, metavar="K",
                       help="sub-networks one replica keeps loaded (least recently used evicted); "
                       "replaces --memory-budget under --engine ray")
    scale.add_argument("--max-ongoing", type=int, default=8, metavar="N",
                       help="legs one replica takes at once (a request has one per leg of its "
                       "route; a pivot has two); they form the replica's batches: a batch takes "
                       "up to N legs, one batch at a time (Ray Serve's max_ongoing_requests = "
                       "max_batch_size = N), translated in engine calls of at most "
                       "--max-batch-tokens source tokens; when every replica holding a pair's "
                       "sub-network is that busy, the pair spreads to another replica")
    return p


def _fail(message: str):
    print(f"taskmoe-serve: error: {message}", file=sys.stderr)
    sys.exit(2)


def make_service(args):
    """Parse and check everything, build (or find in the cache) the sub-networks; exits 2 with a
    message on bad input."""
    from ..deploy.pruning import PruningError
    from ..distributed.checkpoints import CheckpointError
    from ..serve.keys import KeyGuard, load_keys
    from ..serve.metrics import Metrics
    from ..serve.registry import Registry, parse_size
    from ..serve.routes import RouteError, legs_needed, parse_pairs_option, plan_routes
    from ..serve.service import ServeLimits, Service

    if not os.path.isdir(args.data):
        _fail(f"--data {args.data} is not a folder")
    if args.spm_model and not os.path.isfile(args.spm_model):
        _fail(f"--spm-model {args.spm_model} does not exist")
    for name in ("char_limit", "batch_limit", "max_batch_tokens", "max_queue", "threads", "beam"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.alternatives_limit < 0 or args.max_wait_ms < 0 or args.timeout <= 0:
        _fail("--alternatives-limit and --max-wait-ms must be >= 0, --timeout > 0")
    engine = getattr(args, "engine", "embedded")
    if engine == "ray":
        if args.replicas < 1 or args.pairs_per_replica < 1 or args.max_ongoing < 1:
            _fail("--replicas, --pairs-per-replica and --max-ongoing must be >= 1")
        if args.memory_budget:
            _fail("--memory-budget is for the embedded engine; under --engine ray each replica "
                  "keeps --pairs-per-replica sub-networks")
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            _fail("--engine ray needs Ray Serve: pip install 'ray[serve]' (or the package's "
                  "`ray` extra)")
    elif getattr(args, "ray_address", None):
        _fail("--ray-address needs --engine ray")
    try:
        budget = parse_size(args.memory_budget) if args.memory_budget else None
        body_limit = parse_size(args.body_limit)
    except ValueError as err:
        _fail(str(err))
    try:
        keys = KeyGuard(load_keys(args.api_keys)) if args.api_keys else KeyGuard()
    except (OSError, ValueError) as err:
        _fail(f"--api-keys: {err}")
    import torch

    torch.set_num_threads(args.threads)
    try:
        registry = Registry(args.checkpoint, args.data, args.spm_model, backend=args.backend,
                            quantization=args.quantization, cache_dir=args.cache_dir,
                            memory_budget=budget, threads=args.threads, metrics=Metrics(),
                            load_timeout=args.timeout)
        allowed = parse_pairs_option(args.pairs, registry.facts.langs)
        routes = plan_routes(registry.facts, args.pivot, allowed)
    except (FileNotFoundError, CheckpointError, PruningError, RouteError) as err:
        _fail(str(err))
    if registry.backend != args.backend or args.backend == "fairseq":
        log.info("%s", registry.backend_note)
    if registry.facts.trained is None:
        log.warning("the checkpoint records no trained pairs: every pair is served as direct")
    served = [r for r in routes.values() if r.available]
    if not served:
        _fail("no pair can be served: " + "; ".join(sorted({r.why for r in routes.values()})))
    for route in routes.values():
        via = f" via {route.via}" if route.via else ""
        log.info("route %s-%s: %s%s%s", route.src, route.tgt, route.kind, via,
                 f" ({route.why})" if route.why else "")
    try:
        registry.prepare(legs_needed(routes))
    except (ValueError, PruningError) as err:
        _fail(str(err))
    if args.alternatives_limit > args.beam - 1:
        log.warning("--alternatives-limit %d lowered to %d (--beam %d - 1): more alternatives "
                    "would need a wider beam, which changes the translation itself",
                    args.alternatives_limit, args.beam - 1, args.beam)
    limits = ServeLimits(char_limit=args.char_limit, batch_limit=args.batch_limit,
                         alternatives_limit=min(args.alternatives_limit, args.beam - 1),
                         body_limit=body_limit,
                         timeout=args.timeout, beam=args.beam)
    service = Service.build(registry, limits, args.pivot, allowed, args.spm_model,
                            max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                            max_queue=args.max_queue, cross_request=not args.no_cross_batching,
                            load_timeout=args.timeout)
    return service, keys


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


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
