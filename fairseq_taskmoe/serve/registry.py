"""The per-pair sub-network registry: build (once, cached on disk), load on first use, evict LRU.

A sub-network is made by the project's own code, never a second implementation:
`pruning.prune_checkpoint` (merged experts) for the fairseq backend, then `export.extract_dense`
and `export.write_ctranslate2` (CTranslate2's converter) for the ctranslate2 backend. It is
keyed by what it serves (`*-de` with target routing, so en-de and fr-de share one; `en-de` with
lang_pair routing; `*-*` for a model served whole). Layers routed on the input (token, sentence)
cannot be pruned: such a checkpoint has no dense export, so it is served by the fairseq backend,
pruned where it can be and whole elsewhere.

Cache: `CACHE/<checkpoint digest>/<backend>-<quantization>/<key>/`, written under a temporary name
and renamed, so a reader sees a complete artifact or none. The digest is of the checkpoint's
content (sampled for files over 512 MB), so a changed checkpoint is never served from a stale
cache. An artifact that fails to load is deleted and rebuilt once; if that fails too the
sub-network is marked failed, with the reason, and its pairs answer 503 while the rest serve.

Memory: each sub-network is charged its measured size (the artifact's bytes: CTranslate2's
model.bin, or the pruned checkpoint's weights). Loading one that would exceed `memory_budget`
first evicts the least recently used sub-networks that no batch is using; a pinned one (in use)
is never freed, the loader waits instead.
"""

import gc
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from ..atomic import write_atomically, write_text_atomically
from ..deploy.pruning import (PruningError, count_parameters, model_args, prune_checkpoint,
                              trained_pairs)
from ..distributed.checkpoints import (Found, checkpoint_bytes, checkpoint_files, find_checkpoint,
                                       load_any)
from ..integration.compat import load_checkpoint
from ..moe.pairs import serves  # the one rule of what a pruned/exported model serves
from ..moe.routing import TASK_ROUTING_KINDS
from .routes import ModelFacts

log = logging.getLogger("taskmoe.serve")
Pair = Tuple[str, str]
WHOLE = "*-*"
SAMPLED_ABOVE = 512 << 20  # files larger than this are hashed by sampling
ARTIFACT_VERSION = 1  # bump when what is written changes

class Unavailable(RuntimeError):
    """A sub-network that failed to build or load; the message names it and the reason."""


def parse_size(text: str) -> int:
    """'200MB', '1.5GB', '512k', '1000000' -> bytes (powers of 1024 for K/M/G/T)."""
    s = str(text).strip().upper().replace("IB", "B")
    units = {"TB": 1 << 40, "GB": 1 << 30, "MB": 1 << 20, "KB": 1 << 10, "T": 1 << 40,
             "G": 1 << 30, "M": 1 << 20, "K": 1 << 10, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)].strip()
            break
    else:
        number, factor = s, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"bad size {text!r}: write e.g. 200MB or 1.5GB") from None
    if value <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    return int(value * factor)


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def checkpoint_digest(found: Found) -> str:
    """sha256 over the checkpoint's file(s): every byte, or for a file over SAMPLED_ABOVE its
    size, mtime and 64 evenly spaced 64 KB samples (hashing GBs at every start-up is slow)."""
    h = hashlib.sha256()
    for path in checkpoint_files(found):
        st = os.stat(path)
        h.update(f"{os.path.basename(path)}:{st.st_size}".encode())
        with open(path, "rb") as f:
            if st.st_size <= SAMPLED_ABOVE:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(str(st.st_mtime_ns).encode())
                for i in range(64):
                    f.seek(i * (st.st_size - (64 << 10)) // 63)
                    h.update(f.read(64 << 10))
    return h.hexdigest()


def _tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def _weights_bytes(path: str) -> int:
    """What loading costs: CTranslate2's model.bin, or the checkpoint file."""
    if os.path.isdir(path):
        return os.path.getsize(os.path.join(path, "model.bin"))
    return os.path.getsize(path)


@dataclass
class Subnetwork:
    """One buildable, loadable sub-network. key: what it serves (`*-de`, `en-de`, `*-*`);
    build_pair: the pair it was pruned for; path: its artifact; bytes: memory it is charged
    (measured on the artifact); layers: per MoE layer, what it keeps (the prune report)."""

    key: str
    served: List[str]
    build_pair: Pair
    backend: str
    path: str = ""
    bytes: int = 0
    disk_bytes: int = 0
    params: int = 0
    layers: List[dict] = field(default_factory=list)
    error: Optional[str] = None
    whole: bool = False


class _Loaded:
    def __init__(self, engine, cost: int):
        self.engine, self.cost, self.pins = engine, cost, 0


class Registry:
    """Sub-networks of one checkpoint for one backend and quantization."""

    def __init__(self, checkpoint: str, data: str, spm_model: Optional[str],
                 backend: str = "ctranslate2", quantization: Optional[str] = "int8",
                 cache_dir: str = "work/serve-cache", memory_budget: Optional[int] = None,
                 threads: int = 1, metrics=None):
        found = find_checkpoint(checkpoint)
        if found is None:
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist (neither a file nor "
                                    "a sharded checkpoint prefix)")
        self.found, self.checkpoint = found, checkpoint
        self.data, self.spm_model = data, spm_model
        self.threads, self.metrics = threads, metrics
        self.memory_budget = memory_budget
        header = load_checkpoint(found.path, mmap=True)  # args only; tensors stay on disk
        self.args = model_args(header)
        self.facts = ModelFacts.from_checkpoint(self.args, trained_pairs(header))
        del header
        self.max_source_positions = int(getattr(self.args, "max_source_positions", 1024) or 1024)
        self.backend, self.backend_note = self._choose_backend(backend)
        self.quantization = quantization if self.backend == "ctranslate2" else None
        self.digest = checkpoint_digest(found)
        variant = f"{self.backend}-{self.quantization or 'float32'}-v{ARTIFACT_VERSION}"
        self.cache = os.path.join(os.path.abspath(cache_dir), self.digest[:24], variant)
        self.full_params: Optional[int] = None
        self.full_bytes = checkpoint_bytes(found)
        self.subnets: Dict[str, Subnetwork] = {}
        self.pair_to_key: Dict[Pair, str] = {}
        self._state = None  # the full checkpoint, only while building
        self._cond = threading.Condition()
        self._build_lock = threading.Lock()
        self._loaded: Dict[str, _Loaded] = {}  # LRU order: first = least recently used
        self._loading: set = set()
        self._reserved = 0
        self.loads = self.evictions = 0

    # --- planning and building -------------------------------------------------------------

    def _choose_backend(self, asked: str) -> Tuple[str, str]:
        kinds = set(self.facts.kinds)
        input_routed = kinds - set(TASK_ROUTING_KINDS)
        if asked == "fairseq":
            return "fairseq", "fairseq backend (asked)"
        if input_routed:
            return "fairseq", (f"fairseq backend: {'/'.join(sorted(input_routed))}-routed MoE "
                               "layers route on the input, so they are served whole and have no "
                               "CTranslate2 export")
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            return "fairseq", "fairseq backend: CTranslate2 is not installed"
        return "ctranslate2", "ctranslate2 backend"

    def _plan_file(self) -> str:
        return os.path.join(self.cache, "plan.json")

    def _full_state(self) -> dict:
        if self._state is None:
            log.info("reading %s", self.checkpoint)
            self._state = load_any(self.checkpoint)
        return self._state

    def prepare(self, legs: List[Pair]):
        """Plan and build (or find in the cache) the sub-network of every pair in `legs`."""
        os.makedirs(self.cache, exist_ok=True)
        plan = {}
        if os.path.isfile(self._plan_file()):
            try:
                with open(self._plan_file()) as f:
                    plan = json.load(f)
            except (OSError, ValueError):
                plan = {}
        for key, meta in plan.get("subnetworks", {}).items():
            meta["build_pair"] = tuple(meta["build_pair"])
            self.subnets[key] = Subnetwork(**meta)
        self.full_params = plan.get("full_params")
        for pair in legs:
            key = plan.get("pairs", {}).get("-".join(pair))
            if key is None:
                key = next((k for k, s in self.subnets.items() if serves(s.served, *pair)), None)
            if key is None or key not in self.subnets:
                key = self._plan_pair(pair)
            self.pair_to_key[pair] = key
        for key in {self.pair_to_key[p] for p in legs}:
            sub = self.subnets[key]
            if not sub.path or not os.path.exists(sub.path):
                self._build(sub)
        self._save_plan()
        self._state = None  # the full checkpoint is no longer needed
        gc.collect()
        self._check_budget()

    def _save_plan(self):
        subs = {k: {**asdict(s), "error": None} for k, s in self.subnets.items()}
        plan = {"checkpoint_digest": self.digest, "full_params": self.full_params,
                "subnetworks": subs,
                "pairs": {"-".join(p): k for p, k in self.pair_to_key.items()}}
        write_text_atomically(self._plan_file(), json.dumps(plan, indent=1))

    def _plan_pair(self, pair: Pair) -> str:
        """Prune for `pair` (no model built) to learn what the sub-network serves."""
        state = self._full_state()
        self.full_params = count_parameters(state["model"])
        if self.facts.served is not None:  # an already pruned checkpoint
            key = ",".join(self.facts.served)
            self.subnets.setdefault(key, Subnetwork(key, list(self.facts.served), pair,
                                                    self.backend, whole=True))
            return key
        try:
            _, report = prune_checkpoint(state, "-".join(pair), merge=True)
        except PruningError as err:
            if "nothing to prune" not in str(err):
                raise
            self.subnets.setdefault(WHOLE, Subnetwork(WHOLE, [WHOLE], pair, self.backend,
                                                      whole=True))
            return WHOLE
        key = ",".join(report.served_pairs)
        if key not in self.subnets:
            self.subnets[key] = Subnetwork(key, list(report.served_pairs), pair, self.backend,
                                           params=report.params_after,
                                           layers=_layers_json(report))
        return key

    def _artifact_path(self, sub: Subnetwork) -> str:
        name = sub.key.replace("*", "all").replace(",", "+")
        return os.path.join(self.cache, name + (".pt" if self.backend == "fairseq" else ".ct2"))

    def _build(self, sub: Subnetwork):
        """Write the artifact under a temporary name, then rename (atomic)."""
        t0 = time.time()
        try:
            if sub.whole and self.backend == "fairseq" and not self.found.sharded:
                sub.path = os.path.abspath(self.found.path)  # served as it is: nothing to build
            else:
                sub.path = self._artifact_path(sub)
                self._write_artifact(sub)
            sub.bytes = _weights_bytes(sub.path)
            sub.disk_bytes = _tree_bytes(sub.path)
            sub.error = None
            log.info("built sub-network %s (%s) in %.1f s: %s", sub.key, self.backend,
                     time.time() - t0, sub.path)
        except Exception as err:  # a failed build fails that sub-network only
            sub.error = f"{type(err).__name__}: {err}"
            log.error("sub-network %s failed to build: %s", sub.key, sub.error)

    def _write_artifact(self, sub: Subnetwork):
        state = self._full_state()
        pair = "-".join(sub.build_pair)
        pruned = state if sub.whole else prune_checkpoint(state, pair, merge=True)[0]
        if self.backend == "fairseq":
            write_atomically(pruned, sub.path)
            return
        from ..deploy.export import extract_dense, write_ctranslate2

        if os.path.lexists(sub.path):
            shutil.rmtree(sub.path, ignore_errors=True)
        write_ctranslate2(extract_dense(pruned, pair), sub.path, data=self.data,
                          quantization=self.quantization, spm_model=self.spm_model,
                          source=os.path.abspath(self.checkpoint))

    def _check_budget(self):
        ok = [s for s in self.subnets.values() if s.error is None and s.bytes]
        for s in sorted(ok, key=lambda s: s.key):
            pairs = [f"{a}-{b}" for (a, b), k in self.pair_to_key.items() if k == s.key]
            log.info("sub-network %s serves %s: %s to load (%s params%s), %s on disk",
                     s.key, ", ".join(pairs), human(s.bytes), f"{s.params:,}" if s.params else "?",
                     f" of {self.full_params:,} in the full model" if self.full_params else "",
                     human(s.disk_bytes))
        if self.memory_budget and ok:
            biggest = max(ok, key=lambda s: s.bytes)
            if biggest.bytes > self.memory_budget:
                raise ValueError(
                    f"--memory-budget {human(self.memory_budget)} cannot hold one sub-network: "
                    f"{biggest.key} needs {human(biggest.bytes)} ({biggest.bytes} bytes); give "
                    f"at least {human(biggest.bytes)}")

    # --- lookup ----------------------------------------------------------------------------

    def key_of(self, pair: Pair) -> str:
        return self.pair_to_key[pair]

    def subnetwork(self, key: str) -> Subnetwork:
        return self.subnets[key]

    def loaded_keys(self) -> List[str]:
        with self._cond:
            return list(self._loaded)

    # --- loading, pinning, eviction ----------------------------------------------------------

    def _make_engine(self, sub: Subnetwork):
        from .engines import CT2Engine, FairseqEngine

        if self.backend == "ctranslate2":
            return CT2Engine(sub.path, threads=self.threads,
                             max_source_positions=self.max_source_positions)
        return FairseqEngine(sub.path, self.data, self.spm_model, sub.build_pair)

    def _load(self, sub: Subnetwork):
        """Load; on failure (a corrupt artifact) rebuild once and load again."""
        t0 = time.time()
        try:
            engine = self._make_engine(sub)
        except Exception as first:
            log.warning("sub-network %s failed to load from %s (%s: %s); rebuilding it",
                        sub.key, sub.path, type(first).__name__, first)
            if sub.whole and sub.path == os.path.abspath(self.found.path):
                raise Unavailable(f"sub-network {sub.key}: the checkpoint does not load "
                                  f"({type(first).__name__}: {first})") from first
            if os.path.isdir(sub.path):
                shutil.rmtree(sub.path, ignore_errors=True)
            elif os.path.exists(sub.path):
                os.unlink(sub.path)
            with self._build_lock:  # one build at a time; other pairs keep serving
                self._build(sub)
                self._state = None
            if sub.error:
                raise Unavailable(f"sub-network {sub.key}: {sub.error}") from first
            try:
                engine = self._make_engine(sub)
            except Exception as second:
                sub.error = f"{type(second).__name__}: {second}"
                raise Unavailable(f"sub-network {sub.key} does not load after a rebuild: "
                                  f"{sub.error}") from second
        seconds = time.time() - t0
        self.loads += 1
        if self.metrics:
            self.metrics.loads.labels(sub.key).inc()
            self.metrics.load_seconds.observe(seconds)
        log.info("loaded sub-network %s in %.2f s (%s)", sub.key, seconds, human(sub.bytes))
        return engine

    def _used(self) -> int:
        return sum(e.cost for e in self._loaded.values()) + self._reserved

    def _evict_for(self, need: int) -> bool:
        """Evict unpinned LRU sub-networks until `need` more bytes fit; False if they cannot."""
        if not self.memory_budget:
            return True
        while self._used() + need > self.memory_budget:
            victim = next((k for k, e in self._loaded.items() if e.pins == 0), None)
            if victim is None:
                return False
            del self._loaded[victim]
            self._count_eviction(victim, f"memory budget {human(self.memory_budget)}")
            gc.collect()
        return True

    def _count_eviction(self, key: str, why: str):
        self.evictions += 1
        if self.metrics:
            self.metrics.evictions.labels(key).inc()
        log.info("evicted sub-network %s (%s)", key, why)

    def _load_or_remember(self, sub: Subnetwork):
        """_load; a failure is remembered on the sub-network (later requests for it answer
        Unavailable at once) and raised as Unavailable."""
        try:
            return self._load(sub)
        except Exception as err:
            if sub.error is None:
                sub.error = str(err)
            raise err if isinstance(err, Unavailable) else Unavailable(
                f"sub-network {sub.key}: {err}") from err

    def held(self, key: str):
        """The engine of sub-network `key`, loaded for an owner that decides how long it
        stays (Ray Serve's multiplexer, which evicts by its own LRU): counted as loaded, outside
        the memory budget, until `dropped(key)`."""
        sub = self.subnets[key]
        if sub.error:
            raise Unavailable(f"sub-network {key}: {sub.error}")
        engine = self._load_or_remember(sub)
        with self._cond:
            self._loaded[key] = _Loaded(engine, sub.bytes)
            self._update_gauges()
        return engine

    def dropped(self, key: str, why: str):
        """The owner of a `held` engine let it go."""
        with self._cond:
            if self._loaded.pop(key, None) is not None:
                self._count_eviction(key, why)
                self._update_gauges()

    def _update_gauges(self):
        if self.metrics:
            self.metrics.loaded.set(len(self._loaded))
            self.metrics.loaded_bytes.set(sum(e.cost for e in self._loaded.values()))

    @contextmanager
    def use(self, key: str, timeout: float = 300.0):
        """The loaded engine of sub-network `key`, pinned (never evicted) inside the block."""
        sub = self.subnets[key]
        deadline = time.time() + timeout
        with self._cond:
            while True:
                if sub.error:
                    raise Unavailable(f"sub-network {key}: {sub.error}")
                entry = self._loaded.get(key)
                if entry is not None:
                    entry.pins += 1
                    self._loaded[key] = self._loaded.pop(key)  # most recently used
                    break
                if key not in self._loading and self._evict_for(sub.bytes):
                    self._loading.add(key)
                    self._reserved += sub.bytes
                    entry = None
                    break
                if not self._cond.wait(timeout=max(0.0, deadline - time.time())):
                    if time.time() >= deadline:
                        raise Unavailable(f"sub-network {key}: no room to load it within "
                                          f"{timeout:.0f} s under the memory budget")
        if entry is None:  # this thread loads it, outside the lock
            try:
                engine = self._load_or_remember(sub)
            except Unavailable:
                with self._cond:
                    self._loading.discard(key)
                    self._reserved -= sub.bytes
                    self._cond.notify_all()
                raise
            with self._cond:
                self._loading.discard(key)
                self._reserved -= sub.bytes
                entry = self._loaded[key] = _Loaded(engine, sub.bytes)
                entry.pins += 1
                self._update_gauges()
                self._cond.notify_all()
        try:
            yield entry.engine
        finally:
            with self._cond:
                entry.pins -= 1
                self._update_gauges()
                self._cond.notify_all()


def _layers_json(report) -> List[dict]:
    """The prune report per MoE layer: which experts each served task keeps, with weights."""
    out = []
    for layer in report.layers:
        out.append({"name": layer.name, "routing": layer.routing, "action": layer.action,
                    "experts_before": layer.experts_before, "form": layer.form,
                    "ffn_dims": list(layer.ffn_dims),
                    "kept": {task: [[int(e), round(float(w), 6)] for e, w in kept]
                             for task, kept in layer.kept.items()}})
    return out
