"""taskmoe-serve's options -> a ready Service: check them, plan the routes, build (or find in the
cache) every sub-network a route needs.

One place for what the embedded server, every Ray Serve replica (ray_engine.py) and the
benchmarks start from. The options are the argparse namespace of `cli/serve.py`'s parser (the
CLI only parses); an option or input that cannot be served raises ConfigError with the message
(the command prints it and exits 2).
"""

import importlib.util
import logging
import os

from ..distributed.checkpoints import CheckpointError
from ..moe.pairs import PruningError
from .keys import KeyGuard, load_keys
from .metrics import Metrics
from .registry import Registry, parse_size
from .routes import RouteError, legs_needed, parse_pairs_option, plan_routes
from .service import ServeLimits, Service

log = logging.getLogger("taskmoe.serve")


class ConfigError(Exception):
    """An option or input that cannot be served; the message says which and why."""


DEFAULT_ENGINE_BATCH = {"ctranslate2": 8, "fairseq": 0}  # --engine-batch when not given


def batcher_options(args, backend: str = "ctranslate2") -> dict:
    """The Batcher's options (Service.build passes them on): bounds of an engine call, the
    optional wait, the queue, the process's budget of engine threads, the engine batches of a
    call (--engine-batch, or the backend's default)."""
    engine_batch = (args.engine_batch if args.engine_batch is not None
                    else DEFAULT_ENGINE_BATCH[backend])
    return dict(max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                max_queue=args.max_queue, cross_request=not args.no_cross_batching,
                threads=args.threads, load_timeout=args.timeout, engine_batch=engine_batch)


def default_threads(engine: str = "embedded", replicas: int = 1) -> int:
    """--threads when not given: the cores this process may run on (its CPU affinity, e.g. a
    container's cpuset); under Ray, shared by the replicas (each reserves its threads' CPUs)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // replicas) if engine == "ray" else cores


def resolve_threads(args) -> int:
    """--threads, filled in when not given (default_threads for the engine and replicas)."""
    if args.threads is None:
        args.threads = default_threads(getattr(args, "engine", "embedded"),
                                       getattr(args, "replicas", 1) or 1)
    return args.threads


def check(args):
    """The options alone (before anything is read): ConfigError on the first bad one. Fills
    in --threads when not given (resolve_threads)."""
    resolve_threads(args)
    if not os.path.isdir(args.data):
        raise ConfigError(f"--data {args.data} is not a folder")
    if args.spm_model and not os.path.isfile(args.spm_model):
        raise ConfigError(f"--spm-model {args.spm_model} does not exist")
    for name in ("char_limit", "batch_limit", "max_batch_tokens", "max_queue", "threads", "beam"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if (args.alternatives_limit < 0 or args.max_wait_ms < 0 or args.timeout <= 0
            or (args.engine_batch is not None and args.engine_batch < 0)):
        raise ConfigError("--alternatives-limit, --max-wait-ms and --engine-batch must be >= 0, "
                          "--timeout > 0")
    if getattr(args, "engine", "embedded") == "ray":
        if args.replicas < 1 or args.pairs_per_replica < 1:
            raise ConfigError("--replicas and --pairs-per-replica must be >= 1")
        if args.memory_budget:
            raise ConfigError("--memory-budget is for the embedded engine; under --engine ray "
                              "each replica keeps --pairs-per-replica sub-networks")
        if importlib.util.find_spec("ray") is None:
            raise ConfigError("--engine ray needs Ray Serve: pip install 'ray[serve]' (or the "
                              "package's `ray` extra)")
    elif getattr(args, "ray_address", None):
        raise ConfigError("--ray-address needs --engine ray")


def make_service(args):
    """(Service, KeyGuard) for these options, every sub-network a route needs built into (or
    found in) --cache-dir; no thread is started. ConfigError on bad options or input."""
    check(args)
    try:
        budget = parse_size(args.memory_budget) if args.memory_budget else None
        body_limit = parse_size(args.body_limit)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        keys = KeyGuard(load_keys(args.api_keys)) if args.api_keys else KeyGuard()
    except (OSError, ValueError) as err:
        raise ConfigError(f"--api-keys: {err}") from None
    try:
        # torch_threads: the fairseq engine's (and a build's) threads, set when torch is first
        # used; a warm start on CTranslate2 never imports torch
        registry = Registry(args.checkpoint, args.data, args.spm_model, backend=args.backend,
                            quantization=args.quantization, cache_dir=args.cache_dir,
                            memory_budget=budget, threads=args.threads, metrics=Metrics(),
                            load_timeout=args.timeout, torch_threads=args.threads)
        allowed = parse_pairs_option(args.pairs, registry.facts.langs)
        routes = plan_routes(registry.facts, args.pivot, allowed)
    except (FileNotFoundError, CheckpointError, PruningError, RouteError) as err:
        raise ConfigError(str(err)) from None
    if registry.backend != args.backend or args.backend == "fairseq":
        log.info("%s", registry.backend_note)
    if registry.facts.trained is None:
        log.warning("the checkpoint records no trained pairs: every pair is served as direct")
    if not any(r.available for r in routes.values()):
        raise ConfigError("no pair can be served: " + "; ".join(
            sorted({r.why for r in routes.values()})))
    for route in routes.values():
        via = f" via {route.via}" if route.via else ""
        log.info("route %s-%s: %s%s%s", route.src, route.tgt, route.kind, via,
                 f" ({route.why})" if route.why else "")
    try:
        registry.prepare(legs_needed(routes))
    except (ValueError, PruningError) as err:
        raise ConfigError(str(err)) from None
    if args.alternatives_limit > args.beam - 1:
        log.warning("--alternatives-limit %d lowered to %d (--beam %d - 1): more alternatives "
                    "would need a wider beam, which changes the translation itself",
                    args.alternatives_limit, args.beam - 1, args.beam)
    limits = ServeLimits(char_limit=args.char_limit, batch_limit=args.batch_limit,
                         alternatives_limit=min(args.alternatives_limit, args.beam - 1),
                         body_limit=body_limit, timeout=args.timeout, beam=args.beam)
    service = Service.build(registry, limits, args.pivot, allowed, args.spm_model,
                            **batcher_options(args, registry.backend))
    return service, keys
