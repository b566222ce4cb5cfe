"""The BLEU-vs-compute curves of the upcycling study: a row's mean curve over its seeds, where one
curve passes another at equal total compute, where a curve reaches a BLEU, and the figure."""

from pathlib import Path

from research.upcycle_study.plan import GOAL_SHARE, ROWS

# (kind, variant) groups in page order, and their curves' colours
GROUPS = [("dense", "dense"), ("upcycled", "target_target"), ("continued", "dense"),
          ("scratch", "target_target"), ("upcycled", "token_token")]
COLOURS = {("dense", "dense"): "black", ("upcycled", "target_target"): "tab:orange",
           ("continued", "dense"): "tab:gray", ("scratch", "target_target"): "tab:blue",
           ("upcycled", "token_token"): "tab:green"}


def label(group) -> str:
    return next(r for r in ROWS if (r.kind, r.variant) == group).label


def runs_of(group):
    return [r.name for r in ROWS if (r.kind, r.variant) == group]


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def mean_curve(curves, runs):
    """[(total CPU s, avg BLEU, update)] averaged over the runs' points at the updates all of
    them have (with their totals known)."""
    have = [curves[r] for r in runs if r in curves]
    if not have:
        return []
    by_update = [{p["update"]: p for p in c["points"]
                  if p["total"]["cpu_seconds"] is not None and p["avg_bleu"] is not None}
                 for c in have]
    common = sorted(set.intersection(*(set(b) for b in by_update)))
    return [(mean(b[u]["total"]["cpu_seconds"] for b in by_update),
             mean(b[u]["avg_bleu"] for b in by_update), u) for u in common]


def interpolate(curve, x):
    """The curve's BLEU at total CPU x (linear between points); None outside its range."""
    for (x0, y0, _), (x1, y1, _) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if curve and x == curve[-1][0]:
        return curve[-1][1]
    return None


def passes(a, b):
    """The first point (x, y, update) of curve a, after its first, above curve b at the same
    total CPU and staying above at every later point of a where b is measured; None if none."""
    found = None
    for x, y, update in a[1:]:
        other = interpolate(b, x)
        if other is None:
            continue
        if y > other:
            found = found or (x, y, update)
        else:
            found = None
    return found


def reaches(curve, target):
    """The total CPU at which the curve first reaches BLEU `target` (linear between points)."""
    if curve and curve[0][1] >= target:
        return curve[0][0]
    for (x0, y0, _), (x1, y1, _) in zip(curve, curve[1:]):
        if y0 < target <= y1:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return None


def draw(curves, out: Path):
    """BLEU on the curves' sample against total training CPU seconds, one line per run (seed 2
    dashed), the dense pre-training's end and 60% of the scratch run's compute marked: the
    whole runs on the left, from the dense pre-training's end on the right."""
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fairseq_taskmoe.atomic import atomic_file

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    dense = mean_curve(curves, runs_of(("dense", "dense")))
    scratch = mean_curve(curves, runs_of(("scratch", "target_target")))
    branch = dense[-1][0] if dense else None
    shown = []
    for ax in axes:
        for group in GROUPS:
            for run in runs_of(group):
                points = mean_curve(curves, [run])
                if not points:
                    continue
                shown += points
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        markersize=3, color=COLOURS[group],
                        linestyle="--" if run.endswith("-s2") else "-",
                        label=f"{label(group)} ({run.rsplit('-', 1)[1]})")
        if branch is not None:
            ax.axvline(branch, color="0.6", linewidth=0.8, linestyle=":")
        if scratch:
            ax.axvline(GOAL_SHARE * scratch[-1][0], color="tab:red", linewidth=0.8,
                       linestyle=":", label=f"{GOAL_SHARE:.0%} of the scratch run's compute")
        ax.set_xlabel("total training CPU seconds (the dense pre-training included)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("BLEU, trained directions (test sample)")
    axes[0].set_title("whole runs", fontsize=9)
    later = [p for p in shown if branch is None or p[0] >= 0.95 * branch]
    if later:
        xs, ys = [p[0] for p in later], [p[1] for p in later]
        pad_x, pad_y = 0.03 * (max(xs) - min(xs) or 1), 0.1 * (max(ys) - min(ys) or 1)
        axes[1].set_xlim(min(xs) - pad_x, max(xs) + pad_x)
        axes[1].set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    axes[1].set_title("from the end of the dense pre-training", fontsize=9)
    axes[1].legend(fontsize=7, loc="lower right")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(str(out)) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
