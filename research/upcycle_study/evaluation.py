"""Evaluating the upcycling study's checkpoints with the study's own code
(research.study.evaluation: fairseq-generate, beam 5, sacreBLEU): a row's final checkpoint on
the whole test set of every trained direction, each task-MoE pruned per direction and checked
identical; the upcycled checkpoint at step 0 against the dense model's hypotheses; the
intermediate checkpoints of the BLEU-vs-compute curves on a seeded sample of the test set
(build_sample), which keeps each point to about a minute."""

import random
from pathlib import Path

from research.common import parse_generate
from research.study.corpus import sentences_if_built, subset_binarized
from research.study.evaluation import Timer, corpus_of, generate, prune_and_evaluate, score

CURVE_CAP, SAMPLE_SEED = 200, 1  # the curves' test sentences per direction, the sample's seed


def sample_indices(n: int, cap: int, seed: int = SAMPLE_SEED):
    """The test sentences a capped set keeps: all when n <= cap (or no cap), else a seeded
    sample in their original order."""
    if not cap or n <= cap:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), cap))


def build_sample(prep: Path, out: Path, langs, pairs, cap: int, seed: int = SAMPLE_SEED):
    """A data folder for fairseq-generate holding the same seeded sample of every pair's test
    set (Multi30k's is 4-way parallel: one sentence set for all directions): the dictionaries,
    bin/test.{pair}.{lang} and text/test.{lang}, the references that research.study's score()
    reads. Skipped when out/bin/.done records the same cap, seed and pairs. Returns the number
    of sentences per direction."""
    import json

    from fairseq_taskmoe.atomic import atomic_file

    out_bin, out_text = Path(out) / "bin", Path(out) / "text"
    done = out_bin / ".done"
    want = {"cap": cap, "seed": seed, "pairs": list(pairs)}
    built = sentences_if_built(done, want)
    if built is not None:
        return built
    out_bin.mkdir(parents=True, exist_ok=True)
    out_text.mkdir(parents=True, exist_ok=True)
    src_bin = Path(prep) / "bin"
    for d in [*src_bin.glob("dict.*.txt"), src_bin / "langs.txt"]:
        if d.exists():
            (out_bin / d.name).write_bytes(d.read_bytes())
    n = len((Path(prep) / "text" / f"test.{langs[0]}").read_text().splitlines())
    keep = sample_indices(n, cap, seed)
    for lang in langs:
        refs = (Path(prep) / "text" / f"test.{lang}").read_text().splitlines()
        if len(refs) != n:
            raise RuntimeError(f"{prep}/text/test.{lang}: {len(refs)} lines, test.{langs[0]} "
                               f"{n}: not one parallel test set")
        with atomic_file(str(out_text / f"test.{lang}"), "w") as f:
            f.write("".join(refs[i] + "\n" for i in keep))
    for pair in pairs:
        for lang in pair.split("-"):
            prefix = f"test.{pair}.{lang}"
            subset_binarized(src_bin, out_bin, prefix, keep, n, "reference sentences")
    with atomic_file(str(done), "w") as f:
        json.dump({**want, "sentences": len(keep)}, f)
    return len(keep)


def mean(values):
    values = list(values)
    return round(sum(values) / len(values), 2) if values and None not in values else None


def curve_bleu(args, sample: Path, checkpoint: Path, out_dir: Path, tag: str):
    """BLEU of `checkpoint` per evaluated direction on the sample folder, and their average;
    generations go to out_dir/gen.{tag}.{pair}.txt (each skipped when it exists)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bleu = {}
    for pair in args.directions:
        hyps, _speed = generate(args, sample / "bin", checkpoint, pair,
                                out_dir / f"gen.{tag}.{pair}.txt")
        bleu[pair] = score(hyps, sample, pair, corpus_of(args))["bleu"]
    return {"bleu": bleu, "avg_bleu": mean(bleu.values())}


def _pop_signature(records, found):
    for record in records:
        sig = record.pop("signatures", None)
        if sig is not None and sig not in found:
            found.append(sig)


def evaluate_final(args, prep: Path, checkpoint: Path, eval_dir: Path, task_routed: bool):
    """The study's evaluation of one checkpoint on the whole test set of every evaluated
    direction: sacreBLEU, chrF and the study's other scores per direction, their averages, and
    for a task-routed model each direction pruned (taskmoe-prune) and translated again, with
    whether its hypotheses are the full model's (research.study.evaluation.prune_and_evaluate).
    Every generation is kept in eval_dir and skipped when there."""
    from fairseq_taskmoe.deploy.pruning import count_parameters
    from fairseq_taskmoe.integration.compat import load_checkpoint

    eval_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(eval_dir / "times.json")
    data, corpus = prep / "bin", corpus_of(args)
    directions, pruned, full_hyps = {}, {}, {}
    for pair in args.directions:
        hyps, speed = timer.step(f"generate {pair}", lambda: generate(
            args, data, checkpoint, pair, eval_dir / f"gen.full.{pair}.txt"))
        full_hyps[pair] = hyps
        directions[pair] = {**score(hyps, prep, pair, corpus), "tokens_per_s": speed}
        if task_routed:
            pruned[pair] = prune_and_evaluate(args, data, prep, checkpoint, pair, eval_dir,
                                              hyps, timer)
    sigs = []
    _pop_signature([*directions.values(), *pruned.values()], sigs)
    return {"directions": directions,
            "averages": {k: mean(d[k] for d in directions.values()) for k in ("bleu", "chrf")},
            "pruned": pruned,
            "pruned_identical": (sum(p["identical_hypotheses"] for p in pruned.values())
                                 if pruned else None),
            "params": count_parameters(load_checkpoint(str(checkpoint))["model"]),
            "checkpoint_bytes": checkpoint.stat().st_size,
            "signatures": sigs[0] if len(sigs) == 1 else sigs,
            "evaluation_seconds": round(sum(timer.times.values()), 1)}


def dense_hypotheses(dense_eval_dir: Path, pair: str):
    """The dense model's hypotheses of `pair` on the whole test set (its final evaluation)."""
    return parse_generate((dense_eval_dir / f"gen.full.{pair}.txt").read_text())[0]


def step0_check(args, prep: Path, upcycled: Path, dense_eval_dir: Path, eval_dir: Path):
    """Step 0 of an upcycled task-MoE: per evaluated direction, whether the upcycled model and
    its pruned sub-network (taskmoe-prune) give the dense model's hypotheses on the whole test
    set, and their BLEU."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(eval_dir / "times.json")
    data, out = prep / "bin", {}
    for pair in args.directions:
        dense = dense_hypotheses(dense_eval_dir, pair)
        hyps, _ = timer.step(f"generate {pair}", lambda: generate(
            args, data, upcycled, pair, eval_dir / f"gen.full.{pair}.txt"))
        # compared with the dense hypotheses: pruned == dense, not only pruned == upcycled
        pruned = prune_and_evaluate(args, data, prep, upcycled, pair, eval_dir, dense, timer)
        out[pair] = {"sentences": len(dense), "upcycled_identical_to_dense": hyps == dense,
                     "pruned_identical_to_dense": pruned["identical_hypotheses"],
                     "bleu_dense": score(dense, prep, pair, corpus_of(args))["bleu"],
                     "bleu_upcycled": score(hyps, prep, pair, corpus_of(args))["bleu"],
                     "bleu_pruned": pruned["bleu"], "pruned_bytes": pruned["bytes"],
                     "kept_experts": pruned["kept_experts"]}
    return {"directions": out,
            "all_identical": all(d["upcycled_identical_to_dense"] and
                                 d["pruned_identical_to_dense"] for d in out.values()),
            "evaluation_seconds": round(sum(timer.times.values()), 1)}

