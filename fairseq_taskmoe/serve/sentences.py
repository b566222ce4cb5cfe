"""A text as the models see it: sentences, with everything between them kept byte for byte.

Translation models are trained on sentences. LibreTranslate (through Argos Translate) splits a
text into sentences, translates them as one batch and puts the text back together; so do we:
`split(text, lang)` cuts a text into sentences with sentencex (Wikimedia's rule-based segmenter,
about 300 languages, no model to download), and `Segmented.join` puts the translations back in
place of the sentences, keeping every newline, blank line and space between them as they were.
A text of one sentence is one segment, translated exactly as fairseq-generate translates it.

Only segments with a word character are translated (`Segmented.sentences`); the rest
(punctuation, numbers-only lines are kept: `\\w` matches digits) is copied.
"""

import re
from dataclasses import dataclass
from typing import List, Sequence

from sentencex import segment as _segment

HAS_WORD = re.compile(r"\w")  # text without a word character is copied, not translated


@dataclass(frozen=True)
class Segmented:
    """parts: the text cut in order, each part ('gap', text) or ('sentence', text); the
    concatenation of the parts' texts is the original text."""

    parts: tuple

    @property
    def sentences(self) -> List[str]:
        return [text for kind, text in self.parts if kind == "sentence"]

    def join(self, translations: Sequence[str]) -> str:
        """The original text with its sentences replaced, in order, by `translations`."""
        if len(translations) != len(self.sentences):
            raise ValueError(f"{len(translations)} translations for "
                             f"{len(self.sentences)} sentences")
        it = iter(translations)
        return "".join(next(it) if kind == "sentence" else text for kind, text in self.parts)


def split(text: str, lang: str) -> Segmented:
    """`text` cut into sentences (sentencex's rules for `lang`) and the gaps between them:
    whitespace around a sentence is a gap, so the sentence itself is stripped."""
    parts = []
    for piece in _segment(lang, text) if text else ():
        core = piece.strip()
        if not core or not HAS_WORD.search(core):
            parts.append(("gap", piece))
            continue
        start = piece.index(core)
        if start:
            parts.append(("gap", piece[:start]))
        parts.append(("sentence", core))
        if start + len(core) < len(piece):
            parts.append(("gap", piece[start + len(core):]))
    if "".join(t for _, t in parts) != text:  # sentencex keeps every character; guard anyway
        core = text.strip()
        lead = text[: len(text) - len(text.lstrip())]
        trail = text[len(lead) + len(core):]
        parts = [p for p in (("gap", lead), ("sentence", core), ("gap", trail)) if p[1]]
        if not HAS_WORD.search(core):
            parts = [("gap", text)]
    return Segmented(tuple(parts))
