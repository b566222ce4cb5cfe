"""Steps 3-5, the student: initialised from the teacher (its non-expert weights, each MoE layer's
two most used experts merged), then trained and evaluated as a study variant."""

import copy
import re
import time
from collections import defaultdict
from pathlib import Path

from fairseq_taskmoe.atomic import write_atomically
from fairseq_taskmoe.moe.experts import merge_ffns
from research.common import read_json, rel, write_json
from research.distill.config import Stop, log
from research.distill.teacher import check_settings, teacher_identity
from research.study import evaluation, grid, runner, training

# <layer prefix>.ffn.experts.experts.<unit>.<fc1|fc2>.<weight|bias>
EXPERT_KEY = re.compile(r"^(?P<layer>.+)\.ffn\.experts\.experts\.(?P<unit>\d+)\."
                        r"(?P<name>fc[12]\.(?:weight|bias))$")
MOE_KEY = re.compile(r"^(?P<layer>.+)\.ffn\.(?:router|experts|merged)\.")


def student_state(teacher_model: dict, experts: dict, weights=(0.5, 0.5)):
    """The dense student's state dict from a token-MoE teacher's.

    teacher_model: the teacher's model state dict; experts: {MoE layer prefix (e.g.
    "encoder.layers.1"): (a, b)}, experts 0 and 1 for a layer not listed. Every key outside the
    MoE layers' FFNs is copied as it is; each MoE layer's router is dropped and its FFN becomes
    `<prefix>.ffn.fc1/fc2` = merge_ffns([expert a, expert b], weights). Returns (state dict,
    {prefix: [a, b]})."""
    units = defaultdict(lambda: defaultdict(dict))
    out = {}
    for key, value in teacher_model.items():
        m = EXPERT_KEY.match(key)
        if m:
            units[m["layer"]][int(m["unit"])][m["name"]] = value
        elif not MOE_KEY.match(key):
            out[key] = value  # shared embeddings stay one tensor
    used = {}
    for layer, by_unit in units.items():
        a, b = experts.get(layer, (0, 1))
        for name, tensor in merge_ffns([by_unit[a], by_unit[b]], weights).items():
            out[f"{layer}.ffn.{name}"] = tensor.contiguous()
        used[layer] = [int(a), int(b)]
    return out, used


def layer_prefix(name: str) -> str:
    """analysis' layer names (enc1, dec1) -> state-dict prefixes (encoder.layers.1, ...)."""
    side = "encoder" if name.startswith("enc") else "decoder"
    return f"{side}.layers.{int(name[3:])}"


def most_used_experts(args, data: Path):
    """{layer prefix: (a, b)} the teacher's two most used experts per MoE layer on the
    validation set, and the assignment shares per expert."""
    import warnings

    import torch
    from fairseq import checkpoint_utils

    from fairseq_taskmoe.integration import plugin  # noqa: F401

    warnings.filterwarnings("ignore", category=UserWarning)  # pin_memory, mask-type notes
    from fairseq_taskmoe.moe.analysis import collect_routing_counts

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(args.teacher)], arg_overrides={"data": str(data)})
    with torch.no_grad():
        totals = collect_routing_counts(models[0], task, "valid")
    chosen, shares = {}, {}
    for name, counts in totals.items():
        per_expert = counts.sum(0).double()
        if per_expert.sum() <= 0:
            continue
        share = per_expert / per_expert.sum()
        top = torch.argsort(share, descending=True)[:2].tolist()
        chosen[layer_prefix(name)] = tuple(top)
        shares[layer_prefix(name)] = [round(float(s), 4) for s in share]
    return chosen, shares


def init_checkpoint(teacher_state: dict, model: dict, info: dict):
    """A fairseq checkpoint of the dense student: the teacher's config with --moe-freq 0, a fresh
    optimizer history (update 0) and no training time, for --finetune-from-model."""
    cfg = copy.deepcopy(teacher_state["cfg"])
    cfg["model"].moe_freq = 0
    last = teacher_state["optimizer_history"][-1]
    return {"args": None, "cfg": cfg, "model": model, "criterion": teacher_state.get("criterion"),
            "optimizer_history": [{"criterion_name": last["criterion_name"],
                                   "optimizer_name": last["optimizer_name"],
                                   "lr_scheduler_state": {"best": None}, "num_updates": 0}],
            "task_state": teacher_state.get("task_state") or {},
            "extra_state": {"train_iterator": {"version": 2, "epoch": 1,
                                               "iterations_in_epoch": 0, "shuffle": True}},
            "distill_init": info}


def step_init(args, prep: Path):
    out_dir = args.work / "init"
    path, record_path = out_dir / "student_init.pt", out_dir / "student_init.json"
    if args.init == "random":
        log("init: --init random, the student starts from fairseq's initialisation")
        return {"init": "random"}
    if path.exists() and record_path.exists():
        log(f"init: {rel(path)} exists, skipped")
        return read_json(record_path)
    from fairseq import checkpoint_utils

    from fairseq_taskmoe.deploy.pruning import count_parameters
    from fairseq_taskmoe.integration.compat import load_checkpoint

    start = time.time()
    teacher = teacher_identity(args)
    check_settings(args, teacher)
    log("init: count the teacher's expert use on the validation set ...")
    chosen, shares = most_used_experts(args, prep / "bin")
    how = "the two experts with most (token, expert) assignments on the validation set"
    if not chosen:
        how = "experts 0 and 1 (the teacher gave no routing counts)"
    state = load_checkpoint(str(args.teacher))
    model_args = state["cfg"]["model"]
    model, used = student_state(state["model"], chosen)
    for layer, (a, b) in used.items():
        side = "encoder" if layer.startswith("encoder") else "decoder"
        width = model[f"{layer}.ffn.fc1.weight"].shape[0]
        dense = getattr(model_args, f"{side}_ffn_embed_dim")
        if width != dense:
            raise Stop(f"{layer}: two merged experts are {width} wide but the student's FFN is "
                       f"{dense}: the student would not be the pruned sub-network's size")
        sh = shares.get(layer)
        log(f"init: {layer}: FFN = 0.5 * (expert {a} + expert {b})"
            + (f" (they get {sh[a]:.1%} and {sh[b]:.1%} of the assignments)" if sh else ""))
    info = {"init": "teacher", "teacher": teacher,
            "copied": "every weight outside the MoE layers' FFNs (embeddings, attention, layer "
                      "norms, dense FFNs)",
            "moe_ffn": "merge_ffns([expert_a, expert_b], [0.5, 0.5]): one FFN of twice the "
                       "expert width computing 0.5 * (expert_a(x) + expert_b(x)); routers "
                       "dropped",
            "experts_chosen_by": how, "experts": used, "expert_shares_valid": shares,
            "params": count_parameters(model)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(init_checkpoint(state, model, info), str(path))
    # what fairseq-train --finetune-from-model does: build the model from the config and load
    # the weights strictly
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": str(prep / "bin")})
    info["loads_in_fairseq"] = type(models[0]).__name__
    info["seconds"] = round(time.time() - start, 1)
    write_json(record_path, info)
    log(f"init: wrote {rel(path)} ({info['params']:,} parameters; loads strictly in fairseq)")
    return info


def register_variant(args):
    """The student as a study variant: the study's train and evaluate then run it like any
    other."""
    flags = ["--moe-freq", 0]
    if args.init == "teacher":
        flags += ["--finetune-from-model", args.work / "init" / "student_init.pt"]
    label = f"dense student distilled from {grid.VARIANTS['token_token']['label']}" + (
        "" if args.init == "teacher" else " (random init)")
    grid.VARIANTS[args.variant] = dict(label=label, flags=flags, seeds=(args.seed,),
                                        routing=None)


def step_train(args):
    data = args.work / "data" / "bin"
    if not (data / ".done").exists():
        raise Stop("train: no distilled data yet; run the teacher and binarize steps")
    if args.init == "teacher" and not (args.work / "init" / "student_init.pt").exists():
        raise Stop("train: no student_init.pt yet; run the init step")
    run_dir = args.work / "runs" / args.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    return training.train(args, data, run_dir, args.variant, args.seed, args.run_name)


def step_evaluate(args, prep: Path, train_cmd):
    run_dir = args.work / "runs" / args.run_name
    done = run_dir / "train.done.json"
    if not done.exists() or read_json(done).get("max_update") != args.max_update:
        raise Stop("evaluate: the student is not trained yet; run the train step")
    path = run_dir / "evaluation.json"
    trained = read_json(done)["num_updates"]
    if path.exists() and read_json(path)["budget"]["updates_done"] == trained:
        log(f"evaluate: {rel(path)} exists, skipped")
        return read_json(path)
    if train_cmd is None:
        train_cmd = grid.train_command(args.work / "data" / "bin", args.variant, args.seed,
                                        run_dir / "checkpoints", args.max_update,
                                        args.save_interval)
    args.langid_accuracy = runner.langid_accuracy(prep)
    out = evaluation.evaluate(args, args.work / "data", args.run_name, args.variant, args.seed,
                         run_dir, train_cmd)
    write_json(path, out)
    return out
