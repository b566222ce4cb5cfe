"""Expert usage per language pair and MoE layer of a task-MoE checkpoint, on a data split.

    .venv/bin/python -m research.study.routing_stats work/demo/checkpoints/checkpoint_last.pt \\
        --data work/demo/multi30k/bin --split valid --out work/demo/routing.valid.json

Prints, per layer and pair, the share of that pair's (token, expert) assignments each expert
got, and writes the same as JSON ({layer: {pair: [share per expert]}}); research.study.heatmap
draws the same.
"""

import argparse
import json
import sys
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.study.routing_stats",
                                description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="fairseq data dir the model was trained on")
    p.add_argument("--split", default="valid")
    p.add_argument("--out", help="JSON output path (written atomically)")
    args = p.parse_args(argv)

    from fairseq import checkpoint_utils

    from fairseq_taskmoe.integration import plugin  # noqa: F401
    from fairseq_taskmoe.moe.analysis import collect_routing_counts, usage_by_pair

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [args.checkpoint], arg_overrides={"data": args.data})
    usage = usage_by_pair(collect_routing_counts(models[0], task, args.split), task.langs)
    for layer, rows in usage.items():
        print(f"{layer}:")
        for pair, shares in rows.items():
            print(f"  {pair:8s} " + " ".join(f"{s:5.2f}" for s in shares))
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(usage, indent=1))
        tmp.rename(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
