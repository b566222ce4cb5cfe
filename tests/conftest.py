import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # for `import user_dir`
os.environ.setdefault("PYTHONWARNINGS", "ignore")  # fairseq's FutureWarnings in subprocesses
warnings.filterwarnings("ignore", category=FutureWarning)

from tiny_data import LANGS, PAIRS, make_tiny_data  # noqa: E402

TASK_FLAGS = ["--task", "translation_task_moe", "--langs", ",".join(LANGS), "--lang-pairs",
              ",".join(PAIRS), "--encoder-langtok", "tgt", "--decoder-langtok"]
ROUTINGS = ["token", "sentence", "target", "lang_pair"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def trained_tiny(tiny_data, tmp_path_factory) -> Path:
    """A task-MoE (task_moe_tiny, target/target, 4 experts, top-2) trained 120 updates, long
    enough to produce real translations: checkpoint_best.pt, shared by the CLI, export and
    serving tests (read only)."""
    from test_cli import train

    save_dir = tmp_path_factory.mktemp("trained")
    train(tiny_data, save_dir, [], updates=120)
    return save_dir / "checkpoint_best.pt"


def parse_train_args(data: Path, extra=()):
    """fairseq's own training parser, as fairseq-train would parse these flags."""
    import user_dir  # noqa: F401  (registers the plugin)
    from fairseq import options

    argv = [str(data), "--user-dir", str(Path(__file__).parents[1] / "user_dir"), *TASK_FLAGS,
            "--arch", "task_moe_tiny", "--criterion", "moe_label_smoothed_cross_entropy",
            "--share-all-embeddings", "--dropout", "0.0", "--cpu", *extra]
    return options.parse_args_and_arch(options.get_training_parser(), argv)


def build_task_and_model(data: Path, extra=(), seed=0):
    import torch
    from fairseq import tasks

    args = parse_train_args(data, extra)
    torch.manual_seed(seed)
    task = tasks.setup_task(args)
    model = task.build_model(args)
    return args, task, model


def first_batch(task, split="valid", max_tokens=400):
    if split not in task.datasets:
        task.load_dataset(split)
    itr = task.get_batch_iterator(task.dataset(split), max_tokens=max_tokens, seed=1)
    return next(itr.next_epoch_itr(shuffle=False))
