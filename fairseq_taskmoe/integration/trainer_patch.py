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

For every model, checkpoints (world size 1 included): fairseq's copies to checkpoint_last/best
are atomic; once all ranks have saved, what an older save on another number of ranks left
under the names just written is deleted (the other layout, rank files beyond W); a resume
decides --finetune-from-model's "first launch" once, from either layout; a failed load lists
the complete checkpoints to resume from; fairseq's inference given a sharded checkpoint's name
says to consolidate it. What all these patches rely on in fairseq is checked at install
(fairseq_guard.py).
"""

import contextlib
import functools
import glob
import logging
import os
import time
import uuid

import torch
import torch.distributed as dist
from fairseq import checkpoint_utils, metrics, utils
from fairseq.distributed import utils as distributed_utils
from fairseq.trainer import Trainer
from omegaconf import open_dict

from ..atomic import write_atomically
from ..distributed import checkpoints as ckpt
from ..distributed.sharding import grad_norm_with_experts, sharded_layers

logger = logging.getLogger(__name__)


def _trainer_world_size(trainer) -> int:
    """W of the trainer's model's sharded experts (its layers, found once in __init__); 1 when
    it has none."""
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
        world_size = _trainer_world_size(self)
        if world_size > 1:
            check_training_setup(cfg, world_size)
            scale_expert_grads(model, world_size)
            logger.info(f"expert parallelism: {len(sharded_layers(model))} MoE layers, each "
                        f"rank holds 1/{world_size} of their experts")
        original(self, cfg, task, model, criterion, *args, **kwargs)
    return __init__


def _patched_clip_grad_norm_(original):
    """fairseq.utils.clip_grad_norm_, which every fairseq optimizer calls (plain, fp16, memory-
    efficient fp16, AMP), leaves parameters marked `expert` out of the norm and only scales
    them. With sharded experts the norm must count them, once over all ranks: otherwise
    --clip-norm clips sharded training differently from replicated training, and an fp16
    overflow in an expert gradient goes undetected (the step is taken, the expert becomes NaN).
    sharding.grad_norm_with_experts computes that norm; clipping is fairseq's."""
    @functools.wraps(original)
    def clip_grad_norm_(params, max_norm, aggregate_norm_fn=None):
        params = [params] if torch.is_tensor(params) else list(params)
        sharded = any(hasattr(p, "expert") for p in params)
        if not sharded or not (dist.is_available() and dist.is_initialized()):
            return original(params, max_norm, aggregate_norm_fn)
        if aggregate_norm_fn is not None:  # FSDP: refused with sharded experts at start-up
            raise ValueError("sharded experts cannot be combined with a norm aggregated by "
                             "the trainer (FSDP)")
        total_norm = grad_norm_with_experts(params)
        if max_norm > 0:
            clip_coef = (float(max_norm) / (total_norm + 1e-6)).clamp_(max=1)
            grads = [p.grad.detach() for p in params if getattr(p, "grad", None) is not None]
            torch._foreach_mul_(grads, clip_coef)
        return total_norm
    clip_grad_norm_.counts_experts = True
    return clip_grad_norm_


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
    """fairseq's checkpoint_utils.PathManager while it saves a checkpoint. fairseq writes the
    first name and copies it to the others (checkpoint_best, checkpoint_last, ...) with a plain
    copy, which a crash can leave half-written: local copies are made atomic (temporary name,
    rename). When rank 0 copies its rank file, it copies the shared file along. The names
    copied to are recorded (`copied`) for the clean-up after the save. Everything else is
    forwarded."""

    def __init__(self, path_manager):
        self._pm = path_manager
        self.copied = []

    def __getattr__(self, name):
        return getattr(self._pm, name)

    def copy(self, src, dst, overwrite=False):
        if os.path.isfile(src) and (overwrite or not os.path.exists(dst)):
            ckpt.copy_atomically(src, dst)
            ok = True
        else:  # a remote path (or a refused overwrite): fairseq's own copy decides
            ok = self._pm.copy(src, dst, overwrite=overwrite)
        match = ckpt.RANK_FILE.match(src)
        if ok and match and match.group("rank") == "0":
            ckpt.copy_atomically(ckpt.shared_path(match.group("prefix")),
                                 ckpt.shared_path(ckpt.checkpoint_prefix(dst)))
        if ok:
            self.copied.append(dst)
        return ok


def _remove_other_layouts(saved_names, world_size: int):
    """After every rank has saved: delete what an older save left under the names just
    written (checkpoints.other_layout_files), e.g. checkpoint_last-rank-{2,3}.pt of a 4-rank
    save after a resume on 2 ranks, or checkpoint_last.pt of a one-process save."""
    for prefix in sorted({ckpt.checkpoint_prefix(name) for name in saved_names}):
        for stale in ckpt.other_layout_files(prefix, world_size):
            logger.info(f"removing {stale}: left by an older save of {prefix} on another "
                        "number of ranks")
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)


def _remove_orphan_shared_files(save_dir: str):
    """fairseq's --keep-* options delete old rank files; drop the shared files left alone."""
    for shared in glob.glob(os.path.join(glob.escape(save_dir), "*-shared.pt")):
        prefix = ckpt.checkpoint_prefix(shared)
        if not os.path.exists(ckpt.rank_path(prefix, 0)):
            os.remove(shared)


def _patched_checkpoint_utils_save(original):
    @functools.wraps(original)
    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        world_size = _trainer_world_size(trainer)
        path_manager = checkpoint_utils.PathManager
        copies = checkpoint_utils.PathManager = _CopySharedToo(path_manager)
        try:
            saved = original(cfg, trainer, epoch_itr, val_loss)
        finally:
            checkpoint_utils.PathManager = path_manager
        if saved is not None and world_size > 1:  # every rank saves: wait for all rank files
            torch.distributed.barrier(group=trainer.data_parallel_process_group)
        if saved is not None and trainer.data_parallel_rank == 0:
            _remove_other_layouts([saved] + copies.copied, world_size)
        if world_size > 1 and trainer.data_parallel_rank == 0 and not cfg.no_save:
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
        shown = found.prefix + "-{shared,rank-*}.pt" if found.sharded else found.path
        logger.info(f"loading {shown}"
                    f" for {'this rank' if sharded_model else 'one process'}")
        read = checkpoint_utils.load_checkpoint_to_cpu

        def load_to_cpu(path, *a, **kw):
            try:
                state = read(path, *a, **kw)
            except Exception as err:  # a truncated file: say what else there is
                raise ckpt.CheckpointError(f"cannot read {path} ({type(err).__name__}: {err})."
                                           + ckpt.restore_hint(found.prefix)) from err
            return state_for_model(found, state, model, reset_optimizer,
                                   self.data_parallel_world_size)

        checkpoint_utils.load_checkpoint_to_cpu = load_to_cpu
        try:  # every rank reads its own experts: no broadcast of rank 0's state
            with _temporarily(self.cfg.checkpoint, "load_checkpoint_on_all_dp_ranks", True):
                return original(self, found.path, reset_optimizer, *args, **kwargs)
        finally:
            checkpoint_utils.load_checkpoint_to_cpu = read
    return load_checkpoint


def last_checkpoint_exists(save_dir: str, suffix: str = "") -> bool:
    """Whether `save_dir` holds checkpoint_last in either layout (ordinary, or sharded by any
    number of ranks). Raises CheckpointError for a broken one (rank files without the shared
    file): that is a run to repair, not a first launch."""
    return ckpt.find_checkpoint(os.path.join(save_dir, f"checkpoint_last{suffix}.pt")) is not None


def _patched_checkpoint_utils_load(original):
    """fairseq decides whether a run with --finetune-from-model (or --continue-once) is its
    first launch from `checkpoint_last{suffix}.pt`, per rank, with the rank's suffix: a fine-tune
    resumed on another world size (or layout) would restart from the pretrained model on some
    or all ranks. Decided here once, on rank 0, from either layout, and sent to every rank;
    when the run is resumed fairseq is shown no --finetune-from-model, so it takes its ordinary
    resume path (the trainer's load re-shards whatever layout it finds)."""
    @functools.wraps(original)
    def load_checkpoint(cfg, trainer, **passthrough_args):
        once = cfg.finetune_from_model is not None or getattr(cfg, "continue_once", None)
        refused = cfg.finetune_from_model is not None and (
            cfg.reset_optimizer or cfg.reset_lr_scheduler or cfg.reset_meters
            or cfg.reset_dataloader)
        if not once or refused or cfg.restore_file != "checkpoint_last.pt":
            return original(cfg, trainer, **passthrough_args)  # incl. fairseq's own errors
        resumed = (last_checkpoint_exists(cfg.save_dir, cfg.checkpoint_suffix or "")
                   if trainer.data_parallel_rank == 0 else None)
        if trainer.data_parallel_world_size > 1:
            resumed = distributed_utils.broadcast_object(
                resumed, src_rank=0, group=trainer.data_parallel_process_group,
                dist_device=trainer.device)
        if not resumed:  # no rank's file exists either: fairseq's per-rank test agrees
            return original(cfg, trainer, **passthrough_args)
        logger.info(f"{os.path.join(cfg.save_dir, 'checkpoint_last.pt')} exists: resuming this "
                    "run from it on every rank (not from --finetune-from-model/--continue-once)")
        with contextlib.ExitStack() as stack:
            for name in ("finetune_from_model", "continue_once"):
                if getattr(cfg, name, None) is not None:
                    stack.enter_context(_temporarily(cfg, name, None))
            return original(cfg, trainer, **passthrough_args)
    return load_checkpoint


def _patched_load_model_ensemble_and_task(original):
    """fairseq-generate, fairseq-interactive, fairseq-validate and the hub API read a model
    file with this function; given a sharded checkpoint's name it would say only "Model file
    not found". Say what it is and how to make one file of it."""
    @functools.wraps(original)
    def load_model_ensemble_and_task(filenames, *args, **kwargs):
        for filename in filenames:
            message = ckpt.sharded_path_message(filename)
            if message:
                raise IOError(message)
        return original(filenames, *args, **kwargs)
    return load_model_ensemble_and_task


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


def fairseq_expectations():
    """What the patches in this module rely on in fairseq (fairseq_guard.py)."""
    from fairseq.dataclass.configs import CheckpointConfig
    from fairseq.optim.fairseq_optimizer import FairseqOptimizer

    from .fairseq_guard import Expect

    T, cu, du = Trainer, checkpoint_utils, distributed_utils
    return [
        Expect(T, "Trainer", "__init__", "function", ("self", "cfg", "task", "model", "criterion")),
        Expect(T, "Trainer", "train_step", "function", ("self", "samples")),
        Expect(T, "Trainer", "save_checkpoint", "function", ("self", "filename", "extra_state")),
        Expect(T, "Trainer", "load_checkpoint", "function",
               ("self", "filename", "reset_optimizer")),
        Expect(T.load_checkpoint, "Trainer.load_checkpoint", "", "uses",
               ("load_checkpoint_to_cpu", "load_checkpoint_on_all_dp_ranks")),
        Expect(T, "Trainer", "checkpoint_suffix", "property"),
        Expect(T, "Trainer", "should_save_checkpoint_on_current_rank", "property"),
        Expect(T, "Trainer", "data_parallel_rank", "property"),
        Expect(T, "Trainer", "data_parallel_world_size", "property"),
        Expect(T, "Trainer", "data_parallel_process_group", "property"),
        Expect(T, "Trainer", "get_model", "function", ("self",)),
        Expect(T, "Trainer", "state_dict", "function", ("self",)),
        Expect(cu, "checkpoint_utils", "save_checkpoint", "function",
               ("cfg", "trainer", "epoch_itr", "val_loss")),
        Expect(cu.save_checkpoint, "checkpoint_utils.save_checkpoint", "", "uses",
               ("PathManager", "copy", "checkpoint_suffix")),
        Expect(cu, "checkpoint_utils", "load_checkpoint", "function", ("cfg", "trainer")),
        Expect(cu.load_checkpoint, "checkpoint_utils.load_checkpoint", "", "uses",
               ("finetune_from_model", "restore_file", "checkpoint_suffix")),
        Expect(cu, "checkpoint_utils", "load_checkpoint_to_cpu", "function", ("path",)),
        Expect(cu, "checkpoint_utils", "load_model_ensemble_and_task", "function",
               ("filenames",)),
        Expect(cu.load_model_ensemble, "checkpoint_utils.load_model_ensemble", "", "uses",
               ("load_model_ensemble_and_task",)),
        Expect(cu, "checkpoint_utils", "PathManager", "attribute"),
        Expect(du, "distributed_utils", "broadcast_object", "function",
               ("obj", "src_rank", "group", "dist_device")),
        Expect(utils, "utils", "clip_grad_norm_", "function",
               ("params", "max_norm", "aggregate_norm_fn")),
        Expect(FairseqOptimizer.clip_grad_norm, "FairseqOptimizer.clip_grad_norm", "", "uses",
               ("clip_grad_norm_",)),
        *[Expect(CheckpointConfig, "CheckpointConfig", name, "field") for name in (
            "load_checkpoint_on_all_dp_ranks", "finetune_from_model", "restore_file",
            "save_dir", "checkpoint_suffix", "reset_optimizer", "reset_lr_scheduler",
            "reset_meters", "reset_dataloader", "no_save")],
    ]


def install():
    """Patch fairseq's Trainer once (the plugin may be imported several times), after checking
    that this fairseq has what the patches rely on."""
    from .fairseq_guard import require

    require(fairseq_expectations(), "trainer_patch")
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
    utils.clip_grad_norm_ = _patched_clip_grad_norm_(utils.clip_grad_norm_)
    checkpoint_utils.load_checkpoint = _patched_checkpoint_utils_load(
        checkpoint_utils.load_checkpoint)
    checkpoint_utils.load_model_ensemble_and_task = _patched_load_model_ensemble_and_task(
        checkpoint_utils.load_model_ensemble_and_task)
    Trainer._taskmoe_patched = True
