"""The distillation section (issue 10): the dense student next to dense, its token / token
teacher and the pruned task-MoE of the same size; decode speeds, costs, and the paper's "beyond
distillation" claim against the present runs."""

import json
from pathlib import Path

from research.common import REPO, current_command
from research.study.grid import DIRECTIONS, VARIANTS
from research.study.report.stats import (DISTILLED, PRUNED, TABLE1_EXTRA, avg_value, cell,
                                         direction_value, gain_share, pruned_bleu,
                                         pruned_trained_avg, seeds_note, stat, table,
                                         trained_mean)


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
             "the training sources (sequence-level distillation, `python -m research.distill`). "
             "The pruned task-MoE row uses, per trained direction, the checkpoint pruned for it; "
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
        notes.append(f"`{name}` was made by: `{current_command(r['commands']['study'])}`.")
    notes.extend(claim_notes(groups, distilled))
    if not distilled:
        notes.append("Run it with `.venv/bin/python -m research.distill` once `token_token-s1` "
                     "(the teacher) and `target_target-s1` (for the speed comparison) are "
                     "trained.")
    parts.append("\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts)


STEP_BENCHMARK = REPO / "results" / "student_shape_benchmark.json"


def speed_notes(sp, data_stats=None, step_benchmark: Path = STEP_BENCHMARK):
    """The student vs pruned decode speed of a distillation run, with what explains a gap: output
    length (tokens/s over sentences/s of the same runs) and, when measured, the per-step cost at
    equal length (research.bench.inference's variants c and e at the study's shapes)."""
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
                    f"{current_command(b['command'])}`, {Path(step_benchmark).name}) gives the "
                    "pruned task-MoE "
                    f"{c:,.0f} tokens/s and a dense transformer of its active size {e:,.0f} "
                    f"({c / e:.2f}x).")
                break
    return notes


# Kudugunta et al. 2021 (WMT, 8 directions): the student keeps 32% of token-MoE's gain over dense;
# the extracted task-MoE sub-network keeps all of it, +2.1 BLEU over the student.
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
