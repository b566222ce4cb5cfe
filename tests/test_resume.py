"""Resuming and loading across world sizes and layouts (checkpoints.py, trainer_patch.py):
optimizer state without some experts, stale files of older saves, the choice between an
ordinary and a sharded checkpoint under one name, fine-tuning resumed on another world size,
atomic copies and the hint a broken set gives, the fairseq-version guard, and the message of
fairseq's inference tools on a sharded name."""

import os
import re
import shutil

import pytest
import torch

from fairseq_taskmoe.distributed import checkpoints as ckpt

from test_sharding import load, train  # noqa: E402  (conftest puts tests/ on the path)

# --- synthetic checkpoints: what fairseq-train writes, without training ---------------------

LAYER = "encoder.layers.1.ffn.experts"


def fake_checkpoint(updates: int, experts: int = 4, without_state=()):
    """A one-process fairseq checkpoint dict (shared parameters, `experts` experts of one
    layer, Adam-like state by position, fairseq's update count), and its parameter order.
    Parameters named in `without_state` have no optimizer state (never got a gradient)."""
    model = {"embed.weight": torch.full((3,), float(updates))}
    for e in range(experts):
        model[f"{LAYER}.experts.{e}.fc1.weight"] = torch.full((2, 3), float(e))
    model["norm.weight"] = torch.ones(3)
    names = list(model)
    state = {i: {"step": torch.tensor(float(updates)), "exp_avg": torch.full_like(model[n], i)}
             for i, n in enumerate(names) if n not in without_state}
    return {"model": model, "cfg": None, "extra_state": {"train_iterator": {"epoch": 1}},
            "optimizer_history": [{"num_updates": updates}],
            "last_optimizer_state": {"state": state,
                                     "param_groups": [{"lr": 0.1,
                                                       "params": list(range(len(names)))}]}}, names


def expert_index(name: str) -> int:
    match = re.search(r"\.experts\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def write_sharded(prefix, state: dict, names, world_size: int, save_id: str):
    """What a `world_size`-rank save of the one-process checkpoint `state` (parameter order
    `names`) writes under `prefix`, made with checkpoints.split_checkpoint."""
    all_experts = [n for n in names if re.search(r"\.experts\.\d+\.", n)]
    per_layer = {}
    for n in all_experts:
        layer, e = re.match(r"^(.*)\.experts\.(\d+)\.", n).groups()
        per_layer[layer] = max(per_layer.get(layer, 0), int(e) + 1)
    named = ckpt.optimizer_state_by_name(state["last_optimizer_state"], names)
    for r in range(world_size):
        def mine(n):
            layer, e = re.match(r"^(.*)\.experts\.(\d+)\.", n).groups()
            block = per_layer[layer] // world_size
            return r * block <= int(e) < (r + 1) * block
        local = {n for n in all_experts if mine(n)}
        local_names = [n for n in names if n not in all_experts or n in local]
        rank_state = dict(state, model={k: v for k, v in state["model"].items()
                                        if k not in all_experts or k in local},
                          last_optimizer_state=ckpt.optimizer_state_by_index(named, local_names))
        rank_part, shared = ckpt.split_checkpoint(rank_state, local_names, local, names,
                                                  all_experts, r, world_size, save_id)
        torch.save(rank_part, ckpt.rank_path(str(prefix), r))
        if r == 0:
            torch.save(shared, ckpt.shared_path(str(prefix)))


# --- 4: optimizer state without some parameters --------------------------------------------

def test_optimizer_state_without_some_experts_goes_to_any_sharding():
    """An expert no task chose has no Adam state (torch creates it at the first gradient):
    re-sharding keeps it stateless instead of refusing the checkpoint."""
    idle = f"{LAYER}.experts.3.fc1.weight"
    state, names = fake_checkpoint(5, without_state=[idle])
    named = ckpt.optimizer_state_by_name(state["last_optimizer_state"], names)
    rank1 = [n for n in names if "experts" not in n or expert_index(n) in (2, 3)]
    by_index = ckpt.optimizer_state_by_index(named, rank1)
    assert sorted(by_index["state"]) == [i for i, n in enumerate(rank1) if n != idle]
    # torch's own optimizer takes it: the idle expert starts fresh, the others continue
    params = [torch.nn.Parameter(state["model"][n].clone()) for n in rank1]
    adam = torch.optim.Adam(params, lr=0.1)
    adam.load_state_dict(by_index)
    assert params[rank1.index(idle)] not in adam.state
    assert adam.state[params[0]]["step"] == 5
    # a state that cannot be numbered for the model is still refused
    two_groups = dict(named, param_groups=[{"lr": 0.1}, {"lr": 0.2}])
    with pytest.raises(ckpt.CheckpointError, match="2 parameter groups.*--reset-optimizer"):
        ckpt.optimizer_state_by_index(two_groups, rank1)


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory):
    """3 updates on one process with 8 experts per layer: with target routing in the decoder
    (3 target languages, top-2) some experts never get a token, so have no Adam state."""
    save_dir = tmp_path_factory.mktemp("one")
    train(tiny_data, save_dir, 1, 3, "--moe-expert-count", "8")
    return save_dir / "checkpoint_last.pt"


def test_one_process_checkpoint_with_idle_experts_resumes_on_two_ranks(tiny_data, one_process,
                                                                       tmp_path):
    optim = load(one_process)["last_optimizer_state"]
    assert len(optim["state"]) < len(optim["param_groups"][0]["params"]), "an idle expert"
    logs = train(tiny_data, tmp_path, 2, 5, "--moe-expert-count", "8", "--restore-file",
                 one_process)
    assert re.search(r"Loaded checkpoint .*@ 3 updates", logs[0][1])
    assert re.search(r"num_updates[ =]5\b", logs[0][1])


# --- 5: stale files of older saves; the layout choice ---------------------------------------

def test_rank_files_left_by_a_save_on_more_ranks_do_not_block_a_load(tmp_path, capsys):
    """A 4-rank save, then a 2-rank save of the same name (before the saving run removed
    the old rank files, or in a folder written by an older version): rank files 2 and 3 are
    ignored by loading and by taskmoe-consolidate."""
    from fairseq_taskmoe.cli.consolidate import main as consolidate_main

    prefix = tmp_path / "checkpoint_last"
    write_sharded(prefix, *fake_checkpoint(4, experts=8), world_size=4, save_id="four")
    state, names = fake_checkpoint(6, experts=8)
    write_sharded(prefix, state, names, world_size=2, save_id="two")
    assert os.path.exists(ckpt.rank_path(str(prefix), 3))
    merged = ckpt.consolidate(str(prefix))
    assert merged["optimizer_history"][-1]["num_updates"] == 6
    for name, value in state["model"].items():
        torch.testing.assert_close(merged["model"][name], value)
    assert consolidate_main([str(prefix), "--output", str(tmp_path / "out.pt")]) == 0
    # a rank file beyond the world size that claims this very save is still an error
    shutil.copy(ckpt.rank_path(str(prefix), 1), ckpt.rank_path(str(prefix), 2))
    with pytest.raises(ckpt.CheckpointError, match="rank-2.pt does not belong to"):
        ckpt.consolidate(str(prefix))


def test_files_a_save_leaves_behind_are_listed_for_removal(tmp_path):
    prefix = str(tmp_path / "checkpoint_last")
    for name in ["-rank-0", "-rank-1", "-rank-2", "-rank-3", "-shared", ""]:
        open(f"{prefix}{name}.pt", "wb").close()
    open(f"{prefix}-rank-0-rank-1.pt", "wb").close()  # another prefix's file
    base = os.path.basename
    assert [base(p) for p in ckpt.other_layout_files(prefix, 2)] == [
        "checkpoint_last-rank-2.pt", "checkpoint_last-rank-3.pt", "checkpoint_last.pt"]
    assert [base(p) for p in ckpt.other_layout_files(prefix, 1)] == [
        f"checkpoint_last-rank-{r}.pt" for r in range(4)] + ["checkpoint_last-shared.pt"]


@pytest.mark.parametrize("sharded_newer", [True, False])
def test_layout_is_chosen_by_content_not_by_file_times(tmp_path, sharded_newer):
    """Both layouts under one name: the one further in training is loaded, whatever the
    modification times say (a `cp -r` or rsync rewrites them)."""
    prefix = tmp_path / "checkpoint_last"
    old, new = fake_checkpoint(4), fake_checkpoint(9)
    full_state, sharded_state = (old, new) if sharded_newer else (new, old)
    torch.save(full_state[0], f"{prefix}.pt")
    write_sharded(prefix, *sharded_state, world_size=2, save_id="s")
    full, shared = f"{prefix}.pt", ckpt.shared_path(str(prefix))
    less_trained, more_trained = (full, shared) if sharded_newer else (shared, full)
    os.utime(less_trained, (2_000_000_000, 2_000_000_000))  # file times say the opposite
    os.utime(more_trained, (1_000_000_000, 1_000_000_000))
    for name in (full, str(prefix), shared):
        found = ckpt.find_checkpoint(name)
        assert found.sharded is sharded_newer, name
        assert ckpt.load_any(name)["optimizer_history"][-1]["num_updates"] == 9


@pytest.mark.slow
def test_resume_on_fewer_ranks_removes_the_old_rank_files(tiny_data, tmp_path):
    """A 4-rank save (simulated from a real 2-rank one with split_checkpoint) resumed on 2
    ranks in the same --save-dir: the save removes checkpoint_last-rank-{2,3}.pt, and the
    next resume and taskmoe-consolidate work."""
    from fairseq_taskmoe.cli.consolidate import main as consolidate_main

    source, save_dir = tmp_path / "source", tmp_path / "run"
    train(tiny_data, source, 2, 2, "--disable-validation")
    state = ckpt.read_sharded(str(source / "checkpoint_last"))
    meta = state.pop("sharding")
    state["last_optimizer_state"] = ckpt.optimizer_state_by_index(
        state["last_optimizer_state"], meta["param_names"])
    itr = state["extra_state"]["train_iterator"]  # batches per rank: 4 ranks took half as many
    itr["iterations_in_epoch"] = itr["iterations_in_epoch"] * 2 // 4
    save_dir.mkdir()
    write_sharded(save_dir / "checkpoint_last", state, meta["param_names"], 4, "four-ranks")

    logs = train(tiny_data, save_dir, 2, 4, "--disable-validation")
    assert re.search(r"Loaded checkpoint .*checkpoint_last-shared\.pt .*@ 2 updates",
                     logs[0][1])
    assert sorted(p.name for p in save_dir.glob("checkpoint_last*")) == [
        "checkpoint_last-rank-0.pt", "checkpoint_last-rank-1.pt", "checkpoint_last-shared.pt"]
    assert consolidate_main([str(save_dir / "checkpoint_last"), "--output",
                             str(tmp_path / "merged.pt")]) == 0
    logs = train(tiny_data, save_dir, 2, 6, "--disable-validation")
    assert re.search(r"Loaded checkpoint .*@ 4 updates", logs[0][1])


# --- 6: --finetune-from-model resumed on another world size -------------------------------

def test_finetune_resumed_on_another_world_size_continues_the_finetune(tiny_data, one_process,
                                                                       tmp_path):
    """fairseq decides "first launch" from checkpoint_last-rank-{r}.pt; a fine-tune saved by
    one process (checkpoint_last.pt) and resumed on 2 ranks must continue, not restart from
    the pretrained model."""
    flags = ["--moe-expert-count", "8", "--finetune-from-model", one_process]
    (_, log), = train(tiny_data, tmp_path, 1, 2, *flags)
    assert "loading pretrained model from" in log  # the first launch
    logs = train(tiny_data, tmp_path, 2, 4, *flags)
    assert "loading pretrained model from" not in logs[0][1]
    assert re.search(r"Loaded checkpoint .*checkpoint_last.*@ 2 updates", logs[0][1])
    assert re.search(r"num_updates[ =]4\b", logs[0][1])
    assert not (tmp_path / "checkpoint_last.pt").exists(), "the other layout is removed"


# --- 10: atomic copies; what a broken set says -----------------------------------------------

def test_checkpoint_copies_replace_the_destination_atomically(tmp_path, monkeypatch):
    """fairseq copies checkpoint_X to checkpoint_last/best with a plain copy; through the
    plugin's PathManager the copy is a new file renamed over the old one, so a crash during
    the copy leaves the old complete file."""
    from fairseq.file_io import PathManager

    from fairseq_taskmoe.integration.trainer_patch import _CopySharedToo

    src, dst = tmp_path / "checkpoint3-rank-1.pt", tmp_path / "checkpoint_last-rank-1.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old complete file")
    inode = os.stat(dst).st_ino
    copier = _CopySharedToo(PathManager)
    assert copier.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_ino != inode, "written in place, not renamed over"
    assert copier.copied == [str(dst)]

    def crash(source, target, *args):
        target.write(source.read(10))
        raise OSError("disk full")

    dst.write_bytes(b"old complete file")
    monkeypatch.setattr(ckpt.shutil, "copyfileobj", crash)
    with pytest.raises(OSError, match="disk full"):
        copier.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old complete file"
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_broken_set_names_the_complete_checkpoints_to_restore(tmp_path):
    """A crash between two ranks' writes leaves rank files of two saves: the error says so and
    lists the checkpoints that are complete, most trained first."""
    write_sharded(tmp_path / "checkpoint_best", *fake_checkpoint(6), 2, "best")
    torch.save(fake_checkpoint(8)[0], tmp_path / "checkpoint2.pt")
    write_sharded(tmp_path / "checkpoint_last", *fake_checkpoint(8), 2, "old")
    part = load(tmp_path / "checkpoint_last-rank-0.pt")
    write_sharded(tmp_path / "checkpoint_last", *fake_checkpoint(10), 2, "new")
    torch.save(part, tmp_path / "checkpoint_last-rank-0.pt")  # rank 0 had not written yet
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.read_sharded(str(tmp_path / "checkpoint_last"))
    message = str(err.value)
    assert "checkpoint_last-rank-0.pt comes from another run or save" in message
    assert ("Complete checkpoints to resume from (--restore-file NAME.pt, whatever its "
            f"layout): {tmp_path}/checkpoint2.pt (8 updates), {tmp_path}/checkpoint_best.pt "
            "(sharded) (6 updates).") in message
    os.remove(tmp_path / "checkpoint_last-shared.pt")  # rank files only
    with pytest.raises(ckpt.CheckpointError, match=r"shared.pt is missing.*checkpoint2\.pt"):
        ckpt.find_checkpoint(str(tmp_path / "checkpoint_last.pt"))


# --- 11: the fairseq the patches were written for ---------------------------------------------

def test_a_fairseq_without_what_the_plugin_patches_is_refused_at_start_up(monkeypatch):
    import fairseq
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils
    from fairseq.trainer import Trainer

    from fairseq_taskmoe.integration import compat, teardown, trainer_patch
    from fairseq_taskmoe.integration.fairseq_guard import FairseqMismatch

    trainer_patch.install()  # this fairseq passes (and installing twice is harmless)
    monkeypatch.delattr(Trainer, "checkpoint_suffix")
    monkeypatch.setattr(Trainer, "should_save_checkpoint_on_current_rank", lambda self: True)
    monkeypatch.setattr(checkpoint_utils, "save_checkpoint", lambda cfg, trainer: None)
    monkeypatch.setattr(fairseq, "__version__", "0.13.0")
    with pytest.raises(FairseqMismatch) as err:
        trainer_patch.install()
    message = str(err.value)
    assert "patches internals of fairseq-fixed 0.12.3.1, but the installed fairseq 0.13.0" in \
        message
    assert "Trainer.checkpoint_suffix is missing" in message
    assert "Trainer.should_save_checkpoint_on_current_rank is not a property" in message
    assert "checkpoint_utils.save_checkpoint takes (cfg, trainer), expected (cfg, trainer, " \
        "epoch_itr, val_loss, ...)" in message
    assert "Install fairseq-fixed==0.12.3.1" in message
    # names the patching module where it lives (integration/), as a module and as a file
    assert "fairseq_taskmoe.integration.trainer_patch patches internals" in message
    assert "port fairseq_taskmoe/integration/trainer_patch.py to this fairseq" in message
    assert os.path.exists(os.path.join(os.path.dirname(__file__), os.pardir,
                                       "fairseq_taskmoe/integration/trainer_patch.py"))

    monkeypatch.delattr(distributed_utils, "distributed_main")
    with pytest.raises(FairseqMismatch, match="distributed_utils.distributed_main is missing"):
        teardown.install()
    monkeypatch.delattr(distributed_utils, "_TensorPlaceholder")
    with pytest.raises(FairseqMismatch, match="_TensorPlaceholder is missing"):
        compat.allow_fairseq_checkpoint_types()


# --- 9: fairseq's inference tools given a sharded checkpoint's name ---------------------------

def test_inference_on_a_sharded_name_says_to_consolidate(tmp_path):
    import user_dir  # noqa: F401  (the plugin, as --user-dir loads it)
    from fairseq import checkpoint_utils

    prefix = tmp_path / "checkpoint_last"
    write_sharded(prefix, *fake_checkpoint(3), 2, "s")
    with pytest.raises(IOError) as err:  # what fairseq-generate --path calls
        checkpoint_utils.load_model_ensemble([str(prefix) + ".pt"])
    message = str(err.value)
    assert f"{prefix}.pt is a sharded checkpoint" in message
    assert f"taskmoe-consolidate {prefix} --output {prefix}-consolidated.pt" in message
    assert ckpt.sharded_path_message(str(tmp_path / "missing.pt")) is None
    with pytest.raises(IOError, match="Model file not found"):  # fairseq's own message
        checkpoint_utils.load_model_ensemble([str(tmp_path / "missing.pt")])
