"""Python API on a CTranslate2 model written by `taskmoe-export --format ctranslate2`: raw text
in, raw text out. Imports neither fairseq nor the plugin.

    from fairseq_taskmoe.ct2 import load_ct2_translator
    mt = load_ct2_translator("work/en-de.ct2")             # spm.model and language tokens inside
    mt.translate("A man rides a bike.")                     # -> German string
    mt.translate(["Two dogs.", "A red car."], beam=5, max_batch_size=32)

The model directory holds `taskmoe_export.json` (export.CONVENTION_FILE): the language tokens
fairseq's translation_multi_simple_epoch adds (`--encoder-langtok tgt`: `__de__` before the
source pieces; `--decoder-langtok`: `__de__` forced as the first target token) and the
SentencePiece model, if one was given to the exporter. The tokens are those of the pair asked
(`language_tokens`, `source_lang=` / `target_lang=`): a model that serves several pairs (`*-de`;
`*-*` for a model without task-routed layers) is not tied to the pair it was exported for.
CTranslate2 appends `</s>` to the source and starts the decoder with `</s>`, as fairseq does.
Without a SentencePiece model, input and output are whitespace-separated tokens (fairseq's
dictionary symbols).
"""

import json
import os
from typing import List, Optional, Sequence, Tuple, Union

from .moe.pairs import language_tokens, serves  # plain Python, shared with prune and export

CONVENTION_FILE = "taskmoe_export.json"  # same name as export.CONVENTION_FILE (no fairseq here)
# CTranslate2's weight types (ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES), listed here so
# that --help, taskmoe-export --format fairseq and taskmoe-serve's options work without
# CTranslate2 installed, and taskmoe-serve's without torch (cli/export.py imports deploy/)
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16",
                 "bfloat16", "float32")


class CT2Translator:
    """`translate(text or list of texts)` with a CTranslate2 Translator.

    device: "cpu" or "cuda"; compute_type: CTranslate2's ("default" = the type the model was
    saved in; "int8", "float32", ...); intra_threads: threads per translation (0: CTranslate2's
    default, 4); inter_threads: batches translated in parallel.
    """

    def __init__(self, model_dir: str, device: str = "cpu", compute_type: str = "default",
                 intra_threads: int = 0, inter_threads: int = 1):
        import ctranslate2

        path = os.path.join(model_dir, CONVENTION_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_dir} has no {CONVENTION_FILE}: export it with "
                                    "taskmoe-export --format ctranslate2")
        with open(path) as f:
            self.convention = json.load(f)
        self.translator = ctranslate2.Translator(model_dir, device=device,
                                                 compute_type=compute_type,
                                                 intra_threads=intra_threads,
                                                 inter_threads=inter_threads)
        self.spm = None
        if self.convention.get("spm_model"):
            import sentencepiece

            self.spm = sentencepiece.SentencePieceProcessor(
                model_file=os.path.join(model_dir, self.convention["spm_model"]))
        self.source_lang = self.convention["source_lang"]
        self.target_lang = self.convention["target_lang"]

    def tokens(self, source_lang: Optional[str] = None,
               target_lang: Optional[str] = None) -> Tuple[List[str], List[str]]:
        """(source prefix, target prefix) of source_lang -> target_lang (default: the pair the
        model was exported for); ValueError for a pair the model does not serve. An export that
        serves several pairs (`*-de`, or `*-*` for a model without task-routed layers) is
        given the tokens of the pair asked, not those of the pair it was exported for."""
        conv = self.convention
        src = source_lang if source_lang is not None else self.source_lang
        tgt = target_lang if target_lang is not None else self.target_lang
        if not serves(conv["serves"], src, tgt):
            raise ValueError(f"this model serves {', '.join(conv['serves'])}, not {src}-{tgt}: "
                             "export that pair with taskmoe-export")
        return language_tokens(conv, src, tgt)

    def source_prefix(self, source_lang: Optional[str] = None,
                      target_lang: Optional[str] = None) -> List[str]:
        """Tokens before the pieces (see `tokens`). Only `--encoder-langtok src` depends on the
        source language (a target-routed export serves any source language into its target)."""
        return self.tokens(source_lang, target_lang)[0]

    def encode(self, text: str) -> List[str]:
        return self.spm.encode(text, out_type=str) if self.spm is not None else text.split()

    def decode(self, tokens: Sequence[str]) -> str:
        return self.spm.decode(list(tokens)) if self.spm is not None else " ".join(tokens)

    def translate_tokens(self, tokens: List[List[str]], beam: int = 5, max_batch_size: int = 0,
                         source_lang: Optional[str] = None, target_lang: Optional[str] = None,
                         **options) -> List[List[str]]:
        """Token lists (no language tokens) -> best hypotheses as token lists. `options` go to
        ctranslate2.Translator.translate_batch (length_penalty, max_decoding_length, ...);
        max_batch_size 0 = one batch (CTranslate2 sorts by length inside). source_lang,
        target_lang: the pair (default: the exported one), for a model that serves several."""
        if not tokens:
            return []
        prefix, target_prefix = self.tokens(source_lang, target_lang)
        results = self.translator.translate_batch(
            [prefix + t for t in tokens],
            target_prefix=[target_prefix] * len(tokens) if target_prefix else None,
            beam_size=beam, max_batch_size=max_batch_size, **options)
        return [r.hypotheses[0][len(target_prefix):] for r in results]

    def translate(self, text: Union[str, Sequence[str]], beam: int = 5, max_batch_size: int = 0,
                  source_lang: Optional[str] = None, target_lang: Optional[str] = None,
                  **options) -> Union[str, List[str]]:
        """Raw text (one string or a list) -> translation(s), same shape."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        hyps = self.translate_tokens([self.encode(t) for t in texts], beam=beam,
                                     max_batch_size=max_batch_size, source_lang=source_lang,
                                     target_lang=target_lang, **options)
        out = [self.decode(h) for h in hyps]
        return out[0] if single else out


def load_ct2_translator(model_dir: str, **kwargs) -> CT2Translator:
    """A CT2Translator for a model directory written by taskmoe-export --format ctranslate2."""
    return CT2Translator(str(model_dir), **kwargs)
