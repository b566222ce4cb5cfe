"""Prometheus metrics of one server (prometheus-client), in their own CollectorRegistry so that
several apps in one process (tests) do not share counters.

What an operator of a multi-pair server needs to see: traffic and latency per endpoint, status and
pair; whether cross-request batching happens (batch sizes); back-pressure (queue depth); and what
the memory budget costs (sub-networks loaded, loads, evictions, load time, resident memory).
"""

import os

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def resident_bytes() -> int:
    """This process's resident set size (psutil when installed, else /proc)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("taskmoe_requests", "HTTP requests", ["endpoint", "status", "pair"],
                                registry=r)
        self.latency = Histogram("taskmoe_request_seconds", "HTTP request latency",
                                 ["endpoint", "status", "pair"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.batch_size = Histogram("taskmoe_batch_texts",
                                    "texts per batcher call (what one worker takes at once, "
                                    "translated in engine batches of --engine-batch)",
                                    ["subnetwork"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("taskmoe_batch_requests",
                                        "requests in one batcher call",
                                        ["subnetwork"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("taskmoe_queue_depth", "request legs accepted whose texts are "
                                 "not all in an engine call yet (a pivot request has one leg "
                                 "waiting at a time)", registry=r)
        self.loaded = Gauge("taskmoe_subnetworks_loaded", "sub-networks in memory", registry=r)
        self.loaded_bytes = Gauge("taskmoe_subnetworks_bytes",
                                  "memory charged to loaded sub-networks", registry=r)
        self.loads = Counter("taskmoe_subnetwork_loads", "sub-network loads", ["subnetwork"],
                             registry=r)
        self.evictions = Counter("taskmoe_subnetwork_evictions", "sub-networks evicted (LRU)",
                                 ["subnetwork"], registry=r)
        self.load_seconds = Histogram("taskmoe_subnetwork_load_seconds", "time to load one",
                                      buckets=LATENCY_BUCKETS, registry=r)
        # --engine ray only: legs whose replica died under them (sent again, or answered 503)
        self.replica_losses = Counter("taskmoe_replica_losses", "legs whose replica was lost "
                                      "(--engine ray)", ["subnetwork", "outcome"], registry=r)
        self.rss = Gauge("taskmoe_resident_memory_bytes", "resident set size of the process",
                         registry=r)
        self.rss.set_function(resident_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
