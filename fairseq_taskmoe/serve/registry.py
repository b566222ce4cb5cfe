"""The per-pair sub-network registry: build (once, cached on disk), load on first use, evict LRU.

A sub-network is made by the project's own code, never a second implementation:
`pruning.prune_checkpoint` (merged experts) for the fairseq backend, then `export.extract_dense`
and `export.write_ctranslate2` (CTranslate2's converter) for the ctranslate2 backend. It is
keyed by what it serves (`*-de` with target routing, so en-de and fr-de share one; `en-de` with
lang_pair routing; `*-*` for a model served whole). Layers routed on the input (token, sentence)
cannot be pruned: such a checkpoint has no dense export, so it is served by the fairseq backend,
pruned where it can be and whole elsewhere. A checkpoint that taskmoe-prune already pruned is
served as it is: by CTranslate2 one export per pair it serves (when its layers were merged), else
by fairseq (layers pruned without merging have no dense export; the start-up log says so).

Cache: `CACHE/<checkpoint digest>/<backend>-<quantization>-<inputs digest>/`. The checkpoint
digest is of its content (sampled for files over 512 MB), the inputs digest of everything else
that goes into an artifact: the source of the code that writes artifacts (`ARTIFACT_CODE`; no
hand-bumped version), and for CTranslate2 the dictionaries in --data, the SentencePiece model's
bytes and CTranslate2's version. So a changed input is never served from a stale cache. In it,
`plan.json` (what each sub-network serves, its size and the sha256 of its artifact) and the
artifacts, written under a temporary name and renamed, so a reader sees a complete artifact or
none. Nothing in the plan is an absolute path: an artifact is found by its name in the cache
folder in use (a copied or moved cache works on its own), and a sub-network served as the
checkpoint itself (fairseq, nothing to build) is always the file given now. Files are deleted
only through `_remove`, which refuses anything outside the cache folder: the server never
deletes a file of the user's.

Start-up: the checkpoint digest is computed first (bytes only). What start-up needs of the
checkpoint (languages, trained pairs, routing kinds, a pruned checkpoint's served pairs and the
layers it cannot export, the weights' bytes, the max positions) is kept beside the variants in
`CACHE/<checkpoint digest>/facts.json`, written atomically by the start that read the checkpoint
and recording the full digest and the hash of the code that computes it (`FACTS_CODE`): a later
start with the same bytes reads it instead. So a warm start on CTranslate2 (facts.json, plan and
every artifact present) imports neither torch nor fairseq: it loads the CTranslate2 models, the
SentencePiece model and the dictionaries. The first start, a changed checkpoint, a missing,
corrupt or other code's facts.json (read again and rewritten), a build, or the fairseq backend
import torch (and fairseq where they read or run a model), when first needed; `torch_threads`
is set then.

Failures: an artifact that fails to load is rebuilt only when it is proven corrupt (missing, or
its sha256 differs from the plan's); any other failure (MemoryError, a file still being copied)
leaves it in place. Either way a failure is remembered on the sub-network with its reason: its
pairs answer 503 at once until a backoff (RETRY_FIRST seconds, doubling per failure up to
RETRY_MAX) has passed, then the next request tries again. The other pairs keep serving.

Memory: each sub-network is charged what it holds resident: CTranslate2's model.bin, or for
fairseq the bytes of the model's tensors (parameters and buffers; never the checkpoint file's
size, which includes the optimizer state). Loading one that would exceed `memory_budget` evicts
the least recently used sub-networks that no batch is using, and only when that makes it fit; a
pinned one (in use) is never freed, the loader waits (at most `load_timeout` seconds, or the
caller's timeout). An evicted engine is released outside the registry's lock, with no forced
garbage collection (its memory is freed by reference counting).
"""

import ctypes
import ctypes.util
import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

# torch-free imports only: torch and fairseq (pruning, checkpoint loading, the model's config)
# are imported where a checkpoint is read, so that a warm start on CTranslate2 loads neither
from ..atomic import write_atomically, write_text_atomically
from ..distributed.checkpoints import Found, checkpoint_files, find_checkpoint, load_any
# the one rule of what a pruned/exported model serves
from ..moe.pairs import TASK_ROUTING_KINDS, PruningError, served_pairs, serves
from .routes import ModelFacts

log = logging.getLogger("taskmoe.serve")
Pair = Tuple[str, str]
WHOLE = "*-*"
SAMPLED_ABOVE = 512 << 20  # files larger than this are hashed by sampling
# the modules whose code decides what an artifact holds: a change to any of them is a new cache
ARTIFACT_CODE = ("fairseq_taskmoe.deploy.pruning", "fairseq_taskmoe.deploy.export",
                 "fairseq_taskmoe.moe.experts", "fairseq_taskmoe.moe.routing",
                 "fairseq_taskmoe.moe.pairs", __name__)
# the modules whose code decides what facts.json holds (what start-up reads of a checkpoint)
FACTS_CODE = ("fairseq_taskmoe.deploy.pruning", "fairseq_taskmoe.integration.config",
              "fairseq_taskmoe.integration.compat", "fairseq_taskmoe.distributed.checkpoints",
              "fairseq_taskmoe.serve.routes", __name__)
RETRY_FIRST, RETRY_MAX = 2.0, 120.0  # seconds before a failed sub-network is tried again


class Unavailable(RuntimeError):
    """A sub-network that failed to build or load; the message names it and the reason."""


class CacheDirError(ValueError):
    """--cache-dir cannot be used (not creatable, not a folder, not writable); the message
    names it."""


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


@lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap():
    """Give the heap memory freed by an evicted sub-network back to the system. glibc keeps
    freed chunks in its arenas (one per thread that allocated; engines load in worker threads),
    so without this a process's RSS stays where the evicted engines left it and a memory budget
    holds in name only: measured on LoHelp's 15 sub-networks under a quarter of their bytes,
    RSS after warm-up 611 MB without, about 500 with (budget plus base: 442 MB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _hash_file(h, path: str, sampled: bool):
    """Feed `path` to hash `h`: every byte, or (sampled, files over SAMPLED_ABOVE) its size,
    mtime and 64 evenly spaced 64 KB samples."""
    st = os.stat(path)
    h.update(f"{os.path.basename(path)}:{st.st_size}".encode())
    with open(path, "rb") as f:
        if not sampled or st.st_size <= SAMPLED_ABOVE:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(str(st.st_mtime_ns).encode())
            for i in range(64):
                f.seek(i * (st.st_size - (64 << 10)) // 63)
                h.update(f.read(64 << 10))


def checkpoint_digest(found: Found) -> str:
    """sha256 over the checkpoint's file(s): every byte, or for a file over SAMPLED_ABOVE its
    size, mtime and 64 evenly spaced 64 KB samples (hashing GBs at every start-up is slow)."""
    h = hashlib.sha256()
    for path in checkpoint_files(found):
        _hash_file(h, path, sampled=True)
    return h.hexdigest()


def artifact_checksum(path: str) -> str:
    """sha256 of an artifact, every byte: a file, or a folder's files (by relative path)."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        _hash_file(h, path, sampled=False)
        return h.hexdigest()
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            h.update(os.path.relpath(full, path).encode())
            _hash_file(h, full, sampled=False)
    return h.hexdigest()


@lru_cache(maxsize=None)
def code_version(modules: Sequence[str] = ARTIFACT_CODE) -> str:
    """sha256 of the source files of `modules`: what replaces a hand-bumped artifact version.
    The files are found without importing the modules (those of ARTIFACT_CODE import torch)."""
    import importlib.util

    h = hashlib.sha256()
    for name in modules:
        path = importlib.util.find_spec(name).origin
        h.update(name.encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _files_digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        _hash_file(h, path, sampled=False)
    return h.hexdigest()


def model_bytes(model_state: dict) -> int:
    """Bytes of a model state dict's tensors (parameters and buffers), each stored tensor once
    (tied embeddings appear under several keys): what the loaded model holds."""
    import torch

    seen = {}
    for value in model_state.values():
        if isinstance(value, torch.Tensor):
            seen[(value.data_ptr(), tuple(value.shape), value.dtype)] = (
                value.numel() * value.element_size())
    return sum(seen.values())


def _tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def _unexportable_layers(args) -> List[str]:
    """The MoE layers of a pruned checkpoint that have no one dense FFN per pair (pruned
    without merging, or kept whole): export.extract_dense refuses them."""
    from ..integration.config import MoEConfig

    moe = MoEConfig.from_namespace(args)
    layout = moe.pruned_layout()
    layers = layout.get("layers", {})
    out = []
    for side in ("encoder", "decoder"):
        for index in range(getattr(args, f"{side}_layers")):
            name = f"{side}.layers.{index}"
            if not moe.is_moe_layer(index):
                continue
            info = layers.get(name)
            if (info is None or not info.get("merged", layout.get("merged", True))
                    or info.get("slots") != 1):
                out.append(name)
    return out


PLANNED = ("key", "served", "build_pair", "backend", "bytes", "disk_bytes", "params", "layers",
           "whole", "checksum")  # what plan.json keeps of a Subnetwork


@dataclass
class Subnetwork:
    """One buildable, loadable sub-network. key: what it serves (`*-de`, `en-de`, `*-*`);
    build_pair: the pair it was pruned for; bytes: memory it is charged (what it holds
    resident); layers: per MoE layer, what it keeps (the prune report); whole: nothing pruned
    by the server (the checkpoint as it is, maybe exported); checksum: sha256 of the artifact
    as built ("" for the checkpoint itself). Not in the plan: path (the artifact in the cache
    in use, or the checkpoint given now), the last failure and when to try again."""

    key: str
    served: List[str]
    build_pair: Pair
    backend: str
    bytes: int = 0
    disk_bytes: int = 0
    params: int = 0
    layers: List[dict] = field(default_factory=list)
    whole: bool = False
    checksum: str = ""
    path: str = ""
    error: Optional[str] = None
    failures: int = 0
    retry_at: float = 0.0  # time.monotonic() after which a failed sub-network is tried again


class _Loaded:
    def __init__(self, engine, cost: int):
        self.engine, self.cost, self.pins = engine, cost, 0


class Registry:
    """Sub-networks of one checkpoint for one backend and quantization.

    load_timeout: how long `use` waits for room under the memory budget when the caller gives
    no timeout (seconds). torch_threads: torch's threads, set the first time this registry
    imports torch (taskmoe-serve: --threads; None leaves them as they are)."""

    def __init__(self, checkpoint: str, data: str, spm_model: Optional[str],
                 backend: str = "ctranslate2", quantization: Optional[str] = "int8",
                 cache_dir: str = "work/serve-cache", memory_budget: Optional[int] = None,
                 threads: int = 1, metrics=None, load_timeout: float = 60.0,
                 torch_threads: Optional[int] = None):
        found = find_checkpoint(checkpoint)
        if found is None:
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist (neither a file nor "
                                    "a sharded checkpoint prefix)")
        self.found, self.checkpoint = found, checkpoint
        self.data, self.spm_model = data, spm_model
        self.threads, self.metrics = threads, metrics
        self.memory_budget, self.load_timeout = memory_budget, load_timeout
        self.torch_threads, self._torch_set = torch_threads, False
        self.digest = checkpoint_digest(found)  # bytes only: no torch
        self.cache_dir = os.path.abspath(cache_dir)
        self.root = os.path.join(self.cache_dir, self.digest[:24])  # this checkpoint's folder
        # facts, full_bytes, max_source/target_positions, unexportable_layers
        self._unsaved_facts = self._know_checkpoint()
        self.backend, self.backend_note = self._choose_backend(backend)
        if self.backend == "fairseq":
            self._before_torch()  # here, in the main thread: the engines run on torch
        self.quantization = quantization if self.backend == "ctranslate2" else None
        self.inputs = self._artifact_inputs()
        inputs = hashlib.sha256(json.dumps(self.inputs, sort_keys=True).encode()).hexdigest()
        variant = f"{self.backend}-{self.quantization or 'float32'}-{inputs[:16]}"
        self.cache = os.path.join(self.root, variant)
        self.full_params: Optional[int] = None
        self.subnets: Dict[str, Subnetwork] = {}
        self.pair_to_key: Dict[Pair, str] = {}
        self._state = None  # the full checkpoint, only while building
        self._cond = threading.Condition()
        self._build_lock = threading.Lock()
        self._loaded: Dict[str, _Loaded] = {}  # LRU order: first = least recently used
        self._loading: set = set()
        self._reserved = 0
        self.loads = self.evictions = 0

    # --- what start-up knows of the checkpoint: facts.json, else the checkpoint ----------------

    def _before_torch(self):
        """Called before this registry uses torch (reading the checkpoint, building, the
        fairseq backend): sets torch's threads to torch_threads, once."""
        if self.torch_threads and not self._torch_set:
            import torch

            torch.set_num_threads(self.torch_threads)  # explicit: Ray sets 1
            self._torch_set = True

    def _facts_file(self) -> str:
        return os.path.join(self.root, "facts.json")

    def _know_checkpoint(self) -> Optional[dict]:
        """Set what start-up needs of the checkpoint (_apply_facts) from facts.json when it was
        written for these bytes (digest) by this code (FACTS_CODE); else from the checkpoint
        itself, and return that record for prepare() to write (None when read from the file)."""
        path = self._facts_file()
        try:
            with open(path) as f:
                record = json.load(f)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            if (record.get("checkpoint_digest"), record.get("code")) == (
                    self.digest, code_version(FACTS_CODE)):
                self._apply_facts(record)
                return None
            log.info("%s was written by another version of the server: reading the checkpoint",
                     path)
        except (FileNotFoundError, NotADirectoryError):  # the first start (or no cache yet)
            pass
        except PermissionError as err:  # the cache folder's check names the fix (below)
            log.warning("%s cannot be read (%s): reading the checkpoint", path, err.strerror)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("%s cannot be used (%s: %s): reading the checkpoint and rewriting it",
                        path, type(err).__name__, err)
        record = self._checkpoint_facts()
        self._apply_facts(record)
        return record

    def _checkpoint_facts(self) -> dict:
        """facts.json's record, read from the checkpoint (its header, tensors mapped, not read;
        the rank files of a sharded one for their bytes): torch and fairseq are imported."""
        self._before_torch()
        from ..deploy.pruning import model_args, trained_pairs
        from ..integration.compat import load_checkpoint

        log.info("reading %s (its languages, routing, size)", self.checkpoint)
        header = load_checkpoint(self.found.path, mmap=True)  # tensors stay on disk (mapped)
        args = model_args(header)
        facts = ModelFacts.from_checkpoint(args, trained_pairs(header))
        # the model weights' bytes (not the files': those hold the optimizer state too)
        full_bytes = model_bytes(header["model"]) + sum(
            model_bytes(load_checkpoint(path, mmap=True).get("model", {}))
            for path in checkpoint_files(self.found)[1:])
        return {"checkpoint_digest": self.digest, "code": code_version(FACTS_CODE),
                "facts": facts.as_json(), "full_bytes": full_bytes,
                "max_source_positions": int(getattr(args, "max_source_positions", 1024) or 1024),
                "max_target_positions": int(getattr(args, "max_target_positions", 1024) or 1024),
                # only a pruned checkpoint's are asked (_choose_backend)
                "unexportable_layers": (_unexportable_layers(args) if facts.served is not None
                                        else [])}

    def _apply_facts(self, record: dict):
        """The record's values on self; KeyError, TypeError or ValueError when malformed."""
        layers = record["unexportable_layers"]
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise TypeError("unexportable_layers must be a list of layer names")
        numbers = [record[k] for k in ("full_bytes", "max_source_positions",
                                       "max_target_positions")]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise TypeError("full_bytes and the max positions must be whole numbers")
        self.facts = ModelFacts.from_json(record["facts"])
        self.full_bytes, self.max_source_positions, self.max_target_positions = numbers
        self.unexportable_layers: List[str] = layers

    def _save_facts(self):
        """Write facts.json (atomically) when start-up read the checkpoint: the next start
        with these bytes reads it instead."""
        if self._unsaved_facts is not None:
            write_text_atomically(self._facts_file(), json.dumps(self._unsaved_facts, indent=1))
            self._unsaved_facts = None

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
        if self.facts.served is not None:
            unmerged = self.unexportable_layers
            if unmerged:
                pairs = ",".join(self.facts.served)
                return "fairseq", (
                    f"fairseq backend: this checkpoint was pruned for {pairs} without one merged "
                    f"FFN per pair in MoE layer(s) {', '.join(unmerged)} (taskmoe-prune "
                    "--no-merge, or pairs sharing experts), so it has no CTranslate2 export. For "
                    "CTranslate2 serve the full checkpoint (pruned and exported per pair here), "
                    "or prune one pair: taskmoe-prune FULL_CHECKPOINT --lang-pair SRC-TGT")
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            return "fairseq", "fairseq backend: CTranslate2 is not installed"
        return "ctranslate2", "ctranslate2 backend"

    def _artifact_inputs(self) -> dict:
        """Everything besides the checkpoint that goes into an artifact (the cache key)."""
        inputs = {"backend": self.backend, "quantization": self.quantization,
                  "code": code_version()}
        if self.backend == "ctranslate2":
            import ctranslate2

            dicts = sorted(os.path.join(self.data, name) for name in os.listdir(self.data)
                           if name.startswith("dict.") and name.endswith(".txt"))
            inputs.update(ctranslate2=ctranslate2.__version__,
                          dictionaries=_files_digest(dicts),
                          spm_model=_files_digest([self.spm_model]) if self.spm_model else None)
        return inputs

    def _plan_file(self) -> str:
        return os.path.join(self.cache, "plan.json")

    def _full_state(self) -> dict:
        if self._state is None:
            self._before_torch()
            log.info("reading %s", self.checkpoint)
            self._state = load_any(self.checkpoint)
        return self._state

    def _make_cache(self):
        """The cache folder, created if missing; CacheDirError naming --cache-dir otherwise."""
        try:
            os.makedirs(self.cache, exist_ok=True)
            tempfile.TemporaryFile(dir=self.cache).close()
        except OSError as err:
            where = f" ({err.filename})" if err.filename else ""
            raise CacheDirError(
                f"--cache-dir {self.cache_dir} cannot be used: {err.strerror or err}{where}; "
                "give a folder this user can write to (a missing one is created)") from err

    def _read_plan(self) -> dict:
        if os.path.isfile(self._plan_file()):
            try:
                with open(self._plan_file()) as f:
                    return json.load(f)
            except (OSError, ValueError):
                pass
        return {}

    def prepare(self, legs: List[Pair]):
        """Plan and build (or find in the cache) the sub-network of every pair in `legs`."""
        self._make_cache()
        self._save_facts()
        plan = self._read_plan()
        for key, meta in plan.get("subnetworks", {}).items():
            sub = Subnetwork(**{name: meta[name] for name in PLANNED if name in meta})
            sub.build_pair = tuple(sub.build_pair)
            sub.path = self._path_of(sub)
            self.subnets[key] = sub
        self.full_params = plan.get("full_params")
        for pair in legs:
            key = plan.get("pairs", {}).get("-".join(pair))
            if key is None:
                key = next((k for k, s in self.subnets.items() if serves(s.served, *pair)), None)
            if key is None or key not in self.subnets:
                key = self._plan_pair(pair)
            self.pair_to_key[pair] = key
        for key in sorted({self.pair_to_key[p] for p in legs}):
            sub = self.subnets[key]
            if self._needs_build(sub):
                try:
                    self._build(sub)
                except Exception as err:  # a failed build fails that sub-network only
                    self._failed(sub, f"{type(err).__name__}: {err}")
                    log.error("sub-network %s failed to build: %s", sub.key, sub.error)
        self._save_plan()
        self._state = None  # the full checkpoint is no longer needed
        gc.collect()  # start-up, nothing served yet: free the full checkpoint now
        self._check_budget()

    def _save_plan(self):
        subs = {k: {name: getattr(s, name) for name in PLANNED} for k, s in self.subnets.items()}
        plan = {"checkpoint_digest": self.digest, "inputs": self.inputs,
                "full_params": self.full_params, "subnetworks": subs,
                "pairs": {"-".join(p): k for p, k in self.pair_to_key.items()}}
        write_text_atomically(self._plan_file(), json.dumps(plan, indent=1))

    def _plan_pair(self, pair: Pair) -> str:
        """Prune for `pair` (no model built) to learn what the sub-network serves."""
        from ..deploy.pruning import count_parameters, prune_checkpoint

        state = self._full_state()
        self.full_params = count_parameters(state["model"])
        if self.facts.served is not None:  # an already pruned checkpoint: served as it is
            served = list(self.facts.served)
            if self.backend == "ctranslate2":  # one export per pair (_choose_backend: merged)
                served = served_pairs(self.facts.kinds, [pair])
            return self._add(Subnetwork(",".join(served), served, pair, self.backend,
                                        params=self.full_params, whole=True))
        try:
            _, report = prune_checkpoint(state, "-".join(pair), merge=True)
        except PruningError as err:
            if "nothing to prune" not in str(err):
                raise
            return self._add(Subnetwork(WHOLE, [WHOLE], pair, self.backend,
                                        params=self.full_params, whole=True))
        return self._add(Subnetwork(",".join(report.served_pairs), list(report.served_pairs),
                                    pair, self.backend, params=report.params_after,
                                    layers=_layers_json(report)))

    def _add(self, sub: Subnetwork) -> str:
        if sub.key not in self.subnets:
            sub.path = self._path_of(sub)
            self.subnets[sub.key] = sub
        return sub.key

    def _is_checkpoint(self, sub: Subnetwork) -> bool:
        """Served by fairseq from the checkpoint file itself: nothing to build or delete."""
        return sub.whole and self.backend == "fairseq" and not self.found.sharded

    def _path_of(self, sub: Subnetwork) -> str:
        """Where the sub-network is read from: the checkpoint given now, or its artifact in the
        cache folder in use (never a path recorded by another run)."""
        if self._is_checkpoint(sub):
            return os.path.abspath(self.found.path)
        name = sub.key.replace("*", "all").replace(",", "+")
        return os.path.join(self.cache, name + (".pt" if self.backend == "fairseq" else ".ct2"))

    def _needs_build(self, sub: Subnetwork) -> bool:
        if self._is_checkpoint(sub):
            return not sub.bytes  # only measured
        return not sub.checksum or not os.path.exists(sub.path)

    def _build(self, sub: Subnetwork):
        """Write the artifact under a temporary name, then rename (atomic); measure it and
        record its checksum. Raises what the build raises."""
        t0 = time.time()
        sub.checksum = ""
        if self._is_checkpoint(sub):  # served as it is: nothing to build
            from ..integration.compat import load_checkpoint

            sub.bytes = model_bytes(load_checkpoint(sub.path, mmap=True)["model"])
        else:
            sub.bytes = self._write_artifact(sub)
            sub.checksum = artifact_checksum(sub.path)
        sub.disk_bytes = _tree_bytes(sub.path)
        sub.error, sub.failures = None, 0
        log.info("built sub-network %s (%s) in %.1f s: %s", sub.key, self.backend,
                 time.time() - t0, sub.path)

    def _write_artifact(self, sub: Subnetwork) -> int:
        """Write sub.path; returns the bytes the loaded sub-network holds."""
        from ..deploy.pruning import prune_checkpoint

        state = self._full_state()
        pair = "-".join(sub.build_pair)
        pruned = state if sub.whole else prune_checkpoint(state, pair, merge=True)[0]
        if self.backend == "fairseq":
            write_atomically(pruned, sub.path)
            return model_bytes(pruned["model"])
        from ..deploy.export import extract_dense, write_ctranslate2

        # replaces an existing sub.path atomically
        write_ctranslate2(extract_dense(pruned, pair), sub.path, data=self.data,
                          quantization=self.quantization, spm_model=self.spm_model,
                          source=os.path.abspath(self.checkpoint))
        return os.path.getsize(os.path.join(sub.path, "model.bin"))

    def _remove(self, path: str):
        """Delete an artifact: the one way this server deletes anything. Refuses whatever is
        not inside the cache folder (a checkpoint, another cache, a link out of it)."""
        real, cache = os.path.realpath(path), os.path.realpath(self.cache)
        if real == cache or os.path.commonpath([real, cache]) != cache:
            raise RuntimeError(f"refusing to delete {path}: it is not inside the cache folder "
                               f"{self.cache}")
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

    def _corrupt(self, sub: Subnetwork) -> Optional[str]:
        """Why sub's artifact is proven corrupt (missing, or not the bytes that were built), or
        None: intact, or the checkpoint itself (never rebuilt, never deleted)."""
        if self._is_checkpoint(sub):
            return None
        if not os.path.exists(sub.path):
            return "missing"
        if not sub.checksum:
            return "not recorded in the plan"
        if artifact_checksum(sub.path) != sub.checksum:
            return "corrupt (its sha256 differs from the one recorded when it was built)"
        return None

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

    def call_shape(self, key: str) -> Tuple[int, int]:
        """(calls one engine runs at once, threads each): CTranslate2 runs `threads` calls of
        one thread (inter_threads); fairseq one call on torch's `threads` threads. The
        batcher's budget of `threads` engine threads bounds all sub-networks together."""
        if self.backend == "ctranslate2":
            return self.threads, 1
        return 1, self.threads

    def _make_engine(self, sub: Subnetwork):
        from .engines import CT2Engine, FairseqEngine

        if self.backend == "ctranslate2":
            return CT2Engine(sub.path, calls=self.call_shape(sub.key)[0],
                             max_source_positions=self.max_source_positions,
                             max_target_positions=self.max_target_positions)
        return FairseqEngine(sub.path, self.data, self.spm_model, sub.build_pair)

    def _load(self, sub: Subnetwork):
        """Load; if that fails and the artifact is proven corrupt (`_corrupt`), rebuild it once
        and load again. Any other failure leaves the artifact as it is. Raises Unavailable with
        the reason (without the sub-network's name: `_load_or_remember` adds it)."""
        t0 = time.time()
        try:
            engine = self._make_engine(sub)
        except Exception as first:
            with self._build_lock:  # one build at a time; other pairs keep serving
                corrupt = self._corrupt(sub)
                if corrupt is None:
                    what = "the checkpoint" if self._is_checkpoint(sub) else "its artifact"
                    raise Unavailable(f"did not load from {what} {sub.path} "
                                      f"({type(first).__name__}: {first})") from first
                log.warning("sub-network %s failed to load from %s (%s: %s) and its artifact "
                            "is %s: rebuilding it", sub.key, sub.path, type(first).__name__,
                            first, corrupt)
                try:
                    self._remove(sub.path)
                    self._build(sub)
                except Exception as err:
                    raise Unavailable(f"its artifact was {corrupt} and rebuilding it failed: "
                                      f"{type(err).__name__}: {err}") from err
                finally:
                    self._state = None  # the full checkpoint read to rebuild it
                self._save_plan()
            try:
                engine = self._make_engine(sub)
            except Exception as second:
                raise Unavailable(f"does not load after a rebuild: {type(second).__name__}: "
                                  f"{second}") from second
        seconds = time.time() - t0
        self.loads += 1
        if self.metrics:
            self.metrics.loads.labels(sub.key).inc()
            self.metrics.load_seconds.observe(seconds)
        log.info("loaded sub-network %s in %.2f s (%s)", sub.key, seconds, human(sub.bytes))
        return engine

    def _failed(self, sub: Subnetwork, why: str):
        """Remember a failure: answered at once until the backoff has passed."""
        sub.failures += 1
        sub.error = why
        sub.retry_at = time.monotonic() + min(RETRY_MAX, RETRY_FIRST * 2 ** (sub.failures - 1))

    def _check_failed(self, sub: Subnetwork):
        """Unavailable while a failure is remembered and its backoff has not passed."""
        if sub.error is not None:
            left = sub.retry_at - time.monotonic()
            if left > 0:
                raise Unavailable(f"sub-network {sub.key}: {sub.error} (tried again in "
                                  f"{left:.1f} s)")

    def _used(self) -> int:
        return sum(e.cost for e in self._loaded.values()) + self._reserved

    def _evict_for(self, need: int, dropped: list) -> bool:
        """Under the lock: evict unpinned LRU sub-networks until `need` more bytes fit, into
        `dropped` (released by the caller outside the lock). False, evicting nothing, if even
        evicting every unpinned one would not make it fit."""
        if not self.memory_budget:
            return True
        free = self.memory_budget - self._used()
        if free >= need:
            return True
        unpinned = [k for k, e in self._loaded.items() if e.pins == 0]  # LRU first
        if free + sum(self._loaded[k].cost for k in unpinned) < need:
            return False
        for victim in unpinned:
            if free >= need:
                break
            entry = self._loaded.pop(victim)
            free += entry.cost
            dropped.append(entry)
            self._count_eviction(victim, f"memory budget {human(self.memory_budget)}")
        self._update_gauges()
        return True

    def _count_eviction(self, key: str, why: str):
        self.evictions += 1
        if self.metrics:
            self.metrics.evictions.labels(key).inc()
        log.info("evicted sub-network %s (%s)", key, why)

    def _load_or_remember(self, sub: Subnetwork):
        """_load; a failure is remembered on the sub-network (requests for it answer Unavailable
        at once until its backoff has passed) and raised as Unavailable."""
        try:
            engine = self._load(sub)
        except Exception as err:
            self._failed(sub, str(err) if isinstance(err, Unavailable)
                         else f"{type(err).__name__}: {err}")
            log.error("sub-network %s: %s", sub.key, sub.error)
            raise Unavailable(f"sub-network {sub.key}: {sub.error}") from err
        sub.error, sub.failures = None, 0
        return engine

    def held(self, key: str):
        """The engine of sub-network `key`, loaded for an owner that decides how long it
        stays (Ray Serve's multiplexer, which evicts by its own LRU): counted as loaded, outside
        the memory budget, until `dropped(key)`."""
        sub = self.subnets[key]
        self._check_failed(sub)
        engine = self._load_or_remember(sub)
        with self._cond:
            self._loaded[key] = _Loaded(engine, sub.bytes)
            self._update_gauges()
        return engine

    def dropped(self, key: str, why: str):
        """The owner of a `held` engine let it go."""
        with self._cond:
            entry = self._loaded.pop(key, None)
            if entry is not None:
                self._count_eviction(key, why)
                self._update_gauges()
        if entry is not None:
            del entry  # released outside the lock
            trim_heap()

    def _update_gauges(self):
        if self.metrics:
            self.metrics.loaded.set(len(self._loaded))
            self.metrics.loaded_bytes.set(sum(e.cost for e in self._loaded.values()))

    @contextmanager
    def use(self, key: str, timeout: Optional[float] = None):
        """The loaded engine of sub-network `key`, pinned (never evicted) inside the block.
        timeout: how long to wait for room under the memory budget (default load_timeout)."""
        sub = self.subnets[key]
        timeout = self.load_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        dropped: list = []  # evicted engines: released after the lock, never under it
        with self._cond:
            while True:
                self._check_failed(sub)
                entry = self._loaded.get(key)
                if entry is not None:
                    entry.pins += 1
                    self._loaded[key] = self._loaded.pop(key)  # most recently used
                    break
                if key not in self._loading and self._evict_for(sub.bytes, dropped):
                    self._loading.add(key)
                    self._reserved += sub.bytes
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"sub-network {key}: no room to load it within "
                                      f"{timeout:g} s under the memory budget")
                self._cond.wait(timeout=left)
        if dropped:
            dropped.clear()
            trim_heap()
        if entry is None:  # this thread loads it, outside the lock
            try:
                engine = self._load_or_remember(sub)
            except Unavailable:
                with self._cond:
                    self._loading.discard(key)
                    self._reserved -= sub.bytes
                    self._update_gauges()
                    self._cond.notify_all()
                raise
            with self._cond:
                self._loading.discard(key)
                self._reserved -= sub.bytes
                entry = self._loaded[key] = _Loaded(engine, sub.bytes)
                entry.pins += 1
                self._update_gauges()
                self._cond.notify_all()
            del engine
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
