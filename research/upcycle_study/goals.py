"""The issue's goals (issue 28) checked against the upcycling study's rows on the whole test set,
and what the compute budget allows given the measured CPU seconds per update."""

from research.upcycle_study.curves import mean, runs_of
from research.upcycle_study.plan import GOAL_MARGIN, GOAL_SHARE, budget_continuation


def spread(values):
    """Half the range: the seed noise the study reports (± half-range)."""
    values = [v for v in values if v is not None]
    return (max(values) - min(values)) / 2 if len(values) > 1 else None


def fmt(value, digits=2):
    return "–" if value is None else f"{value:,.{digits}f}"


def cpu(value):
    return "–" if value is None else f"{value:,.0f}"


def goal_line(name, state, detail):
    return f"- **{name}**: {state}. {detail[0].upper()}{detail[1:]}"


def section_goals(records, dense_steps, continuation):
    rows, step0 = records["row"], records["step0"]
    up_g, dc_g, sc_g = ("upcycled", "target_target"), ("continued", "dense"), \
        ("scratch", "target_target")

    def have(group):
        return [rows[n] for n in runs_of(group) if n in rows]

    def missing(*groups):
        return ", ".join(f"`{n}`" for g in groups for n in runs_of(g) if n not in rows)

    def bleu(rs):
        return mean(r["averages"]["bleu"] for r in rs)

    def total(rs):
        return mean(r["compute"]["total"]["cpu_seconds"] for r in rs)

    up, dc, sc, dense = have(up_g), have(dc_g), have(sc_g), have(("dense", "dense"))
    lines = ["## Goals (issue 28)", "",
             f"Upcycled target / target after {continuation:,} updates, on the whole test set "
             "(mean of its seeds):", ""]
    first = f"at least dense continued + {GOAL_MARGIN:.1f} BLEU"
    if up and dc:
        delta = bleu(up) - bleu(dc)
        noise = sum(spread([r["averages"]["bleu"] for r in g]) or 0 for g in (up, dc))
        lacking = missing(up_g, dc_g)
        lines.append(goal_line(
            first, "met" if delta >= GOAL_MARGIN else "not met",
            f"{bleu(up):.2f} against {bleu(dc):.2f}: {delta:+.2f} (seed half-ranges summed: "
            f"{noise:.2f})." + (f" Seeds still missing: {lacking}." if lacking else "")))
    else:
        lines.append(goal_line(first, "pending", f"needs {missing(up_g, dc_g)}."))
    second, third = ("at least the scratch task-MoE",
                     f"at most {GOAL_SHARE:.0%} of the scratch run's total compute")
    if up and sc:
        lines.append(goal_line(second, "met" if bleu(up) >= bleu(sc) else "not met",
                               f"{bleu(up):.2f} against {bleu(sc):.2f} "
                               f"({bleu(up) - bleu(sc):+.2f})."))
        if total(up) is not None and total(sc):
            share = total(up) / total(sc)
            lines.append(goal_line(
                third, "met" if share <= GOAL_SHARE else "not met",
                f"{cpu(total(up))} CPU s (the dense pre-training's "
                f"{cpu(total(dense) if dense else None)} included once) against "
                f"{cpu(total(sc))}: {share:.0%}."))
        else:
            lines.append(goal_line(third, "unknown", "a row's CPU seconds were not recorded."))
    else:
        lines += [goal_line(g, "pending", f"needs {missing(up_g, sc_g)}.")
                  for g in (second, third)]
    fourth = "step 0: every pair's pruned sub-network gives the dense model's hypotheses"
    checks = [step0[n] for n in runs_of(up_g) if n in step0]
    if checks:
        lines.append(goal_line(fourth, "met" if all(c["all_identical"] for c in checks)
                               else "not met", f"{len(checks)} upcycled checkpoint(s) checked "
                               "on the whole test set (section Step 0)."))
    else:
        lines.append(goal_line(fourth, "pending", "no step-0 check yet."))
    if dense and up and sc and None not in (total(dense), total(sc), total(up)):
        lines += ["", budget_sentence(dense[0], up, sc[0], dense_steps, continuation)]
    return "\n".join(lines)


def budget_sentence(dense, upcycled, scratch, dense_steps, continuation):
    """What the 60% budget allows, from the measured CPU seconds per update."""
    d = dense["compute"]["own"]["cpu_seconds"]
    u = mean(r["compute"]["own"]["cpu_seconds"] for r in upcycled) / continuation
    s = scratch["compute"]["own"]["cpu_seconds"] / (dense_steps + continuation)
    kind, m = budget_continuation(d, dense_steps, u, s, GOAL_SHARE)
    if kind == "at most":
        reach = f"only for M up to {m:,} updates"
    elif kind == "at least":
        reach = f"only for M of at least {m:,} updates"
    elif kind == "any":
        reach = "for any M"
    else:
        reach = ("for no M: the dense pre-training alone costs more than "
                 f"{GOAL_SHARE:.0%} of a scratch run of its length")
    return (f"The compute budget in numbers: the dense pre-training cost {cpu(d)} CPU s "
            f"({d / dense_steps:.2f} per update), an upcycled continuation update {u:.2f}, a "
            f"scratch update {s:.2f}. With the scratch run sized {dense_steps:,} + M updates, an "
            f"upcycled run stays within {GOAL_SHARE:.0%} of its compute {reach}.")
