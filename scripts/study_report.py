#!/usr/bin/env python3
"""Write docs/results.md from the study's results JSONs (scripts/study.py).

    .venv/bin/python scripts/study_report.py        # results/study -> docs/results.md
    .venv/bin/python scripts/study_report.py --results /tmp/r --out /tmp/results.md

Every number in the page comes from a JSON; runs without one are listed as "not yet run", and the
"reading" section only states what the present data shows. Re-run it after every sitting.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from study import (DIRECTIONS, REPO, TRAINED, VARIANTS, ZERO_SHOT,  # sibling script
                   runs)

sys.path.insert(0, str(REPO))
from fairseq_taskmoe.atomic import atomic_file  # noqa: E402

# Kudugunta et al. 2021, Table 1 (WMT, 30 directions, 32 experts): average BLEU.
PAPER = {"dense": 20.0, "token_token": 22.6, "sentence_sentence": 19.9,
         "lang_pair_lang_pair": 21.4, "target_target": 22.9, "token_target": 23.6}
MAIN = list(PAPER)
# rows of the Table 1 comparison that the paper does not have (balance-loss variants)
TABLE1_EXTRA = ["target_target_tasks"]
BALANCE = ["target_target_gl0", "target_target", "target_target_gl0.1", "target_target_tasks"]
SCOPES = ("target_target", "target_target_tasks")  # weight 0.01 over tokens, over tasks
# scripts/distill.py (issue 10): dense students distilled from token / token seed 1
DISTILLED = {"distilled": "dense student distilled from token / token",
             "distilled_random": "dense student distilled from token / token (random init)"}
PRUNED = "target_target"  # its pruned sub-network has the student's size


def load_results(folder: Path):
    """{run name: results dict} of every *.json in `folder`."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        out[data.get("run", path.stem)] = data
    return out


def by_variant(results):
    groups = {}
    for data in results.values():
        groups.setdefault(data["variant"], []).append(data)
    for v in groups.values():
        v.sort(key=lambda d: d["seed"])
    return groups


def stat(values):
    """(mean, half the range) of the non-None values; (None, None) if there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, (max(values) - min(values)) / 2 if len(values) > 1 else None


def fmt(mean, spread=None, digits=1, pct=False):
    if mean is None:
        return "–"
    scale, unit = (100, "%") if pct else (1, "")
    text = f"{mean * scale:.{digits}f}{unit}"
    return text + (f" ± {spread * scale:.{digits}f}" if spread is not None else "")


def signed(x, digits=1):
    return "–" if x is None else f"{x:+.{digits}f}"


def gain_share(x, dense, token):
    """(BLEU_x - BLEU_dense) / (BLEU_token_token - BLEU_dense) as text; "–" when undefined."""
    if x is None or dense is None or token is None or token <= dense:
        return "–"
    return f"{(x - dense) / (token - dense):.0%}"


def cell(runs_of_variant, getter, digits=1, pct=False):
    return fmt(*stat([getter(r) for r in runs_of_variant]), digits=digits, pct=pct)


def direction_value(key, pair):
    return lambda r: r["directions"].get(pair, {}).get(key)


def avg_value(group, key):
    """A run's average over its trained or zero-shot directions, from the per-direction values
    (the stored average is rounded to 2 decimals; re-rounding it can differ by 0.1 from the
    pruned average computed from the same directions)."""
    pairs = TRAINED if group == "trained" else ZERO_SHOT

    def get(r):
        vals = [r["directions"].get(p, {}).get(key) for p in pairs]
        if None not in vals:
            return sum(vals) / len(vals)
        return (r["averages"].get(group) or {}).get(key)
    return get


def trained_mean(runs_of_variant):
    """Mean over seeds of the trained-direction average BLEU (None without runs)."""
    return stat([avg_value("trained", "bleu")(r) for r in runs_of_variant])[0]


def seeds_note(group):
    return ", ".join(str(r["seed"]) for r in group)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def hms(seconds):
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------- sections


def section_setup(results):
    any_run = next(iter(results.values()))
    shared = " ".join(k if v is None else f"{k} {v}"
                      for k, v in any_run["config"]["shared_flags"].items())
    budgets = sorted({(r["budget"]["updates_done"], r["budget"]["max_tokens"])
                      for r in results.values()})
    sizes = sorted({str(r["data"]["train_lines_per_direction"]) for r in results.values()})
    lid = any_run["langid"]
    acc = ", ".join(f"{lang} {v['on_target']:.1%}" for lang, v in
                    lid["accuracy_on_test_references"].items())
    evaluated = sorted({tuple(r["data"]["evaluated_directions"]) for r in results.values()})
    lines = [
        "## Set-up",
        "",
        f"- Shared backbone and recipe (every run): `{shared}`.",
        "- Budget (updates × max tokens per update): " + "; ".join(
            f"{u:,} × {t:,} = {u * t:,} tokens" for u, t in budgets)
        + (" **(runs differ in budget: compare with care)**" if len(budgets) > 1 else "") + ".",
        f"- Training lines per direction: {', '.join(sizes)}; trained directions "
        f"{', '.join(TRAINED)}; zero-shot (never trained) {', '.join(ZERO_SHOT)}.",
        f"- Test set: {any_run['data']['test_set']}, beam 5; BLEU signature "
        f"`{any_run['signatures']['bleu']}`, chrF signature `{any_run['signatures']['chrf']}`.",
        f"- Off-target: share of hypotheses detected as a language other than the target "
        f"(detector: {lid['method']}; hypotheses without evidence count as neither). The "
        f"detector's accuracy on the test references: {acc}.",
    ]
    if len(evaluated) > 1 or list(evaluated[0]) != DIRECTIONS:
        lines.append("- **Some runs were evaluated on a subset of the directions** (smoke "
                     "settings); their averages are left empty.")
    lens = {r["commands"].get("generate_max_len_b") for r in results.values()}
    if lens != {None}:
        lines.append(f"- **Generation length capped** (`--max-len-b {sorted(lens, key=str)}`: "
                     "smoke settings).")
    return "\n".join(lines)


def section_status(results, distilled=None):
    def done(name, r):
        threads = (r.get("environment") or {}).get("omp_num_threads") or "all (2)"
        return [f"`{name}`", r["label"], r["seed"], "done", f"{r['budget']['updates_done']:,}",
                hms(r["wall_seconds"]["training"]), hms(r["wall_seconds"]["evaluation"]),
                threads]

    rows, distilled = [], distilled or {}
    for name, variant, seed in runs():
        r = results.get(name)
        rows.append(done(name, r) if r is not None else
                    [f"`{name}`", VARIANTS[variant]["label"], seed, "not yet run", "–", "–", "–",
                     "–"])
    rows += [done(name, r) for name, r in sorted(distilled.items())]  # scripts/distill.py's
    return ("## Runs\n\nWall-clock times on this project's 2-core machine. Runs with 1 thread "
            "(`OMP_NUM_THREADS=1`) trained two to three at a time, each on a share of the cores, "
            "and runs with all threads often shared them with tests: compare the times as a "
            "rough cost, not as speeds.\n\n" + table(
                ["run", "encoder / decoder routing", "seed", "state", "updates", "training time",
                 "evaluation time", "threads"], rows))


def section_table1(groups, distilled=None):
    dense = groups.get("dense", [])
    dense_mean = trained_mean(dense)
    token_mean = trained_mean(groups.get("token_token", []))
    rows = []
    for v in MAIN + TABLE1_EXTRA:
        g = groups.get(v, [])
        label = (f"target / target, balance over {balance_settings(v)[1]}" if v in TABLE1_EXTRA
                 else VARIANTS[v]["label"])
        paper = (fmt(PAPER[v]), signed(PAPER[v] - PAPER["dense"])) if v in PAPER else ("–", "–")
        if not g:
            rows.append([label, *paper, "not yet run", "–", "–", "–", "–"])
            continue
        mean = trained_mean(g)
        ours_delta = mean - dense_mean if (mean is not None and dense_mean is not None) else None
        rows.append([label, *paper, cell(g, avg_value("trained", "bleu")), signed(ours_delta),
                     gain_share(mean, dense_mean, token_mean),
                     cell(g, avg_value("zero_shot", "bleu")), seeds_note(g)])
    for v, label in DISTILLED.items():
        g = [r for r in (distilled or {}).values() if r["variant"] == v]
        if not g:
            if v == "distilled":
                rows.append([label, "–", "–", "not yet run", "–", "–", "–", "–"])
            continue
        mean = trained_mean(g)
        ours_delta = mean - dense_mean if (mean is not None and dense_mean is not None) else None
        rows.append([label, "–", "–", cell(g, avg_value("trained", "bleu")), signed(ours_delta),
                     gain_share(mean, dense_mean, token_mean),
                     cell(g, avg_value("zero_shot", "bleu")), seeds_note(g)])
    return ("## Against the paper's Table 1\n\nPaper: WMT, 30 directions, 32 experts, average "
            "BLEU. Here: Multi30k, the 6 trained directions averaged (and the 6 zero-shot ones), "
            "8 experts. Δ is against the dense model of the same table; ± is half the range over "
            "seeds. \"Gain of token / token kept\" is (BLEU − BLEU dense) / (BLEU token / "
            "token − BLEU dense) of the trained averages. The target / target row balances "
            "the experts over tokens, as every other MoE row does; \"target / target, balance "
            "over tasks\" is the same model balanced over tasks (not in the paper; section "
            "\"Balance loss\"). The dense student "
            "(`scripts/distill.py`, section \"Distillation baseline\") is not in the paper's "
            "table.\n\n" + table(
                ["encoder / decoder routing", "paper BLEU", "paper Δ vs dense",
                 "ours: trained avg BLEU", "ours Δ vs dense", "gain of token / token kept",
                 "ours: zero-shot avg BLEU", "seeds"], rows))


def pruned_bleu(pair):
    """A task-routed run's BLEU for `pair` from its checkpoint pruned for `pair` (trained
    directions); zero-shot directions from the full model, which computes each task's experts
    merged, as a sub-network pruned for the pair's target would."""
    def get(r):
        rec = (r.get("pruned") or {}).get(pair) or r["directions"].get(pair) or {}
        return rec.get("bleu")
    return get


def pruned_trained_avg(r):
    vals = [pruned_bleu(p)(r) for p in TRAINED]
    return None if None in vals else sum(vals) / len(vals)


def section_distillation(groups, distilled):
    """Issue 10: the dense student next to dense, its teacher and the pruned task-MoE."""
    title = "## Distillation baseline\n\n"
    dense_mean = trained_mean(groups.get("dense", []))
    token_mean = trained_mean(groups.get("token_token", []))
    header = ["model", *DIRECTIONS, "trained avg", "zero-shot avg", "gain of token / token kept"]

    def plain(g):
        mean = trained_mean(g)
        return [*[cell(g, direction_value("bleu", p)) for p in DIRECTIONS],
                cell(g, avg_value("trained", "bleu")), cell(g, avg_value("zero_shot", "bleu")),
                gain_share(mean, dense_mean, token_mean)]

    rows = []
    pruned_label = f"{VARIANTS[PRUNED]['label']}, pruned (taskmoe-prune)"
    for label, g, cells in [
            (VARIANTS["dense"]["label"], groups.get("dense", []), plain),
            (VARIANTS["token_token"]["label"] + " (the teacher)", groups.get("token_token", []),
             plain),
            (pruned_label, groups.get(PRUNED, []), lambda g: [
                *[cell(g, pruned_bleu(p)) for p in DIRECTIONS], cell(g, pruned_trained_avg),
                cell(g, avg_value("zero_shot", "bleu")),
                gain_share(stat([pruned_trained_avg(r) for r in g])[0], dense_mean,
                           token_mean)])]:
        rows.append([label, *cells(g)] if g else [label, "not yet run"] + [""] * (len(header) - 2))
    for v, label in DISTILLED.items():
        g = [r for r in distilled.values() if r["variant"] == v]
        if g:
            rows.append([label, *plain(g)])
        elif v == "distilled":
            rows.append([label, "not yet run"] + [""] * (len(header) - 2))
    parts = [title + "A dense model of the study's backbone (`--moe-freq 0`: d=256, 3+3 layers, "
             "FFN 1024, the size of one pruned target / target sub-network), trained with the "
             "study's recipe and budget on the token / token teacher's beam-5 translations of "
             "the training sources (sequence-level distillation, `scripts/distill.py`). The "
             "pruned task-MoE row uses, per trained direction, the checkpoint pruned for it; "
             "its zero-shot cells are the full model's, which runs each task's experts merged "
             "exactly as a pruned sub-network does.", table(header, rows)]
    notes = []
    for name, r in sorted(distilled.items()):
        init = r.get("distillation", {}).get("student_init") or {}
        if init.get("init") == "teacher":
            notes.append(f"`{name}` starts from the teacher's non-expert weights; each MoE "
                         "layer's FFN from two merged experts (0.5 each): " + ", ".join(
                             f"{layer} experts {a} and {b}"
                             for layer, (a, b) in init.get("experts", {}).items())
                         + f" ({init.get('experts_chosen_by')}).")
        sp = r.get("speed") or {}
        if "student" in sp:
            notes.extend(speed_notes(sp, r["distillation"].get("data", {}).get("directions")))
        elif sp.get("skipped"):
            notes.append(f"Decode speed of `{name}`: not measured yet ({sp['skipped']}).")
        c = r.get("cost")
        if c:
            here = c.get("pruning_seconds_measured_here") or {}
            study_runs = c.get("pruning_seconds_from_study_runs") or {}
            prune = "; ".join(
                [f"{p} {s:.1f} s (measured with the speed run)" for p, s in here.items()]
                + [f"`{run}`: {sum(v.values()):.1f} s for {len(v)} directions"
                   for run, v in study_runs.items()])
            notes.append(
                f"Cost of each path beyond training the large MoE (`{name}`, measured here): "
                f"distillation = teacher decoding {c['teacher_decode_seconds']:,.0f} s + "
                f"student training {c['student_training_seconds']:,.0f} s (+ binarizing "
                f"{c['binarize_seconds']:,.0f} s and initialising {c['init_seconds']:,.0f} s) = "
                f"{c['distillation_total_seconds']:,.0f} s; pruning = "
                + (prune or "not measured yet") + ".")
        notes.append(f"`{name}` was made by: `.venv/bin/python {r['commands']['study']}`.")
    notes.extend(claim_notes(groups, distilled))
    if not distilled:
        notes.append("Run it with `.venv/bin/python scripts/distill.py` once `token_token-s1` "
                     "(the teacher) and `target_target-s1` (for the speed comparison) are "
                     "trained.")
    parts.append("\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts)


STEP_BENCHMARK = REPO / "results" / "student_shape_benchmark.json"


def speed_notes(sp, data_stats=None, step_benchmark: Path = STEP_BENCHMARK):
    """The student vs pruned decode speed of a distillation run, with what explains a gap: output
    length (tokens/s over sentences/s of the same runs) and, when measured, the per-step cost at
    equal length (benchmark_inference.py variants c and e at the study's shapes)."""
    s, p = sp["student"], sp["pruned"]
    pair_stats = (data_stats or {}).get(sp["pair"], {})
    teacher_len, ref_len = (pair_stats.get(k) for k in ("mean_pieces_teacher",
                                                        "mean_pieces_reference"))
    per_sent = {who: x["tokens_per_s"] / x["sentences_per_s"] for who, x in (("s", s), ("p", p))}
    notes = [
        f"Decode speed, measured in one run ({sp['pair']}, beam {sp['beam']}, {sp['how']}): "
        f"student {s['sentences_per_s']:,} sentences/s, {s['tokens_per_s']:,} tokens/s "
        f"({s['params']:,} parameters); pruned {VARIANTS[PRUNED]['label']} "
        f"{p['sentences_per_s']:,} sentences/s, {p['tokens_per_s']:,} tokens/s "
        f"({p['params']:,} parameters): the student runs at "
        f"{s['sentences_per_s'] / p['sentences_per_s']:.2f}x the pruned model's sentences/s and "
        f"{s['tokens_per_s'] / p['tokens_per_s']:.2f}x its tokens/s. Its hypotheses are longer: "
        f"{per_sent['s']:.1f} generated tokens per sentence against {per_sent['p']:.1f} "
        "(tokens/s over sentences/s of the same runs), and fairseq's beam search decodes a batch "
        "until its longest hypothesis ends, so long outputs cost more steps than their own "
        "tokens."
        + (f" The length is not the teacher's: its {sp['pair']} training targets average "
           f"{teacher_len:.1f} pieces (references {ref_len:.1f})." if teacher_len else "")]
    if step_benchmark.exists():
        b = json.loads(step_benchmark.read_text())
        for E, res in b["experts"].items():
            v = res["variants"]
            if "c" in v and "e" in v:
                c, e = (v[k]["throughput"]["decode"]["peak"] for k in ("c", "e"))
                notes.append(
                    "At equal output length the two networks cost the same: forced-length "
                    f"decoding at the study's shapes (random weights, {b['date']}, `"
                    f"{b['command']}`, {Path(step_benchmark).name}) gives the pruned task-MoE "
                    f"{c:,.0f} tokens/s and a dense transformer of its active size {e:,.0f} "
                    f"({c / e:.2f}x).")
                break
    return notes


# Kudugunta et al. 2021 (WMT, 8 directions): the student keeps 32% of token-MoE's gain over dense; the
# extracted task-MoE sub-network keeps all of it, +2.1 BLEU over the student.
PAPER_DISTILLED_KEEPS, PAPER_PRUNED_OVER_STUDENT = 0.32, 2.1


def claim_notes(groups, distilled):
    """The paper's "beyond distillation" claim against the present runs (trained averages)."""
    mean = {v: trained_mean(g) for v, g in groups.items()}
    students = [r for r in distilled.values() if r["variant"] == "distilled"]
    student = trained_mean(students)
    pruned = stat([pruned_trained_avg(r) for r in groups.get(PRUNED, [])])[0]
    dense, token = mean.get("dense"), mean.get("token_token")
    if None in (student, pruned, dense, token) or token <= dense:
        return []
    keeps = {"s": (student - dense) / (token - dense), "p": (pruned - dense) / (token - dense)}
    extra = {v: stat([pruned_trained_avg(r) for r in groups.get(v, [])])[0] for v in TABLE1_EXTRA}
    extra = {v: p for v, p in extra.items() if p is not None}
    return [
        f"The paper's claim (WMT, 8 directions): the student keeps "
        f"{PAPER_DISTILLED_KEEPS:.0%} of token-MoE's gain over dense and the extracted task-MoE "
        f"all of it, {PAPER_PRUNED_OVER_STUDENT:+.1f} BLEU over the student. Here (trained "
        f"averages: the student's seed {seeds_note(students)}, the other models' means over "
        f"their seeds): the student keeps {keeps['s']:.0%} "
        f"({student - dense:+.1f} BLEU over dense), the pruned {VARIANTS[PRUNED]['label']} "
        f"{keeps['p']:.0%} ({pruned - dense:+.1f}), {pruned - student:+.1f} BLEU over the "
        "student. "
        + ("Direction as in the paper: pruning beats distilling at the same active size"
           if pruned > student else "Unlike the paper, the student is not behind")
        + (", but here the task-MoE itself keeps less than all of token-MoE's gain."
           if keeps["p"] < 0.95 else ".")] + [
        f"Balanced over tasks ({VARIANTS[v]['label']}, seed {seeds_note(groups[v])}), the pruned "
        f"target / target keeps {(p - dense) / (token - dense):.0%} ({p - dense:+.1f} BLEU over "
        f"dense), {p - student:+.1f} BLEU over the student." for v, p in extra.items()]


def variant_rows(groups, width, cells):
    """One table row per model variant: its label (with the seed count) and cells(runs), or
    "not yet run" padded to `width` columns when it has no finished run."""
    rows = []
    for v in VARIANTS:
        g = groups.get(v, [])
        if not g:
            rows.append([VARIANTS[v]["label"], "not yet run"] + [""] * (width - 2))
        else:
            label = VARIANTS[v]["label"] + (f" ({len(g)} seeds)" if len(g) > 1 else "")
            rows.append([label, *cells(g)])
    return rows


def section_directions(groups, key, title, digits=1, pct=False, pairs=DIRECTIONS,
                       averages=True):
    header = ["model", *pairs]
    if averages:
        header += ["trained avg", "zero-shot avg"]
    def cells(g):
        row = [cell(g, direction_value(key, p), digits, pct) for p in pairs]
        if averages:
            row += [cell(g, avg_value("trained", key), digits, pct),
                    cell(g, avg_value("zero_shot", key), digits, pct)]
        return row

    return f"## {title}\n\n" + table(header, variant_rows(groups, len(header), cells))


def unseen_policies(r):
    """{policy: {zero-shot pair: record}} of a lang_pair run, {} when not evaluated."""
    return (r.get("unseen_pairs") or {}).get("directions") or {}


def section_off_target(groups):
    header = ["model", *ZERO_SHOT, "avg off-target", "avg undetected"]

    def zs_mean(key):
        def get(r):
            vals = [r["directions"].get(p, {}).get(key) for p in ZERO_SHOT]
            return None if None in vals else sum(vals) / len(vals)
        return get

    rows = variant_rows(groups, len(header), lambda g: [
        *[cell(g, direction_value("off_target", p), pct=True) for p in ZERO_SHOT],
        cell(g, zs_mean("off_target"), pct=True), cell(g, zs_mean("undetected"), pct=True)])
    return ("## Off-target rate, zero-shot directions\n\nShare of hypotheses detected as a "
            "language other than the target; \"undetected\" hypotheses (no stop word or "
            "language-specific letter, or a tie) are counted apart.\n\n" + table(header, rows))


def section_unseen(groups):
    title = "## Unseen pairs under lang-pair routing\n\n"
    g = groups.get("lang_pair_lang_pair", [])
    if not g:
        return title + "lang-pair / lang-pair: not yet run."
    rows, notes, policies = [], [], []
    for r in g:
        unseen = r.get("unseen_pairs") or {}
        if "skipped" in unseen:
            notes.append(f"seed {r['seed']}: {unseen['skipped']}.")
            continue
        by_policy = unseen_policies(r)
        policies = sorted(by_policy)
        for pair in ZERO_SHOT:
            recs = [by_policy[p].get(pair) for p in policies]
            if any(x is None for x in recs):
                continue
            rows.append([f"{pair} (seed {r['seed']})", *[fmt(x["bleu"]) for x in recs],
                         *[fmt(x["off_target"], pct=True) for x in recs]])
        notes.append(f"seed {r['seed']}: the checkpoint's own setting is "
                     f"`{unseen['checkpoint_default']}`; the other was applied with "
                     f"`{unseen['override']}`.")
    text = (title + "A zero-shot pair's own gate row is never trained. `moe_unseen_pairs` "
            "chooses how lang-pair routing treats such a pair: `own_row` reads that untrained "
            "row, `target_mean` routes by the mean logits of the trained pairs into the same "
            "target language.")
    parts = [text]
    if rows:
        parts.append(table(["direction", *[f"BLEU {p}" for p in policies],
                            *[f"off-target {p}" for p in policies]], rows))
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts)


def section_params(groups):
    rows = []
    for v in VARIANTS:
        g = groups.get(v, [])
        if not g:
            rows.append([VARIANTS[v]["label"], "not yet run", "", "", ""])
            continue
        r = g[0]
        p = r["params"]
        rows.append([r["label"], f"{p['total']:,}", f"{p['active_per_token']:,}",
                     p["active_how"], f"{r['checkpoint_bytes']:,}"])
    return ("## Parameters\n\n" + table(
        ["model", "parameters", "active per token", "how 'active' is counted",
         "checkpoint_last.pt bytes (with Adam state)"], rows))


def section_pruning(results):
    rows = []
    for name, r in results.items():
        for pair, p in (r.get("pruned") or {}).items():
            full = r["directions"][pair]
            rows.append([f"`{name}`", pair, fmt(full["bleu"], digits=2), fmt(p["bleu"], digits=2),
                         "yes" if p["identical_hypotheses"] else "**no**",
                         f"{p['bytes']:,}", f"{p['bytes'] / r['checkpoint_bytes']:.1%}",
                         f"{p['params']:,}"])
    if not rows:
        return "## Pruned checkpoints\n\nNo task-routed run has finished yet."
    return ("## Pruned checkpoints\n\nEvery task-routed run, pruned for each trained direction "
            "with `taskmoe-prune CHECKPOINT --lang-pair PAIR` and re-evaluated.\n\n" + table(
                ["run", "direction", "BLEU full", "BLEU pruned", "identical hypotheses",
                 "pruned bytes", "of the full checkpoint", "pruned parameters"], rows))


def top1_weight(r):
    """Mean over pruned pairs and layers of the larger gate weight of the kept top-2 experts."""
    ws = [max(w for _e, w in kept) for p in (r.get("pruned") or {}).values()
          for kept in (p.get("kept_experts") or {}).values() if kept]
    return sum(ws) / len(ws) if ws else None


def scope_reading(scopes):
    """Balance over tokens against over tasks (target / target, weight 0.01), seed by seed: is
    the difference of the means larger than the seeds' spread?"""
    per = {v: [avg_value("trained", "bleu")(r) for r in g] for v, g in scopes.items()}
    (tok, tok_s), (tas, tas_s) = (stat(per[v]) for v in SCOPES)
    diff, noise = tas - tok, (tok_s or 0) + (tas_s or 0)
    seeds = {v: ", ".join(f"{b:.2f}" for b in per[v]) for v in SCOPES}
    weights = {v: fmt(stat([top1_weight(r) for r in scopes[v]])[0], digits=3) for v in SCOPES}
    return (f"Balance scope (target / target, weight 0.01, trained average per seed): over "
            f"tokens {seeds[SCOPES[0]]}, over tasks {seeds[SCOPES[1]]}; means {tok:.2f} and "
            f"{tas:.2f}, difference {diff:+.2f} BLEU against a summed seed half-range of "
            f"{noise:.2f}: " + ("larger than the seed noise." if abs(diff) > noise and noise else
                                "not larger than the seed noise, so not evidence by itself.")
            + f" Top-1 gate weight {weights[SCOPES[0]]} over tokens, {weights[SCOPES[1]]} over "
            "tasks (0.5 = a tie).")


def balance_settings(v):
    flags = [str(f) for f in VARIANTS[v]["flags"]]
    wt = flags[flags.index("--moe-gate-loss-wt") + 1]
    scope = flags[flags.index("--moe-balance-scope") + 1]  # study.moe() always sets it
    return wt, scope + (" (the plugin's default)" if scope == default_balance_scope() else "")


def default_balance_scope():
    from dataclasses import fields

    from fairseq_taskmoe.config import MoEConfig

    return next(f.default for f in fields(MoEConfig) if f.name == "moe_balance_scope")


def section_balance(groups):
    rows = []
    for v in BALANCE:
        wt, scope = balance_settings(v)
        g = groups.get(v, [])
        if not g:
            rows.append([wt, scope, "not yet run", "", "", "", ""])
            continue
        rows.append([wt, scope, cell(g, avg_value("trained", "bleu")),
                     cell(g, avg_value("trained", "chrf")), cell(g, avg_value("zero_shot", "bleu")),
                     cell(g, avg_value("zero_shot", "off_target"), pct=True),
                     fmt(stat([top1_weight(r) for r in g])[0], digits=3)])
    return ("## Balance loss for target / target routing\n\nThe top-1 weight is the larger of "
            "the two gate weights a task's route gives its experts, averaged over pruned pairs "
            "and layers (0.5 = a tie between the two experts).\n\n" + table(
                ["gate loss weight", "balance over", "trained avg BLEU", "trained avg chrF",
                 "zero-shot avg BLEU", "zero-shot off-target", "top-1 gate weight"], rows))


def top2_share(usage_of_layer):
    """Mean over language pairs of the share of a pair's assignments on its two most used
    experts: 1.0 when every pair keeps to two experts (task routing, top-2), 2/E when each pair
    spreads evenly over all E experts. Concentration only: pair_distance says whether pairs
    differ."""
    shares = [sum(sorted(row, reverse=True)[:2]) for row in usage_of_layer.values()]
    return sum(shares) / len(shares) if shares else None


def pair_distance(usage_of_layer):
    """Mean total-variation distance between two pairs' expert shares: 0 when every pair is
    routed alike, 1 when no two pairs share an expert."""
    rows = list(usage_of_layer.values())
    d = [sum(abs(a - b) for a, b in zip(x, y)) / 2
         for i, x in enumerate(rows) for y in rows[i + 1:]]
    return sum(d) / len(d) if d else None


def seeds_phrase(n):
    return "in 1 seed" if n == 1 else f"over {n} seeds"


def span(values, digits=2):
    """'0.73' for one value (or equal values), '0.04-0.09' for a range."""
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo}-{hi}"


def tag_only_distance(usage_of_layer, source="en"):
    """pair_distance among the pairs that translate from `source`. Multi30k is 4-way parallel,
    so those pairs' encoders read the same sentences, which differ only in the target-language
    tag that `--encoder-langtok tgt` puts first: in an encoder layer, how far the tag alone moves
    the routing."""
    return pair_distance({p: u for p, u in usage_of_layer.items() if p.split("-")[0] == source})


def section_heatmaps(results, out_dir: Path):
    parts, rows, layers = [], [], []
    for name, r in results.items():
        png = r.get("heatmap")
        if png and not Path(png).exists():  # recorded on another checkout: same name here
            png = str(REPO / "docs" / "img" / Path(png).name)
        if png and Path(png).exists():
            rel = os.path.relpath(png, out_dir)
            parts.append(f"### `{name}` ({r['label']})\n\n![{name}]({rel})")
        usage = r.get("routing_usage_valid") or {}
        if usage:
            layers += [l for l in usage if l not in layers]
            rows.append((name, r["label"], {l: (top2_share(u), pair_distance(u))
                                            for l, u in usage.items()},
                         {l: tag_only_distance(u) for l, u in usage.items()
                          if l.startswith("enc")}))
    intro = ("## Routing heatmaps\n\nShare of each language pair's (token, expert) assignments "
             "per expert, per MoE layer, on the validation set (`scripts/routing_heatmap.py`).")
    spec = ""
    if rows:
        enc_layers = [l for l in layers if l.startswith("enc")]
        experts = next(iter(results.values()))["config"]["shared_flags"]["--moe-expert-count"]
        spec = ("\n\nPer layer, two numbers from the same shares: how concentrated each pair's "
                "routing is (the mean over pairs of the share of its assignments on its two most "
                f"used experts: 1.00 as task routing with top-2, {2 / experts:.2f} when a pair "
                "spreads evenly over all experts), and how much it depends on the pair (the mean "
                "total-variation distance between two pairs' expert shares: 0 when every pair is "
                "routed alike, 1 when no two pairs share an expert). For encoder layers, a "
                "third: the same distance among en-de, en-fr and en-cs only, whose encoders read "
                "the same English sentences (Multi30k is 4-way parallel) with only the "
                "target-language tag of `--encoder-langtok tgt` differing, so it is what the tag "
                "alone does to the routing.\n\n" + table(
                    ["run", "routing", *[f"{l} {m}" for l in layers
                                         for m in ("top-2 share", "pair distance")],
                     *[f"{l} tag-only distance" for l in enc_layers]],
                    [[f"`{n}`", label, *[fmt(x, digits=2) for l in layers
                                         for x in v.get(l, (None, None))],
                      *[fmt(tag.get(l), digits=2) for l in enc_layers]]
                     for n, label, v, tag in rows]))
    return intro + spec + "\n\n" + ("\n\n".join(parts) if parts else "None yet.")


def level_with(best, others, mean, spreads):
    """The variants among `others` whose trained mean lies within the summed seed half-ranges
    of `best`'s and theirs (a variant run with one seed, spread None, adds no spread)."""
    return [v for v in others
            if mean[best] - mean[v] <= (spreads[best] or 0) + (spreads[v] or 0)]


def section_reading(results, groups):
    """Statements that the present data supports, nothing else."""
    out = []
    missing = [name for name, _v, _s in runs() if name not in results]
    if missing:
        out.append(f"Not yet run: {', '.join(f'`{m}`' for m in missing)}; statements below "
                   "cover the finished runs only.")
    budgets = sorted({r["budget"]["updates_done"] for r in results.values()})
    out.append(f"Scale: {', '.join(f'{b:,}' for b in budgets)} updates of at most "
               f"{next(iter(results.values()))['budget']['max_tokens']:,} tokens on Multi30k "
               f"({len(TRAINED)} trained directions, "
               f"{next(iter(results.values()))['config']['shared_flags']['--moe-expert-count']} "
               "experts) against the paper's WMT (30 directions, 32 experts, far longer "
               "training): absolute BLEU is not comparable, only the sign and order of the "
               "differences between routings are.")
    mean = {v: trained_mean(g) for v, g in groups.items()}
    spreads = {v: stat([avg_value("trained", "bleu")(r) for r in g])[1] for v, g in groups.items()}
    zs_stats = {v: stat([avg_value("zero_shot", "bleu")(r) for r in g]) for v, g in groups.items()}
    zs = {v: m for v, (m, _s) in zs_stats.items()}
    if mean.get("dense") is not None:
        agree, disagree = [], []
        for v in MAIN[1:]:
            if mean.get(v) is None:
                continue
            ours, paper = mean[v] - mean["dense"], PAPER[v] - PAPER["dense"]
            text = f"{VARIANTS[v]['label']} {ours:+.1f} (paper {paper:+.1f})"
            (agree if (ours > 0) == (paper > 0) else disagree).append(text)
        if agree:
            out.append("Same direction of change against dense as the paper: " + "; ".join(agree)
                       + ".")
        if disagree:
            out.append("Opposite direction of change against dense: " + "; ".join(disagree) + ".")
    ranked = sorted((m, v) for v, m in mean.items() if m is not None and v in MAIN)
    if len(ranked) >= 2:
        top = ranked[-1][0]
        best = [v for m, v in ranked if top - m < 0.05]  # equal at the precision shown
        paper_best = max((v for _m, v in ranked), key=PAPER.get)
        level = level_with(best[0], [v for _m, v in ranked[::-1]
                                     if v not in best and v != "dense"], mean, spreads)
        out.append(f"Best trained average among the finished Table 1 models: "
                   + " and ".join(VARIANTS[v]["label"] for v in best)
                   + f" ({top:.1f} BLEU)"
                   + (f", level within seed noise (the summed half-ranges) with "
                      + ", ".join(VARIANTS[v]["label"] for v in level) if level else "")
                   + "; among the same models the paper's best is "
                   f"{VARIANTS[paper_best]['label']}.")
    noisy = [(v, s) for v, s in spreads.items() if s is not None]
    if noisy:
        out.append("Seed noise (half the range of the trained average over the seeds run): "
                   + ", ".join(f"{VARIANTS[v]['label']} ±{s:.2f}" for v, s in noisy)
                   + ". Differences between models smaller than this are not evidence.")
    checks = [(name, pair, p) for name, r in results.items()
              for pair, p in (r.get("pruned") or {}).items()]
    if checks:
        same = [c for c in checks if c[2]["identical_hypotheses"]]
        equal = [(n, p) for n, p, x in checks if x["bleu"] == results[n]["directions"][p]["bleu"]]
        text = (f"Pruning: {len(same)} of {len(checks)} pruned checkpoints produce hypotheses "
                f"identical to the full model's; {len(equal)} of {len(checks)} have the same BLEU.")
        bad = [f"`{n}` {p}" for n, p, x in checks if not x["identical_hypotheses"]]
        if bad:
            text += " Not identical: " + ", ".join(bad) + "."
        out.append(text)
    if zs.get("target_target") is not None and zs.get("lang_pair_lang_pair") is not None:
        off = {v: stat([avg_value("zero_shot", "off_target")(r) for r in groups[v]])[0]
               for v in ("target_target", "lang_pair_lang_pair")}
        zs_noise = [zs_stats[v][1] for v in ("target_target", "lang_pair_lang_pair")]
        lead = zs["target_target"] - zs["lang_pair_lang_pair"]
        if None in zs_noise:
            verdict = (f"ahead by {lead:.1f} BLEU, as in the paper." if lead > 0 else
                       f"not ahead ({lead:+.1f} BLEU), unlike the paper.")
        elif abs(lead) <= sum(zs_noise):
            policies = sorted({(r.get("unseen_pairs") or {}).get("checkpoint_default")
                               for r in groups["lang_pair_lang_pair"]} - {None})
            verdict = (f"level with it within seed noise ({lead:+.1f} BLEU against a summed seed "
                       f"half-range of {sum(zs_noise):.1f})"
                       + (", with unseen pairs routed by the checkpoints' `moe_unseen_pairs` ("
                          + ", ".join(f"`{p}`" for p in policies) + "; the other policy below)"
                          if policies else "") + ".")
        else:
            verdict = (f"ahead by {lead:.1f} BLEU, more than the seed noise, as in the paper."
                       if lead > 0 else f"behind by {-lead:.1f} BLEU, more than the seed noise, "
                       "unlike the paper.")
        out.append(
            f"Zero-shot: target / target averages {zs['target_target']:.1f} BLEU "
            f"({fmt(off['target_target'], pct=True)} off-target), lang-pair / lang-pair "
            f"{zs['lang_pair_lang_pair']:.1f} ({fmt(off['lang_pair_lang_pair'], pct=True)} "
            "off-target). The paper reports lang-pair routing collapsing on unseen pairs and "
            "target routing generalising; here target routing is " + verdict)
    for r in groups.get("lang_pair_lang_pair", []):
        by_policy = unseen_policies(r)
        avgs = {p: stat([x["bleu"] for x in recs.values()])[0] for p, recs in by_policy.items()
                if len(recs) == len(ZERO_SHOT)}
        if len(avgs) >= 2:
            out.append(f"Unseen-pair routing under lang-pair routing (seed {r['seed']}, zero-shot "
                       "average BLEU): " + ", ".join(f"`{p}` {v:.1f}" for p, v in
                                                    sorted(avgs.items())) + ".")
    first = {v: g[0] for v, g in groups.items()}  # one seed's routing is enough to show it
    usage = {v: r.get("routing_usage_valid") for v, r in first.items()}
    if usage.get("sentence_sentence") and usage.get("target_target"):
        dist = {v: {l: pair_distance(u) for l, u in usage[v].items()}
                for v in ("sentence_sentence", "target_target")}
        out.append(
            "Sentence routing depends on the language pair here (mean distance between two "
            f"pairs' expert shares, seed {first['sentence_sentence']['seed']}: "
            + ", ".join(f"{l} {d:.2f}" for l, d in dist["sentence_sentence"].items())
            + "; target / target " + ", ".join(f"{l} {d:.2f}"
                                               for l, d in dist["target_target"].items())
            + "): it acts as a learned task routing, where the paper's sentence routing gained "
            f"nothing over dense ({PAPER['sentence_sentence'] - PAPER['dense']:+.1f}).")
        tag = {v: [tag_only_distance(u) for r in groups.get(v, [])
                   for l, u in (r.get("routing_usage_valid") or {}).items() if l.startswith("enc")]
               for v in ("sentence_sentence", "token_token")}
        if all(tag.values()):
            out[-1] += (
                " The target-language tag is why: en-de, en-fr and en-cs feed the encoder the "
                "same English sentences (Multi30k is 4-way parallel), differing only in the tag "
                "that `--encoder-langtok tgt` puts first, and sentence routing's encoder still "
                "sends them to different experts (tag-only distance "
                f"{span(tag['sentence_sentence'])} {seeds_phrase(len(groups['sentence_sentence']))}"
                ", against token / token's "
                f"{span(tag['token_token'])}). The pooled sentence representation carries the tag "
                "to the gate, so sentence routing learns to route by target language.")
    bal = [(mean[v], v) for v in BALANCE if mean.get(v) is not None]
    if len(bal) >= 2:
        best = max(bal)[1]
        wt, scope = balance_settings(best)
        level = level_with(best, [v for _m, v in sorted(bal, reverse=True) if v != best], mean,
                           spreads)
        out.append(f"Balance loss: among {len(bal)} finished settings, gate loss weight {wt} "
                   + ("(no balance loss)" if float(wt) == 0 else f"over {scope}")
                   + f" has the best trained average ({max(bal)[0]:.1f} BLEU); spread "
                   f"across settings {max(bal)[0] - min(bal)[0]:.1f} BLEU"
                   + (f"; level within seed noise with {len(level)} of the other "
                      f"{len(bal) - 1}" if level else "") + ".")
    scopes = {v: groups[v] for v in SCOPES if groups.get(v)}
    if len(scopes) == 2:
        out.append(scope_reading(scopes))
    if not out:
        out.append("No finished runs yet.")
    return "## Reading\n\n" + "\n".join(f"- {s}" for s in out)


def section_commands(results):
    any_run = next(iter(results.values()))
    lines = ["## Commands", "", "```bash",
             f".venv/bin/python {any_run['commands']['study']}",
             ".venv/bin/python scripts/study_report.py", "```", "",
             "Data preparation and, per run, the exact training command:", "", "```bash",
             any_run["commands"]["prepare"]]
    for name, r in results.items():
        lines += [f"# {name} (finished by: .venv/bin/python {r['commands']['study']})",
                  r["commands"]["train"]]
    lines += ["# evaluation, e.g. en-de (every direction alike; zero-shot ones too)",
              any_run["commands"]["generate_example"], "```"]
    return "\n".join(lines)


def render(results, out_dir: Path) -> str:
    head = ("# Routing quality study (Multi30k)\n\nGenerated by `scripts/study_report.py` from "
            "`results/study/*.json` (written by `scripts/study.py`); do not edit by hand. The "
            "paper is Kudugunta et al. 2021, \"Beyond Distillation: Task-level Mixture-of-Experts "
            "for Efficient Inference\".")
    distilled = {n: r for n, r in results.items() if r["variant"] in DISTILLED}
    results = {n: r for n, r in results.items() if r["variant"] not in DISTILLED}
    if not results:
        return "\n\n".join([
            head, "No run has finished yet.", section_status(results, distilled),
            "## Commands\n\n```bash\n.venv/bin/python scripts/study.py\n"
            ".venv/bin/python scripts/study_report.py\n```"]) + "\n"
    groups = by_variant(results)
    parts = [head, section_setup(results), section_status(results, distilled),
             section_table1(groups, distilled), section_reading(results, groups),
             section_distillation(groups, distilled),
             section_directions(groups, "bleu", "sacreBLEU per direction"),
             section_directions(groups, "chrf", "chrF per direction"),
             section_off_target(groups),
             section_unseen(groups), section_params(groups), section_pruning(results),
             section_balance(groups), section_heatmaps(results, out_dir),
             section_commands(results)]
    return "\n\n".join(parts) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(REPO / "results" / "study"))
    p.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    results = load_results(Path(args.results))
    with atomic_file(str(out), "w") as f:
        f.write(render(results, out.parent))
    done = sum(r["variant"] not in DISTILLED for r in results.values())
    print(f"wrote {out} ({done} of {len(runs())} study runs finished"
          f"; distillation runs: {len(results) - done})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
