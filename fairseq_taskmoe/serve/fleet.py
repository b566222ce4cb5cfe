"""The metrics of several replica processes as one `/metrics` (taskmoe-serve --engine ray).

Under Ray Serve every Translator replica is a whole server (ray_engine.py): it answers HTTP
requests, loads, evicts and batches, and counts all of it in its own `Metrics` (metrics.py).
Whichever replica Ray's proxy gives a `/metrics`, `/health` or `/pairs` to scrapes first: it
asks every replica, itself included (`DeploymentHandle.broadcast`, each with its own short
timeout), and each answers with a `snapshot` of its metrics. `Fleet` keeps the latest snapshot
of each replica and renders every family summed over the replicas, so that any replica
answers for the whole service.

A replica that did not answer the last scrape is *silent* (hung, or dead): its gauges, the
sub-networks it holds and its legs waiting stop counting, its counters and histograms keep
counting (totals never go back). A replica is *gone* when a scrape that every replica Ray
routes to answered did not include it (Ray never restarts a replica: it starts a new one with
another name); `forget_after` seconds later its entry is dropped and its counters and histograms
are added to the sums of departed replicas, so a long-running fleet keeps no dead entries.
`taskmoe_replicas{state="answering"|"silent"}` says how the last scrape went.

Pure prometheus-client: no Ray here, so it is unit-testable alone.
"""

import threading
import time
from typing import Dict, Iterable, List, Optional, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from .metrics import Metrics

# a replica missing from complete scrapes this long is dropped (longer than Ray's 30 s health
# check timeout: by then Ray has replaced a replica it could not reach)
FORGET_AFTER_S = 60.0
REPLICAS = ("taskmoe_replicas", "Translator replicas at the last scrape (--engine ray): "
            "answering, or silent (asked, no answer in time)")
# (sample name, sorted labels, value)
Sample = Tuple[str, Tuple[Tuple[str, str], ...], float]
# (family name, type, help, samples)
Family = Tuple[str, str, str, List[Sample]]


def snapshot(metrics: Metrics) -> List[Family]:
    """Every family of one process's metrics, as plain picklable tuples (`_created`
    timestamps left out: they cannot be summed)."""
    out = []
    for family in metrics.registry.collect():
        samples = [(s.name, tuple(sorted(s.labels.items())), float(s.value))
                   for s in family.samples if not s.name.endswith("_created")]
        out.append((family.name, family.type, family.documentation, samples))
    return out


def _add(sums: Dict[tuple, float], samples: List[Sample]):
    for sample, labels, value in samples:
        key = (sample, labels)
        sums[key] = sums.get(key, 0.0) + value


class _Replica:
    def __init__(self):
        self.families: List[Family] = []
        self.loaded: List[str] = []
        self.pid: Optional[int] = None
        self.pending = 0  # legs waiting for an engine call there when it answered
        self.live = True  # answered the last scrape
        self.missing_since: Optional[float] = None  # first complete scrape without it


class Fleet:
    """A prometheus-client collector over the replicas' latest snapshots, plus what a
    replica answering for the service needs to know about the others (which sub-networks are
    resident, legs waiting)."""

    def __init__(self, forget_after: float = FORGET_AFTER_S, clock=time.monotonic):
        self._lock = threading.Lock()
        self._replicas: Dict[str, _Replica] = {}
        # counters and histograms of the replicas dropped: family -> (sample, labels) -> sum
        self._departed: Dict[str, Dict[tuple, float]] = {}
        self._last: Tuple[int, int] = (0, 0)  # (answering, silent) at the last scrape
        self._names = []  # family names and types, known before any replica reports
        self.forget_after, self._clock = forget_after, clock
        for family in snapshot(Metrics()):
            self._names.append(family[:3])
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    def render(self) -> bytes:
        """The Prometheus text of the sums (what `/metrics` answers)."""
        return generate_latest(self._registry)

    def update(self, replica: str, families: List[Family], loaded: Iterable[str] = (),
               pid: Optional[int] = None, pending: int = 0):
        """A replica's answer to a scrape."""
        with self._lock:
            entry = self._replicas.setdefault(replica, _Replica())
            entry.families, entry.loaded, entry.pid = families, list(loaded), pid
            entry.pending, entry.live, entry.missing_since = pending, True, None

    def scraped(self, answered: Iterable[str], asked: Optional[int]):
        """The end of a scrape: the replicas `answered` (their `update` done) out of the
        `asked` replicas Ray sent it to (None: the scrape failed, nobody known to be asked).
        Every other replica is silent; when all those asked answered, the others are gone from
        the deployment, and dropped once gone for `forget_after` seconds."""
        answered = set(answered)
        now = self._clock()
        with self._lock:
            complete = asked is not None and len(answered) >= asked
            for name, entry in list(self._replicas.items()):
                if name in answered:
                    continue
                entry.live = False
                if not complete:
                    continue
                if entry.missing_since is None:
                    entry.missing_since = now
                if now - entry.missing_since >= self.forget_after:
                    self._retire(name)
            silent = (asked - len(answered) if asked is not None
                      else len(self._replicas) - len(answered))
            self._last = (len(answered), max(0, silent))

    def _retire(self, name: str):
        """Drop a replica's entry, its counters and histograms kept in the departed sums."""
        entry = self._replicas.pop(name)
        for family, kind, _, samples in entry.families:
            if kind != "gauge":
                _add(self._departed.setdefault(family, {}), samples)

    def lost(self, replica: str):
        """A call to this replica failed because it died: silent until it answers (it
        will not)."""
        with self._lock:
            if replica in self._replicas:
                self._replicas[replica].live = False

    def last_scrape(self) -> Tuple[int, int]:
        """(replicas that answered, replicas asked that did not) at the last scrape."""
        with self._lock:
            return self._last

    def replicas(self) -> Dict[str, dict]:
        with self._lock:
            return {name: {"live": e.live, "pid": e.pid, "loaded": list(e.loaded),
                           "pending": e.pending} for name, e in self._replicas.items()}

    def loaded_keys(self) -> List[str]:
        """Sub-networks resident on at least one live replica."""
        with self._lock:
            keys = {k for e in self._replicas.values() if e.live for k in e.loaded}
        return sorted(keys)

    def pending(self) -> int:
        """Legs waiting for an engine call on the live replicas, as they said at the last
        scrape."""
        with self._lock:
            return sum(e.pending for e in self._replicas.values() if e.live)

    def collect(self):
        with self._lock:
            entries = [(e.live, e.families) for e in self._replicas.values()]
            sums: Dict[str, Dict[tuple, float]] = {
                name: dict(self._departed.get(name, {})) for name, _, _ in self._names}
            answering, silent = self._last
        for live, families in entries:
            for name, kind, _, samples in families:
                if name in sums and (kind != "gauge" or live):
                    _add(sums[name], samples)
        for name, kind, doc in self._names:
            family = Metric(name, doc, kind)
            values = sums[name]
            for (sample, labels), value in sorted(values.items(), key=_order):
                family.add_sample(sample, dict(labels), value)
            yield family
        family = Metric(REPLICAS[0], REPLICAS[1], "gauge")
        family.add_sample(REPLICAS[0], {"state": "answering"}, answering)
        family.add_sample(REPLICAS[0], {"state": "silent"}, silent)
        yield family


def _order(item):
    (sample, labels), _ = item
    # histogram buckets in their numeric order, as prometheus-client writes them
    le = dict(labels).get("le")
    rest = tuple((k, v) for k, v in labels if k != "le")
    return (rest, sample, float(le) if le is not None else 0.0)
