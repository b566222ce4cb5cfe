"""Evaluating a trained study run: every direction's test set translated (beam 5) and scored
(sacreBLEU, chrF, off-target rate), task-routed models pruned per trained direction and
re-evaluated, lang_pair routing under both unseen-pair policies, the routing heatmap; returns
the run's results record. Every step is skipped when its output file exists.

On LoHelp (--corpus lohelp): the capped test sets of research.study.corpus, BLEU with each
target language's tokenizer (zh, ja-mecab, 13a) plus chrF, also against NFKC-normalised
references where that changes them, off-target rates by py3langid (Corpus.detector), no
zero-shot directions; averages over en->X, X->en and the well-covered and lower-coverage
languages (Corpus.groups)."""

import os
import platform
import re
import shlex
import sys
import time
import unicodedata
from pathlib import Path

from fairseq_taskmoe.langid import language_shares
from research.common import (BIN, bleu, generate_command, logger, parse_generate, read_json, run,
                             show, write_json)
from research.study.corpus import CAP_SEED, MULTI30K, WELL_COVERED, bleu_tokenizer
from research.study.grid import (BEAM, TASK_ROUTING, UNSEEN_OPTION, UNSEEN_POLICIES, VARIANTS,
                                 library_has, on_device, preset_flags)

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


def corpus_of(args):
    """The run's corpus (research.study.corpus): Multi30k unless --corpus said otherwise (the
    distillation harness's arguments have none)."""
    return getattr(args, "corpus_spec", None) or MULTI30K


def generate(args, data, checkpoint, pair, out: Path, overrides=None):
    """Detokenized hypotheses {id: text} and tokens/s; skipped when `out` exists."""
    if not out.exists():
        corpus = corpus_of(args)
        cmd = on_device(generate_command(data, checkpoint, pair, beam=BEAM,
                                         langs=",".join(corpus.langs),
                                         pairs=",".join(corpus.trained)),
                        args.preset)
        if args.max_len_b is not None:
            cmd += ["--max-len-a", 0, "--max-len-b", args.max_len_b]
        if overrides:
            cmd += ["--model-overrides", repr(overrides)]
        run(cmd, log_path=out)
    return parse_generate(out.read_text())


def score(hyps, prep: Path, pair: str, corpus=MULTI30K):
    """BLEU (common.bleu: sacreBLEU's corpus_bleu defaults), chrF, language shares and the two
    metric signatures (under the key "signatures"). Other corpora than Multi30k:
    score_tokenized."""
    from sacrebleu.metrics import BLEU, CHRF

    if corpus.name != "multi30k":
        return score_tokenized(hyps, corpus.reference(prep, pair), pair, corpus)
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


def score_tokenized(hyps, ref_path: Path, pair: str, corpus):
    """score() for a corpus with per-direction references and per-language BLEU tokenizers
    (corpus.bleu_tokenizer: zh, ja-mecab, else 13a): BLEU (None where the tokenizer is not
    installed), chrF, the tokenizer, sentence count, length ratio, runaway hypotheses
    (measured in characters for zh and ja, which write no spaces) and language shares (on /
    off target, undetected) by the corpus's detector."""
    from sacrebleu.metrics import BLEU, CHRF

    tgt = pair.split("-")[1]
    refs = ref_path.read_text().splitlines()
    order = sorted(hyps)
    if len(order) != len(refs):
        raise RuntimeError(f"{pair}: {len(order)} hypotheses for {len(refs)} references")
    hyp_list, ref_lists = [hyps[i] for i in order], [[refs[i] for i in order]]
    tok = bleu_tokenizer(tgt)
    chrf_metric = CHRF()
    chrf = chrf_metric.corpus_score(hyp_list, ref_lists).score
    out = {"bleu": None, "chrf": round(chrf, 2), "bleu_tokenize": tok, "sentences": len(refs)}
    out.update({k: round(v, 4)
                for k, v in language_shares(hyp_list, tgt, corpus.detector).items()})
    sigs = {"bleu": None, "chrf": str(chrf_metric.get_signature())}
    if tok is not None:
        bleu_metric = BLEU(tokenize=tok)
        got = bleu_metric.corpus_score(hyp_list, ref_lists)
        out["bleu"] = round(got.score, 2)
        out["length_ratio"] = round(got.sys_len / max(got.ref_len, 1), 4)
        sigs["bleu"] = str(bleu_metric.get_signature())
    else:
        out["length_ratio"] = None
        out["bleu_missing"] = f"sacreBLEU's {tgt} tokenizer is not installed (sacrebleu[ja])"
    units = len if tgt in ("zh", "ja") else (lambda text: len(text.split()))
    long = sum(units(h) > 2 * max(units(r), 1) for h, r in zip(hyp_list, ref_lists[0]))
    out["over_twice_reference"] = round(long / len(hyp_list), 4)
    # The SentencePiece model normalises text (NFKC), so a hypothesis cannot hold the
    # full-width punctuation of Chinese references ("，" is ","), nor "…": the same scores
    # against NFKC-normalised references, where that changes any reference
    nfkc = [unicodedata.normalize("NFKC", r) for r in ref_lists[0]]
    changed = sum(a != b for a, b in zip(nfkc, ref_lists[0]))
    if changed:
        out["nfkc_references"] = {
            "lines_changed": changed,
            "bleu": (round(BLEU(tokenize=tok).corpus_score(hyp_list, [nfkc]).score, 2)
                     if tok is not None else None),
            "chrf": round(CHRF().corpus_score(hyp_list, [nfkc]).score, 2)}
    out["signatures"] = sigs
    return out


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
    out = {**score(hyps, prep, pair, corpus_of(args)),
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


def fmt2(value):
    return "-" if value is None else f"{value:.2f}"


def scores_line(record):
    """A direction's scores for the log: BLEU, chrF and, where measured, the off-target rate."""
    line = f"BLEU {fmt2(record['bleu'])} chrF {record['chrf']:.2f}"
    return line + (f" off-target {record['off_target']:.1%}" if "off_target" in record else "")


INNER = re.compile(r"\| train_inner \|.*?\bloss=([\d.]+), nll_loss=([\d.]+).*?num_updates=(\d+)")


def final_training_loss(train_log: Path, last: int = 100):
    """Label-smoothed loss and NLL (base 2, per target token) that fairseq logged over the last
    `last` updates of training (its train_inner lines, one per --log-interval), or None. Runs of
    one seed see the same batches in the same order, so at equal updates this compares them on
    the same data."""
    if not train_log.exists():
        return None
    rows = {int(u): (float(l), float(n)) for l, n, u in INNER.findall(train_log.read_text())}
    if not rows:
        return None
    end = max(rows)
    kept = [rows[u] for u in sorted(rows) if u > end - last]
    return {"updates": [end - last + 1, end], "lines": len(kept),
            "loss": round(sum(l for l, _ in kept) / len(kept), 3),
            "nll_loss": round(sum(n for _, n in kept) / len(kept), 3)}


def average(directions, names, key):
    vals = [directions[d][key] for d in names if d in directions]
    if None in vals:  # a direction without this score (BLEU without its tokenizer)
        return None
    digits = 4 if key == "off_target" else 2  # a share, not a score
    return round(sum(vals) / len(vals), digits) if vals and len(vals) == len(names) else None


def evaluate(args, prep, run_name, variant, seed, run_dir, train_cmd):
    data = prep / "bin"
    corpus = corpus_of(args)
    trained_pairs, zero_shot_pairs = corpus.trained, corpus.zero_shot
    spec = VARIANTS[variant]
    ckpt = run_dir / "checkpoints" / "checkpoint_last.pt"
    trained = read_json(run_dir / "train.done.json")
    eval_dir = run_dir / f"eval-u{trained['num_updates']}"  # never mixes two trainings
    if corpus.name != "multi30k":  # nor two test caps
        eval_dir = eval_dir.with_name(f"{eval_dir.name}-cap{getattr(args, 'test_cap', 0)}")
    eval_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(eval_dir / "times.json")
    prefix = f"{run_name}"
    directions, full_hyps = {}, {}
    for pair in args.directions:
        log(f"{prefix}: generate {pair}{' (zero-shot)' if pair in zero_shot_pairs else ''} ...")
        hyps, speed = timer.step(f"generate {pair}", lambda: generate(
            args, data, ckpt, pair, eval_dir / f"gen.full.{pair}.txt"))
        full_hyps[pair] = hyps
        directions[pair] = {"zero_shot": pair in zero_shot_pairs,
                            **score(hyps, prep, pair, corpus), "tokens_per_s": speed}
        log(f"{prefix}: {pair} " + scores_line(directions[pair]))

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
        for pair in [d for d in args.directions if d in trained_pairs]:
            log(f"{prefix}: prune for {pair} and translate with the pruned checkpoint ...")
            pruned[pair] = prune_and_evaluate(args, data, prep, ckpt, pair, eval_dir,
                                              full_hyps[pair], timer)
            log(f"{prefix}: pruned {pair}: BLEU {fmt2(pruned[pair]['bleu'])} (full "
                f"{fmt2(directions[pair]['bleu'])}), identical hypotheses "
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
    if routing == ("lang_pair", "lang_pair") and not zero_shot_pairs:
        unseen = {"skipped": f"no zero-shot test sets in {corpus.name} yet"}
    elif routing == ("lang_pair", "lang_pair"):
        default = (model_args.get(UNSEEN_OPTION) if isinstance(model_args, dict)
                   else getattr(model_args, UNSEEN_OPTION, None))
        if library_has(UNSEEN_OPTION) and default is not None:
            # the plain generations above used the checkpoint's own policy; the others by
            # --model-overrides
            by_policy = {default: {p: directions[p] for p in args.directions
                                   if p in zero_shot_pairs}}
            for policy in [p for p in UNSEEN_POLICIES if p != default]:
                by_policy[policy] = {}
                for pair in [d for d in args.directions if d in zero_shot_pairs]:
                    log(f"{prefix}: generate {pair} with {UNSEEN_OPTION}={policy} ...")
                    hyps, speed = timer.step(f"generate {policy} {pair}", lambda: generate(
                        args, data, ckpt, pair, eval_dir / f"gen.{policy}.{pair}.txt",
                        overrides={UNSEEN_OPTION: policy}))
                    by_policy[policy][pair] = {**score(hyps, prep, pair, corpus),
                                               "tokens_per_s": speed}
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
    # the valid split of the training data (Multi30k: the same folder as the test sets)
    png, usage = (heatmap(args, getattr(args, "train_data", None) or data, ckpt, run_name,
                          eval_dir, timer) if routing else (None, None))
    times = timer.times
    import fairseq
    import sacrebleu
    import torch

    gen_example = on_device(generate_command(data, ckpt, trained_pairs[0], beam=BEAM,
                                             langs=",".join(corpus.langs),
                                             pairs=",".join(trained_pairs)),
                            args.preset)
    max_tokens = preset_flags(args)["--max-tokens"]
    if corpus.name != "multi30k":
        data_record = {
            "corpus": corpus.name, "languages": corpus.langs,
            "train_lines_per_direction": getattr(args, "train_lines", None),
            "trained_directions": trained_pairs, "zero_shot_directions": zero_shot_pairs,
            "zero_shot_note": "no X-Y test sets yet: zero-shot is not evaluated",
            "test_set": corpus.test_set, "test_cap": getattr(args, "test_cap", None),
            "test_cap_seed": CAP_SEED, "test_sentences": getattr(args, "test_sentences", None),
            "coverage": corpus.coverage, "well_covered_threshold": WELL_COVERED,
            "well_covered": corpus.well_covered(), "lower_coverage": corpus.lower_coverage(),
            "bleu_tokenizers": {l: bleu_tokenizer(l) for l in corpus.langs},
            "evaluated_directions": args.directions}
        langid = {"method": f"fairseq_taskmoe.langid.detector_for: {corpus.detector.method}, "
                            f"restricted to the {len(corpus.langs)} languages",
                  "accuracy_on_test_references": args.langid_accuracy}
        averages = {name: {k: average(directions, names, k)
                           for k in ("bleu", "chrf", "off_target")}
                    for name, names in corpus.groups().items()}
    else:
        data_record = {"train_lines_per_direction": args.train_size or "all (29,000)",
                       "trained_directions": trained_pairs, "zero_shot_directions": zero_shot_pairs,
                       "test_set": "Multi30k test_2016_flickr (1,000 sentences)",
                       "evaluated_directions": args.directions}
        langid = {"method": "fairseq_taskmoe.langid: stop-word and unique-letter voting",
                  "accuracy_on_test_references": args.langid_accuracy}
        averages = {
            "trained": {k: average(directions, trained_pairs, k) for k in ("bleu", "chrf")},
            "zero_shot": {k: average(directions, zero_shot_pairs, k)
                          for k in ("bleu", "chrf", "off_target")},
        }
    return {
        "run": run_name, "variant": variant, "label": spec["label"], "seed": seed,
        "routing": {"encoder": routing[0], "decoder": routing[1]} if routing else None,
        "task_routed": task_routed,
        "config": {"shared_flags": dict(preset_flags(args)),
                   "variant_flags": [str(f) for f in spec["flags"]]},
        "budget": {"max_update": args.max_update, "updates_done": trained["num_updates"],
                   "max_tokens": max_tokens,
                   "updates_x_max_tokens": trained["num_updates"] * max_tokens},
        "final_training_loss": final_training_loss(run_dir / "train.log"),
        "data": data_record,
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
        "langid": langid,
        "directions": directions,
        "averages": averages,
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
