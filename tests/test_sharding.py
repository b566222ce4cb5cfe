"""Expert parallelism (sharding.py): W gloo ranks holding E/W experts each compute what one
process holding all experts computes, for every routing and for batches whose tokens all go to
one rank; and the fairseq wiring, checkpoints and consolidation built on it."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fairseq_taskmoe.distributed.sharding import ExpertShard, ShardedExpertFFNs, expert_shard
from fairseq_taskmoe.moe.experts import ExpertFFNs
from fairseq_taskmoe.moe.moe_layer import MoELayer
from fairseq_taskmoe.moe.routing import TaskIds, build_router

E, K, C, F, LANGS = 4, 2, 8, 16, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer(kind: str, make_experts) -> MoELayer:
    torch.manual_seed(0)
    router = build_router(kind, C, E, K, LANGS, causal=False)
    return MoELayer(router, make_experts(), capacity_factor=1.0)


def _full_experts():
    return ExpertFFNs(C, [F] * E, torch.relu, torch.nn.Identity())


def _batch(rank: int, kind: str, uneven: bool):
    """This rank's batch: sizes differ per rank, some pads; `uneven` gives every row target
    language 0 (one task per batch)."""
    g = torch.Generator().manual_seed(100 + rank)
    T, B = 3 + rank, 2 + rank % 2
    x = torch.randn(T, B, C, generator=g)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, : rank % 2 + 1] = True  # left padding on the first row
    src = torch.randint(0, LANGS, (B,), generator=g)
    tgt = torch.zeros(B, dtype=torch.long) if uneven else torch.randint(0, LANGS, (B,), generator=g)
    proj = torch.randn(T, B, C, generator=g)  # loss = sum(out * proj)
    return x, pad, TaskIds(src, tgt, LANGS), proj


def _check_layer(rank: int, world_size: int, kind: str, uneven: bool):
    reference = _layer(kind, _full_experts)
    if uneven:
        with torch.no_grad():  # every task -> experts 0 and 1, nothing for the other ranks
            reference.router.wg.weight[:] = torch.tensor([5.0, 4.0, -5.0, -5.0])
    shard = ExpertShard(rank, world_size, E)
    sharded = _layer(kind, lambda: ShardedExpertFFNs(C, [F] * E, torch.relu, torch.nn.Identity(),
                                                     shard))
    # same seed: the sharded layer's experts are the reference's (init consumes the RNG alike)
    for e in shard.local_experts:
        torch.testing.assert_close(sharded.experts.experts[str(e)].fc1.weight,
                                   reference.experts.experts[e].fc1.weight, rtol=0, atol=0)
    sharded.load_state_dict({k: v for k, v in reference.state_dict().items()
                             if not k.startswith("experts.") or k.split(".")[2] in
                             {str(e) for e in shard.local_experts}})

    # reference: one process runs every rank's batch, accumulating the expert gradients
    ref_out, ref_xgrad, ref_router_grad = None, None, None
    for r in range(world_size):
        x, pad, ids, proj = _batch(r, kind, uneven)
        x = x.clone().requires_grad_()
        reference.router.zero_grad()
        out, stats = reference(x, pad, ids)
        (out * proj).sum().backward()
        if r == rank:
            ref_out, ref_xgrad = out.detach(), x.grad
            ref_router_grad = reference.router.wg.weight.grad.clone()
            ref_counts = stats.expert_counts
    x, pad, ids, proj = _batch(rank, kind, uneven)
    x.requires_grad_()
    out, stats = sharded(x, pad, ids)
    (out * proj).sum().backward()

    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_xgrad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sharded.router.wg.weight.grad, ref_router_grad)
    assert stats.expert_counts.tolist() == ref_counts.tolist()
    for e in shard.local_experts:
        mine, full = sharded.experts.experts[str(e)], reference.experts.experts[e]
        for name, p in mine.named_parameters():
            ref_grad = dict(full.named_parameters())[name].grad
            if ref_grad is None:  # no rank sent this expert a token
                assert p.grad is None, (kind, e, name)
            else:
                torch.testing.assert_close(p.grad, ref_grad, rtol=1e-5, atol=1e-6)
            assert getattr(p, "expert", False)
    if uneven:
        assert all(c == 0 for c in stats.expert_counts[2:].tolist())


def _layer_worker(rank: int, world_size: int, port: int):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    torch.set_num_threads(1)
    try:
        for kind in ("token", "sentence", "target", "lang_pair"):
            _check_layer(rank, world_size, kind, uneven=False)
        for kind in ("target", "lang_pair"):  # every row's tokens go to rank 0's experts
            _check_layer(rank, world_size, kind, uneven=True)
        # eval mode (no autograd graph) runs the same exchange
        shard = ExpertShard(rank, world_size, E)
        layer = _layer("token", lambda: ShardedExpertFFNs(C, [F] * E, torch.relu,
                                                          torch.nn.Identity(), shard)).eval()
        x, pad, ids, _ = _batch(rank, "token", False)
        with torch.no_grad():
            out, _ = layer(x, pad, ids)
        assert out.shape == x.shape and not out.requires_grad
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_layer_equals_single_process_layer(world_size):
    mp.spawn(_layer_worker, args=(world_size, free_port()), nprocs=world_size, join=True)


def test_experts_not_divisible_by_world_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"6 experts cannot be split over 4 ranks"):
        ExpertShard(0, 4, 6)


def test_optimizer_state_moves_between_parameter_orders():
    from fairseq_taskmoe.distributed.checkpoints import (full_parameter_order,
                                                         optimizer_state_by_index,
                                                         optimizer_state_by_name)

    layer = "encoder.layers.1.ffn.experts"
    local = ["embed.weight", f"{layer}.experts.2.fc1.weight", f"{layer}.experts.2.fc2.weight",
             f"{layer}.experts.3.fc1.weight", f"{layer}.experts.3.fc2.weight", "norm.weight"]
    full = full_parameter_order(local, {layer: 4})
    assert full == ["embed.weight"] + [f"{layer}.experts.{e}.fc{i}.weight" for e in range(4)
                                       for i in (1, 2)] + ["norm.weight"]
    state = {"state": {i: {"step": i} for i in range(len(local))},
             "param_groups": [{"lr": 0.1, "params": list(range(len(local)))}],
             "loss_scale": 8.0}
    named = optimizer_state_by_name(state, local)
    assert named["state"][f"{layer}.experts.3.fc1.weight"] == {"step": 3}
    assert optimizer_state_by_index(named, local) == state


def test_checkpoint_prefix_accepts_every_name_of_a_checkpoint():
    from fairseq_taskmoe.distributed.checkpoints import checkpoint_prefix

    for name in ("d/checkpoint_last", "d/checkpoint_last.pt", "d/checkpoint_last-shared.pt",
                 "d/checkpoint_last-rank-3.pt", "d/checkpoint_last-shared-rank-1.pt",
                 "d/checkpoint_last-rank-0-rank-1.pt"):
        assert checkpoint_prefix(name) == "d/checkpoint_last", name
    assert checkpoint_prefix("d/checkpoint_1_400.pt") == "d/checkpoint_1_400"


def test_without_process_group_the_local_path_is_kept():
    assert not dist.is_initialized()
    assert expert_shard(E, "auto") is None and expert_shard(E, "off") is None


# --- through fairseq-train, fairseq-generate, taskmoe-consolidate and taskmoe-prune ----------

import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import TASK_FLAGS  # noqa: E402
from test_cli import hypotheses, run as cli_run  # noqa: E402

from fairseq_taskmoe.cli.consolidate import main as consolidate_main  # noqa: E402
from fairseq_taskmoe.cli.prune import main as prune_main  # noqa: E402

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")  # 1 thread per rank


def run(cmd, check=True, **kwargs):
    return cli_run(cmd, check, env=ENV, **kwargs)


def train(data, save_dir, world_size, updates, *extra, check=True):
    """fairseq-train on `world_size` CPU processes (gloo); returns each rank's log."""
    cmd = [BIN / "fairseq-train", data, "--user-dir", "user_dir", *TASK_FLAGS,
           "--arch", "task_moe_tiny", "--criterion", "moe_label_smoothed_cross_entropy",
           "--share-all-embeddings", "--optimizer", "adam", "--lr", "0.005", "--max-tokens",
           "1000", "--max-update", updates, "--cpu", "--seed", "1", "--dropout", "0",
           "--num-workers", "0", "--log-format", "simple", "--log-interval", "2",
           "--save-dir", save_dir, "--no-epoch-checkpoints", "--encoder-moe-routing", "token",
           "--decoder-moe-routing", "target", *extra]
    if world_size > 1:
        cmd += ["--distributed-world-size", world_size, "--distributed-backend", "gloo",
                "--distributed-no-spawn", "--distributed-init-method",
                f"tcp://127.0.0.1:{free_port()}"]
        if "--ddp-backend" not in extra:
            cmd += ["--ddp-backend", "legacy_ddp"]
    procs = [subprocess.Popen([str(c) for c in cmd] + (
        ["--distributed-rank", str(r)] if world_size > 1 else []), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, cwd=REPO, env=ENV) for r in range(world_size)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    if check:
        for p, log in zip(procs, logs):
            assert p.returncode == 0, log[-3000:]
    return [(p.returncode, log) for p, log in zip(procs, logs)]


def generate(data, checkpoint, pair="en-fr"):
    src, tgt = pair.split("-")
    return run([BIN / "fairseq-generate", data, "--user-dir", "user_dir", *TASK_FLAGS,
                "--source-lang", src, "--target-lang", tgt, "--gen-subset", "test",
                "--path", checkpoint, "--beam", "4", "--max-tokens", "2000", "--cpu"]).stdout


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


EXPERT_KEY = re.compile(r"^(.*\.ffn)\.experts\.experts\.(\d+)\.")


@pytest.fixture(scope="module")
def sharded(tiny_data, tmp_path_factory):
    """8 updates on 2 ranks with sharded experts (token encoder / target decoder)."""
    save_dir = tmp_path_factory.mktemp("sharded")
    logs = train(tiny_data, save_dir, 2, 8, "--moe-record-a2a-time")
    return save_dir, logs


def test_sharded_training_equals_replicated_training(tiny_data, sharded, tmp_path):
    save_dir, logs = sharded
    assert re.search(r"a2a_share[ =]0\.\d+", logs[0][1]), "all-to-all share must be logged"
    prefix = save_dir / "checkpoint_last"
    shared, ranks = load(f"{prefix}-shared.pt"), [load(f"{prefix}-rank-{r}.pt") for r in (0, 1)]
    # rank files hold disjoint halves of every layer's experts, and only experts
    owned = [{(m.group(1), int(m.group(2))) for m in map(EXPERT_KEY.match, part["model"])
              if m} for part in ranks]
    for r, part in enumerate(ranks):
        assert all(EXPERT_KEY.match(k) for k in part["model"])
        layers = {layer for layer, _ in owned[r]}
        assert layers == {"encoder.layers.1.ffn", "decoder.layers.1.ffn"}
        assert {e for _, e in owned[r]} == {2 * r, 2 * r + 1}
    assert not any(EXPERT_KEY.match(k) for k in shared["model"])
    # every rank held the same shared parameters when saving
    assert ranks[0]["sharding"]["shared_digest"] == ranks[1]["sharding"]["shared_digest"]

    # the same run with replicated experts (data parallel): same parameters and Adam moments,
    # so expert gradients were neither averaged over ranks nor counted twice
    replicated = tmp_path / "replicated"
    train(tiny_data, replicated, 2, 8, "--moe-expert-parallel", "off")
    assert not list(replicated.glob("*-rank-*.pt"))
    assert consolidate_main([str(prefix), "--output", str(tmp_path / "merged.pt")]) == 0
    merged, reference = load(tmp_path / "merged.pt"), load(replicated / "checkpoint_last.pt")
    assert merged["model"].keys() == reference["model"].keys()
    for key, value in reference["model"].items():
        if torch.is_tensor(value):
            torch.testing.assert_close(merged["model"][key], value, rtol=0, atol=2e-4,
                                       msg=key)
    mine, theirs = (s["last_optimizer_state"]["state"] for s in (merged, reference))
    assert mine.keys() == theirs.keys()
    for i in theirs:
        torch.testing.assert_close(mine[i]["exp_avg"], theirs[i]["exp_avg"], rtol=1e-3,
                                   atol=1e-7)


def test_consolidated_and_pruned_shards_translate_alike(tiny_data, sharded, tmp_path):
    save_dir, _ = sharded
    prefix = save_dir / "checkpoint_last"
    assert consolidate_main([str(prefix), "--output", str(tmp_path / "full.pt")]) == 0
    assert prune_main([str(prefix), "--lang-pair", "en-fr", "--output",
                       str(tmp_path / "en-fr.pt")]) == 0
    assert os.path.getsize(tmp_path / "en-fr.pt") < os.path.getsize(tmp_path / "full.pt") / 2
    full = hypotheses(generate(tiny_data, tmp_path / "full.pt"))
    pruned = hypotheses(generate(tiny_data, tmp_path / "en-fr.pt"))
    assert len(full) == 24 and full.keys() == pruned.keys()
    for i in full:
        assert pruned[i][1] == full[i][1]
        assert pruned[i][0] == pytest.approx(full[i][0], abs=1e-3)


@pytest.mark.slow
def test_resume_moves_between_world_sizes_2_1_2(tiny_data, sharded, tmp_path):
    save_dir, _ = sharded
    one, two = tmp_path / "one", tmp_path / "two"
    (_, log), = train(tiny_data, one, 1, 10, "--restore-file",
                      save_dir / "checkpoint_last.pt")
    assert "Loaded checkpoint" in log and re.search(r"num_updates[ =]10\b", log)
    assert (one / "checkpoint_last.pt").exists()  # one process: an ordinary checkpoint
    logs = train(tiny_data, two, 2, 12, "--restore-file", one / "checkpoint_last.pt")
    assert "Loaded checkpoint" in logs[0][1] and re.search(r"num_updates[ =]12\b", logs[0][1])
    logs = train(tiny_data, two, 2, 14)  # same world size, from its own checkpoint_last
    assert re.search(r"Loaded checkpoint .*checkpoint_last-shared\.pt .*@ 12 updates",
                     logs[0][1])
    assert re.search(r"num_updates[ =]14\b", logs[0][1])
    parts = [load(two / f"checkpoint_last-rank-{r}.pt") for r in (0, 1)]
    assert parts[0]["sharding"]["shared_digest"] == parts[1]["sharding"]["shared_digest"]


def _consolidate_fails(capsys, prefix, output, message):
    assert consolidate_main([str(prefix), "--output", str(output)]) != 0
    err = capsys.readouterr().err
    assert message in err, err
    assert not os.path.exists(output), "nothing partial is written"
    assert not list(Path(output).parent.glob(".*.tmp")), "no temporary file left behind"


def test_bad_sharded_checkpoints_are_clear_errors(sharded, tmp_path, capsys):
    save_dir, _ = sharded
    out = tmp_path / "out.pt"
    for name in ("missing", "extra", "foreign"):
        (tmp_path / name).mkdir()
        for f in save_dir.glob("checkpoint_last-*.pt"):
            shutil.copy(f, tmp_path / name / f.name)
    os.remove(tmp_path / "missing" / "checkpoint_last-rank-1.pt")
    _consolidate_fails(capsys, tmp_path / "missing" / "checkpoint_last", out,
                       "checkpoint_last-rank-1.pt is missing")
    shutil.copy(save_dir / "checkpoint_last-rank-1.pt",
                tmp_path / "extra" / "checkpoint_last-rank-2.pt")
    _consolidate_fails(capsys, tmp_path / "extra" / "checkpoint_last", out,
                       "checkpoint_last-rank-2.pt does not belong to")
    foreign = tmp_path / "foreign" / "checkpoint_last-rank-1.pt"
    part = load(foreign)
    part["sharding"]["save_id"] = "another-run"
    torch.save(part, foreign)
    _consolidate_fails(capsys, tmp_path / "foreign" / "checkpoint_last", out,
                       "checkpoint_last-rank-1.pt comes from another run or save")
    assert prune_main([str(tmp_path / "missing" / "checkpoint_last"), "--lang-pair", "en-fr",
                       "--output", str(out)]) != 0
    assert "checkpoint_last-rank-1.pt is missing" in capsys.readouterr().err
    assert not out.exists()
    os.remove(tmp_path / "missing" / "checkpoint_last-shared.pt")  # rank 0's file only
    assert prune_main([str(tmp_path / "missing" / "checkpoint_last"), "--lang-pair", "en-fr",
                       "--output", str(out)]) != 0
    assert "checkpoint_last-shared.pt is missing" in capsys.readouterr().err


def _cfg(**changes):
    from types import SimpleNamespace as NS
    cfg = NS(distributed_training=NS(ddp_backend="legacy_ddp", zero_sharding="none"),
             optimization=NS(use_bmuf=False), ema=NS(store_ema=False),
             common=NS(fp16=False, bf16=False, memory_efficient_fp16=False,
                       memory_efficient_bf16=False, fp16_no_flatten_grads=False))
    for path, value in changes.items():
        group, name = path.split("__")
        setattr(getattr(cfg, group), name, value)
    return cfg


def test_training_setup_checks():
    from fairseq_taskmoe.integration.trainer_patch import check_training_setup

    check_training_setup(_cfg(), 2)
    check_training_setup(_cfg(common__fp16=True, common__fp16_no_flatten_grads=True), 2)
    check_training_setup(_cfg(common__fp16=True, common__memory_efficient_fp16=True), 2)
    for changes, message in [
        ({"distributed_training__ddp_backend": "c10d"}, "--ddp-backend c10d cannot train"),
        ({"distributed_training__ddp_backend": "fully_sharded"}, "Use --ddp-backend legacy_ddp"),
        ({"common__fp16": True}, "add --fp16-no-flatten-grads"),
        ({"optimization__use_bmuf": True}, "--use-bmuf is not supported"),
        ({"ema__store_ema": True}, "--store-ema is not supported"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_training_setup(_cfg(**changes), 2)


def test_training_ranks_destroy_their_process_group(tiny_data):
    """fairseq's distributed_main, as the plugin installs it (teardown.py), destroys the
    process group once training has returned, and leaves it alone after a failure."""
    from conftest import parse_train_args
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils

    def cfg():
        return convert_namespace_to_omegaconf(parse_train_args(tiny_data, [
            "--distributed-world-size", "1", "--distributed-rank", "0", "--distributed-no-spawn",
            "--distributed-backend", "gloo", "--distributed-init-method",
            f"tcp://127.0.0.1:{free_port()}"]))

    seen = []
    distributed_utils.call_main(cfg(), lambda cfg: seen.append(dist.is_initialized()))
    assert seen == [True] and not dist.is_initialized()

    def fail(cfg):
        raise RuntimeError("training failed")

    with pytest.raises(RuntimeError, match="training failed"):
        distributed_utils.call_main(cfg(), fail)
    try:
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--moe-expert-count", "3"], "3 experts cannot be split over 2 ranks"),
    (["--ddp-backend", "c10d"], "--ddp-backend c10d cannot train with sharded experts"),
])
def test_sharded_training_refuses_what_it_cannot_do(tiny_data, tmp_path, flags, message):
    results = train(tiny_data, tmp_path, 2, 2, *flags, check=False)
    assert all(code != 0 for code, _ in results)
    assert message in results[0][1], results[0][1][-2000:]
