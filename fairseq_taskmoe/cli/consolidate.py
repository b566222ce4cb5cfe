"""taskmoe-consolidate: merge a sharded checkpoint (one file per rank + a shared file) into one
ordinary fairseq checkpoint that fairseq-generate, taskmoe-prune or fairseq-train load on one
process.

    taskmoe-consolidate checkpoints/checkpoint_last --output checkpoints/consolidated.pt
"""

import argparse
import os
import sys

from ..atomic import write_atomically
from ..distributed.checkpoints import CheckpointError, checkpoint_prefix, consolidate, shared_path


def build_parser():
    parser = argparse.ArgumentParser(
        prog="taskmoe-consolidate",
        description="Check and merge the files of one sharded task-MoE checkpoint "
        "(PREFIX-shared.pt and PREFIX-rank-0.pt .. PREFIX-rank-{W-1}.pt, written by fairseq-train "
        "with expert parallelism) into one ordinary checkpoint with every expert and the "
        "optimizer state in single-process order.",
    )
    parser.add_argument("prefix", help="checkpoint prefix, e.g. checkpoints/checkpoint_last "
                        "(PREFIX.pt or PREFIX-shared.pt are accepted too)")
    parser.add_argument("--output", "-o", required=True, help="path of the consolidated file")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    prefix = checkpoint_prefix(args.prefix)
    try:
        if os.path.exists(args.output) and not args.force:
            raise CheckpointError(f"{args.output} exists; pass --force to overwrite it")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise CheckpointError(f"folder of --output {args.output} does not exist")
        if not os.path.isfile(shared_path(prefix)):
            raise CheckpointError(f"{shared_path(prefix)} does not exist: {args.prefix} is not "
                                  "a sharded checkpoint prefix")
        state = consolidate(prefix)
        write_atomically(state, args.output)
    except CheckpointError as err:
        print(f"taskmoe-consolidate: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({len(state['model'])} model entries)")
    return 0


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
