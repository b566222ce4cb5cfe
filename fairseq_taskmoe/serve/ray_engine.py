"""taskmoe-serve --engine ray: the same HTTP API and web page, scaled out on Ray Serve.

Two deployments (REFERENCE.md, "Multi-pair translation servers": Ray Serve):

- `Ingress` (one replica): the FastAPI app of app.py (`create_app`, the same parsing, limits,
  keys, routes and page) as Ray Serve's ingress. Its Service is the embedded server's, built by
  the same `cli.serve.make_service`, except that its batcher is a `HandleBatcher`: each leg of a
  route is ONE call to the Translator deployment with the leg's sub-network key (`*-de`) as the
  multiplexed model id, so the two legs of a pivot may run on different replicas.
- `Translator` (`--replicas N`): `@serve.multiplexed(max_num_models_per_replica=K)` loads a
  sub-network from the shared `--cache-dir` (Registry.held: the registry's own load, with its
  rebuild of a corrupt artifact; `--pairs-per-replica K`, Ray's LRU evicts beyond), and Ray
  routes each leg to a replica that holds its model while one has fewer than `--max-ongoing`
  legs in progress (else to another, which loads it). `@serve.batch` collects concurrent
  legs (split by model id, up to all `--max-ongoing` a replica holds, waiting at most
  `--max-wait-ms`, one batch at a time); the batch is translated by the embedded server's code
  (`Batcher.run`: engine calls of at most `--max-batch-tokens` source tokens, grouped by
  decoding options, sorted by length, batch metrics).

Sub-networks are built once: by the start-up of the `taskmoe-serve` process (Registry.prepare,
before Ray is started); every replica then finds them in the cache (on another machine without
that folder it builds them itself, once, with the same code). The replicas' metrics reach
`/metrics` through fleet.py: `/metrics`, `/health` and `/pairs` ask every replica first
(`DeploymentHandle.broadcast`, each replica with its own `REPORT_TIMEOUT_S`: a hung replica
costs that long, and the others' answers are used), so answers carry translations only;
`/health` is 503 when no replica answers. A leg whose replica dies is sent again (by Ray's
router when the replica had not confirmed it, else here, counted in
taskmoe_replica_losses_total; translation is idempotent); when the retries are used up the
request is answered 503 with Retry-After.

Overload: the ingress takes at most `--max-queue` requests at once (/health and /metrics
aside) and answers the next ones itself, the API's JSON 503 with Retry-After (`Admission`);
Ray sends it that many plus `INGRESS_HEADROOM` (room for those refusals), and its proxy queues
at most `INGRESS_HEADROOM` more before answering 503 itself: nothing piles up unbounded.

Ray is imported only here, and this module only under `--engine ray`.
"""

import asyncio
import contextlib
import logging
import os
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import ray
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import exceptions as serve_exceptions
from starlette.middleware import Middleware
from starlette.routing import Match

from .app import create_app
from .batcher import Batcher, Closed, Job, QueueFull
from .fleet import Fleet, snapshot
from .registry import Unavailable

log = logging.getLogger("taskmoe.serve")
APP = "taskmoe"
RETRIES = 2  # extra tries of a leg whose replica died
REPORT_TIMEOUT_S = 2.0  # how long a scrape waits for each replica's report
# requests Ray lets into the ingress beyond --max-queue (which it answers 503 at once), and
# requests Ray's proxy queues when the ingress has all of those (beyond: Ray's own 503)
INGRESS_HEADROOM = 64
# never refused by the ingress's admission (probes and scrapes; cheap, bounded by the timeout)
UNBOUNDED = ("/health", "/health/live", "/health/ready", "/metrics")
# Ray's own per-call access log lines (ours is one JSON line per HTTP request, in the ingress)
LOGGING = {"enable_access_log": False}
# what a replica's death looks like to the caller, by Ray version and timing
_LOST = tuple(getattr(mod, name) for mod, name in (
    (ray.exceptions, "RayActorError"), (ray.exceptions, "WorkerCrashedError"),
    (serve_exceptions, "ReplicaUnavailableError")) if hasattr(mod, name))


class ReplicaLost(QueueFull):
    """The replica serving a leg died, and so did the retries: 503, retry shortly."""


def _absolute(args):
    """Paths as the replicas must see them (their working folder is not ours)."""
    import copy

    args = copy.copy(args)
    for name in ("checkpoint", "data", "spm_model", "cache_dir", "api_keys"):
        value = getattr(args, name, None)
        if value:
            setattr(args, name, os.path.abspath(str(value)))
    return args


# --- the Translator deployment (one per replica: load, batch, translate) ---------------------


class _Held:
    """The registry Batcher.run expects, holding one engine Ray's multiplexer loaded."""

    def __init__(self, engine):
        self.engine = engine

    @contextmanager
    def use(self, key, timeout=None):
        yield self.engine


class _Resident:
    """What the multiplexed loader returns; Ray calls its `__del__` when it evicts it (LRU)."""

    def __init__(self, engine, on_evict):
        self.engine = engine
        self.__del__ = on_evict  # an instance attribute: only Ray calls it


class TranslatorCore:
    """The replica's work without Ray's decorators: load a sub-network, translate a batch of
    jobs (dicts) with it, report this replica's metrics."""

    def __init__(self, args):
        from ..cli.serve import make_service

        service, _ = make_service(args)  # finds the sub-networks in the cache; no threads start
        self.registry, self.metrics = service.registry, service.registry.metrics
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="engine")  # one engine call at a time
        self.max_batch_tokens = args.max_batch_tokens
        self.cross_request = not args.no_cross_batching
        self.ongoing = 0  # legs accepted and not yet answered
        self.running = 0  # of them, the legs of the batch being translated now
        try:
            self.name = ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"
        except Exception:  # outside an actor (unit tests)
            self.name = f"pid-{os.getpid()}"

    async def load(self, key: str) -> _Resident:
        """Registry.held: a sub-network that failed once answers 503 at once."""
        loop = asyncio.get_running_loop()
        engine = await loop.run_in_executor(self.pool, self.registry.held, key)
        return _Resident(engine, lambda: self.registry.dropped(
            key, f"replica {self.name}, --pairs-per-replica"))

    def report(self) -> dict:
        return {"name": self.name, "pid": os.getpid(),
                "loaded": sorted(self.registry.loaded_keys()), "ongoing": self.ongoing,
                "running": self.running, "metrics": snapshot(self.metrics)}

    def failed(self, jobs: List[dict], err: Exception) -> List[dict]:
        return [self._error(err) for _ in jobs]

    async def translate(self, key: str, resident: _Resident, jobs: List[dict]) -> List[dict]:
        live = [Job(j["texts"], j["src"], j["tgt"], j["beam"], j["nbest"], j["sizes"])
                for j in jobs]
        batcher = Batcher(_Held(resident.engine), max_batch_tokens=self.max_batch_tokens,
                          metrics=self.metrics, cross_request=self.cross_request)  # no thread
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.pool, self._run, batcher, key, live)
        return [{"hyps": job.future.result()} if job.future.exception() is None
                else self._error(job.future.exception()) for job in live]

    def _run(self, batcher: Batcher, key: str, jobs: List[Job]):
        """In the engine thread: the batch's legs are in engine calls until it returns."""
        self.running = len(jobs)
        try:
            batcher.run(key, jobs)
        finally:
            self.running = 0

    @staticmethod
    def _error(err: Exception) -> dict:
        unavailable = isinstance(err, Unavailable)
        return {"error": str(err) if unavailable else f"{type(err).__name__}: {err}",
                "unavailable": unavailable}


def batch_options(args) -> dict:
    """@serve.batch's options: a batch takes up to every leg a replica holds (--max-ongoing),
    one batch at a time, so that Ray's rule max_ongoing_requests >= max_batch_size x
    max_concurrent_batches holds and any leg a replica accepts can join its next batch; the
    source tokens of one engine call are bounded by Batcher.run (--max-batch-tokens, a larger
    batch takes several calls), as in the embedded server."""
    if args.no_cross_batching:
        return dict(max_batch_size=1, batch_wait_timeout_s=0.0, max_concurrent_batches=1)
    return dict(max_batch_size=args.max_ongoing, batch_wait_timeout_s=args.max_wait_ms / 1000.0,
                max_concurrent_batches=1)


def translator_deployment(args):
    """The Translator deployment for these options (K and the batch bounds are decorator
    arguments, hence a class made per run)."""
    batch = batch_options(args)

    class Translator:
        def __init__(self, args):
            self.core = TranslatorCore(args)

        @serve.multiplexed(max_num_models_per_replica=args.pairs_per_replica)
        async def subnetwork(self, key: str) -> _Resident:
            return await self.core.load(key)

        @serve.batch(**batch)
        async def run_batch(self, jobs: List[dict]) -> List[dict]:
            key = serve.get_multiplexed_model_id()  # Ray splits batches by model id
            try:
                resident = await self.subnetwork(key)
            except Exception as err:  # the sub-network did not load: answer every job
                log.error("sub-network %s failed to load: %s", key, err)
                return self.core.failed(jobs, err)
            return await self.core.translate(key, resident, jobs)

        async def translate(self, job: dict) -> dict:
            self.core.ongoing += 1
            try:
                return await self.run_batch(job)
            finally:
                self.core.ongoing -= 1

        async def report(self) -> dict:
            return self.core.report()

    return serve.deployment(
        name="Translator", num_replicas=args.replicas,
        # a replica works on --max-ongoing legs at once (its next batch forms from them: see
        # batch_options); when all replicas holding a sub-network are that busy, Ray's router
        # sends the next leg to another replica, which loads it: a busy pair spreads, a quiet
        # one stays put
        max_ongoing_requests=args.max_ongoing, max_queued_requests=args.max_queue,
        ray_actor_options={"num_cpus": args.threads}, health_check_period_s=2.0,
        graceful_shutdown_timeout_s=args.timeout + 5, logging_config=LOGGING)(Translator)


# --- the ingress: create_app over a Service whose batcher calls the Translator ---------------


class HandleBatcher:
    """Plays the Batcher's role in the ingress (submit / pending / close): a leg is one call
    of the Translator deployment, its sub-network the multiplexed model id."""

    def __init__(self, handle, fleet: Fleet, metrics=None, max_queue: int = 256,
                 retries: int = RETRIES, report_timeout: float = REPORT_TIMEOUT_S):
        self.handle, self.fleet, self.metrics = handle, fleet, metrics
        self.max_queue, self.retries, self.report_timeout = max_queue, retries, report_timeout
        self._in_flight = 0  # legs sent and not answered (what --max-queue bounds)
        self._closing = False
        self._unready: Optional[str] = None  # why no replica can serve, at the last scrape
        if metrics:  # read when /metrics renders, after its scrape
            metrics.queue_depth.set_function(self.pending)

    def pending(self) -> int:
        """Legs waiting, as the embedded Batcher counts them: sent and not yet in an engine
        call (in Ray's queue in this process, or on a replica for its next batch): the legs in
        flight less those the live replicas said they were translating at the last scrape
        (/health and /metrics scrape first)."""
        return max(0, self._in_flight - self.fleet.running())

    def submit(self, key: str, job: Job) -> Future:
        if self._closing:
            raise Closed("the server is shutting down")
        if self._in_flight >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry "
                            "shortly", retry_after=1)
        loop = asyncio.get_running_loop()
        payload = {"texts": list(job.texts), "src": job.src, "tgt": job.tgt, "beam": job.beam,
                   "nbest": job.nbest, "sizes": list(job.sizes)}
        self._in_flight += 1
        task = loop.create_task(self._call(key, payload))

        def done(t: asyncio.Task):
            self._in_flight -= 1
            if job.future.done():  # cancelled: the request timed out
                return
            if t.cancelled():
                job.future.cancel()
            elif t.exception() is not None:
                job.future.set_exception(t.exception())
            else:
                job.future.set_result(t.result())

        task.add_done_callback(done)
        job.future.add_done_callback(lambda f: f.cancelled() and loop.call_soon_threadsafe(
            task.cancel))
        return job.future

    async def _call(self, key: str, payload: dict):
        for attempt in range(self.retries + 1):
            try:
                answer = await self.handle.options(multiplexed_model_id=key).translate.remote(
                    payload)
            except serve_exceptions.BackPressureError:
                raise QueueFull("every replica is busy and the queue is full; retry shortly",
                                retry_after=1) from None
            except _LOST as err:
                actor = getattr(err, "actor_id", None)
                if actor:
                    self.fleet.lost(actor if isinstance(actor, str) else actor.hex())
                log.warning("a replica serving %s was lost (%s); %s", key, type(err).__name__,
                            "retrying" if attempt < self.retries else "giving up")
                if self.metrics:
                    self.metrics.replica_losses.labels(
                        key, "retried" if attempt < self.retries else "refused").inc()
                if attempt == self.retries:
                    raise ReplicaLost(f"the replica serving {key} was lost ({type(err).__name__})"
                                      "; retry shortly", retry_after=1) from None
                await asyncio.sleep(0.5 * (attempt + 1))  # Ray's router drops the dead one
                continue
            if "error" in answer:
                if answer["unavailable"]:
                    raise Unavailable(answer["error"])
                raise RuntimeError(answer["error"])
            return answer["hyps"]

    async def refresh(self):
        """A scrape (what /metrics, /health and /pairs await): every replica's report, each
        awaited at most `report_timeout` seconds, all at once. The answers update the fleet;
        the replicas that did not answer are silent there (their gauges and sub-networks
        stop counting) and counted in taskmoe_replicas{state="silent"}. Never raises."""
        try:
            reports, asked = await self._ask_replicas()
        except serve_exceptions.DeploymentUnavailableError:
            reports, asked = [], 0  # no replica is running
        except Exception as err:
            log.warning("could not ask the replicas for their reports: %s: %s",
                        type(err).__name__, err)
            self.fleet.scraped((), None)
            self._unready = f"could not ask the Translator replicas ({type(err).__name__})"
            return
        for r in reports:
            self.fleet.update(r["name"], r["metrics"], r["loaded"], r["pid"], r["running"])
        self.fleet.scraped((r["name"] for r in reports), asked)
        if reports:
            self._unready = None
        elif asked:
            self._unready = (f"no Translator replica answered within {self.report_timeout:g} s "
                             f"({asked} asked)")
        else:
            self._unready = "no Translator replica is running"

    async def _ask_replicas(self) -> Tuple[List[dict], int]:
        """(the reports that came in time, how many replicas were asked)."""
        response = self.handle.broadcast("report")
        # Ray 2.60's DeploymentBroadcastResponse has one timeout for the whole gather (one hung
        # replica would lose every answer): await each replica's result on its own instead
        sent = getattr(response, "_fetch_replica_results_async", None)
        if sent is None:  # another Ray: one timeout for all
            results = await response.results_async(timeout_s=self.report_timeout,
                                                    return_exceptions=True)
            return [r for r in results if isinstance(r, dict)], len(results)
        results = await asyncio.wait_for(sent(), self.report_timeout)
        answers = await asyncio.gather(*(self._ask_one(r) for r in results),
                                       return_exceptions=True)
        return [a for a in answers if isinstance(a, dict)], len(results)

    async def _ask_one(self, result):
        try:
            return await asyncio.wait_for(result.get_async(), self.report_timeout)
        except asyncio.TimeoutError:
            with contextlib.suppress(Exception):
                result.cancel()  # do not let reports pile up on a hung replica
            raise

    def unready(self) -> Optional[str]:
        """None when some Translator replica answered the last scrape, else why not (/health
        answers 503 with it)."""
        return self._unready

    def close(self, timeout: float = 60.0):
        """Take nothing new; Ray's graceful shutdown lets the legs in flight finish."""
        self._closing = True


class Admission:
    """ASGI middleware of the ingress: at most `limit` requests in the app at once (beyond,
    the API's JSON 503 with Retry-After, counted and logged under its route); /health and
    /metrics always pass."""

    def __init__(self, app, limit: int, routes=()):
        self.app, self.limit, self.routes = app, limit, routes
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNBOUNDED:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            for route in self.routes:  # the route, for the access log and the metrics
                match, child = route.matches(scope)
                if match == Match.FULL:
                    scope.update(child)
                    break
            refusal = JSONResponse(
                {"error": f"the server is busy ({self.limit} requests in progress); retry "
                          "shortly", "hint": "retry after the Retry-After seconds"},
                status_code=503, headers={"Retry-After": "1"})
            return await refusal(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class Ingress:
    def __init__(self, translator, args):
        from ..cli.serve import make_service

        self.service, self.keys = make_service(args)  # routes, limits, keys: the same code
        metrics = self.service.registry.metrics
        self.fleet = Fleet()
        self.fleet.adopt(metrics)  # /metrics: this process's requests + the replicas' engines
        self.service.batcher = HandleBatcher(translator, self.fleet, metrics, args.max_queue)
        # /health and /pairs say what the replicas hold, not this process (which loads nothing)
        self.service.registry.loaded_keys = self.fleet.loaded_keys
        self.service.refresh = self.service.batcher.refresh
        self.service.unready = self.service.batcher.unready  # /health: 503 without replicas
        self.max_queue = args.max_queue

    async def __serve_build_asgi_app__(self):
        app = create_app(self.service, self.keys)
        # innermost: inside the app's access log, metrics and CORS
        app.user_middleware.append(Middleware(Admission, limit=self.max_queue,
                                              routes=app.router.routes))
        return app


def ingress_options(args) -> dict:
    """The Ingress deployment's bounds (see the module's docstring, Overload)."""
    return dict(max_ongoing_requests=args.max_queue + INGRESS_HEADROOM,
                max_queued_requests=INGRESS_HEADROOM,
                backpressure_config={"retry_after_s": 1})


def application(args):
    """The Ray Serve application: Ingress(Translator)."""
    args = _absolute(args)
    ingress = serve.deployment(
        name="Ingress", num_replicas=1, **ingress_options(args),
        ray_actor_options={"num_cpus": 0}, logging_config=LOGGING,
        graceful_shutdown_timeout_s=args.timeout + 5)(serve.ingress()(Ingress))
    return ingress.bind(translator_deployment(args).bind(args), args)


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
    """For `serve run fairseq_taskmoe.serve.ray_engine:app_builder checkpoint=C data=D ...` and
    KubeRay's RayService (`import_path` and `args` in serveConfigV2): the options are
    taskmoe-serve's flags, without dashes. Builds the sub-network cache first, as taskmoe-serve's
    start-up does (Serve's own HTTP options replace --host / --port)."""
    from ..cli.serve import build_parser, make_service

    args = build_parser().parse_args(builder_argv(options))
    service, _ = make_service(args)
    service.batcher.close()
    return application(args)


# --- running it -------------------------------------------------------------------------------


def connect(args) -> bool:
    """Join --ray-address, or start a local Ray cluster; True when this process started it."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=args.ray_address, include_dashboard=False,
                 logging_level=logging.WARNING, configure_logging=False)
    except Exception as err:
        if args.ray_address is None:
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        raise SystemExit(
            f"taskmoe-serve: could not join the Ray cluster at {args.ray_address}: "
            f"{type(err).__name__}: {first}\nhint: is `ray start --head` running there, and "
            "is ADDRESS its HOST:PORT (or `auto` on the head machine)? `ray start` turns token "
            "authentication on (Ray 2.60): run taskmoe-serve with RAY_AUTH_MODE=token and the "
            "cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN (docs/serving.md, Two "
            "machines)") from None
    return args.ray_address is None


def deploy(args) -> str:
    """Start Serve's HTTP proxy on --host/--port and run the application; returns the URL
    once every replica is up."""
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application(args), name=APP, route_prefix="/")
    return f"http://{args.host}:{args.port}"


def undeploy(shutdown: bool):
    """Delete the application (its replicas finish what they accepted); when this process
    started the cluster, stop Serve and Ray too."""
    try:
        serve.delete(APP)
    finally:
        if shutdown:
            serve.shutdown()
            ray.shutdown()


def replica_counts() -> Dict[str, int]:
    """Replicas of the Translator deployment by state (RUNNING, STARTING, ...)."""
    status = serve.status().applications[APP].deployments["Translator"]
    return {str(getattr(k, "value", k)): v for k, v in status.replica_states.items()}


def serve_forever(args) -> int:
    started = connect(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = deploy(args)
        print(f"taskmoe-serve: serving on Ray Serve ({args.replicas} replica(s), "
              f"{args.pairs_per_replica} sub-network(s) each) at {url}/ (API docs: /docs)",
              flush=True)
        while not stop.wait(1.0):  # the signal handler runs between waits
            pass
    finally:
        undeploy(started)
    return 0
