"""Evaluating a trained study run: every direction's test set translated (beam 5) and scored
(sacreBLEU, chrF, off-target rate), task-routed models pruned per trained direction and
re-evaluated, lang_pair routing under both unseen-pair policies, the routing heatmap; returns
the run's results record. Every step is skipped when its output file exists."""

import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

from fairseq_taskmoe.langid import language_shares
from research.common import (BIN, bleu, generate_command, logger, parse_generate, read_json, run,
                             show, write_json)
from research.study.grid import (BEAM, LANGS, TASK_ROUTING, TRAINED, UNSEEN_OPTION,
                                 UNSEEN_POLICIES, VARIANTS, ZERO_SHOT, library_has, on_device,
                                 preset_flags)

log = logger("study")


class Timer:
    """Seconds spent per evaluation step, kept across sittings in eval/times.json."""

    def __init__(self, path: Path):
        self.path = path
        self.times = read_json(path) if path.exists() else {}

    def step(self, name, fn):
        start = time.time()
        out = fn()
        self.times[name] = round(self.times.get(name, 0.0) + time.time() - start, 1)
        write_json(self.path, self.times)
        return out


def generate(args, data, checkpoint, pair, out: Path, overrides=None):
    """Detokenized hypotheses {id: text} and tokens/s; skipped when `out` exists."""
    if not out.exists():
        cmd = on_device(generate_command(data, checkpoint, pair, beam=BEAM,
                                         langs=",".join(LANGS), pairs=",".join(TRAINED)),
                        args.preset)
        if args.max_len_b is not None:
            cmd += ["--max-len-a", 0, "--max-len-b", args.max_len_b]
        if overrides:
            cmd += ["--model-overrides", repr(overrides)]
        run(cmd, log_path=out)
    return parse_generate(out.read_text())


def score(hyps, prep: Path, pair: str):
    """BLEU (common.bleu: sacreBLEU's corpus_bleu defaults), chrF, language shares and the two
    metric signatures (under the key "signatures")."""
    from sacrebleu.metrics import BLEU, CHRF

    tgt = pair.split("-")[1]
    ref_path = prep / "text" / f"test.{tgt}"
    refs = ref_path.read_text().splitlines()
    order = sorted(hyps)
    if len(order) != len(refs):
        raise RuntimeError(f"{pair}: {len(order)} hypotheses for {len(refs)} references")
    hyp_list, ref_lists = [hyps[i] for i in order], [[refs[i] for i in order]]
    bleu_metric, chrf_metric = BLEU(), CHRF()
    # for its signature and lengths; the score is common.bleu's
    lengths = bleu_metric.corpus_score(hyp_list, ref_lists)
    chrf = chrf_metric.corpus_score(hyp_list, ref_lists).score
    shares = language_shares(hyp_list, tgt)
    # hypotheses over twice their reference's length: runaway decoding (repetition loops)
    long = sum(len(h.split()) > 2 * max(len(r.split()), 1) for h, r in zip(hyp_list, ref_lists[0]))
    return {"bleu": round(bleu(hyps, ref_path), 2), "chrf": round(chrf, 2),
            **{k: round(v, 4) for k, v in shares.items()},
            "length_ratio": round(lengths.sys_len / max(lengths.ref_len, 1), 4),
            "over_twice_reference": round(long / len(hyp_list), 4),
            "signatures": {"bleu": str(bleu_metric.get_signature()),
                           "chrf": str(chrf_metric.get_signature())}}


def parse_prune_log(text):
    """taskmoe-prune's report -> {layer: [[expert, gate weight], ...]} of the pruned layers."""
    kept = {}
    for line in text.splitlines():
        m = re.match(r"\s+(\S+)\s+(target|lang_pair)\s+pruned .*?\)\s+(.*)$", line)
        if m:
            kept[m.group(1)] = [[int(e), float(w)] for e, w in
                                re.findall(r"e(\d+)\*([\d.]+)", m.group(3))]
    return kept


def prune_and_evaluate(args, data, prep, ckpt, pair, eval_dir, full_hyps, timer):
    """Prune for `pair`, translate its test set with the pruned checkpoint, compare."""
    record = eval_dir / f"pruned.{pair}.json"
    if record.exists():
        return read_json(record)
    pruned = eval_dir / f"pruned.{pair}.pt"
    prune_log = eval_dir / f"prune.{pair}.log"
    if not prune_log.exists() or not pruned.exists():
        timer.step(f"prune {pair}", lambda: run([BIN / "taskmoe-prune", ckpt, "--lang-pair", pair,
                                                 "--output", pruned, "--force"],
                                                log_path=prune_log))
    hyps, speed = timer.step(f"generate pruned {pair}", lambda: generate(
        args, data, pruned, pair, eval_dir / f"gen.pruned.{pair}.txt"))
    from fairseq_taskmoe.deploy.params import active_parameters
    from fairseq_taskmoe.deploy.pruning import count_parameters
    from fairseq_taskmoe.integration.compat import load_checkpoint

    model = load_checkpoint(str(pruned))["model"]
    out = {**score(hyps, prep, pair),
           "identical_hypotheses": hyps == full_hyps,
           "bytes": pruned.stat().st_size,
           "params": count_parameters(model),
           "params_active_per_token": active_parameters(model, preset_flags(args)["--moe-top-k"]),
           "tokens_per_s": speed,
           "kept_experts": parse_prune_log(prune_log.read_text())}
    write_json(record, out)
    if not args.keep_pruned:
        pruned.unlink()
    return out


def heatmap(args, data, ckpt, run_name, eval_dir, timer):
    """docs/img/<run>.png and the usage JSON it is drawn from (valid split)."""
    png, usage = args.img_dir / f"{run_name}.png", eval_dir / "routing.valid.json"
    if not (png.exists() and usage.exists()):
        args.img_dir.mkdir(parents=True, exist_ok=True)
        timer.step("heatmap", lambda: run(
            [sys.executable, "-m", "research.study.heatmap", ckpt, "--data", data,
             "--out", png, "--json", usage, "--title", run_name],
            log_path=eval_dir / "heatmap.log"))
    return png, read_json(usage)


def average(directions, names, key):
    vals = [directions[d][key] for d in names if d in directions]
    return round(sum(vals) / len(vals), 2) if vals and len(vals) == len(names) else None


def evaluate(args, prep, run_name, variant, seed, run_dir, train_cmd):
    data = prep / "bin"
    spec = VARIANTS[variant]
    ckpt = run_dir / "checkpoints" / "checkpoint_last.pt"
    trained = read_json(run_dir / "train.done.json")
    eval_dir = run_dir / f"eval-u{trained['num_updates']}"  # never mixes two trainings
    eval_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(eval_dir / "times.json")
    prefix = f"{run_name}"
    directions, full_hyps = {}, {}
    for pair in args.directions:
        log(f"{prefix}: generate {pair}{' (zero-shot)' if pair in ZERO_SHOT else ''} ...")
        hyps, speed = timer.step(f"generate {pair}", lambda: generate(
            args, data, ckpt, pair, eval_dir / f"gen.full.{pair}.txt"))
        full_hyps[pair] = hyps
        directions[pair] = {"zero_shot": pair in ZERO_SHOT, **score(hyps, prep, pair),
                            "tokens_per_s": speed}
        log(f"{prefix}: {pair} BLEU {directions[pair]['bleu']:.2f} chrF "
            f"{directions[pair]['chrf']:.2f} off-target {directions[pair]['off_target']:.1%}")

    from fairseq_taskmoe.deploy.params import active_parameters
    from fairseq_taskmoe.deploy.pruning import count_parameters
    from fairseq_taskmoe.integration.compat import load_checkpoint

    full_state = load_checkpoint(str(ckpt))
    full_model = full_state["model"]
    cfg = full_state.get("cfg") or {}
    model_args = (cfg.get("model") if isinstance(cfg, dict) else None) or full_state.get("args")
    total = count_parameters(full_model)
    routing = spec["routing"]
    task_routed = routing is not None and bool(set(routing) & TASK_ROUTING)
    pruned = {}
    if task_routed:
        for pair in [d for d in args.directions if d in TRAINED]:
            log(f"{prefix}: prune for {pair} and translate with the pruned checkpoint ...")
            pruned[pair] = prune_and_evaluate(args, data, prep, ckpt, pair, eval_dir,
                                              full_hyps[pair], timer)
            log(f"{prefix}: pruned {pair}: BLEU {pruned[pair]['bleu']:.2f} (full "
                f"{directions[pair]['bleu']:.2f}), identical hypotheses "
                f"{pruned[pair]['identical_hypotheses']}, {pruned[pair]['bytes']:,} bytes")
    if task_routed and "en-de" in pruned:
        active = pruned["en-de"]["params_active_per_token"]
        active_how = "parameters of the checkpoint pruned for en-de (taskmoe-prune)"
    else:
        top_k, experts = (preset_flags(args)[k] for k in ("--moe-top-k", "--moe-expert-count"))
        active = active_parameters(full_model, top_k)
        active_how = (f"total minus {experts - top_k} idle experts per MoE layer"
                      if routing else "dense: every parameter is active")

    unseen = {}
    if routing == ("lang_pair", "lang_pair"):
        default = (model_args.get(UNSEEN_OPTION) if isinstance(model_args, dict)
                   else getattr(model_args, UNSEEN_OPTION, None))
        if library_has(UNSEEN_OPTION) and default is not None:
            # the plain generations above used the checkpoint's own policy; the others by
            # --model-overrides
            by_policy = {default: {p: directions[p] for p in args.directions if p in ZERO_SHOT}}
            for policy in [p for p in UNSEEN_POLICIES if p != default]:
                by_policy[policy] = {}
                for pair in [d for d in args.directions if d in ZERO_SHOT]:
                    log(f"{prefix}: generate {pair} with {UNSEEN_OPTION}={policy} ...")
                    hyps, speed = timer.step(f"generate {policy} {pair}", lambda: generate(
                        args, data, ckpt, pair, eval_dir / f"gen.{policy}.{pair}.txt",
                        overrides={UNSEEN_OPTION: policy}))
                    by_policy[policy][pair] = {**score(hyps, prep, pair), "tokens_per_s": speed}
                    got = by_policy[policy][pair]
                    log(f"{prefix}: {pair} with {policy}: BLEU {got['bleu']:.2f} off-target "
                        f"{got['off_target']:.1%}")
            unseen = {"option": UNSEEN_OPTION, "checkpoint_default": default,
                      "override": f"--model-overrides \"{{'{UNSEEN_OPTION}': POLICY}}\"",
                      "directions": by_policy}
        else:
            note = (f"skipped: the plugin (or this checkpoint) has no model option "
                    f"{UNSEEN_OPTION}, so zero-shot pairs were routed by their own untrained row "
                    "only")
            log(f"{prefix}: {note}")
            unseen = {"skipped": note}

    sigs = []  # the same for every direction; kept once
    extra = [r for d in (unseen.get("directions") or {}).values() for r in d.values()]
    for record in [*directions.values(), *pruned.values(), *extra]:
        sig = record.pop("signatures", None)
        if sig is None:  # a dict listed twice (the default policy's zero-shot records)
            continue
        if sig not in sigs:
            sigs.append(sig)
    png, usage = (heatmap(args, data, ckpt, run_name, eval_dir, timer) if routing
                  else (None, None))
    times = timer.times
    import fairseq
    import sacrebleu
    import torch

    gen_example = on_device(generate_command(data, ckpt, "en-de", beam=BEAM,
                                             langs=",".join(LANGS), pairs=",".join(TRAINED)),
                            args.preset)
    max_tokens = preset_flags(args)["--max-tokens"]
    return {
        "run": run_name, "variant": variant, "label": spec["label"], "seed": seed,
        "routing": {"encoder": routing[0], "decoder": routing[1]} if routing else None,
        "task_routed": task_routed,
        "config": {"shared_flags": dict(preset_flags(args)),
                   "variant_flags": [str(f) for f in spec["flags"]]},
        "budget": {"max_update": args.max_update, "updates_done": trained["num_updates"],
                   "max_tokens": max_tokens,
                   "updates_x_max_tokens": trained["num_updates"] * max_tokens},
        "data": {"train_lines_per_direction": args.train_size or "all (29,000)",
                 "trained_directions": TRAINED, "zero_shot_directions": ZERO_SHOT,
                 "test_set": "Multi30k test_2016_flickr (1,000 sentences)",
                 "evaluated_directions": args.directions},
        "commands": {"study": "-m research.study " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                     "prepare": args.prepare_command,
                     "train": show(train_cmd),
                     "generate_example": show(gen_example),
                     "generate_max_len_b": args.max_len_b},
        "wall_seconds": {"training": trained["training_seconds"],
                         "evaluation": round(sum(times.values()), 1),
                         "evaluation_steps": times},
        "params": {"total": total, "active_per_token": active, "active_how": active_how},
        "checkpoint_bytes": ckpt.stat().st_size,
        "signatures": sigs[0] if len(sigs) == 1 else sigs,
        "langid": {"method": "fairseq_taskmoe.langid: stop-word and unique-letter voting",
                   "accuracy_on_test_references": args.langid_accuracy},
        "directions": directions,
        "averages": {
            "trained": {k: average(directions, TRAINED, k) for k in ("bleu", "chrf")},
            "zero_shot": {k: average(directions, ZERO_SHOT, k)
                          for k in ("bleu", "chrf", "off_target")},
        },
        "pruned": pruned,
        "unseen_pairs": unseen,
        "heatmap": str(png) if png else None,
        "routing_usage_valid": usage,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "fairseq": fairseq.__version__, "sacrebleu": sacrebleu.__version__,
                        "cpu_count": os.cpu_count(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
