"""The metrics of several replica processes as one `/metrics` (taskmoe-serve --engine ray).

Under Ray Serve the HTTP process (the ingress) counts requests and their latency, while the
sub-networks are loaded, evicted and batched in the replica processes, each with its own
`Metrics` (metrics.py). A replica sends a `snapshot` of its metrics with every answer (and when
the ingress asks every replica, `DeploymentHandle.broadcast`); `Fleet` keeps the latest snapshot
of each replica and is registered in the ingress's CollectorRegistry in place of the families
that replicas own, which it yields summed over the replicas. Counters and histograms keep the
last figures of a replica that died (totals never go back); gauges count live replicas only.

Pure prometheus-client: no Ray here, so it is unit-testable alone.
"""

import threading
from typing import Dict, Iterable, List, Optional, Tuple

from prometheus_client.metrics_core import Metric

from .metrics import Metrics, resident_bytes

# Metrics attribute -> what the replicas own (the ingress unregisters its own copy of these)
REPLICA_OWNED = ("batch_size", "batch_requests", "loaded", "loaded_bytes", "loads", "evictions",
                 "load_seconds", "rss")
# (sample name, sorted labels, value)
Sample = Tuple[str, Tuple[Tuple[str, str], ...], float]
# (family name, type, help, samples)
Family = Tuple[str, str, str, List[Sample]]


def snapshot(metrics: Metrics) -> List[Family]:
    """The replica-owned families of one process's metrics, as plain picklable tuples
    (`_created` timestamps left out: they cannot be summed)."""
    wanted = {getattr(metrics, attr)._name for attr in REPLICA_OWNED}
    out = []
    for family in metrics.registry.collect():
        if family.name not in wanted:
            continue
        samples = [(s.name, tuple(sorted(s.labels.items())), float(s.value))
                   for s in family.samples if not s.name.endswith("_created")]
        out.append((family.name, family.type, family.documentation, samples))
    return out


class _Replica:
    def __init__(self):
        self.families: List[Family] = []
        self.loaded: List[str] = []
        self.pid: Optional[int] = None
        self.live = True


class Fleet:
    """A prometheus-client collector over the replicas' latest snapshots, plus what the
    ingress needs to know about them (which sub-networks are resident where)."""

    def __init__(self, own_rss: bool = True):
        self._lock = threading.Lock()
        self._replicas: Dict[str, _Replica] = {}
        self._names = []  # family names and types, known before any replica reports
        self.own_rss = own_rss
        probe = Metrics()
        for family in snapshot(probe):
            self._names.append(family[:3])

    def adopt(self, metrics: Metrics):
        """Take the replica-owned families out of the ingress's registry and yield them from
        the replicas instead (one registry, one /metrics)."""
        for attr in REPLICA_OWNED:
            metrics.registry.unregister(getattr(metrics, attr))
        metrics.registry.register(self)

    def update(self, replica: str, families: List[Family], loaded: Iterable[str] = (),
               pid: Optional[int] = None):
        with self._lock:
            entry = self._replicas.setdefault(replica, _Replica())
            entry.families, entry.loaded, entry.pid = families, list(loaded), pid
            entry.live = True

    def live_only(self, replicas: Iterable[str]):
        """Every replica not in `replicas` (the ones that answered a broadcast) is dead."""
        alive = set(replicas)
        with self._lock:
            for name, entry in self._replicas.items():
                entry.live = name in alive

    def lost(self, replica: str):
        with self._lock:
            if replica in self._replicas:
                self._replicas[replica].live = False

    def replicas(self) -> Dict[str, dict]:
        with self._lock:
            return {name: {"live": e.live, "pid": e.pid, "loaded": list(e.loaded)}
                    for name, e in self._replicas.items()}

    def loaded_keys(self) -> List[str]:
        """Sub-networks resident on at least one live replica."""
        with self._lock:
            keys = {k for e in self._replicas.values() if e.live for k in e.loaded}
        return sorted(keys)

    def collect(self):
        with self._lock:
            entries = [(e.live, e.families) for e in self._replicas.values()]
        sums: Dict[str, Dict[tuple, float]] = {name: {} for name, _, _ in self._names}
        for live, families in entries:
            for name, kind, _, samples in families:
                if name not in sums or (kind == "gauge" and not live):
                    continue
                for sample, labels, value in samples:
                    key = (sample, labels)
                    sums[name][key] = sums[name].get(key, 0.0) + value
        for name, kind, doc in self._names:
            family = Metric(name, doc, kind)
            values = sums[name]
            if self.own_rss and name == "taskmoe_resident_memory_bytes":
                # the ingress process too: the memory of the whole service
                key = (name, ())
                values[key] = values.get(key, 0.0) + resident_bytes()
            for (sample, labels), value in sorted(values.items(), key=_order):
                family.add_sample(sample, dict(labels), value)
            yield family


def _order(item):
    (sample, labels), _ = item
    # histogram buckets in their numeric order, as prometheus-client writes them
    le = dict(labels).get("le")
    rest = tuple((k, v) for k, v in labels if k != "le")
    return (rest, sample, float(le) if le is not None else 0.0)
