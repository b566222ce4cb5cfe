"""research/distill/student.py: the student initialised from a token-MoE teacher (no
training, no data beyond the tiny corpus): the student's non-expert weights are the teacher's, and
each MoE layer's FFN computes 0.5 * (expert_a(x) + expert_b(x))."""

import argparse

import torch

from conftest import build_task_and_model
from research.distill.speed import generation_speed, median
from research.distill.student import init_checkpoint, layer_prefix, student_state

WIDE = ["--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128"]
TEACHER = ["--encoder-moe-routing", "token", "--decoder-moe-routing", "token",
           "--moe-expert-ffn-dim", "64", *WIDE]  # two experts = one dense FFN of 128
STUDENT = ["--moe-freq", "0", *WIDE]


def test_student_copies_the_teacher_and_merges_two_experts(tiny_data):
    _, _, teacher = build_task_and_model(tiny_data, TEACHER, seed=0)
    _, _, student = build_task_and_model(tiny_data, STUDENT, seed=1)
    teacher.eval()
    student.eval()
    t_state = teacher.state_dict()
    state, used = student_state(t_state, {"encoder.layers.1": (3, 1)})
    assert used == {"encoder.layers.1": [3, 1], "decoder.layers.1": [0, 1]}  # default 0 and 1
    student.load_state_dict(state, strict=True)

    moe = ("encoder.layers.1.ffn.", "decoder.layers.1.ffn.")
    checked = 0
    for key, value in student.state_dict().items():
        if key.startswith(moe) or not torch.is_tensor(value):
            continue
        assert torch.equal(value, t_state[key]), key
        checked += 1
    assert checked > 20
    assert not any(".router." in k or ".experts." in k for k in student.state_dict())

    x = torch.randn(7, 32)
    with torch.no_grad():
        for side, (a, b) in (("encoder", (3, 1)), ("decoder", (0, 1))):
            experts = getattr(teacher, side).layers[1].ffn.experts.experts
            want = 0.5 * (experts[a](x) + experts[b](x))
            got = getattr(student, side).layers[1].ffn(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_init_checkpoint_is_a_fresh_dense_start():
    model_args = argparse.Namespace(moe_freq=2, encoder_ffn_embed_dim=1024)
    teacher = {"cfg": {"model": model_args, "task": None},
               "optimizer_history": [{"criterion_name": "C", "optimizer_name": "Adam",
                                      "lr_scheduler_state": {"best": 1.0}, "num_updates": 1000}],
               "extra_state": {"previous_training_time": 1234.0}, "criterion": None}
    ckpt = init_checkpoint(teacher, {"w": torch.zeros(1)}, {"init": "teacher"})
    assert ckpt["cfg"]["model"].moe_freq == 0 and model_args.moe_freq == 2  # a copy
    assert ckpt["optimizer_history"][-1]["num_updates"] == 0
    assert ckpt["optimizer_history"][-1]["optimizer_name"] == "Adam"
    assert "previous_training_time" not in ckpt["extra_state"]  # the student's clock starts at 0
    assert "last_optimizer_state" not in ckpt


def test_layer_names_and_generation_speed():
    assert layer_prefix("enc1") == "encoder.layers.1"
    assert layer_prefix("dec11") == "decoder.layers.11"
    text = ("INFO | Translated 1,000 sentences (12,345 tokens) in 20.0s (50.00 sentences/s, "
            "617.25 tokens/s)\n")
    assert generation_speed(text) == {"sentences": 1000, "sentences_per_s": 50.0,
                                              "tokens_per_s": 617.25}
    assert median([3, 1, 2]) == 2 and median([1, 2, 3, 4]) == 2.5
