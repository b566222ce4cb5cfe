"""taskmoe-serve --engine ray: the same HTTP API and web page, scaled out on Ray Serve.

One deployment, `Translator` (`--replicas N`; REFERENCE.md, "Multi-pair translation servers":
Ray Serve). Each replica is a whole embedded server: Ray Serve's HTTP proxy routes every
request straight to a replica (`@serve.ingress`: no ingress deployment between them), which
runs the FastAPI app of app.py (`create_app`: the same parsing, limits, keys, routes and page)
over the Service of factory.py (`make_service`: the same code as the embedded server), with
its own Batcher (continuous batching, the `--threads` budget of engine threads).

Where a leg is translated (`Residents.here`, the routing rule). A replica holds at most
`--pairs-per-replica K` sub-networks, loaded by a `@serve.multiplexed` method (so that Ray
knows which replica holds which, and evicts the least recently used beyond K). A leg is
translated by the replica that prepared the request when that replica holds its sub-network
or has room for it (fewer than K held or loading: loading evicts nothing), and always when it
is the only replica. Otherwise (K others held here) the leg is ONE call through a
DeploymentHandle with the sub-network key (`*-de`) as the multiplexed model id: Ray sends it
to a replica that holds it (or, if none does, to one holding the fewest, which loads it), and
that replica translates it itself, never sending it on. The rule is the same for both legs of
a pivot. So with K at least the sub-networks in use, every request is served where it
landed, without a hop; a replica that already holds K others hands over only the legs it
cannot hold, instead of evicting. The proxy spreads requests over replicas by their load, so a
busy pair is served by every replica that has room for it.

Sub-networks are built once: by the start-up of the `taskmoe-serve` process (Registry.prepare,
before Ray is started); every replica then finds them in the cache (on another machine without
that folder it builds them itself, once, with the same code). `/metrics`, `/health` and
`/pairs` answer for the whole service from whichever replica gets them: it asks every replica,
itself included (fleet.py; `DeploymentHandle.broadcast`, each replica with its own
`REPORT_TIMEOUT_S`: a hung replica costs that long, and the others' answers are used). A leg
handed to a replica that dies is sent again (by Ray's router when the replica had not
confirmed it, else here, counted in taskmoe_replica_losses_total; translation is idempotent);
when the retries are used up the request is answered 503 with Retry-After. A request whose own
replica dies (the one running its HTTP handler) is lost with it: Ray's proxy answers 500, and
the client may send it again.

Overload: a replica takes at most `--max-queue` requests at once (/health and /metrics aside)
and answers the next ones itself, the API's JSON 503 with Retry-After (`Admission`); Ray sends
it that many plus `HEADROOM` (room for those refusals and for legs handed over by other
replicas: a replica full of its own requests still takes those, which wait on nothing else,
so two replicas never wait on each other), and its proxy queues at most `HEADROOM` more
before answering 503 itself: nothing piles up unbounded. Ray's per-request access log is off
(the app writes its own); engine threads are explicit (CTranslate2 one thread per call and
`--threads` calls, torch `--threads`; Ray sets OMP_NUM_THREADS=1 in its workers) and the same
number of CPUs is reserved per replica. Direct ingress (RAY_SERVE_THROUGHPUT_OPTIMIZED) is
not used: its replica ports do not route by multiplexed model id (Ray issue 65976).

Ray is imported only here, and this module only under `--engine ray`.
"""

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Dict, List, Optional, Tuple

import ray
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import exceptions as serve_exceptions
from starlette.middleware import Middleware
from starlette.routing import Match

from .app import create_app
from .batcher import Batcher, Closed, Job, QueueFull
from .factory import batcher_options, make_service, resolve_threads
from .fleet import Fleet, snapshot
from .registry import Unavailable

log = logging.getLogger("taskmoe.serve")
APP = "taskmoe"
RETRIES = 2  # extra tries of a leg whose replica died
REPORT_TIMEOUT_S = 2.0  # how long a scrape waits for each replica's report
# requests Ray lets into a replica beyond --max-queue (its refusals, and legs handed over by
# other replicas), and requests Ray's proxy queues when every replica has all of those
HEADROOM = 64
# never refused by a replica's admission (probes and scrapes; cheap, bounded by the timeout)
UNBOUNDED = ("/health", "/health/live", "/health/ready", "/metrics")
# Ray's own per-request access log lines (ours is one JSON line per HTTP request, in the app)
LOGGING = {"enable_access_log": False}
# a sub-network in use here is marked used in Ray's LRU at most this often
TOUCH_S = 1.0
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


# --- a replica: which legs it translates, and the sub-networks Ray's multiplexer holds -------


class _Resident:
    """What the multiplexed loader returns; Ray calls its `__del__` when it evicts it (LRU)."""

    def __init__(self, engine, on_evict):
        self.engine = engine
        self.__del__ = on_evict  # an instance attribute: only Ray calls it


class Residents:
    """The sub-networks Ray's multiplexer holds on this replica, seen two ways: as the registry
    the replica's Batcher loads engines from (`use`; the rest of Registry's interface, e.g.
    `call_shape`, is the registry's), and as the routing rule (`here`).

    `load(key)` is the replica's `@serve.multiplexed` method (a coroutine on `loop`, the
    replica's event loop): it loads through `Registry.held` (`held_by_ray`) and Ray evicts
    beyond `capacity` (K)."""

    def __init__(self, registry, capacity: int, alone: bool, load, loop):
        self.registry, self.capacity, self.alone = registry, capacity, alone
        self._load, self._loop = load, loop
        self._lock = threading.Lock()
        self.held: Dict[str, _Resident] = {}
        self.loading: set = set()  # being loaded, or claimed for loading
        self._touched: Dict[str, float] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="load")  # one load at a time

    def __getattr__(self, name):  # what is not here is the registry's
        registry = self.__dict__.get("registry")
        if registry is None:
            raise AttributeError(name)
        return getattr(registry, name)

    def here(self, key: str) -> bool:
        """The routing rule: translate a leg of sub-network `key` on this replica when it is
        the only replica, or holds `key` (or is loading it), or has room for it (fewer than K
        held or loading, so loading it evicts nothing); else hand it to a replica that holds
        it."""
        return (self.alone or key in self.held or key in self.loading
                or len(self.held) + len(self.loading) < self.capacity)

    def claim(self, key: str):
        """On the event loop, as a leg of `key` is queued here: start loading `key` when it is
        not held, else mark it used in Ray's LRU (at most every TOUCH_S seconds)."""
        if key in self.loading:
            return
        now = time.monotonic()
        if key in self.held:
            if now - self._touched.get(key, float("-inf")) < TOUCH_S:
                return
        else:
            self.loading.add(key)
        self._touched[key] = now
        self._loop.create_task(self._load(key)).add_done_callback(partial(self._claimed, key))

    def _claimed(self, key: str, task: asyncio.Task):
        self.loading.discard(key)
        if not task.cancelled():
            task.exception()  # retrieved: the leg's engine call loads again and answers it

    async def held_by_ray(self, key: str) -> _Resident:
        """The body of the multiplexed loader: Registry.held in the load thread (a sub-network
        that failed once answers 503 at once, within its backoff). Counted as loading
        meanwhile, whoever asked (a leg queued here, or one handed over)."""
        self.loading.add(key)
        try:
            engine = await self._loop.run_in_executor(self._pool, self.registry.held, key)
            resident = _Resident(engine, lambda: self._evicted(key, resident))
            with self._lock:
                self.held[key] = resident
            return resident
        finally:
            self.loading.discard(key)

    def _evicted(self, key: str, resident: _Resident):
        """Ray's LRU let `resident` go (in a thread of Ray's): the registry counts it."""
        with self._lock:
            if self.held.get(key) is resident:
                del self.held[key]
        self.registry.dropped(key, "--pairs-per-replica")

    @contextmanager
    def use(self, key: str, timeout: Optional[float] = None):
        """For the Batcher's worker threads: the engine of `key`, loaded through Ray's
        multiplexer first when it is not held (still loading, or evicted since its leg was
        queued). The reference kept here keeps the engine alive through the call even if Ray
        evicts it meanwhile."""
        resident = self.held.get(key)
        if resident is None:
            timeout = self.registry.load_timeout if timeout is None else timeout
            future = asyncio.run_coroutine_threadsafe(self._load(key), self._loop)
            try:
                resident = future.result(timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise Unavailable(f"sub-network {key}: not loaded within {timeout:g} s") from None
        yield resident.engine


class Legs:
    """The replica's batcher, as Service.translate sees it (submit / pending / close): a leg
    is queued in this replica's own Batcher when `Residents.here` says so, else handed to
    another replica (HandleBatcher)."""

    def __init__(self, residents: Residents, local: Batcher, remote: "HandleBatcher"):
        self.residents, self.local, self.remote = residents, local, remote
        self._lock = threading.Lock()
        self.ongoing = 0  # legs queued in the local Batcher and not yet answered

    def submit(self, key: str, job: Job) -> Future:
        if self.residents.here(key):
            return self.queue(key, job)
        return self.remote.submit(key, job)

    def queue(self, key: str, job: Job) -> Future:
        """Into this replica's Batcher (a leg of its own requests, or one handed over)."""
        self.residents.claim(key)
        future = self.local.submit(key, job)
        with self._lock:
            self.ongoing += 1
        future.add_done_callback(self._answered)
        return future

    def _answered(self, future: Future):
        with self._lock:
            self.ongoing -= 1

    def pending(self) -> int:
        """Legs waiting for an engine call on every live replica, at the last scrape (what
        /health says; it scrapes first)."""
        return self.remote.fleet.pending()

    def close(self, timeout: float = 60.0):
        self.remote.close()
        self.local.close(timeout)


class Replica:
    """A Translator replica without Ray's decorators: the whole server, a leg handed over by
    another replica, and this replica's report."""

    def __init__(self, args, load, loop, handle):
        service, self.keys = make_service(args)  # finds the sub-networks in the cache
        registry, self.metrics = service.registry, service.registry.metrics
        self.residents = Residents(registry, args.pairs_per_replica, args.replicas == 1, load,
                                   loop)
        self.fleet = Fleet()
        remote = HandleBatcher(handle, self.fleet, self.metrics, args.max_queue)
        local = Batcher(self.residents, metrics=self.metrics,
                        **batcher_options(args, registry.backend))
        service.batcher.close()  # the one make_service made (no thread started): not used
        service.batcher = self.legs = Legs(self.residents, local, remote)
        # what /metrics, /health and /pairs show is the whole service's, from the scrape each
        # of them awaits first; this replica's own figures are what it reports
        service.refresh, service.unready = remote.refresh, remote.unready
        registry.loaded_keys = self.fleet.loaded_keys
        self.metrics.render = self.fleet.render
        self.service, self.max_queue = service, args.max_queue
        try:
            self.name = ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"
        except Exception:  # outside an actor (unit tests)
            self.name = f"pid-{os.getpid()}"

    def app(self):
        app = create_app(self.service, self.keys)
        # innermost: inside the app's access log, metrics and CORS
        app.user_middleware.append(Middleware(Admission, limit=self.max_queue,
                                              routes=app.router.routes))
        return app

    async def handed_over(self, key: str, leg: dict) -> dict:
        """A leg another replica handed over (multiplexed model id `key`, already loaded by
        Ray's multiplexer): translated here, never sent on."""
        job = Job(leg["texts"], leg["src"], leg["tgt"], leg["beam"], leg["nbest"],
                  leg["sizes"], deadline=time.monotonic() + leg["seconds"])
        try:
            future = self.legs.queue(key, job)
            return {"hyps": await asyncio.wrap_future(future)}
        except asyncio.CancelledError:  # the caller gave up (its request timed out or left)
            job.future.cancel()
            raise
        except Exception as err:
            return failure(err)

    def report(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "loaded": sorted(self.residents.held),
                "ongoing": self.legs.ongoing, "pending": self.legs.local.pending(),
                "metrics": snapshot(self.metrics)}


def failure(err: Exception) -> dict:
    """A leg's error as an answer: busy (503, retry shortly), unavailable (503, the
    sub-network failed), or any other error."""
    kind = ("busy" if isinstance(err, (QueueFull, Closed)) else
            "unavailable" if isinstance(err, Unavailable) else "error")
    return {"error": str(err) if kind != "error" else f"{type(err).__name__}: {err}",
            "kind": kind}


def translator_deployment(args):
    """The Translator deployment for these options (K is a decorator argument, hence a class
    made per run)."""

    class Translator:
        async def __init__(self, args):
            context = serve.get_replica_context()
            handle = serve.get_deployment_handle(context.deployment, context.app_name)
            self.replica = Replica(args, self.subnetwork, asyncio.get_running_loop(), handle)

        @serve.multiplexed(max_num_models_per_replica=args.pairs_per_replica)
        async def subnetwork(self, key: str) -> _Resident:
            return await self.replica.residents.held_by_ray(key)

        async def translate(self, leg: dict) -> dict:
            key = serve.get_multiplexed_model_id()
            try:
                await self.subnetwork(key)  # held here from now on: Ray routes its legs here
            except Exception as err:  # the sub-network did not load
                log.error("sub-network %s failed to load: %s", key, err)
                return failure(err)
            return await self.replica.handed_over(key, leg)

        async def report(self) -> dict:
            return self.replica.report()

        async def __serve_build_asgi_app__(self):
            return self.replica.app()

    return serve.deployment(
        name="Translator", num_replicas=args.replicas, **translator_options(args),
        ray_actor_options={"num_cpus": resolve_threads(args)}, health_check_period_s=2.0,
        graceful_shutdown_timeout_s=args.timeout + 5,
        logging_config=LOGGING)(serve.ingress()(Translator))


def translator_options(args) -> dict:
    """The bounds of a replica (see the module's docstring, Overload). No @serve.batch: the
    replica's Batcher forms the engine calls, so Ray's rule max_ongoing_requests >=
    max_batch_size x max_concurrent_batches has nothing to bound."""
    return dict(max_ongoing_requests=args.max_queue + HEADROOM, max_queued_requests=HEADROOM,
                backpressure_config={"retry_after_s": 1})


# --- handing a leg to another replica, and scraping them all ---------------------------------


class HandleBatcher:
    """A replica's legs for sub-networks it does not hold (submit / pending / close, as a
    Batcher): a leg is one call of the Translator deployment, its sub-network the multiplexed
    model id; and the scrape of every replica (`refresh`)."""

    def __init__(self, handle, fleet: Fleet, metrics=None, max_queue: int = 256,
                 retries: int = RETRIES, report_timeout: float = REPORT_TIMEOUT_S,
                 timeout: float = 60.0):
        self.handle, self.fleet, self.metrics = handle, fleet, metrics
        self.max_queue, self.retries, self.report_timeout = max_queue, retries, report_timeout
        self.timeout = timeout  # for a leg without a deadline
        self._in_flight = 0  # legs sent and not answered (what --max-queue bounds)
        self._closing = False
        self._unready: Optional[str] = None  # why no replica can serve, at the last scrape

    def pending(self) -> int:
        """Legs sent and not yet answered (the replica that took one counts it in its own
        queue depth until it is in an engine call)."""
        return self._in_flight

    def submit(self, key: str, job: Job) -> Future:
        if self._closing:
            raise Closed("the server is shutting down")
        if self._in_flight >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry "
                            "shortly", retry_after=1)
        loop = asyncio.get_running_loop()
        seconds = (job.deadline - time.monotonic() if job.deadline is not None
                   else self.timeout)
        payload = {"texts": list(job.texts), "src": job.src, "tgt": job.tgt, "beam": job.beam,
                   "nbest": job.nbest, "sizes": list(job.sizes), "seconds": max(0.001, seconds)}
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
                if answer["kind"] == "busy":
                    raise QueueFull(answer["error"], retry_after=1)
                if answer["kind"] == "unavailable":
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
            self.fleet.update(r["name"], r["metrics"], r["loaded"], r["pid"], r["pending"])
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
        """Hand over nothing new; Ray's graceful shutdown lets the legs in flight finish."""
        self._closing = True


class Admission:
    """ASGI middleware of a replica's app: at most `limit` requests in the app at once (beyond,
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


def application(args):
    """The Ray Serve application: the Translator deployment, Ray Serve's HTTP ingress."""
    args = _absolute(args)
    return translator_deployment(args).bind(args)


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


def check_cpus(args, started: bool):
    """Each replica reserves --threads CPUs: on the cluster this process started (its own
    machine's CPUs), replicas that cannot all be placed would leave `serve.run` waiting
    forever, so refuse; on a joined cluster an autoscaler may add nodes: warn."""
    need, have = args.replicas * args.threads, ray.cluster_resources().get("CPU", 0)
    if need <= have:
        return
    message = (f"--replicas {args.replicas} x --threads {args.threads} needs {need} CPUs, the "
               f"Ray cluster has {have:g}")
    if started:
        raise SystemExit(f"taskmoe-serve: error: {message}\nhint: under --engine ray "
                         "--threads is per replica: lower it or --replicas")
    log.warning("%s: replicas wait until the cluster has room", message)


def serve_forever(args) -> int:
    started = connect(args)
    try:
        check_cpus(args, started)
    except SystemExit:
        if started:
            ray.shutdown()
        raise
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
