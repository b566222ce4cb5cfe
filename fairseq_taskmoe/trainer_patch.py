"""fairseq wiring for expert parallelism, installed on fairseq's Trainer by the plugin.

It changes nothing for a model without sharded experts (world size 1, `--moe-expert-parallel
off`, dense or pruned models). For a model with sharded experts (sharding.ShardedExpertFFNs):

- start-up checks: `--ddp-backend legacy_ddp` (the only fairseq backend that leaves parameters
  marked `expert` out of the gradient all-reduce), no BMUF or ZeRO optimizer sharding, and with
  `--fp16` unflattened fp32 parameters (`--fp16-no-flatten-grads`, or `--memory-efficient-fp16`)
  so that expert and shared parameters stay apart;
- expert gradients are scaled by 1/W: fairseq's legacy_ddp averages shared gradients over the W
  ranks and the trainer then multiplies every gradient by W / sample_size, while an expert's
  gradient is already the sum over all ranks' tokens (the all-to-all brought them to its rank).
  With the 1/W, every parameter gets the gradient of the same objective as with replicated
  experts: sum over the global batch / sample_size;
- `--moe-record-a2a-time`: logs `a2a_share` (all-to-all seconds / training-step seconds) and
  `a2a_ms` per step, as measured on rank 0;
- checkpoints: every rank writes its experts to `checkpoint_X-rank-{r}.pt`, rank 0 the rest to
  `checkpoint_X-shared.pt`; loading re-shards (checkpoints.py).
"""

import contextlib
import functools
import glob
import logging
import os
import time
import uuid

from fairseq import checkpoint_utils, metrics, utils
from fairseq.distributed import utils as distributed_utils
from fairseq.trainer import Trainer
from omegaconf import open_dict

from . import checkpoints as ckpt
from .atomic import write_atomically
from .sharding import sharded_layers

logger = logging.getLogger(__name__)


def expert_world_size(model) -> int:
    """W of a model's sharded experts; 1 when it has none."""
    layers = sharded_layers(model)
    return layers[0][1].shard.world_size if layers else 1


def _trainer_world_size(trainer) -> int:
    layers = getattr(trainer, "_taskmoe_layers", None)
    return layers[0][1].shard.world_size if layers else 1


def check_training_setup(cfg, world_size: int):
    """Refuse fairseq settings that would average, mix or flatten sharded expert parameters."""
    dist_cfg, common = cfg.distributed_training, cfg.common
    why = (f"with sharded experts (world size {world_size}, each rank holding its own experts; "
           "--moe-expert-parallel off replicates them instead)")
    if dist_cfg.ddp_backend != "legacy_ddp":
        raise ValueError(
            f"--ddp-backend {dist_cfg.ddp_backend} cannot train {why}: it would average expert "
            "gradients across ranks. Use --ddp-backend legacy_ddp.")
    if cfg.optimization.use_bmuf:
        raise ValueError(f"--use-bmuf is not supported {why}")
    if dist_cfg.zero_sharding != "none":
        raise ValueError(f"--zero-sharding {dist_cfg.zero_sharding} is not supported {why}")
    if getattr(getattr(cfg, "ema", None), "store_ema", False):
        raise ValueError(f"--store-ema is not supported {why}: the EMA copy would be saved "
                         "by rank 0 only, with rank 0's experts")
    if (common.fp16 or common.bf16) and not (common.memory_efficient_fp16
                                            or common.memory_efficient_bf16
                                            or common.fp16_no_flatten_grads):
        raise ValueError(
            f"--fp16/--bf16 flattens all fp32 parameters into one tensor, mixing experts with "
            f"shared parameters; {why} add --fp16-no-flatten-grads (or use "
            "--memory-efficient-fp16)")


def scale_expert_grads(model, world_size: int):
    """Register the 1/W gradient scale on every sharded expert parameter (module docstring)."""
    for _, layer in sharded_layers(model):
        for param in layer.parameters():
            param.register_hook(functools.partial(_scale, factor=1.0 / world_size))


def _scale(grad, factor):
    return grad * factor


def _patched_init(original):
    @functools.wraps(original)
    def __init__(self, cfg, task, model, criterion, *args, **kwargs):
        self._taskmoe_layers = sharded_layers(model)  # fixed for the trainer's life
        world_size = expert_world_size(model)
        if world_size > 1:
            check_training_setup(cfg, world_size)
            scale_expert_grads(model, world_size)
            logger.info(f"expert parallelism: {len(sharded_layers(model))} MoE layers, each "
                        f"rank holds 1/{world_size} of their experts")
        original(self, cfg, task, model, criterion, *args, **kwargs)
    return __init__


def _patched_train_step(original):
    @functools.wraps(original)
    def train_step(self, samples, *args, **kwargs):
        layers = self._taskmoe_layers
        record = layers and getattr(self.cfg.model, "moe_record_a2a_time", False)
        if not record:
            return original(self, samples, *args, **kwargs)
        for _, layer in layers:
            layer.timer.pop()  # drop what validation or a previous failure left
        start = time.perf_counter()
        out = original(self, samples, *args, **kwargs)
        step = time.perf_counter() - start
        a2a = sum(layer.timer.pop() for _, layer in layers)
        metrics.log_scalar("a2a_share", a2a / max(step, 1e-9), weight=1, priority=900, round=3)
        metrics.log_scalar("a2a_ms", 1000 * a2a, weight=1, priority=901, round=1)
        return out
    return train_step


# --- checkpoints ----------------------------------------------------------------------------

def _names(model):
    """Trainable parameter names in the order fairseq gives parameters to the optimizer."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _expert_layout(model):
    """(this rank's expert parameter names, single-process parameter order, all expert names)."""
    layers = {name: layer.shard.num_experts for name, layer in sharded_layers(model)}
    local = {n for n, p in model.named_parameters() if getattr(p, "expert", False)}
    full = ckpt.full_parameter_order(_names(model), layers)
    all_experts = [n for n in full if any(n.startswith(m + ".experts.") for m in layers)]
    return local, full, all_experts


def _patched_save_checkpoint(original):
    @functools.wraps(original)
    def save_checkpoint(self, filename, extra_state):
        model = self.get_model()
        if _trainer_world_size(self) == 1:
            return original(self, filename, extra_state)
        rank, world_size = self.data_parallel_rank, self.data_parallel_world_size
        state = utils.move_to_cpu(self.state_dict())
        state["extra_state"].update(extra_state)
        save_id = distributed_utils.broadcast_object(  # one id per save, the same on all ranks
            uuid.uuid4().hex if rank == 0 else None, src_rank=0,
            group=self.data_parallel_process_group, dist_device=self.device)
        local, full, all_experts = _expert_layout(model)
        rank_part, shared = ckpt.split_checkpoint(state, _names(model), local, full, all_experts,
                                                  rank, world_size, save_id)
        logger.info(f"Saving rank {rank}'s experts to {os.path.abspath(filename)}")
        write_atomically(rank_part, filename)
        if rank == 0:
            shared_file = ckpt.shared_path(ckpt.checkpoint_prefix(filename))
            logger.info(f"Saving shared parameters to {os.path.abspath(shared_file)}")
            write_atomically(shared, shared_file)
        return os.path.abspath(filename)
    return save_checkpoint


class _CopySharedToo:
    """fairseq's checkpoint_utils.PathManager while it saves a sharded checkpoint: when it copies
    rank 0's file to another name (checkpoint_best, checkpoint_last, ...), rank 0 copies the
    shared file along. Everything else is forwarded."""

    def __init__(self, path_manager):
        self._pm = path_manager

    def __getattr__(self, name):
        return getattr(self._pm, name)

    def copy(self, src, dst, overwrite=False):
        ok = self._pm.copy(src, dst, overwrite=overwrite)
        match = ckpt.RANK_FILE.match(src)
        if ok and match and match.group("rank") == "0":
            ckpt.copy_atomically(ckpt.shared_path(match.group("prefix")),
                                 ckpt.shared_path(ckpt.checkpoint_prefix(dst)))
        return ok


def _remove_orphan_shared_files(save_dir: str):
    """fairseq's --keep-* options delete old rank files; drop the shared files left alone."""
    for shared in glob.glob(os.path.join(glob.escape(save_dir), "*-shared.pt")):
        prefix = ckpt.checkpoint_prefix(shared)
        if not os.path.exists(ckpt.rank_path(prefix, 0)):
            os.remove(shared)


def _patched_checkpoint_utils_save(original):
    @functools.wraps(original)
    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        if _trainer_world_size(trainer) == 1:
            return original(cfg, trainer, epoch_itr, val_loss)
        path_manager = checkpoint_utils.PathManager
        checkpoint_utils.PathManager = _CopySharedToo(path_manager)
        try:
            saved = original(cfg, trainer, epoch_itr, val_loss)
        finally:
            checkpoint_utils.PathManager = path_manager
        if trainer.data_parallel_rank == 0 and not cfg.no_save:
            _remove_orphan_shared_files(cfg.save_dir)
        return saved
    # fairseq keeps the best score on the function object it calls, i.e. on this one now
    return save_checkpoint


@contextlib.contextmanager
def _temporarily(obj, name, value):
    old = getattr(obj, name)
    with open_dict(obj) if hasattr(obj, "_get_node") else contextlib.nullcontext():
        setattr(obj, name, value)
    try:
        yield
    finally:
        with open_dict(obj) if hasattr(obj, "_get_node") else contextlib.nullcontext():
            setattr(obj, name, old)


def _saved_world_size(state: dict) -> int:
    if isinstance(state.get("sharding"), dict):
        return state["sharding"]["world_size"]
    try:
        return int(state["cfg"]["distributed_training"]["distributed_world_size"])
    except (KeyError, TypeError):
        return 1


def rescale_epoch_position(state: dict, saved_world_size: int, world_size: int):
    """fairseq deals batch i of an epoch to rank i % W, and records how many batches each rank
    has taken: after k on W_old ranks, k * W_old batches are done, k * W_old // W_new per rank on
    W_new ranks (without this, fairseq refuses to resume mid-epoch on fewer ranks)."""
    itr = (state.get("extra_state") or {}).get("train_iterator")
    if itr and saved_world_size != world_size and itr.get("iterations_in_epoch"):
        old = itr["iterations_in_epoch"]
        itr["iterations_in_epoch"] = old * saved_world_size // world_size
        logger.info(f"checkpoint written by {saved_world_size} ranks, resumed on {world_size}: "
                    f"{old} batches per rank into the epoch become {itr['iterations_in_epoch']}")


def state_for_model(found: ckpt.Found, state: dict, model, reset_optimizer: bool,
                    world_size: int = 1) -> dict:
    """Re-shard a loaded checkpoint (`state`: the shared file, or an ordinary checkpoint) for
    `model`, sharded over `world_size` ranks or not at all: its experts, the optimizer state by
    position in its parameter order, the position in the epoch."""
    rescale_epoch_position(state, _saved_world_size(state), world_size)
    names = _names(model)
    local, full, all_experts = _expert_layout(model)
    optim = state.get("last_optimizer_state")
    if found.sharded:
        keep = (lambda key: key in local) if all_experts else None
        state = ckpt.read_sharded(found.prefix, wanted_experts=keep, shared_state=state)
        named = state.get("last_optimizer_state")
    else:
        if all_experts:  # an ordinary checkpoint holds every expert: keep this rank's
            drop = set(all_experts) - local
            state["model"] = {k: v for k, v in state["model"].items() if k not in drop}
        named = None
        if optim is not None and not reset_optimizer:
            named = ckpt.optimizer_state_by_name(optim, full)
    state.pop("sharding", None)
    state["last_optimizer_state"] = None
    if named is not None and not reset_optimizer:
        state["last_optimizer_state"] = ckpt.optimizer_state_by_index(named, names)
    return state


def _patched_load_checkpoint(original):
    @functools.wraps(original)
    def load_checkpoint(self, filename, reset_optimizer=False, *args, **kwargs):
        found = ckpt.find_checkpoint(filename)
        model = self.get_model()
        sharded_model = _trainer_world_size(self) > 1
        if found is None or not (found.sharded or sharded_model):
            return original(self, filename, reset_optimizer, *args, **kwargs)
        logger.info(f"loading {found.prefix + '-{shared,rank-*}.pt' if found.sharded else found.path}"
                    f" for {'this rank' if sharded_model else 'one process'}")
        read = checkpoint_utils.load_checkpoint_to_cpu

        def load_to_cpu(path, *a, **kw):
            return state_for_model(found, read(path, *a, **kw), model, reset_optimizer,
                                   self.data_parallel_world_size)

        checkpoint_utils.load_checkpoint_to_cpu = load_to_cpu
        try:  # every rank reads its own experts: no broadcast of rank 0's state
            with _temporarily(self.cfg.checkpoint, "load_checkpoint_on_all_dp_ranks", True):
                return original(self, found.path, reset_optimizer, *args, **kwargs)
        finally:
            checkpoint_utils.load_checkpoint_to_cpu = read
    return load_checkpoint


def _suffix_property(original):
    def checkpoint_suffix(self):
        suffix = original.fget(self)
        if _trainer_world_size(self) > 1:
            return f"{suffix}-rank-{self.data_parallel_rank}"
        return suffix
    return property(checkpoint_suffix)


def _save_on_rank_property(original):
    def should_save_checkpoint_on_current_rank(self):
        return _trainer_world_size(self) > 1 or original.fget(self)
    return property(should_save_checkpoint_on_current_rank)


def install():
    """Patch fairseq's Trainer once (the plugin may be imported several times)."""
    if getattr(Trainer, "_taskmoe_patched", False):
        return
    Trainer.__init__ = _patched_init(Trainer.__init__)
    Trainer.train_step = _patched_train_step(Trainer.train_step)
    Trainer.save_checkpoint = _patched_save_checkpoint(Trainer.save_checkpoint)
    Trainer.load_checkpoint = _patched_load_checkpoint(Trainer.load_checkpoint)
    Trainer.checkpoint_suffix = _suffix_property(Trainer.checkpoint_suffix)
    Trainer.should_save_checkpoint_on_current_rank = _save_on_rank_property(
        Trainer.should_save_checkpoint_on_current_rank)
    checkpoint_utils.save_checkpoint = _patched_checkpoint_utils_save(
        checkpoint_utils.save_checkpoint)
    Trainer._taskmoe_patched = True
