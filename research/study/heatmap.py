"""Heatmaps of expert usage per language pair, one panel per MoE layer, from a checkpoint.

    .venv/bin/python -m research.study.heatmap \\
        work/study/runs/token_target-s1/checkpoints/checkpoint_last.pt \\
        --data work/study/multi30k/bin --out docs/img/token_target-s1.png

Runs the model teacher-forced over a split (default: valid) in eval mode and counts, per MoE
layer, language pair and expert, the (token, expert) assignments (fairseq_taskmoe.moe.analysis).
Cell (pair, expert) is that expert's share of the pair's assignments: with top-2 routing every
row sums to 1 and a task-routed layer shows two cells of 0.5 per row; token routing spreads a
pair's tokens. Rows are the pairs present in the split. The study draws one per run
(research/study/evaluation.py).
"""

import argparse
import json
import sys
import warnings


def draw(usage, out, title=None):
    """usage {layer: {pair: [share per expert]}} -> PNG at `out` (written atomically)."""
    import logging

    # importing fairseq leaves the root logger at DEBUG: keep matplotlib's start-up quiet
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fairseq_taskmoe.atomic import atomic_file

    layers = sorted(usage, key=lambda name: (not name.startswith("enc"), name))
    if not layers:
        raise SystemExit("no MoE layer with routing counts: is this a dense checkpoint?")
    rows = max(len(usage[layer]) for layer in layers)
    # Multi30k's at most 12 pairs fit 3.2 inches; LoHelp's 28 get a taller figure
    height = 3.2 if rows <= 12 else 0.2 * rows + 1.0
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1.2, height),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax, layer in zip(axes[0], layers):
        pairs = list(usage[layer])
        grid = [usage[layer][p] for p in pairs]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(layer)
        ax.set_xlabel("expert")
        ax.set_xticks(range(len(grid[0])))
        ax.set_yticks(range(len(pairs)))
        ax.set_yticklabels(pairs)
        for r, row in enumerate(grid):
            for c, share in enumerate(row):
                if share >= 0.005:
                    ax.text(c, r, f"{share:.2f}"[1:] if share < 1 else "1", ha="center",
                            va="center", fontsize=6, color="white" if share < 0.6 else "black")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.9, label="share of the pair's assignments")
    if title:
        fig.suptitle(title)
    with atomic_file(str(out)) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.study.heatmap",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="fairseq data dir the model was trained on")
    p.add_argument("--split", default="valid")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--json", help="also write the usage shares as JSON ({layer: {pair: [...]}})")
    p.add_argument("--title", help="figure title (default: the checkpoint path)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from fairseq import checkpoint_utils

    from fairseq_taskmoe.atomic import atomic_file
    from fairseq_taskmoe.integration import plugin  # noqa: F401
    from fairseq_taskmoe.moe.analysis import collect_routing_counts, usage_by_pair

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [args.checkpoint], arg_overrides={"data": args.data})
    usage = usage_by_pair(collect_routing_counts(models[0], task, args.split), task.langs)
    draw(usage, args.out, args.title or args.checkpoint)
    if args.json:
        with atomic_file(args.json, "w") as f:
            json.dump(usage, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
