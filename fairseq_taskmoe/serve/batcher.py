"""Cross-request batching: one queue and one worker thread per sub-network.

A worker takes the oldest waiting request, then keeps collecting requests for the same
sub-network until `max_wait_ms` have passed since that request arrived or `max_batch_tokens`
source tokens are waiting, and translates them all in ONE engine call (texts of one request are
in that call too, never looped over), sorted by length so that similar lengths are padded
together (as CTranslate2's BufferedTranslationWrapper does). Requests whose decoding options
differ (beam, n-best) or whose input differs in more than the text (`--encoder-langtok src`) go
in separate calls of the same round.

Threads, not processes: CTranslate2 is not fork-safe, and both engines release the GIL in their
kernels. The queue is bounded in total (`max_queue` requests): beyond it `submit` raises
QueueFull and the caller answers 503 with Retry-After. A request that timed out is cancelled
(its future), and the worker skips it. `close()` stops accepting and drains what was accepted:
no accepted request is left without an answer.
"""

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

log = logging.getLogger("taskmoe.serve")


class QueueFull(RuntimeError):
    """The bounded queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Closed(RuntimeError):
    """The server is shutting down and takes no new work."""


@dataclass
class Job:
    """One request's texts for one leg: answered with the n best translations of each text."""

    texts: List[str]
    src: str
    tgt: str
    beam: int
    nbest: int
    tokens: int
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, registry, max_batch_tokens: int = 4096, max_wait_ms: float = 10.0,
                 max_queue: int = 256, metrics=None, cross_request: bool = True):
        self.registry, self.metrics = registry, metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.cross_request = cross_request  # False: one request per engine call (benchmarks)
        self._cond = threading.Condition()
        self._queues: Dict[str, Deque[Job]] = {}
        self._workers: Dict[str, threading.Thread] = {}
        self._pending = 0
        self._closing = False

    def pending(self) -> int:
        with self._cond:
            return self._pending

    def submit(self, key: str, job: Job) -> Future:
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if self._pending >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry "
                                "shortly", retry_after=1)
            self._queues.setdefault(key, deque()).append(job)
            self._pending += 1
            self._gauge()
            if key not in self._workers:
                worker = threading.Thread(target=self._run, args=(key,), daemon=True,
                                          name=f"batcher-{key}")
                self._workers[key] = worker
                worker.start()
            self._cond.notify_all()
        return job.future

    def _gauge(self):
        if self.metrics:
            self.metrics.queue_depth.set(self._pending)

    def _take(self, key: str) -> Optional[List[Job]]:
        """Block until a batch for `key` is due; None when closing with nothing left."""
        queue = self._queues[key]
        with self._cond:
            while not queue:
                if self._closing:
                    return None
                self._cond.wait()
            if self.cross_request:
                deadline = queue[0].enqueued + self.max_wait
                while (sum(j.tokens for j in queue) < self.max_batch_tokens
                       and not self._closing):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(timeout=left)
            batch, tokens = [], 0
            while queue and (not batch or (self.cross_request
                                           and tokens + queue[0].tokens <= self.max_batch_tokens)):
                job = queue.popleft()
                tokens += job.tokens
                batch.append(job)
            self._pending -= len(batch)
            self._gauge()
            return batch

    def _run(self, key: str):
        while True:
            batch = self._take(key)
            if batch is None:
                return
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if live:
                self._translate(key, live)

    def _translate(self, key: str, jobs: List[Job]):
        try:
            with self.registry.use(key) as engine:
                groups: Dict[tuple, List[Job]] = {}
                for job in jobs:
                    group = (engine.group_key(job.src, job.tgt), job.beam, job.nbest)
                    groups.setdefault(group, []).append(job)
                for group_jobs in groups.values():
                    self._call(key, engine, group_jobs)
        except Exception as err:  # e.g. the sub-network failed to load: answer every request
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)

    def _call(self, key: str, engine, jobs: List[Job]):
        """ONE engine call for all texts of `jobs`, longest first; results back per job."""
        flat = [(len(text), j, i) for j, job in enumerate(jobs) for i, text in
                enumerate(job.texts)]
        order = sorted(range(len(flat)), key=lambda n: -flat[n][0])
        texts = [jobs[flat[n][1]].texts[flat[n][2]] for n in order]
        first = jobs[0]
        try:
            hyps = engine.translate(texts, first.src, first.tgt, beam=first.beam,
                                    nbest=first.nbest)
        except Exception as err:
            log.exception("translation failed for sub-network %s", key)
            for job in jobs:
                job.future.set_exception(err)
            return
        if self.metrics:
            self.metrics.batch_size.labels(key).observe(len(texts))
            self.metrics.batch_requests.labels(key).observe(len(jobs))
        answers = [[None] * len(job.texts) for job in jobs]
        for n, hyp in zip(order, hyps):
            _, j, i = flat[n]
            answers[j][i] = hyp
        for job, answer in zip(jobs, answers):
            job.future.set_result(answer)

    def close(self, timeout: float = 60.0):
        """Take nothing new, answer what was accepted, stop the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            workers = list(self._workers.values())
        end = time.monotonic() + timeout
        for worker in workers:
            worker.join(timeout=max(0.0, end - time.monotonic()))
