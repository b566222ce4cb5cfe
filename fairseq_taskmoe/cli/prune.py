"""taskmoe-prune: write the exactly equivalent per-task sub-network of a task-MoE checkpoint.

    taskmoe-prune checkpoints/checkpoint_best.pt --lang-pair en-de --output en-de.pt
    taskmoe-prune checkpoints/checkpoint_best.pt --lang-pair '*-de' --output into-de.pt
    taskmoe-prune checkpoints/checkpoint_last --lang-pair en-de --output en-de.pt  # sharded
"""

import argparse
import os
import sys

from ..atomic import write_atomically
from ..distributed.checkpoints import CheckpointError, checkpoint_bytes, find_checkpoint, load_any
from ..deploy.pruning import PruneReport, PruningError, prune_checkpoint


def build_parser():
    parser = argparse.ArgumentParser(
        prog="taskmoe-prune",
        description="Keep only the experts that the given task(s) use in every task-routed MoE "
        "layer of a task-MoE checkpoint (merged into one FFN per layer by default), drop the "
        "optimizer state, and write a checkpoint that fairseq-generate serves with the same "
        "flags as the full model and identical output for those tasks.",
    )
    parser.add_argument("checkpoint", help="full task-MoE checkpoint written by fairseq-train, "
                        "or the prefix of a sharded one (e.g. checkpoints/checkpoint_last for "
                        "checkpoint_last-shared.pt + checkpoint_last-rank-*.pt)")
    parser.add_argument("--lang-pair", required=True, metavar="PAIRS",
                        help="comma-separated pairs to serve, e.g. en-de or en-de,en-fr; "
                        "'*-de' means every language into de")
    parser.add_argument("--output", "-o", required=True, help="path of the pruned checkpoint")
    parser.add_argument("--no-merge", action="store_true",
                        help="keep every task's k experts as separate FFNs with their frozen gate "
                        "weights instead of merging them (same outputs, slower). By default each layer takes "
                        "the smaller exact form: one merged FFN per distinct route, or the "
                        "unmerged union when several tasks share experts")
    parser.add_argument("--allow-untrained-routes", action="store_true",
                        help="prune a pair even when a task-routed layer reads its route from a "
                        "gate row that training never updated (a lang_pair-routed zero-shot "
                        "pair): by default that is refused, since the route is random")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    return parser


def print_report(report: PruneReport, bytes_before: int, bytes_after: int, out=sys.stdout):
    print(f"serves: {', '.join(report.served_pairs)}", file=out)
    for warning in report.warnings:
        print(f"warning: {warning}", file=out)
    for layer in report.layers:
        if layer.action == "pruned":
            kept = "; ".join(f"{task}: " + " ".join(f"e{e}*{w:.3f}" for e, w in picks)
                             for task, picks in layer.kept.items())
            dims = "+".join(map(str, layer.ffn_dims))
            print(f"  {layer.name:18s} {layer.routing:9s} pruned {layer.experts_before} -> "
                  f"{len(layer.ffn_dims)} FFN (dim {dims}) {layer.form} ({layer.why})   {kept}",
                  file=out)
        else:
            print(f"  {layer.name:18s} {layer.routing:9s} kept whole ({layer.experts_before} "
                  "experts: routing depends on the input)", file=out)
    ratio = report.params_after / report.params_before
    print(f"parameters: {report.params_before:,} -> {report.params_after:,} ({ratio:.1%})",
          file=out)
    print(f"checkpoint bytes: {bytes_before:,} -> {bytes_after:,} "
          f"({bytes_after / bytes_before:.1%}; the full one includes optimizer state)", file=out)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        try:
            found = find_checkpoint(args.checkpoint)
        except CheckpointError as err:
            raise PruningError(str(err)) from err
        if found is None:
            raise PruningError(f"checkpoint {args.checkpoint} does not exist")
        if os.path.exists(args.output) and not args.force:
            raise PruningError(f"{args.output} exists; pass --force to overwrite it")
        if os.path.abspath(args.output) == os.path.abspath(args.checkpoint):
            raise PruningError("--output must differ from the input checkpoint")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise PruningError(f"folder of --output {args.output} does not exist")
        try:
            state = load_any(args.checkpoint)
        except CheckpointError as err:
            raise PruningError(str(err)) from err
        except Exception as err:  # truncated zip, not a pickle, ...
            raise PruningError(f"cannot read {args.checkpoint} ({type(err).__name__}: {err}); "
                               "is it a complete fairseq checkpoint?") from err
        pruned, report = prune_checkpoint(state, args.lang_pair, merge=not args.no_merge,
                                          allow_untrained=args.allow_untrained_routes)
        write_atomically(pruned, args.output)
    except PruningError as err:
        print(f"taskmoe-prune: error: {err}", file=sys.stderr)
        return 2
    print_report(report, checkpoint_bytes(found), os.path.getsize(args.output))
    print(f"wrote {args.output}")
    return 0


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
