"""Per-row language ids read from the language tags of translation_multi_simple_epoch.

The task marks every source with a language tag (`--encoder-langtok tgt`: the target language's
`__de__`; `--encoder-langtok src`: the source language's) and, with `--decoder-langtok`, starts
the decoder's input with the target's tag. When a batch reaches the model without per-row ids (a
custom inference loop, a batch built by hand), the ids are read from those tags, row by row:
the source tag is the first non-pad token (sources are left-padded by default), the decoder tag
the token after the leading </s>. A row whose tag is not a language of `--langs` is an error,
never a silent default.

Axis legend: B batch, T time, V vocabulary.
"""

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..moe.routing import TaskIds


class LangTagReader:
    """Reads TaskIds from language-tag tokens.

    tag_ids: the dictionary index of each language's tag, in `--langs` order;
    encoder_langtok: None, "src" or "tgt" (which language the source tag names);
    decoder_langtok: whether decoder inputs start with </s> and the target's tag.
    """

    def __init__(self, tag_ids: Sequence[int], vocab_size: int, pad: int,
                 encoder_langtok: Optional[str], decoder_langtok: bool, langs: Sequence[str]):
        self.table = torch.full((vocab_size,), -1, dtype=torch.long)  # [V] token -> lang index
        self.table[torch.tensor(list(tag_ids), dtype=torch.long)] = torch.arange(len(tag_ids))
        self.pad = pad
        self.encoder_langtok = encoder_langtok
        self.decoder_langtok = decoder_langtok
        self.langs = list(langs)

    @property
    def reads_anything(self) -> bool:
        return self.encoder_langtok in ("src", "tgt") or self.decoder_langtok

    def _lookup(self, tokens: Tensor, where: str) -> Tensor:
        """tokens: [B] -> language indices [B]; raises for a row whose token is no tag."""
        table = self.table.to(tokens.device)
        ids = table[tokens]
        bad = (ids < 0).nonzero().flatten().tolist()
        if bad:
            raise RuntimeError(
                f"cannot read the language of row(s) {bad[:8]} from their {where}: token id(s) "
                f"{tokens[bad[:8]].tolist()} are not language tags of --langs "
                f"{','.join(self.langs)}. Pass src_lang_idx/tgt_lang_idx in net_input "
                "(--task translation_task_moe does), or add the tags as the task does")
        return ids

    def source_tag(self, src_tokens: Tensor) -> Tensor:
        """src_tokens: [B, T] (left- or right-padded) -> language of each row's first token."""
        first = src_tokens.ne(self.pad).int().argmax(dim=1, keepdim=True)  # [B, 1] first non-pad
        return self._lookup(src_tokens.gather(1, first).squeeze(1), "first source token")

    def read(self, src_tokens: Tensor, prev_output_tokens: Optional[Tensor] = None,
             src_lang: Optional[Tensor] = None, tgt_lang: Optional[Tensor] = None) -> TaskIds:
        """TaskIds with given sides kept and missing ones read from the tags where possible;
        a side no tag names stays None (routing that needs it then fails clearly)."""
        if src_lang is None and self.encoder_langtok == "src":
            src_lang = self.source_tag(src_tokens)
        if tgt_lang is None and self.encoder_langtok == "tgt":
            tgt_lang = self.source_tag(src_tokens)
        if (tgt_lang is None and self.decoder_langtok and prev_output_tokens is not None
                and prev_output_tokens.size(1) >= 2):
            tgt_lang = self._lookup(prev_output_tokens[:, 1], "decoder prefix (--decoder-langtok)")
        return TaskIds(src_lang, tgt_lang, len(self.langs), origin="the batch's language tags")


def build_tag_reader(args, dictionary, langs: Sequence[str]) -> Optional[LangTagReader]:
    """The reader for a model built with these task args, or None without language tags."""
    from fairseq.data.multilingual.multilingual_utils import get_lang_tok

    style = getattr(args, "lang_tok_style", None) or "multilingual"
    tag_ids = [dictionary.index(get_lang_tok(lang, style)) for lang in langs]
    if any(i == dictionary.unk() for i in tag_ids):
        return None  # the dictionary has no tags for these languages
    reader = LangTagReader(tag_ids, len(dictionary), dictionary.pad(),
                           getattr(args, "encoder_langtok", None),
                           bool(getattr(args, "decoder_langtok", False)), langs)
    return reader if reader.reads_anything else None
