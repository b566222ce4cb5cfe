"""Inference inside a multi-process job: a model loaded from a checkpoint holds whole experts.

Only fairseq-train's build of the model shards its experts (translation_task_moe's build_model
without from_checkpoint, sharding.expert_parallel_build). fairseq's checkpoint loading (the hub
interface, fairseq-generate, -validate) builds whole experts in any process group, so a 2-rank
job loads an ordinary checkpoint and translates exactly as one process does."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_cli import train
from test_sharding import free_port

SOURCES = ["e1 e2 e3", "e4 e5", "e7 e0 e11 e3"]


def _translate(checkpoint, data):
    """(hypotheses, number of sharded MoE layers) through fairseq_taskmoe.hub.load_translator."""
    from fairseq_taskmoe.distributed.sharding import sharded_layers
    from fairseq_taskmoe.hub import load_translator

    mt = load_translator(str(checkpoint), data=str(data), source_lang="en", target_lang="fr",
                         beam=4)
    return mt.translate(SOURCES, beam=4), len(sharded_layers(mt.models[0]))


def _rank(rank: int, world_size: int, port: int, checkpoint, data, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    torch.set_num_threads(1)
    try:
        from fairseq import tasks

        from conftest import parse_train_args
        from fairseq_taskmoe.distributed.sharding import sharded_layers

        hyps, sharded = _translate(checkpoint, data)
        # in the same group, the training build (fairseq-train's task.build_model) shards
        args = parse_train_args(data)
        task = tasks.setup_task(args)
        training = len(sharded_layers(task.build_model(args)))
        loading = len(sharded_layers(task.build_model(args, from_checkpoint=True)))
        (out_dir / f"rank{rank}.json").write_text(json.dumps(
            {"hyps": hyps, "sharded": sharded, "training": training, "loading": loading}))
    finally:
        dist.destroy_process_group()


def test_hub_in_a_two_rank_group_loads_whole_experts_and_translates_as_one_process(
        tiny_data, tmp_path):
    train(tiny_data, tmp_path, [], updates=60)  # target / target, 4 experts
    checkpoint = tmp_path / "checkpoint_best.pt"
    want, sharded = _translate(checkpoint, tiny_data)  # no process group
    assert sharded == 0 and all(w.startswith("f") for w in " ".join(want).split()), want
    mp.spawn(_rank, args=(2, free_port(), checkpoint, tiny_data, tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["sharded"] == 0, "a loaded model holds every expert"
        assert got["hyps"] == want
        assert got["training"] == 2 and got["loading"] == 0  # enc1, dec1 sharded for training
