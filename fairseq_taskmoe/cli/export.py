"""taskmoe-export: serve one pair of a task-MoE checkpoint without the plugin.

    taskmoe-export checkpoints/checkpoint_best.pt --lang-pair en-de --format fairseq \\
        --output en-de.transformer.pt
    taskmoe-export checkpoints/checkpoint_best.pt --lang-pair en-de --format ctranslate2 \\
        --data data-bin --spm-model spm.model --quantization int8 --output en-de.ct2
    taskmoe-export checkpoints/checkpoint_last --lang-pair en-de --format fairseq \\
        --output en-de.transformer.pt  # sharded (expert-parallel) checkpoint, by its prefix
    taskmoe-export checkpoints/checkpoint_best.pt --lang-pair en-de --format argos \\
        --data data-bin --spm-model spm.model --quantization int8 --output en-de.argosmodel
    taskmoe-export checkpoints/checkpoint_best.pt --all-pairs packages/ --format argos \\
        --data data-bin --spm-model spm.model --quantization int8  # one package per pair
"""

import argparse
import os
import sys

from ..atomic import write_atomically
from ..ct2 import QUANTIZATIONS  # CTranslate2's weight types, without CTranslate2
from ..deploy.argos import (CHUNK_TYPE_SETTING, argos_tokens, check_spacy_pipeline, package_name,
                           write_argos_package)
from ..deploy.export import (CONVENTION_FILE, ExportError, extract_dense, fairseq_flags,
                             to_fairseq_transformer, write_ctranslate2)
from ..deploy.pruning import PruningError
from ..distributed.checkpoints import CheckpointError, find_checkpoint, load_any
from ..integration.compat import load_checkpoint


def build_parser():
    parser = argparse.ArgumentParser(
        prog="taskmoe-export",
        description="Export one language pair of a task-MoE checkpoint (full or pruned; a full "
        "one is pruned for the pair and its experts merged on the way) as a dense model that "
        "serves without the plugin: fairseq's own `transformer` for stock fairseq-generate (no "
        "--user-dir), a CTranslate2 model, or an Argos Translate package (.argosmodel, which "
        "argostranslate and LibreTranslate install). Every MoE layer must be task-routed (target "
        "or lang_pair): token- and sentence-routed layers have no dense equivalent.",
    )
    parser.add_argument("checkpoint", help="task-MoE checkpoint (fairseq-train or taskmoe-prune), "
                        "or the prefix (or any file) of a sharded one, as taskmoe-prune takes it "
                        "(e.g. checkpoints/checkpoint_last for checkpoint_last-shared.pt + "
                        "checkpoint_last-rank-*.pt)")
    parser.add_argument("--lang-pair", metavar="SRC-TGT",
                        help="the one pair to export, e.g. en-de (required, except with "
                        "--all-pairs)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="fairseq: a checkpoint of fairseq's transformer (FFNs zero-padded "
                        "to one width per side, exact); ctranslate2: a CTranslate2 model "
                        "directory (per-layer FFN widths kept); argos: an Argos Translate 1.11 "
                        "package, one .argosmodel file (the CTranslate2 model, SentencePiece, "
                        "language tokens handled, a spaCy sentence splitter inside)")
    parser.add_argument("--output", "-o",
                        help="the checkpoint file (fairseq), model directory (ctranslate2) or "
                        ".argosmodel file (argos)")
    parser.add_argument("--all-pairs", metavar="DIR",
                        help="argos: instead of --lang-pair and --output, one package per pair "
                        "the checkpoint was trained on (its --lang-pairs), written as "
                        "DIR/taskmoe-SRC_TGT.argosmodel (DIR is created)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="ctranslate2, argos: weight type (default: the checkpoint's, "
                        "float32)")
    parser.add_argument("--data", metavar="DIR",
                        help="ctranslate2, argos: the fairseq data folder with the dictionaries "
                        "(dict.LANG.txt); default: the one recorded in the checkpoint")
    parser.add_argument("--spm-model", metavar="FILE",
                        help="ctranslate2: SentencePiece model to copy next to the model (the "
                        "Python API then takes raw text); argos: required, the package's "
                        "tokenizer")
    parser.add_argument("--package-version", default="1.0", metavar="VERSION",
                        help="argos: metadata.json's package_version (default 1.0)")
    parser.add_argument("--spacy-pipeline", metavar="DIR",
                        help="argos: a saved spaCy pipeline (nlp.to_disk) to ship as the "
                        "package's sentence splitter, without a sentencizer (Argos adds one); "
                        "default: a blank pipeline of the source language when spaCy is "
                        "installed, else none (Argos would then download a splitter)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite --output (or the packages in --all-pairs) if it exists")
    return parser


FORMATS = ("fairseq", "ctranslate2", "argos")
_CT2_ONLY = ("quantization", "data", "spm_model")
_ARGOS_ONLY = ("all_pairs", "package_version", "spacy_pipeline")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_args(args):
    """The flags that apply to --format, and either --lang-pair + --output or --all-pairs."""
    parser = build_parser()
    argos_only = [n for n in _ARGOS_ONLY if getattr(args, n) != parser.get_default(n)]
    ct2_only = [n for n in _CT2_ONLY if getattr(args, n) != parser.get_default(n)]
    if args.format != "argos" and argos_only:
        raise ExportError(f"{_flag(argos_only[0])} applies to --format argos only")
    if args.format == "fairseq" and ct2_only:
        raise ExportError(f"{_flag(ct2_only[0])} applies to --format ctranslate2 and argos only")
    if args.all_pairs is not None:
        if args.lang_pair or args.output:
            raise ExportError("--all-pairs DIR writes one package per trained pair: give it "
                              "instead of --lang-pair and --output")
        if os.path.isfile(args.all_pairs):
            raise ExportError(f"--all-pairs {args.all_pairs} is a file; it takes a folder")
    elif not args.lang_pair or not args.output:
        raise ExportError("--lang-pair SRC-TGT and --output are required"
                          + (" (or --all-pairs DIR)" if args.format == "argos" else ""))
    if args.format == "argos":
        if not args.spm_model:
            raise ExportError("--format argos needs --spm-model FILE, the SentencePiece model of "
                              "the training data: Argos tokenizes with the package's "
                              "sentencepiece.model")
        if args.spacy_pipeline is not None:
            if not os.path.isdir(args.spacy_pipeline):
                raise ExportError(f"--spacy-pipeline {args.spacy_pipeline} is not a folder")
            check_spacy_pipeline(args.spacy_pipeline)


def _check_paths(args):
    if os.path.abspath(args.output) == os.path.abspath(args.checkpoint):
        raise ExportError("--output must differ from the input checkpoint")
    if os.path.lexists(args.output) and not args.force:
        raise ExportError(f"{args.output} exists; pass --force to overwrite it")
    if args.format == "fairseq" and os.path.isdir(args.output):
        raise ExportError(f"{args.output} is a directory; --format fairseq writes one file")
    if args.format == "ctranslate2" and os.path.isfile(args.output):
        raise ExportError(f"{args.output} is a file; --format ctranslate2 writes a directory")
    if args.format == "argos" and os.path.isdir(args.output):
        raise ExportError(f"{args.output} is a directory; --format argos writes one .argosmodel "
                          "file (--all-pairs DIR writes one per pair)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise ExportError(f"folder of --output {args.output} does not exist")
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


def _argos_outputs(args, state) -> list:
    """[(pair, output file)] of --all-pairs: the checkpoint's trained pairs (--lang-pairs), each
    refused if its package exists and --force is not given, before anything is written."""
    from ..deploy.pruning import model_args

    pairs = getattr(model_args(state), "lang_pairs", None)
    pairs = pairs.split(",") if isinstance(pairs, str) else list(pairs or [])
    if not pairs:
        raise ExportError("the checkpoint records no --lang-pairs; export with --lang-pair")
    outputs = []
    for pair in pairs:
        src, _, tgt = pair.partition("-")
        path = os.path.join(args.all_pairs, package_name(src, tgt) + ".argosmodel")
        if os.path.lexists(path) and not args.force:
            raise ExportError(f"{path} exists; pass --force to overwrite it")
        outputs.append((pair, path))
    return outputs


def _export_argos(args, state, pair: str, output: str):
    dense = extract_dense(state, pair)
    written = write_argos_package(dense, output, args.spm_model, data=args.data,
                                  quantization=args.quantization,
                                  package_version=args.package_version,
                                  spacy_pipeline=args.spacy_pipeline,
                                  source=os.path.abspath(args.checkpoint))
    source_bos, target_prefix = argos_tokens(dense)
    tokens = []
    if source_bos:
        tokens.append(f"source token {source_bos} added by CTranslate2 (model/config.json)")
    if target_prefix:
        tokens.append(f"target prefix {target_prefix} (metadata.json; a control piece of "
                      "sentencepiece.model, so it decodes to nothing)")
    print(f"wrote {output}: Argos package {written['from_code']} -> {written['to_code']} "
          f"(serves {', '.join(dense.served)}); {'; '.join(tokens) or 'no language tokens'}")
    return written


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        if args.all_pairs is not None:
            state = read_checkpoint(args.checkpoint)
            outputs = _argos_outputs(args, state)
            os.makedirs(args.all_pairs, exist_ok=True)
            written = [_export_argos(args, state, pair, path) for pair, path in outputs]
            _print_argos_settings(written)
            return 0
        _check_paths(args)
        state = read_checkpoint(args.checkpoint)
        if args.format == "argos":
            _print_argos_settings([_export_argos(args, state, args.lang_pair, args.output)])
            return 0
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


def _print_argos_settings(written: list):
    if all(w["spacy"] for w in written):
        print(f"  sentence splitting: spacy/ in the package; run Argos Translate or LibreTranslate "
              f"with {CHUNK_TYPE_SETTING} (and spaCy installed), else Argos's default splitter "
              "downloads a model at the first translation")
    else:
        print("  warning: no sentence splitter in the package (spaCy is not installed here and "
              "no --spacy-pipeline was given): Argos will download one at the first translation. "
              "pip install spacy and export again to translate offline", file=sys.stderr)
    print("  install (argospm installs from its online index only): python -c \"import "
          "argostranslate.package as p; p.install_from_path('FILE')\"")


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
