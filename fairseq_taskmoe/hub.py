"""Python API: translate raw strings with a full or pruned task-MoE checkpoint.

    from fairseq_taskmoe.hub import load_translator
    mt = load_translator("work/demo/pruned.en-de.pt", data="work/demo/multi30k/bin",
                         spm_model="work/demo/multi30k/spm.model", source_lang="en",
                         target_lang="de")
    mt.translate("A man rides a bike.")            # -> German string
    mt.translate(["Two dogs.", "A red car."], beam=4)

This is fairseq's own hub interface (fairseq.hub_utils.GeneratorHubInterface, minus language
tokens in the output, in whichever --lang-tok-style the task uses): SentencePiece is applied on
the way in and removed on the way out, and the
task settings (--langs, --lang-pairs, language tokens) come from the checkpoint.
"""

from argparse import Namespace
from pathlib import Path
from typing import Optional

from fairseq import checkpoint_utils, hub_utils
from fairseq.data import encoders
from fairseq.data.multilingual.multilingual_utils import get_lang_tok

from .integration import plugin  # noqa: F401  (registers model and task, fixes checkpoint loading)


class TaskMoEHubInterface(hub_utils.GeneratorHubInterface):
    """fairseq's hub interface, minus the language tokens (`__de__`) in decoded output, which
    fairseq-generate strips but the stock hub interface does not."""

    def __init__(self, cfg, task, models):
        super().__init__(cfg, task, models)
        style = getattr(task.args, "lang_tok_style", None) or "multilingual"  # __de__ or [de]
        tags = (self.tgt_dict.index(get_lang_tok(lang, style)) for lang in task.langs)
        self.lang_tokens = {i for i in tags if i != self.tgt_dict.unk()}

    def string(self, tokens):
        return self.tgt_dict.string(tokens, extra_symbols_to_ignore=self.lang_tokens)


def load_translator(checkpoint: str, data: str, source_lang: str, target_lang: str,
                    spm_model: Optional[str] = None, cpu: bool = True, **overrides):
    """A GeneratorHubInterface for one direction. `overrides` are task settings."""
    overrides = dict(data=str(data), source_lang=source_lang, target_lang=target_lang,
                     **overrides)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(Path(checkpoint))], arg_overrides=overrides)
    hub = TaskMoEHubInterface(cfg, task, models)
    if spm_model is not None:
        hub.bpe = encoders.build_bpe(
            Namespace(bpe="sentencepiece", sentencepiece_model=str(spm_model)))
    return hub if cpu else hub.cuda()
