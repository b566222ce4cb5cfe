"""docs/results-upcycle.md and its figure from the upcycling study's result files: the rows on
the whole test set, step 0, BLEU against total training CPU seconds, when the upcycled model
passes the others, and the issue's goals; a section whose runs have not finished says so, with
no figure in it.

    .venv/bin/python -m research.upcycle_study.report   # results/upcycle -> docs/results-upcycle.md
"""

import argparse
import json
import os
import re
from pathlib import Path

from fairseq_taskmoe.atomic import write_text_atomically
from research.common import REPO, current_command, show
from research.study.grid import LANGS, PRESETS, TRAINED, flag_list
from research.upcycle_study.curves import (GROUPS, draw, interpolate, label, mean, mean_curve,
                                           passes, reaches, runs_of)
from research.upcycle_study.goals import cpu, fmt, section_goals, spread
from research.upcycle_study.plan import (CURVE_EVERY, DEFAULT_CONTINUATION, REWARM_UPDATES, ROWS,
                                         TOKEN_NOISE, continuation_schedule, expert_dim,
                                         row_named, training_command, upcycle_command)

FIGURE = "upcycle_bleu_vs_cpu.png"


def load(results: Path, continuation: int):
    """{stage: {run: record}} for stage in row, curve, step0, upcycle, keeping the dense row's
    records and the others' of this --upcycle-updates; and the files of another M left out."""
    out = {s: {} for s in ("row", "curve", "step0", "upcycle")}
    other = []
    for path in sorted(Path(results).glob("*.json")) if Path(results).exists() else []:
        stage, _, run = path.stem.partition("-")
        if stage not in out:
            stage, run = "row", path.stem
        record = json.loads(path.read_text())
        if run not in {r.name for r in ROWS}:
            continue
        if record.get("upcycle_updates") not in (None, continuation):
            other.append(path.name)
            continue
        out[stage][run] = record
    return out, other


def section_setup(preset: str, continuation: int, dense_steps: int, records):
    flags = PRESETS[preset]["flags"]
    sched = continuation_schedule(preset, dense_steps, continuation)
    up = next(r for r in ROWS if r.kind == "upcycled" and r.task_routed)
    tok = next(r for r in ROWS if r.kind == "upcycled" and not r.task_routed)
    curve = next(iter(records["curve"].values()), None)
    sample = (f"a seeded sample of {curve['sentences']:,} test sentences per direction"
              if curve else "a seeded sample of the test set (`--curve-cap`, 200 sentences per "
                            "direction by default)")
    return "\n".join([
        "## What was run",
        "",
        f"Multi30k, the routing study's `{preset}` recipe (`{show(flag_list(flags))}`), trained "
        "on the six en↔{de,fr,cs} directions. Rows (M, `--upcycle-updates`, is "
        f"{continuation:,}):",
        "",
        f"- **dense**: the study's own `dense-s1` (`--moe-freq 0`), {dense_steps:,} updates, "
        "its inverse-sqrt schedule;",
        f"- **upcycled target / target** (seeds 1, 2): `taskmoe-upcycle` of the dense checkpoint "
        f"into the study's task-MoE ({flags['--moe-expert-count']} experts of "
        f"{expert_dim(up, preset)}, top-{flags['--moe-top-k']}, the dense FFN split in "
        f"{int(flags['--encoder-ffn-embed-dim']) // expert_dim(up, preset)} pieces: exact), then "
        f"{continuation:,} updates;",
        "- **upcycled token / token** (seed 1): copies of the dense FFN "
        f"({expert_dim(tok, preset)} wide: token routing cannot split it exactly), a fresh gate, "
        "`--noise "
        f"{TOKEN_NOISE}` to break the copies' symmetry, then {continuation:,} updates;",
        f"- **dense continued** (seeds 1, 2): the dense checkpoint, {continuation:,} more updates;",
        f"- **target / target from scratch** (seed 1): the study's `target_target`, "
        f"{dense_steps + continuation:,} updates, its inverse-sqrt schedule.",
        "",
        "Every continued row (upcycled and dense alike) starts with `fairseq-train "
        "--finetune-from-model` (fresh Adam, data order restarted with the row's seed) and the "
        "same schedule: the dense run's inverse-sqrt curve carried on from its rate at update "
        f"{dense_steps:,} ({sched['--lr']}) to the rate it would reach at update "
        f"{dense_steps + continuation:,} ({sched['--end-learning-rate']}), linear, re-warmed over "
        f"{REWARM_UPDATES} updates for the fresh Adam (1 / (1 - β2)): fairseq's polynomial_decay. "
        "For seed 1 of the upcycled target / target row and of the dense continued row:",
        "",
        "```bash", *planned_commands(preset, dense_steps, continuation,
                                     recorded_curve_every(records)), "```",
        "",
        "**Compute** is training CPU seconds (user + system of fairseq-train, every thread, read "
        "at each checkpoint save: work lost to a kill is not counted, each sitting's start-up "
        "is), and updates. A row's total counts the dense pre-training once, for every row that "
        "starts from the dense checkpoint, plus the `taskmoe-upcycle` command for upcycled rows; "
        "evaluation is not counted. Rows are scored like the study (beam 5, detokenized "
        "sacreBLEU) on the whole test set of every trained direction, and each task-MoE is "
        "pruned per direction and checked to give the full model's hypotheses. The curves, "
        "cheaper, score every checkpoint saved (`--curve-every` updates apart) on "
        f"{sample}: their BLEU is not the whole test set's.",
    ])


def recorded_curve_every(records) -> int:
    """The --curve-every the finished rows ran with (their checkpoints' interval), else the
    default."""
    for r in records["row"].values():
        found = re.search(r"--save-interval-updates (\d+)", r["commands"].get("train") or "")
        if found:
            return int(found.group(1))
    return CURVE_EVERY


def planned_commands(preset, dense_steps, continuation, curve_every=CURVE_EVERY):
    """The upcycled target / target and dense continued rows' commands (seed 1) with the
    default folders, as the runner builds them."""
    work, study = REPO / "work" / "upcycle" / f"m{continuation}", REPO / "work" / "study"
    dense = study / "runs" / "dense-s1" / "checkpoints" / "checkpoint_last.pt"
    data = study / "multi30k" / "bin"
    up, cont = row_named("upcycled_target_target-s1"), row_named("dense_continued-s1")
    upcycled = work / up.name / "upcycled.pt"
    train = [training_command(row, data, work / row.name / "checkpoints", dense_steps,
                              continuation, preset, LANGS, TRAINED, curve_every, init)
             for row, init in ((up, upcycled), (cont, dense))]
    return [show(upcycle_command(up, dense, upcycled, preset)), *(show(c) for c in train)]


def section_status(records, other):
    lines = ["## Status", "", "| row | run | state |", "|---|---|---|"]
    for row in ROWS:
        if row.name in records["row"]:
            state = "done"
        elif row.name in records["curve"] or row.name in records["upcycle"]:
            state = "running: " + ", ".join(
                s for s in ("upcycle", "step0", "curve") if row.name in records[s]) + " written"
        else:
            state = "pending: not yet run"
        lines.append(f"| {row.label} | `{row.name}` | {state} |")
    if other:
        lines += ["", "Left out (another `--upcycle-updates`): " + ", ".join(
            f"`{o}`" for o in other) + "."]
    return "\n".join(lines)


def section_rows(records, directions):
    rows = records["row"]
    if not rows:
        return "## Rows (whole test set)\n\nPending: no row has finished yet."
    scratch = next((r for r in rows.values() if r["kind"] == "scratch"), None)
    scratch_cpu = scratch["compute"]["total"]["cpu_seconds"] if scratch else None
    lines = ["## Rows (whole test set)", "",
             "| row | run | updates own / total | CPU s own / total | total / scratch's | "
             "avg BLEU | avg chrF | pruned = full |", "|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        r = rows.get(row.name)
        if r is None:
            lines.append(f"| {row.label} | `{row.name}` | pending | | | | | |")
            continue
        own, total = r["compute"]["own"], r["compute"]["total"]
        share = (f"{total['cpu_seconds'] / scratch_cpu:.0%}"
                 if scratch_cpu and total["cpu_seconds"] is not None else "–")
        pruned = (f"{r['pruned_identical']} of {len(r['pruned'])}" if r["task_routed"]
                  else "– (not task-routed)")
        lines.append(f"| {row.label} | `{row.name}` | {own['updates']:,} / "
                     f"{total['updates']:,} | {cpu(own['cpu_seconds'])} / "
                     f"{cpu(total['cpu_seconds'])} | {share} | {fmt(r['averages']['bleu'])} | "
                     f"{fmt(r['averages']['chrf'])} | {pruned} |")
    lines += ["", machine_note(rows.values())]
    lines += ["", "By row (mean ± half the range over seeds):", "",
              "| row | seeds | avg BLEU | total CPU s |", "|---|---|---|---|"]
    for group in GROUPS:
        have = [rows[n] for n in runs_of(group) if n in rows]
        if not have:
            lines.append(f"| {label(group)} | 0 of {len(runs_of(group))} | pending | |")
            continue
        bleus = [r["averages"]["bleu"] for r in have]
        sp = spread(bleus)
        lines.append(f"| {label(group)} | {len(have)} of {len(runs_of(group))} | "
                     f"{fmt(mean(bleus))}{'' if sp is None else f' ± {sp:.2f}'} | "
                     f"{cpu(mean(r['compute']['total']['cpu_seconds'] for r in have))} |")
    lines += ["", "BLEU per direction:", "",
              "| run | " + " | ".join(directions) + " |",
              "|---|" + "---|" * len(directions)]
    for row in ROWS:
        if row.name in rows:
            d = rows[row.name]["directions"]
            lines.append(f"| `{row.name}` | " + " | ".join(
                fmt(d[p]["bleu"]) if p in d else "–" for p in directions) + " |")
    return "\n".join(lines)


def machine_note(rows):
    """Where the rows were trained, and a warning when their CPU seconds came from different
    machines or thread settings (then not directly comparable)."""
    cpus = sorted({f"{r['environment']['cpu']} ({r['environment']['cpu_count']} CPUs)"
                   for r in rows if r.get("environment")})
    threads = sorted({str(s.get("omp_num_threads")) for r in rows for s in r.get("sittings", [])})
    dense = next((r for r in rows if r["kind"] == "dense"), None)
    note = (f"Trained on {', '.join(cpus) or 'an unrecorded machine'}; OMP_NUM_THREADS "
            f"{', '.join('unset' if t == 'None' else t for t in threads) or 'unrecorded'}"
            + (f"; the dense run in {dense['run_dir']}" if dense and dense.get("run_dir") else "")
            + ".")
    if len(cpus) > 1 or len(threads) > 1:
        note += (" **Rows ran on different machines or thread settings: their CPU seconds are "
                 "not directly comparable.**")
    return note


def section_step0(records):
    lines = ["## Step 0: the upcycled model is the dense model", ""]
    upcycled = [r for r in ROWS if r.kind == "upcycled"]
    for row in upcycled:
        up = records["upcycle"].get(row.name)
        check = records["step0"].get(row.name)
        if not row.task_routed:
            state = ("pending: not yet upcycled" if up is None else
                     "not exact by design (`--noise` perturbs the copies; token routing is "
                     "not prunable); its update-0 point is on the curve")
        elif check is None:
            state = "pending: not yet checked"
        else:
            d = check["directions"]
            same = sum(v["upcycled_identical_to_dense"] for v in d.values())
            pruned = sum(v["pruned_identical_to_dense"] for v in d.values())
            n = next(iter(d.values()))["sentences"] if d else 0
            state = (f"{same} of {len(d)} directions give the dense model's hypotheses, "
                     f"{pruned} of {len(d)} pruned sub-networks too ({n:,} test sentences each)"
                     + (f"; the same tensors as `{check['same_as']}`'s upcycled checkpoint"
                        if check.get("same_as") else ""))
        cost = (f" Upcycling took {up['cpu_seconds']:,.1f} CPU s." if up else "")
        lines.append(f"- `{row.name}`: {state}.{cost}")
    return "\n".join(lines)


def section_curves(records, figure_rel):
    curves = records["curve"]
    if figure_rel is None or not any(mean_curve(curves, [run]) for run in curves):
        return "## BLEU against total compute\n\nPending: no curve yet."
    up = mean_curve(curves, runs_of(("upcycled", "target_target")))
    dc = mean_curve(curves, runs_of(("continued", "dense")))
    sc = mean_curve(curves, runs_of(("scratch", "target_target")))
    tok = mean_curve(curves, runs_of(("upcycled", "token_token")))
    lines = ["## BLEU against total compute", "",
             f"![BLEU against total CPU seconds]({figure_rel})", "",
             "Each point is a checkpoint scored on the test sample (average over the trained "
             "directions; two seeds averaged where a row has them), at the training CPU seconds "
             "that produced it, the dense pre-training included for the rows that start from "
             "it. A curve passes another where it is above the other's BLEU at the same total "
             "compute (interpolated between the other's points) and stays above at every later "
             "point where the other was measured.", ""]
    if not up:
        return "\n".join(lines + ["- The upcycled target / target model: pending (no curve "
                                  "yet)."])
    lines.append(against(up, "Upcycled target / target", dc, "dense continued"))
    lines.append(against(up, "Upcycled target / target", sc, "the scratch task-MoE"))
    if sc:
        final = sc[-1]
        at = reaches(up, final[1])
        lines.append(
            f"- The scratch task-MoE ends at {final[1]:.2f} after {cpu(final[0])} CPU s; "
            + (f"the upcycled model reaches that at {cpu(at)} CPU s, {at / final[0]:.0%} of it."
               if at is not None else
               f"the upcycled model does not reach it within its {up[-1][2]:,} updates "
               f"({up[-1][1]:.2f} at {cpu(up[-1][0])} CPU s, {up[-1][0] / final[0]:.0%} of "
               "the scratch run's compute)."))
    if tok:
        lines.append(against(tok, "Upcycled token / token", dc, "dense continued"))
    return "\n".join(lines)


def against(a, name_a, b, name_b):
    """When curve a passes curve b for good, as a sentence."""
    if not b:
        return f"- {name_a} against {name_b}: pending ({name_b} has no curve yet)."
    hit = passes(a, b)
    if hit:
        return (f"- {name_a} passes {name_b} at {cpu(hit[0])} CPU s in total (continuation "
                f"update {hit[2]:,}: {hit[1]:.2f} against {interpolate(b, hit[0]):.2f}) and "
                "stays ahead at every later point.")
    if not [p for p in a[1:] if interpolate(b, p[0]) is not None]:
        return (f"- {name_a} against {name_b}: none of its points lies within the total "
                f"compute {name_b} was measured over.")
    return (f"- {name_a} does not pass {name_b} for good within its {a[-1][2]:,} updates "
            f"(last point {a[-1][1]:.2f} at {cpu(a[-1][0])} CPU s).")


def section_commands(records, continuation):
    rows = records["row"]
    m = f"--upcycle-updates {continuation}"
    lines = ["## Commands", "", "```bash",
             f"make study-upcycle          # = .venv/bin/python -m research.upcycle_study {m} "
             f"--curve-every {recorded_curve_every(records)}",
             f".venv/bin/python -m research.upcycle_study {m} --list",
             "make study-upcycle-report   # = .venv/bin/python -m research.upcycle_study.report "
             f"{m}",
             "```"]
    examples = [rows[r.name] for r in ROWS if r.name in rows]
    if examples:
        lines += ["", "As recorded (one run per row):", ""]
        seen = set()
        for r in examples:
            if (r["kind"], r["variant"]) in seen:
                continue
            seen.add((r["kind"], r["variant"]))
            lines.append(f"- `{r['run']}`:")
            cmds = [c for c in (r["commands"]["upcycle"], r["commands"]["train"]) if c]
            lines += ["", "  ```", *(f"  {current_command(c)}" for c in cmds), "  ```", ""]
    return "\n".join(lines).rstrip()


def render(records, other, out_dir: Path, figure: Path, preset="cpu",
           continuation=DEFAULT_CONTINUATION, dense_steps=None):
    dense_steps = dense_steps or PRESETS[preset]["max_update"]
    dense = records["row"].get("dense-s1")
    directions = (dense["data"]["evaluated_directions"] if dense else
                  next((r["data"]["evaluated_directions"] for r in records["row"].values()),
                       ["en-de", "de-en", "en-fr", "fr-en", "en-cs", "cs-en"]))
    figure_rel = os.path.relpath(figure, out_dir) if figure is not None else None
    head = ("# Upcycling a dense model (Multi30k)\n\nGenerated by `python -m "
            "research.upcycle_study.report` from the result files that `python -m "
            "research.upcycle_study` writes under results/upcycle/; do not edit by hand. What "
            "`taskmoe-upcycle` does: [training.md](training.md#starting-from-a-dense-model). "
            "Sparse upcycling: Komatsuzaki et al. 2022.")
    return "\n\n".join([head, section_setup(preset, continuation, dense_steps, records),
                        section_status(records, other), section_rows(records, directions),
                        section_step0(records), section_curves(records, figure_rel),
                        section_goals(records, dense_steps, continuation),
                        section_commands(records, continuation)]) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.upcycle_study.report",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(REPO / "results" / "upcycle"),
                   help="the study's result files (default: results/upcycle)")
    p.add_argument("--out", default=str(REPO / "docs" / "results-upcycle.md"),
                   help="the page (default: docs/results-upcycle.md)")
    p.add_argument("--img-dir", default=str(REPO / "docs" / "img"),
                   help=f"where the figure {FIGURE} goes (default: docs/img)")
    p.add_argument("--upcycle-updates", type=int, default=DEFAULT_CONTINUATION,
                   help="the M of the runs to report (default: %(default)s)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    records, other = load(Path(args.results), args.upcycle_updates)
    figure = Path(args.img_dir).resolve() / FIGURE
    if any(mean_curve(records["curve"], [run]) for run in records["curve"]):
        draw(records["curve"], figure)
    elif not figure.exists():
        figure = None
    dense = records["row"].get("dense-s1") or {}
    write_text_atomically(str(out), render(records, other, out.parent, figure,
                                           continuation=args.upcycle_updates,
                                           dense_steps=dense.get("dense_updates")))
    print(f"wrote {out} ({len(records['row'])} of {len(ROWS)} rows finished)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
