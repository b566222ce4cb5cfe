"""Per-rank expert checkpoints (the layout of fairseq's moe/nllb branches), consolidation and
re-sharding. Plain torch: checkpoint dicts in, checkpoint dicts out; no model is built.

One save of a W-rank run with prefix P (e.g. `checkpoints/checkpoint_last`) is W + 1 files:

    P-rank-{r}.pt  written by rank r: {"model": its experts' parameters only,
                   "last_optimizer_state": {"state": optimizer state of those, by name},
                   "sharding": {"rank", "world_size", "save_id", "shared_digest"}}
    P-shared.pt    written by rank 0: the fairseq checkpoint without expert parameters (cfg,
                   extra_state, optimizer history, ...), the shared parameters' optimizer state
                   by name, and "sharding": {"world_size", "save_id", "param_names" (the
                   single-process model's parameter order), "expert_keys" (all of them)}

Expert keys carry global indices (`...ffn.experts.experts.{e}.fc1.weight`), so the union of the
rank files' models is the single-process model and re-sharding is a key filter. Optimizer state is
stored by parameter name because torch numbers it by position in the model's parameter list,
which depends on the world size; `param_names` turns it back into positions for any world size.
`save_id` (one per save, the same on all ranks) rejects a rank file from another run or save;
`shared_digest` (a hash of the shared parameters each rank holds) rejects ranks that diverged.

torch and the checkpoint loader (integration/compat.py) are imported where a file is read or a
tensor hashed, not with the module: finding a checkpoint's files (`find_checkpoint`,
`checkpoint_files`, `Found`) loads neither, which is what taskmoe-serve does on a warm cache.
"""

import glob
import hashlib
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Set

from ..atomic import atomic_file

if TYPE_CHECKING:
    import torch

RANK_FILE = re.compile(r"^(?P<prefix>.*)-rank-(?P<rank>\d+)\.pt$")


class CheckpointError(ValueError):
    """A sharded checkpoint that cannot be read as asked; the message names the file."""


def rank_path(prefix: str, rank: int) -> str:
    return f"{prefix}-rank-{rank}.pt"


def shared_path(prefix: str) -> str:
    return f"{prefix}-shared.pt"


def checkpoint_prefix(path: str) -> str:
    """`P.pt`, `P-shared.pt`, `P-rank-3.pt` or `P` -> `P`; also the names fairseq makes of a
    --restore-file given as one of the files (`P-shared-rank-1.pt`, `P-rank-0-rank-1.pt`)."""
    match = RANK_FILE.match(path)
    if match:
        path = match.group("prefix")
    elif path.endswith(".pt"):
        path = path[: -len(".pt")]
    return re.sub(r"(-shared|-rank-\d+)$", "", path)


@dataclass(frozen=True)
class Found:
    """What a checkpoint path or prefix points to: `sharded` (P-shared.pt + rank files) or an
    ordinary single file (`path`)."""

    prefix: str
    sharded: bool

    @property
    def path(self) -> str:  # a file that exists
        return shared_path(self.prefix) if self.sharded else f"{self.prefix}.pt"


def find_checkpoint(path: str) -> Optional[Found]:
    """The checkpoint behind `path` (any of the forms checkpoint_prefix accepts), or None.

    Saving removes the other layout under the same name (other_layout_files), so both exist
    only in a folder written before that, or assembled by hand. Then the one further in
    training wins: fairseq's update count, recorded in both (the ordinary file on a tie, and a
    readable one over an unreadable one). Never the files' modification times: `cp -r` and
    rsync rewrite them, which would silently swap an older checkpoint in."""
    prefix = checkpoint_prefix(path)
    full, shared = f"{prefix}.pt", shared_path(prefix)
    if os.path.isfile(full) and os.path.isfile(shared):
        updates = {name: _updates_or_none(name) for name in (full, shared)}
        sharded = (updates[shared] is not None and
                   (updates[full] is None or updates[shared] > updates[full]))
        return Found(prefix, sharded=sharded)
    if os.path.isfile(shared):
        return Found(prefix, sharded=True)
    if os.path.isfile(full):
        return Found(prefix, sharded=False)
    orphans = sorted(glob.glob(glob.escape(prefix) + "-rank-*.pt"))
    if orphans:
        raise CheckpointError(f"{shared} is missing: {orphans[0]} is one rank's experts only; "
                              "the shared file (written by rank 0) is needed too."
                              + restore_hint(prefix))
    return None


def training_updates(state: dict) -> int:
    """The number of updates fairseq's trainer recorded in a checkpoint (or its shared file);
    -1 when it recorded none (a pruned or hand-made checkpoint)."""
    history = state.get("optimizer_history") if isinstance(state, dict) else None
    if not history or not isinstance(history[-1], dict):
        return -1
    return int(history[-1].get("num_updates", -1))


def _updates_or_none(path: str) -> Optional[int]:
    try:
        return training_updates(_load(path, mmap=True))
    except CheckpointError:
        return None


def other_layout_files(prefix: str, world_size: int) -> List[str]:
    """Files under `prefix` that a save of it by `world_size` ranks did not write and that
    belong to an older save: with W > 1, the ordinary file and rank files W, W+1, ... (a run
    resumed on fewer ranks); with W = 1 (an ordinary file), the shared file and every rank
    file. The saving rank deletes them once all ranks have written, so a later load or
    taskmoe-consolidate never meets them."""
    stale = []
    for path in glob.glob(glob.escape(prefix) + "-rank-*.pt"):
        match = RANK_FILE.match(path)
        if match and match.group("prefix") == prefix and (
                world_size == 1 or int(match.group("rank")) >= world_size):
            stale.append(path)
    other = f"{prefix}.pt" if world_size > 1 else shared_path(prefix)
    if os.path.isfile(other):
        stale.append(other)
    return sorted(stale)


def restore_hint(prefix: str) -> str:
    """For an error about a broken checkpoint P: the complete checkpoints in P's folder (each
    checked as a load would check it), most trained first, to resume from instead."""
    folder = os.path.dirname(prefix) or "."
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.pt"))):
        if RANK_FILE.match(path) or checkpoint_prefix(path) == prefix:
            continue
        sharded = path.endswith("-shared.pt")
        try:
            state = (_read_sharded(checkpoint_prefix(path), wanted_experts=lambda key: False)
                     if sharded else _load(path, mmap=True))
        except CheckpointError:
            continue
        found.append((training_updates(state), f"{checkpoint_prefix(path)}.pt"
                      + (" (sharded)" if sharded else "")))
    if not found:
        return f" No other complete checkpoint is in {folder}."
    names = ", ".join(f"{name} ({updates} updates)" if updates >= 0 else name
                      for updates, name in sorted(found, key=lambda f: -f[0]))
    return (f" Complete checkpoints to resume from (--restore-file NAME.pt, whatever its "
            f"layout): {names}.")


# --- optimizer state: by position <-> by name -------------------------------------------------

def optimizer_state_by_name(state: dict, names: Sequence[str]) -> dict:
    """A torch optimizer state_dict whose parameters are numbered by position in `names` ->
    the same with parameter names (param_groups keep their hyper-parameters, not the list)."""
    groups = state["param_groups"]
    if len(groups) != 1 or list(groups[0]["params"]) != list(range(len(names))):
        raise CheckpointError(
            f"optimizer state with {len(groups)} parameter groups over "
            f"{sum(len(g['params']) for g in groups)} parameters does not match the model's "
            f"{len(names)} parameters in one group; pass --reset-optimizer")
    named = {k: v for k, v in state.items() if k not in ("state", "param_groups")}
    named["state"] = {names[i]: v for i, v in state["state"].items()}
    named["param_groups"] = [{k: v for k, v in groups[0].items() if k != "params"}]
    return named


def optimizer_state_by_index(named: dict, names: Sequence[str]) -> dict:
    """Inverse of optimizer_state_by_name for a model whose parameters are `names`.

    A parameter without state is normal: torch optimizers create a parameter's state at its
    first step with a gradient, and with task routing an expert that no task chose never gets
    one; torch's load_state_dict leaves such a parameter to start fresh, as it would have.
    What is refused is a state that cannot be numbered for this model: several parameter
    groups (this module names one group only)."""
    groups = named.get("param_groups")
    if not isinstance(groups, list) or len(groups) != 1:
        raise CheckpointError(
            f"the checkpoint's optimizer state has "
            f"{len(groups) if isinstance(groups, list) else 'no'} parameter groups, but a "
            "sharded checkpoint records one; pass --reset-optimizer")
    state = {k: v for k, v in named.items() if k not in ("state", "param_groups")}
    state["state"] = {i: named["state"][n] for i, n in enumerate(names) if n in named["state"]}
    state["param_groups"] = [dict(named["param_groups"][0], params=list(range(len(names))))]
    return state


# --- split (save) ---------------------------------------------------------------------------

def parameters_digest(model_state: Dict[str, "torch.Tensor"], keys: Iterable[str]) -> str:
    """A hash of the given tensors' bytes: equal on every rank iff their values are equal."""
    import torch

    h = hashlib.sha1()
    for key in sorted(keys):
        value = model_state[key]
        h.update(key.encode())
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        else:  # fairseq puts a few non-tensor entries in model state dicts
            h.update(repr(value).encode())
    return h.hexdigest()


def split_checkpoint(state: dict, local_names: Sequence[str], expert_keys: Set[str],
                     full_names: Sequence[str], all_expert_keys: Sequence[str], rank: int,
                     world_size: int, save_id: str):
    """One rank's fairseq checkpoint dict -> (rank file dict, shared file dict).

    local_names: this rank's trainable parameters in optimizer order; expert_keys: the ones that
    are this rank's experts; full_names: the single-process model's parameter order;
    all_expert_keys: every expert parameter of the model, on any rank.
    """
    model = state["model"]
    shared_keys = [k for k in model if k not in expert_keys]
    meta = {"rank": rank, "world_size": world_size, "save_id": save_id,
            "shared_digest": parameters_digest(model, shared_keys)}
    optim = state.get("last_optimizer_state")
    named = optimizer_state_by_name(optim, local_names) if optim is not None else None
    rank_part = {
        "model": {k: model[k] for k in model if k in expert_keys},
        "last_optimizer_state": None if named is None else
        {"state": {n: s for n, s in named["state"].items() if n in expert_keys}},
        "sharding": meta,
    }
    shared = {k: v for k, v in state.items() if k not in ("model", "last_optimizer_state")}
    shared["model"] = {k: model[k] for k in shared_keys}
    if named is not None:
        shared["last_optimizer_state"] = dict(
            named, state={n: s for n, s in named["state"].items() if n not in expert_keys})
    shared["sharding"] = {"world_size": world_size, "save_id": save_id,
                          "shared_digest": meta["shared_digest"],
                          "param_names": list(full_names),
                          "expert_keys": list(all_expert_keys)}
    return rank_part, shared


# --- read and merge (load, consolidate) -------------------------------------------------------

def _load(path: str, mmap: bool = False) -> dict:
    from ..integration.compat import load_checkpoint

    try:
        return load_checkpoint(path, mmap=mmap)  # weights only, fairseq's types allowed
    except Exception as err:  # truncated zip, not a pickle, ...
        raise CheckpointError(f"cannot read {path} ({type(err).__name__}: {err})") from err


def read_sharded(prefix: str, wanted_experts=None, shared_state: Optional[dict] = None) -> dict:
    """Check and merge P-shared.pt and every P-rank-{r}.pt into one checkpoint dict whose
    optimizer state is by name. wanted_experts(key) -> bool keeps only some expert parameters
    (re-sharding); every rank file is still checked. shared_state: P-shared.pt already loaded.
    Raises CheckpointError naming the file and the complete checkpoints to restore from (a
    crash in the middle of a save leaves a set that is not one save)."""
    try:
        return _read_sharded(prefix, wanted_experts, shared_state)
    except CheckpointError as err:
        raise CheckpointError(f"{err}.{restore_hint(prefix)}") from err


def _is_stale_rank_file(path: str, save_id: str) -> bool:
    """A rank file beyond the shared file's world size that another save wrote (a run
    resumed on fewer ranks in the same folder): never part of this checkpoint, so ignored.
    One that claims this save (a copied file) is an error instead."""
    try:
        part = _load(path, mmap=True)
    except CheckpointError:
        return True
    meta = part.get("sharding") if isinstance(part, dict) else None
    return not isinstance(meta, dict) or meta.get("save_id") != save_id


def _read_sharded(prefix: str, wanted_experts=None, shared_state: Optional[dict] = None) -> dict:
    shared_file = shared_path(prefix)
    if shared_state is None and not os.path.isfile(shared_file):
        raise CheckpointError(f"{shared_file} does not exist (the shared part of a sharded "
                              "checkpoint, written by rank 0)")
    state = _load(shared_file) if shared_state is None else shared_state
    meta = state.get("sharding")
    if not isinstance(meta, dict) or "world_size" not in meta:
        raise CheckpointError(f"{shared_file} is not the shared part of a taskmoe sharded "
                              "checkpoint (no sharding record)")
    W = meta["world_size"]
    expected = [rank_path(prefix, r) for r in range(W)]
    present = sorted(glob.glob(glob.escape(prefix) + "-rank-*.pt"))
    extra = [p for p in present if p not in expected and RANK_FILE.match(p)
             and RANK_FILE.match(p).group("prefix") == prefix
             and not _is_stale_rank_file(p, meta["save_id"])]
    if extra:
        raise CheckpointError(f"{extra[0]} does not belong to {shared_file}, which was written "
                              f"by {W} ranks (rank files 0..{W - 1}); remove it")
    all_experts = set(meta["expert_keys"])
    model = dict(state["model"])
    named = state.get("last_optimizer_state")
    seen: Set[str] = set()
    for r, path in enumerate(expected):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: {shared_file} was written by {W} ranks "
                                  f"and needs {os.path.basename(rank_path(prefix, 0))} .. "
                                  f"{os.path.basename(rank_path(prefix, W - 1))}")
        part = _load(path, mmap=True)
        pmeta = part.get("sharding") if isinstance(part, dict) else None
        if not isinstance(pmeta, dict) or pmeta.get("rank") != r or pmeta.get("world_size") != W:
            raise CheckpointError(f"{path} is not rank {r} of a {W}-rank taskmoe checkpoint")
        if pmeta.get("save_id") != meta["save_id"]:
            raise CheckpointError(f"{path} comes from another run or save than {shared_file} "
                                  f"(save id {pmeta.get('save_id')} vs {meta['save_id']}): a "
                                  "sharded checkpoint's files must come from one save")
        if pmeta.get("shared_digest") != meta["shared_digest"]:
            raise CheckpointError(f"{path}: rank {r} held different shared parameters than "
                                  f"rank 0 when saving ({shared_file}); the ranks diverged")
        keys = set(part["model"])
        if not keys <= all_experts or keys & seen:
            bad = sorted((keys - all_experts) | (keys & seen))[0]
            raise CheckpointError(f"{path} holds {bad}, which is not an expert parameter of "
                                  f"{shared_file} or is also in another rank file")
        seen |= keys
        keep = {k for k in keys if wanted_experts is None or wanted_experts(k)}
        model.update({k: part["model"][k].clone() for k in keep})
        if named is not None:
            opt = part.get("last_optimizer_state")
            if opt is None:
                raise CheckpointError(f"{path} has no optimizer state but {shared_file} has")
            named["state"].update({n: s for n, s in opt["state"].items() if n in keep})
        del part
    if seen != all_experts:
        raise CheckpointError(f"the rank files of {prefix} lack {len(all_experts - seen)} "
                              f"expert parameters, e.g. {sorted(all_experts - seen)[0]}")
    state["model"] = model
    return state


def consolidate(prefix: str) -> dict:
    """Sharded checkpoint -> one ordinary fairseq checkpoint (single-process parameter order,
    optimizer state by position), which fairseq-generate and fairseq-train load on 1 process."""
    state = read_sharded(prefix)
    meta = state.pop("sharding")
    if state.get("last_optimizer_state") is not None:
        state["last_optimizer_state"] = optimizer_state_by_index(state["last_optimizer_state"],
                                                                 meta["param_names"])
    return state


def checkpoint_files(found: Found) -> List[str]:
    """The files of a checkpoint: its file, or the shared file and every rank file (sorted)."""
    if not found.sharded:
        return [found.path]
    return [found.path] + sorted(glob.glob(glob.escape(found.prefix) + "-rank-*.pt"))


def checkpoint_bytes(found: Found) -> int:
    """Size on disk of a checkpoint: its file, or all files of a sharded one."""
    return sum(os.path.getsize(f) for f in checkpoint_files(found))


def load_any(path: str) -> dict:
    """An ordinary checkpoint file, or a sharded one given by prefix or any of its files,
    consolidated. Raises CheckpointError when nothing is there."""
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"checkpoint {path} does not exist (neither a file nor a sharded "
                              f"checkpoint {shared_path(checkpoint_prefix(path))})")
    return consolidate(found.prefix) if found.sharded else _load(found.path)


def sharded_path_message(path: str) -> Optional[str]:
    """For a model path given to fairseq's inference tools (--path, the hub API), which read
    one file: when it names no file but a sharded checkpoint, the error that says so, with the
    command that makes one file of it; None otherwise (fairseq's own handling applies)."""
    if os.path.exists(path):
        return None
    try:
        found = find_checkpoint(path)
    except CheckpointError as err:  # rank files without the shared file
        return str(err)
    if found is None or not found.sharded:
        return None
    prefix = found.prefix
    output = f"{prefix}-consolidated.pt"
    return (f"{path} is a sharded checkpoint ({os.path.basename(shared_path(prefix))} and "
            f"{os.path.basename(prefix)}-rank-*.pt, written by fairseq-train with expert "
            "parallelism); fairseq's inference reads one model file. Consolidate it first:\n"
            f"  taskmoe-consolidate {shlex.quote(prefix)} --output {shlex.quote(output)}\n"
            f"then pass --path {shlex.quote(output)} (or make a small checkpoint for one pair "
            f"with taskmoe-prune {shlex.quote(prefix)} ...)")


def copy_atomically(src: str, dst: str):
    with open(src, "rb") as source, atomic_file(dst) as target:
        shutil.copyfileobj(source, target)


def full_parameter_order(names: Sequence[str], layers: Dict[str, int]) -> List[str]:
    """A sharded model's parameter names -> the single-process model's: in each sharded layer
    (`layers`: experts module name -> E), the local experts' block becomes experts 0..E-1, with
    the parameter names of the first local expert (all experts of a layer have the same)."""
    out: List[str] = []
    done = set()
    for name in names:
        layer = next((m for m in layers if name.startswith(m + ".experts.")), None)
        if layer is None:
            out.append(name)
            continue
        if layer in done:
            continue
        done.add(layer)
        first = name[len(layer) + len(".experts."):].split(".", 1)[0]
        suffixes = [n[len(f"{layer}.experts.{first}."):] for n in names
                    if n.startswith(f"{layer}.experts.{first}.")]
        out += [f"{layer}.experts.{e}.{s}" for e in range(layers[layer]) for s in suffixes]
    return out
