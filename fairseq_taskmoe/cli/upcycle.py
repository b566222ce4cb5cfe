"""taskmoe-upcycle: a dense transformer -> a task-MoE that computes the same function at step 0.

    taskmoe-upcycle dense/checkpoint_best.pt --output moe.pt \\
        --moe-expert-count 8 --moe-top-k 2 --encoder-moe-routing target \\
        --decoder-moe-routing target
    fairseq-train DATA --user-dir user_dir ... --finetune-from-model moe.pt  # flags it prints
"""

import argparse
import os
import shlex
import sys

from ..atomic import write_atomically
from ..deploy.upcycle import UpcycleError, UpcycleOptions, UpcycleReport, upcycle_checkpoint
from ..distributed.checkpoints import CheckpointError, load_any
from ..integration.config import MoEConfig
from ..moe.routing import ROUTING_KINDS, UNSEEN_PAIR_POLICIES


def _list(text: str):
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser():
    defaults = MoEConfig()
    parser = argparse.ArgumentParser(
        prog="taskmoe-upcycle",
        description="Turn a dense multilingual transformer (fairseq's transformer trained with "
        "--task translation_multi_simple_epoch, or task_moe with --moe-freq 0) into a task-MoE "
        "checkpoint whose output equals the dense model's at step 0: every expert starts as the "
        "dense FFN (or a piece of it) and the gates combine them back into it. Continue it with "
        "fairseq-train --finetune-from-model (fresh optimizer, your schedule); taskmoe-prune, "
        "taskmoe-export and taskmoe-serve read it like any task-MoE checkpoint.",
    )
    parser.add_argument("checkpoint", help="the dense checkpoint (fairseq-train's .pt)")
    parser.add_argument("--output", "-o", required=True, help="path of the task-MoE checkpoint")
    moe = parser.add_argument_group("the MoE, as fairseq-train spells it")
    moe.add_argument("--moe-freq", type=int, default=defaults.moe_freq, metavar="N",
                     help="every N-th FFN becomes an MoE layer (layers with (i+1) %% N == 0) "
                     "(default: %(default)s)")
    moe.add_argument("--moe-expert-count", type=int, default=defaults.moe_expert_count,
                     metavar="E", help="experts per MoE layer (default: %(default)s)")
    moe.add_argument("--moe-top-k", type=int, default=defaults.moe_top_k, metavar="K",
                     help="experts per token / task (default: %(default)s)")
    moe.add_argument("--encoder-moe-routing", choices=ROUTING_KINDS,
                     default=str(defaults.encoder_moe_routing),
                     help="routing of encoder MoE layers (default: %(default)s)")
    moe.add_argument("--decoder-moe-routing", choices=ROUTING_KINDS,
                     default=str(defaults.decoder_moe_routing),
                     help="routing of decoder MoE layers (default: %(default)s)")
    moe.add_argument("--moe-expert-ffn-dim", type=int, default=None, metavar="F",
                     help="inner dim of each expert (default: the dense FFN's, each expert a "
                     "copy). Narrower: the dense FFN's hidden units split across experts, exact "
                     "for task routing when F divides the dense width and the number of pieces "
                     "divides --moe-top-k and --moe-expert-count")
    moe.add_argument("--moe-unseen-pairs", choices=UNSEEN_PAIR_POLICIES,
                     default=str(defaults.moe_unseen_pairs),
                     help="lang_pair routing of pairs outside --lang-pairs "
                     "(default: %(default)s)")
    moe.add_argument("--langs", type=_list, default=None, metavar="LANGS",
                     help="the task's languages (default: the dense checkpoint's; must be its "
                     "list, in its order, which fixes the language tokens' ids)")
    moe.add_argument("--lang-pairs", type=_list, default=None, metavar="PAIRS",
                     help="the task's pairs, e.g. en-de,de-en (default: the dense checkpoint's); "
                     "task routes are given to these first")
    init = parser.add_argument_group("initialisation")
    init.add_argument("--gate-margin", type=float, default=1.0, metavar="M",
                      help="task-routed gates: logit 0 on each task's k experts, -M on the "
                      "others (exact for any M > 0; larger M, routes slower to change; with "
                      "--moe-top-k 1 the rows are saturated instead) (default: %(default)s)")
    init.add_argument("--noise", type=float, default=0.0, metavar="STD",
                      help="add Gaussian noise of STD x each weight matrix's std to every expert "
                      "of token/sentence-routed layers, to break their symmetry (default: 0, "
                      "off; step 0 is then not exact)")
    init.add_argument("--reinit-fraction", type=float, default=0.0, metavar="R",
                      help="Drop-Upcycling: re-initialise a random fraction R of each expert's "
                      "hidden units (fc1 rows, fc2 columns) in token/sentence-routed layers "
                      "(default: 0, off; step 0 is then not exact)")
    init.add_argument("--perturb-task-routed", action="store_true",
                      help="apply --noise / --reinit-fraction to task-routed layers too (off: "
                      "their tasks already get experts of their own)")
    init.add_argument("--seed", type=int, default=1,
                      help="seed of the random gates and perturbations (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    return parser


def options_from(args) -> UpcycleOptions:
    return UpcycleOptions(
        moe_freq=args.moe_freq, moe_expert_count=args.moe_expert_count, moe_top_k=args.moe_top_k,
        encoder_moe_routing=args.encoder_moe_routing,
        decoder_moe_routing=args.decoder_moe_routing, moe_expert_ffn_dim=args.moe_expert_ffn_dim,
        moe_unseen_pairs=args.moe_unseen_pairs, langs=args.langs, lang_pairs=args.lang_pairs,
        gate_margin=args.gate_margin, noise=args.noise, reinit_fraction=args.reinit_fraction,
        perturb_task_routed=args.perturb_task_routed, seed=args.seed)


def print_report(report: UpcycleReport, output: str, out=None):
    out = out or sys.stdout
    updates = f", {report.source_updates} updates" if report.source_updates is not None else ""
    print(f"dense: {report.source_kind} (--arch {report.source_arch}{updates}); languages "
          f"{','.join(report.langs)}; pairs {','.join(report.lang_pairs)}", file=out)
    for note in report.notes:
        print(f"note: {note}", file=out)
    for layer in report.layers:
        form = (f"copies of the dense FFN (dim {layer.dense_dim})" if layer.pieces == 1 else
                f"{layer.pieces} pieces of the dense FFN (dim {layer.dense_dim} -> "
                f"{layer.expert_dim}, fc2 x{layer.pieces})")
        gate = ("; ".join(f"{task}: " + ",".join(f"e{e}" for e in experts)
                          for task, experts in layer.routes.items())
                if layer.routes else "random gate (learned routing)")
        extra = "  [perturbed]" if layer.perturbed else ""
        print(f"  {layer.name:18s} {layer.routing:9s} experts: {form}{extra}\n"
              f"  {'':18s} {'':9s} routes: {gate}", file=out)
    ratio = report.params_after / report.params_before
    print(f"parameters: {report.params_before:,} -> {report.params_after:,} ({ratio:.2f}x)",
          file=out)
    if report.exact:
        print("step 0: exact, every pair's output is the dense model's (up to float rounding "
              "of the summation order)", file=out)
    else:
        print(f"step 0: NOT exact for: {'; '.join(report.inexact)}", file=out)
    print(f"wrote {output}", file=out)
    print("continue training with: fairseq-train DATA --user-dir user_dir "
          f"{shlex.join(report.task_flags)} {shlex.join(report.model_flags)} "
          f"--finetune-from-model {shlex.quote(output)} ...", file=out)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if os.path.abspath(args.output) == os.path.abspath(args.checkpoint):
            raise UpcycleError("--output must differ from the input checkpoint")
        if os.path.exists(args.output) and not args.force:
            raise UpcycleError(f"{args.output} exists; pass --force to replace it")
        if os.path.isdir(args.output):
            raise UpcycleError(f"--output {args.output} is a folder")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise UpcycleError(f"folder of --output {args.output} does not exist")
        try:
            state = load_any(args.checkpoint)
        except CheckpointError as err:
            raise UpcycleError(str(err)) from err
        except Exception as err:  # truncated zip, not a pickle, ...
            raise UpcycleError(f"cannot read {args.checkpoint} ({type(err).__name__}: {err}); "
                               "is it a complete fairseq checkpoint?") from err
        upcycled, report = upcycle_checkpoint(state, options_from(args))
        write_atomically(upcycled, args.output)
    except UpcycleError as err:
        print(f"taskmoe-upcycle: error: {err}", file=sys.stderr)
        return 2
    print_report(report, args.output)
    return 0


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
