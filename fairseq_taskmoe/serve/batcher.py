"""Cross-request batching: one queue per sub-network, engine calls bounded by `max_batch_tokens`,
and a process-wide budget of engine threads (`threads`).

A job is one request's sentences for one leg. Batching is continuous: a worker whose engine is
idle takes what is waiting at once (one request alone when only one is there, never waiting for
others to come), and the requests that arrive while its call runs form its next call
(`max_wait_ms` > 0 adds an optional wait for more requests to share a call). A call takes
sentences from the jobs in arrival order until `max_batch_tokens` source tokens are in it, and
translates them longest first in engine batches of at most `engine_batch` sentences.

Engine threads: the registry says how many calls one engine can run at once and how many
threads each takes (`Registry.call_shape`: CTranslate2 runs `threads` calls of one thread each,
its inter_threads; fairseq one call of `threads` torch threads). A sub-network gets that many
workers, and a worker starts a call only when the budget has the call's threads free, so a hot
pair uses every core while the others are quiet, and many busy pairs never run more than
`threads` engine threads together. A sub-network with several workers shares what waits
among those running or able to start (two calls of 32 side by side, not one of 64 on one core
while the other core translates the stragglers one by one), leaving no share to a worker that
has no thread to run on. A job larger than `max_batch_tokens` is translated over several
calls: after each of its chunks it waits behind every job that has not had a turn yet, so a
one-sentence request that arrives meanwhile is in the very next call instead of waiting for the
whole large job (new jobs first, then round robin between the large ones). Small jobs (at
most one engine batch) go first in a call, and once it has translated one engine batch of the
larger ones, a worker that sees a new job waiting (and no idle worker to take it) gives their
rest back to the queue between two engine batches: the new job waits for the batch running and
one more, not for a whole call of `max_batch_tokens`; a larger job still advances by an engine
batch a call, and one that got nothing goes first in the next. A job's sentences are taken
longest first, and each call is sorted by length, so that similar lengths are padded together
(as CTranslate2's BufferedTranslationWrapper does). Jobs whose decoding options differ (beam,
n-best) or whose input differs in more than the text (`--encoder-langtok src`) go in separate
calls of the same round.

Threads, not processes: CTranslate2 is not fork-safe, and both engines release the GIL in their
kernels. Each queue has its own condition (on one shared lock), so a submit wakes only a
worker of its sub-network. The queue is bounded in total (`max_queue` jobs not finished): beyond
it `submit` raises QueueFull and the caller answers 503 with Retry-After. A job whose future was
cancelled (its request timed out, or its client went away) is dropped before its next chunk.
`close()` stops accepting and drains what was accepted: no accepted job is left without an answer.
"""

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

log = logging.getLogger("taskmoe.serve")


class QueueFull(RuntimeError):
    """The bounded queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Closed(RuntimeError):
    """The server is shutting down and takes no new work."""


@dataclass(eq=False)
class Job:
    """One request's inputs for one leg, answered with the n best translations of each.

    texts: what the engine translates; sizes: source tokens of each text (what
    `max_batch_tokens` counts); deadline: time.monotonic() after which nobody waits
    for the answer (bounds how long the worker may wait to load the sub-network)."""

    texts: list
    src: str
    tgt: str
    beam: int
    nbest: int
    sizes: List[int]
    deadline: Optional[float] = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self._lock = threading.Lock()  # two workers may answer chunks of one job at once
        if len(self.sizes) != len(self.texts):
            raise ValueError(f"{len(self.sizes)} sizes for {len(self.texts)} texts")
        # longest first: a chunk takes inputs of similar length
        self._order = sorted(range(len(self.texts)), key=lambda i: -self.sizes[i])
        self._next = 0
        self._answers: List[Optional[list]] = [None] * len(self.texts)
        self._missing = len(self.texts)

    @property
    def tokens(self) -> int:
        return sum(self.sizes)

    @property
    def tokens_left(self) -> int:
        """Source tokens of the inputs not yet taken into an engine call."""
        return sum(self.sizes[i] for i in self._order[self._next:])

    @property
    def left(self) -> int:
        """Inputs not yet taken into an engine call."""
        return len(self._order) - self._next

    @property
    def over(self) -> bool:
        """Answered, failed or cancelled: nothing more to translate."""
        return self.future.done()

    def _take(self, budget: int, force: bool) -> List[int]:
        """Indices of the next inputs whose sizes fit in `budget` (at least one if `force`)."""
        taken = []
        while self._next < len(self._order):
            i = self._order[self._next]
            if self.sizes[i] > budget and not (force and not taken):
                break
            taken.append(i)
            budget -= self.sizes[i]
            self._next += 1
        return taken

    def _untake(self, indices: List[int]):
        """Inputs taken into a call and not translated go back before the untaken ones (they
        are the longest left: taken longest first)."""
        back = set(indices)
        done = [i for i in self._order[:self._next] if i not in back]
        rest = sorted(indices, key=lambda i: -self.sizes[i])
        self._order = done + rest + self._order[self._next:]
        self._next = len(done)

    def _answer(self, i: int, hyps: list):
        with self._lock:
            self._answers[i] = hyps
            self._missing -= 1
            done = self._missing == 0
        if done:
            _settle(self.future, result=self._answers)


def _settle(future: Future, result=None, error: Optional[BaseException] = None):
    """Set a future unless it is done already (cancelled by its waiter meanwhile)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


Chunk = Tuple[Job, List[int]]


class _Queue:
    """One sub-network's waiting jobs: those never in an engine call (`fresh`, in arrival order)
    come before those with inputs left after a turn (`started`, round robin)."""

    def __init__(self, jobs=()):
        self.fresh: Deque[Job] = deque(jobs)
        self.started: Deque[Job] = deque()

    def __bool__(self):
        return bool(self.fresh or self.started)

    def __iter__(self):
        return itertools.chain(self.fresh, self.started)

    def first(self) -> Job:
        return self.fresh[0] if self.fresh else self.started[0]

    def pop_first(self) -> Job:
        return self.fresh.popleft() if self.fresh else self.started.popleft()

    def remove(self, job: Job):
        (self.fresh if job in self.fresh else self.started).remove(job)


class Batcher:
    def __init__(self, registry, max_batch_tokens: int = 4096, max_wait_ms: float = 0.0,
                 max_queue: int = 256, metrics=None, cross_request: bool = True,
                 load_timeout: float = 60.0, threads: int = 1, engine_batch: int = 8):
        if threads < 1 or engine_batch < 0:
            raise ValueError(f"threads must be >= 1 and engine_batch >= 0, not {threads}, "
                             f"{engine_batch}")
        self.registry, self.metrics = registry, metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.cross_request = cross_request  # False: one request per engine call (benchmarks)
        self.load_timeout = load_timeout  # for a job without a deadline
        self.threads = threads  # engine threads of all sub-networks together
        self.engine_batch = engine_batch  # sentences per engine batch in a call (0: the whole)
        self._lock = threading.Lock()
        self._conds: Dict[str, threading.Condition] = {}
        self._queues: Dict[str, _Queue] = {}
        self._workers: Dict[str, List[threading.Thread]] = {}
        self._shapes: Dict[str, Tuple[int, int]] = {}
        self._idle: Dict[str, int] = {}  # workers of a sub-network waiting for work
        self._free = threads  # engine threads not in a call
        self._pending = 0  # jobs accepted and not yet taken whole
        self._closing = False

    def pending(self) -> int:
        with self._lock:
            return self._pending

    def busy_threads(self) -> int:
        """Engine threads in a call now."""
        with self._lock:
            return self.threads - self._free

    def call_shape(self, key: str) -> Tuple[int, int]:
        """(workers, threads per call) of `key`: what its engine can run at once
        (`registry.call_shape`; one call of one thread for a registry that does not say),
        within the budget."""
        shape = getattr(self.registry, "call_shape", None)
        calls, cost = shape(key) if shape else (1, 1)
        cost = max(1, min(cost, self.threads))
        return max(1, min(calls, self.threads // cost)), cost

    def submit(self, key: str, job: Job) -> Future:
        with self._lock:
            if self._closing:
                raise Closed("the server is shutting down")
            if self._pending >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry "
                                "shortly", retry_after=1)
            if not job.texts:
                _settle(job.future, result=[])
                return job.future
            cond = self._conds.get(key)
            if cond is None:
                cond = self._start(key)
            self._queues[key].fresh.append(job)
            self._pending += 1
            self._gauge()
            cond.notify()
        return job.future

    def _start(self, key: str) -> threading.Condition:
        """The queue and workers of a sub-network, at its first job (under the lock)."""
        cond = self._conds[key] = self._condition(key)
        self._queues[key] = _Queue()
        self._idle[key] = 0
        workers, cost = self._shapes[key] = self.call_shape(key)
        self._workers[key] = []
        for n in range(workers):
            worker = threading.Thread(target=self._run, args=(key, cost), daemon=True,
                                      name=f"batcher-{key}-{n}")
            self._workers[key].append(worker)
            worker.start()
        return cond

    def _condition(self, key: str) -> threading.Condition:
        """The condition the workers of `key` wait on (their own, on the shared lock)."""
        return threading.Condition(self._lock)

    def _gauge(self):
        if self.metrics:
            self.metrics.queue_depth.set(self._pending)

    def _take(self, key: str, cost: int) -> Optional[List[Chunk]]:
        """Block until `key` has work and the budget `cost` free threads, take them and fill
        a call; None when closing with nothing left."""
        queue, cond = self._queues[key], self._conds[key]
        with cond:
            self._idle[key] += 1
            try:
                while True:
                    self._drop_over(queue)
                    if queue and self._free >= cost:
                        break
                    if not queue and self._closing:
                        return None
                    cond.wait()
            finally:
                self._idle[key] -= 1
            self._free -= cost
            if self.cross_request and self.max_wait > 0:
                deadline = queue.first().enqueued + self.max_wait
                while (sum(j.tokens_left for j in queue) < self.max_batch_tokens
                       and not self._closing):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    cond.wait(timeout=left)
                self._drop_over(queue)
            chunks = self._fill(queue, self._share(queue, key, cost))
            if not chunks:
                self._release(cost)
            elif queue and self._free >= cost:
                cond.notify()  # an idle worker of `key` takes the rest side by side
            return chunks

    def _share(self, queue: _Queue, key: str, cost: int) -> int:
        """Source tokens this call may take: `max_batch_tokens`, or when `key` has other calls
        running or able to start now (its busy workers, and its idle ones as far as the budget
        has threads free), an even share of what waits, so that the calls run side by side:
        the idle ones start now, a busy one takes its share when its call ends (taking
        everything would leave it small calls of what arrives meanwhile, one core doing the
        bulk). An idle worker with no thread to run on gets no share: a share for it would only
        wait (six pairs over four sub-networks on two threads, 16 clients: 1.34-1.38 requests
        per engine call when every call was halved, 2.11 without those shares)."""
        if not self.cross_request:
            return self.max_batch_tokens
        busy = self._shapes[key][0] - 1 - self._idle[key]  # this worker is not idle any more
        others = busy + min(self._idle[key], self._free // cost)
        if others == 0:
            return self.max_batch_tokens
        waiting = sum(j.tokens_left for j in queue)
        return max(1, min(self.max_batch_tokens, -(-waiting // (others + 1))))

    def _release(self, cost: int):
        """A call's threads go back to the budget; a worker of every sub-network with work
        waiting may start (under the lock)."""
        self._free += cost
        for key, queue in self._queues.items():
            if queue:
                self._conds[key].notify()

    def _fill(self, queue: _Queue, budget: int) -> List[Chunk]:
        """One engine call's chunks, taken from `queue` in order: at most `budget` source
        tokens (one input at least); a job with inputs left goes to the back of the started
        ones."""
        chunks: List[Chunk] = []
        while queue:
            job = queue.first()
            if job.over:
                self._retire(queue.pop_first())
                continue
            taken = job._take(budget, force=not chunks)
            if not taken:
                break  # the call is full
            chunks.append((job, taken))
            budget -= sum(job.sizes[i] for i in taken)
            queue.pop_first()
            if job.left:
                queue.started.append(job)  # the rest after the others: round robin
            else:
                self._retire(job)
            if not self.cross_request or budget <= 0:
                break
        return chunks

    def _drop_over(self, queue: _Queue):
        """Forget jobs nobody waits for any more (cancelled, or failed in an earlier call)."""
        for job in [j for j in queue if j.over]:
            queue.remove(job)
            self._retire(job)

    def _retire(self, job: Job):
        """A job leaves the queue (taken whole, or over): under the lock."""
        self._pending -= 1
        self._gauge()

    def _run(self, key: str, cost: int):
        while True:
            chunks = self._take(key, cost)
            if chunks is None:
                return
            if chunks:
                try:
                    self._translate(key, chunks)
                finally:
                    with self._lock:
                        self._release(cost)

    def _translate(self, key: str, chunks: List[Chunk]):
        deadlines = [job.deadline for job, _ in chunks if job.deadline is not None]
        wait = (max(0.001, max(deadlines) - time.monotonic()) if len(deadlines) == len(chunks)
                else self.load_timeout)
        try:
            with self.registry.use(key, timeout=wait) as engine:
                groups: Dict[tuple, List[Chunk]] = {}
                for job, taken in chunks:
                    group = (engine.group_key(job.src, job.tgt), job.beam, job.nbest)
                    groups.setdefault(group, []).append((job, taken))
                for group_chunks in groups.values():
                    self._call(key, engine, group_chunks)
        except Exception as err:  # e.g. the sub-network failed to load: answer every job
            for job, _ in chunks:
                _settle(job.future, error=err)

    def _call(self, key: str, engine, chunks: List[Chunk]):
        """ONE engine call for the chunks' inputs: longest first, in batches of at most
        `engine_batch` sentences one after the other on this worker's thread (similar lengths
        padded together: a batch of 32 mixed lengths decodes each step for its longest, and
        beam search runs until its last sentence ends); results back per job as each batch
        ends, and a job cancelled meanwhile is left out of the batches after. Small jobs go
        first; after them and one engine batch of the larger ones, a job that has had no turn
        yet and no idle worker to take it makes the call give the larger jobs' rest back
        (_give_back) and end."""
        live = [(job, taken) for job, taken in chunks if not job.over]
        if not live:
            return
        # the small jobs first (at most one engine batch), longest first; then the large ones
        # in the order the call took them, each longest first
        large = [bool(self.engine_batch) and len(job.texts) > self.engine_batch
                 for job, _ in live]
        small = [(job, i) for (job, taken), big in zip(live, large) if not big for i in taken]
        flat = sorted(small, key=lambda ji: -ji[0].sizes[ji[1]]) + [
            (job, i) for (job, taken), big in zip(live, large) if big
            for i in sorted(taken, key=lambda i: -job.sizes[i])]
        first = live[0][0]
        if self.metrics:
            self.metrics.batch_size.labels(key).observe(len(flat))
            self.metrics.batch_requests.labels(key).observe(len(live))
        step = self.engine_batch or len(flat)
        for start in range(0, len(flat), step):
            if start >= len(small) + step and self._newcomer_waits(key):
                # the large jobs' rest after the newcomer
                self._give_back(key, flat[start:], {job: len(t) for job, t in live})
                return
            part = [(job, i) for job, i in flat[start:start + step]
                    if not job.over]  # a job cancelled meanwhile is not translated further
            if not part:
                continue
            try:
                hyps = engine.translate([job.texts[i] for job, i in part], first.src,
                                        first.tgt, beam=first.beam, nbest=first.nbest)
            except Exception as err:
                log.exception("translation failed for sub-network %s", key)
                for job in {job for job, _ in flat[start:]}:
                    _settle(job.future, error=err)
                return
            for (job, i), hyp in zip(part, hyps):
                job._answer(i, hyp)

    def _newcomer_waits(self, key: str) -> bool:
        """A job that has had no turn waits for `key` and no idle worker can take it now (read
        without the lock: a hint, checked between engine batches)."""
        return bool(self._queues[key].fresh) and not (
            self._idle[key] and self._free >= self._shapes[key][1])

    def _give_back(self, key: str, rest: List[Tuple[Job, int]], in_call: Dict[Job, int]):
        """Inputs of a call not translated go back to their jobs, for a later call: a job that
        had none of its inputs translated in this call goes to the front of the started ones
        (the next call takes it before those that advanced: none starves), one that had left
        the queue (its last inputs were in this call) back into it."""
        back: Dict[Job, List[int]] = {}
        for job, i in rest:
            back.setdefault(job, []).append(i)
        with self._lock:
            started = self._queues[key].started
            for job, indices in back.items():
                if job.over:  # cancelled meanwhile: _drop_over forgets it
                    continue
                queued = bool(job.left)  # else retired when its last inputs were taken
                if not queued:
                    self._pending += 1
                if len(indices) == in_call[job]:  # nothing of it done: it goes next
                    if queued:
                        started.remove(job)
                    started.appendleft(job)
                elif not queued:
                    started.append(job)
                job._untake(indices)
            self._gauge()
            self._conds[key].notify()

    def close(self, timeout: float = 60.0):
        """Take nothing new, answer what was accepted, stop the workers."""
        with self._lock:
            self._closing = True
            for cond in self._conds.values():
                cond.notify_all()
            workers = [w for ws in self._workers.values() for w in ws]
        end = time.monotonic() + timeout
        for worker in workers:
            worker.join(timeout=max(0.0, end - time.monotonic()))
