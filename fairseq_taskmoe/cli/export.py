"""taskmoe-export: serve one pair of a task-MoE checkpoint without the plugin.

    taskmoe-export checkpoints/checkpoint_best.pt --lang-pair en-de --format fairseq \\
        --output en-de.transformer.pt
    taskmoe-export checkpoints/checkpoint_best.pt --lang-pair en-de --format ctranslate2 \\
        --data data-bin --spm-model spm.model --quantization int8 --output en-de.ct2
    taskmoe-export checkpoints/checkpoint_last --lang-pair en-de --format fairseq \\
        --output en-de.transformer.pt  # sharded (expert-parallel) checkpoint, by its prefix
"""

import argparse
import os
import sys

from ..atomic import write_atomically
from ..deploy.export import (CONVENTION_FILE, ExportError, extract_dense, fairseq_flags,
                             to_fairseq_transformer, write_ctranslate2)
from ..deploy.pruning import PruningError
from ..distributed.checkpoints import CheckpointError, find_checkpoint, load_any
from ..integration.compat import load_checkpoint

# CTranslate2's weight types (ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES), listed here so
# that --help and --format fairseq work without CTranslate2 installed
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
                 "bfloat16", "float32")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="taskmoe-export",
        description="Export one language pair of a task-MoE checkpoint (full or pruned; a full "
        "one is pruned for the pair and its experts merged on the way) as a dense model that "
        "serves without the plugin: fairseq's own `transformer` for stock fairseq-generate (no "
        "--user-dir), or a CTranslate2 model. Every MoE layer must be task-routed (target or "
        "lang_pair): token- and sentence-routed layers have no dense equivalent.",
    )
    parser.add_argument("checkpoint", help="task-MoE checkpoint (fairseq-train or taskmoe-prune), "
                        "or the prefix (or any file) of a sharded one, as taskmoe-prune takes it "
                        "(e.g. checkpoints/checkpoint_last for checkpoint_last-shared.pt + "
                        "checkpoint_last-rank-*.pt)")
    parser.add_argument("--lang-pair", required=True, metavar="SRC-TGT",
                        help="the one pair to export, e.g. en-de")
    parser.add_argument("--format", required=True, choices=("fairseq", "ctranslate2"),
                        help="fairseq: a checkpoint of fairseq's transformer (FFNs zero-padded "
                        "to one width per side, exact); ctranslate2: a CTranslate2 model "
                        "directory (per-layer FFN widths kept)")
    parser.add_argument("--output", "-o", required=True,
                        help="the checkpoint file (fairseq) or model directory (ctranslate2)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="ctranslate2: weight type (default: the checkpoint's, float32)")
    parser.add_argument("--data", metavar="DIR",
                        help="ctranslate2: the fairseq data folder with the dictionaries "
                        "(dict.LANG.txt); default: the one recorded in the checkpoint")
    parser.add_argument("--spm-model", metavar="FILE",
                        help="ctranslate2: SentencePiece model to copy next to the model (the "
                        "Python API then takes raw text)")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    return parser


def _check_paths(args):
    if os.path.abspath(args.output) == os.path.abspath(args.checkpoint):
        raise ExportError("--output must differ from the input checkpoint")
    if os.path.lexists(args.output) and not args.force:
        raise ExportError(f"{args.output} exists; pass --force to overwrite it")
    if args.format == "fairseq" and os.path.isdir(args.output):
        raise ExportError(f"{args.output} is a directory; --format fairseq writes one file")
    if args.format == "ctranslate2" and os.path.isfile(args.output):
        raise ExportError(f"{args.output} is a file; --format ctranslate2 writes a directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise ExportError(f"folder of --output {args.output} does not exist")
    if args.format == "fairseq":
        given = [f for f in ("quantization", "data", "spm_model") if getattr(args, f)]
        if given:
            raise ExportError(f"--{given[0].replace('_', '-')} applies to --format ctranslate2 "
                              "only")
    if args.spm_model and not os.path.isfile(args.spm_model):
        raise ExportError(f"--spm-model {args.spm_model} does not exist")


def read_checkpoint(path: str) -> dict:
    """What taskmoe-prune reads (checkpoints.load_any): an ordinary checkpoint file, or a
    sharded one given by its prefix or any of its files (P-shared.pt, P-rank-R.pt), consolidated
    in memory; also a single file under another name (model.bin). ExportError otherwise."""
    try:
        if find_checkpoint(path) is None and os.path.isfile(path):  # a file not named *.pt
            return load_checkpoint(path)
        return load_any(path)  # CheckpointError naming the files when there is none
    except CheckpointError as err:
        raise ExportError(str(err)) from err
    except Exception as err:  # truncated zip, not a pickle, ...
        raise ExportError(f"cannot read {path} ({type(err).__name__}: {err}); is it a complete "
                          "fairseq checkpoint?") from err


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        _check_paths(args)
        state = read_checkpoint(args.checkpoint)
        dense = extract_dense(state, args.lang_pair)
        if args.format == "fairseq":
            write_atomically(to_fairseq_transformer(dense), args.output)
        else:
            write_ctranslate2(dense, args.output, data=args.data,
                              quantization=args.quantization, spm_model=args.spm_model,
                              source=os.path.abspath(args.checkpoint))
    except (ExportError, PruningError) as err:
        print(f"taskmoe-export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {'-'.join(dense.pair)} (serves {', '.join(dense.served)}) as a dense "
          f"{'fairseq transformer' if args.format == 'fairseq' else 'CTranslate2 model'}:")
    for line in dense.layers:
        print(f"  {line}")
    if args.format == "fairseq":
        widths = {side: max(dims) for side, dims in dense.ffn_dims.items()}
        padded = [f"{side} {dims} -> {widths[side]}" for side, dims in dense.ffn_dims.items()
                  if any(d != widths[side] for d in dims)]
        if padded:
            print(f"  FFN widths zero-padded (exact) to one per side: {'; '.join(padded)}")
        print(f"serve with stock fairseq (no --user-dir): fairseq-generate DATA "
              f"{fairseq_flags(dense)} --source-lang {dense.pair[0]} --target-lang "
              f"{dense.pair[1]} --path {args.output}")
    else:
        print(f"  language tokens: {CONVENTION_FILE} in the model directory")
    print(f"wrote {args.output}")
    return 0


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
