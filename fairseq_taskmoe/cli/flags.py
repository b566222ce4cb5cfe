"""taskmoe-flags: print the plugin's fairseq flags with their help text.

fairseq-train --help lists only the options known before the model is chosen, so the task_moe
model and criterion flags never show there; this prints them from the same dataclasses fairseq
turns into flags.
"""

import argparse
import sys


def build_parser():
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    from ..integration.config import MoEConfig
    from ..integration.criterion import MoELabelSmoothedCrossEntropyConfig

    parser = argparse.ArgumentParser(
        prog="fairseq-train --user-dir user_dir --task translation_task_moe --arch task_moe",
        description="Flags added by fairseq-taskmoe (on top of fairseq's transformer and "
        "translation_multi_simple_epoch flags). The task translation_task_moe takes exactly "
        "the flags of translation_multi_simple_epoch and requires --langs (or --lang-dict).",
        add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen_parser_from_dataclass(parser.add_argument_group(
        "model task_moe_transformer (--arch task_moe, task_moe_small, task_moe_tiny)"),
        MoEConfig())
    gen_parser_from_dataclass(parser.add_argument_group(
        "criterion moe_label_smoothed_cross_entropy"), MoELabelSmoothedCrossEntropyConfig())
    return parser


def main(argv=None):
    build_parser().print_help(sys.stdout)
    return 0


def cli():
    sys.exit(main())
