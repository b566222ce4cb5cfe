"""The inference benchmark's variants (research.bench.inference, docs/benchmarks.md section 1):
random-weight checkpoints of each at a given shape, loaded as fairseq-generate would, the same
random inputs for every one, and one timed decode or score call. Random weights are all that
speed needs. research/bench/serve.py serves variants a and b built here, for more languages
too (dict_dir's `langs`, the shape's optional `langs`, `pairs`, `max_target_positions`: the tiny
run of research/bench/serve_many.py's test)."""

import time
import warnings
from pathlib import Path

import torch

from fairseq_taskmoe.atomic import atomic_file, write_text_atomically
from research.common import LANGS, PAIRS, REPO

warnings.filterwarnings("ignore", category=FutureWarning)  # fairscale vs current torch

PAIR = "en-de"
VARIANTS = {  # name -> (label, routing (enc, dec) or None for dense, prune, merge)
    "a": ("token-MoE (token/token), full", ("token", "token"), False, True),
    "b": ("task-MoE (target/target), full", ("target", "target"), False, True),
    "c": ("task-MoE pruned, merged", ("target", "target"), True, True),
    "d": ("task-MoE pruned, --no-merge", ("target", "target"), True, False),
    "e": ("dense transformer, active size of c", None, False, True),
    "f": ("token/target pruned (decoder)", ("token", "target"), True, True),
}


def dict_dir(work: Path, vocab: int, langs=None) -> Path:
    """A data folder holding only dictionaries (all the task needs to build models): words
    w0, w1, ... for `langs` (default: Multi30k's LANGS, in work/dict{vocab}; other languages in
    a folder of their own), vocab symbols in all with the special and language tokens."""
    langs = list(langs or LANGS)
    d = work / (f"dict{vocab}" if langs == LANGS else f"dict{vocab}-{'-'.join(langs)}")
    if not (d / f"dict.{langs[0]}.txt").exists():
        d.mkdir(parents=True, exist_ok=True)
        text = "".join(f"w{i} 1\n" for i in range(vocab - 4 - len(langs)))
        for lang in langs:
            write_text_atomically(d / f"dict.{lang}.txt", text)
    return d


def train_args(data: Path, args, experts: int, routing):
    """fairseq's training args of a variant. args: the shape (layers, embed_dim, ffn_dim,
    heads, moe_freq) and optionally `langs` and `pairs` (lists; default: Multi30k's LANGS and
    PAIRS, the directions the model is trained on) and `max_target_positions` (default:
    fairseq's)."""
    import user_dir  # noqa: F401  (registers the plugin)
    from fairseq import options

    langs = getattr(args, "langs", None) or LANGS
    pairs = getattr(args, "pairs", None) or PAIRS
    shape = ["--encoder-layers", args.layers, "--decoder-layers", args.layers,
             "--encoder-embed-dim", args.embed_dim, "--decoder-embed-dim", args.embed_dim,
             "--encoder-ffn-embed-dim", args.ffn_dim, "--decoder-ffn-embed-dim", args.ffn_dim,
             "--encoder-attention-heads", args.heads, "--decoder-attention-heads", args.heads,
             "--share-all-embeddings", "--encoder-langtok", "tgt", "--decoder-langtok",
             "--langs", ",".join(langs), "--lang-pairs", ",".join(pairs), "--cpu"]
    if getattr(args, "max_target_positions", None):
        shape += ["--max-target-positions", args.max_target_positions]
    if routing is None:  # fairseq's own model and task: no plugin code on the dense path
        argv = [data, "--task", "translation_multi_simple_epoch", "--arch", "transformer"]
    else:
        argv = [data, "--user-dir", REPO / "user_dir", "--task", "translation_task_moe",
                "--arch", "task_moe", "--moe-expert-count", experts, "--moe-top-k", 2,
                "--moe-expert-ffn-dim", args.ffn_dim // 2, "--moe-freq", args.moe_freq,
                "--encoder-moe-routing", routing[0], "--decoder-moe-routing", routing[1]]
    argv = [str(a) for a in argv + shape]
    return options.parse_args_and_arch(options.get_training_parser(), argv)


def build_checkpoint(data: Path, args, experts: int, variant: str, path: Path):
    """Random-weight checkpoint of a variant (pruned ones pruned from their full model)."""
    from fairseq import tasks

    from fairseq_taskmoe.deploy.pruning import prune_checkpoint

    _, routing, prune, merge = VARIANTS[variant]
    targs = train_args(data, args, experts, routing)
    torch.manual_seed(1)
    model = tasks.setup_task(targs).build_model(targs)
    state = {"cfg": {"model": targs, "task": targs}, "model": model.state_dict(),
             "args": None, "optimizer_history": [], "extra_state": {},
             "last_optimizer_state": None}
    if prune:
        state, _ = prune_checkpoint(state, PAIR, merge=merge)
    with atomic_file(str(path), "wb") as f:
        torch.save(state, f)


def load(path: Path):
    """(model in eval mode, task) from a checkpoint file, as fairseq-generate would build it."""
    from fairseq import tasks

    import user_dir  # noqa: F401
    from fairseq_taskmoe.integration.compat import load_checkpoint

    state = load_checkpoint(str(path))
    targs = state["cfg"]["model"]
    task = tasks.setup_task(targs)
    model = task.build_model(targs)
    model.load_state_dict(state["model"], strict=True)
    return model.eval(), task


def make_inputs(task, batch: int, args, seed=0):
    """The same random source/target tokens for every variant (en-de rows)."""
    d = task.source_dictionary
    g = torch.Generator().manual_seed(seed + batch)
    low, high = d.nspecial, len(d) - len(LANGS)  # ordinary symbols
    src = torch.randint(low, high, (batch, args.src_len), generator=g)
    src[:, -1] = d.eos()
    tgt = torch.randint(low, high, (batch, args.tgt_len), generator=g)
    prev = torch.cat([torch.full((batch, 1), d.eos()), tgt[:, :-1]], 1)
    return {"src_tokens": src, "src_lengths": torch.full((batch,), args.src_len),
            "prev_output_tokens": prev,
            "src_lang_idx": torch.full((batch,), LANGS.index(PAIR.split("-")[0])),
            "tgt_lang_idx": torch.full((batch,), LANGS.index(PAIR.split("-")[1]))}


def net_input_for(model, net):
    """The stock transformer takes no language ids."""
    if type(model).__module__.startswith("fairseq_taskmoe"):
        return net
    return {k: v for k, v in net.items() if not k.endswith("lang_idx")}


def run_measure(measure, model, task, net, args):
    """One timed call; returns seconds."""
    from fairseq.sequence_generator import SequenceGenerator

    net = net_input_for(model, net)
    start = time.perf_counter()
    with torch.inference_mode():
        if measure == "score":
            model(**net)
        else:
            gen = SequenceGenerator([model], task.target_dictionary, beam_size=args.beam,
                                    max_len_a=0, max_len_b=args.tgt_len, min_len=args.tgt_len)
            src = {k: v for k, v in net.items() if k != "prev_output_tokens"}
            hyps = gen.generate([model], {"net_input": src})
            assert all(len(h[0]["tokens"]) == args.tgt_len + 1 for h in hyps)  # + EOS
    return time.perf_counter() - start


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
