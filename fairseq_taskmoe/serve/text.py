"""Text handling around the engines: long inputs split into sentences, HTML text nodes.

Long inputs: a text whose pieces exceed what the model's positions allow is split at sentence
ends (a plain regex: `. ! ? …` followed by space) and greedily regrouped into segments that
fit; each segment is translated and the translations are joined with a space. Text that fits is
never split, so a short request is translated exactly as fairseq-generate would. A single
sentence that does not fit is refused (`TooLong`, naming the limit): never cut silently.

HTML (`format=html`): the markup is kept byte for byte (tags with their attributes, comments,
doctype) and every text node with letters in it is translated, script/style excepted; entities
in text are decoded before translation and the translation is escaped again.
"""

import html
import re
from html.parser import HTMLParser
from typing import Callable, List, Tuple

_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
_HAS_WORD = re.compile(r"\w")
_RAW_TEXT_TAGS = {"script", "style"}


class TooLong(ValueError):
    """A sentence longer than the model takes; the message names the limit."""


def split_to_fit(text: str, count: Callable[[str], int], limit: int) -> List[str]:
    """[text] if it fits in `limit` pieces, else sentence groups that each fit."""
    if count(text) <= limit:
        return [text]
    segments: List[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(text.strip()):
        n = count(sentence)
        if n > limit:
            raise TooLong(f"a sentence of {n} tokens is longer than this model takes "
                          f"({limit} tokens per sentence; the text was split at sentence ends): "
                          f"split it, starting {sentence[:40]!r}")
        candidate = f"{current} {sentence}" if current else sentence
        if current and count(candidate) > limit:
            segments.append(current)
            current = sentence
        else:
            current = candidate
    if current:
        segments.append(current)
    return segments


class _Fragments(HTMLParser):
    """Splits an HTML string into ('markup', raw) and ('text', decoded) fragments."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: List[Tuple[str, str]] = []
        self._raw_depth = 0

    def handle_starttag(self, tag, attrs):
        self.parts.append(("markup", self.get_starttag_text()))
        if tag in _RAW_TEXT_TAGS:
            self._raw_depth += 1

    def handle_startendtag(self, tag, attrs):
        self.parts.append(("markup", self.get_starttag_text()))

    def handle_endtag(self, tag):
        self.parts.append(("markup", f"</{tag}>"))
        if tag in _RAW_TEXT_TAGS and self._raw_depth:
            self._raw_depth -= 1

    def handle_data(self, data):
        if self._raw_depth:
            self.parts.append(("markup", data))
        else:
            self.parts.append(("text", data))

    def handle_comment(self, data):
        self.parts.append(("markup", f"<!--{data}-->"))

    def handle_decl(self, decl):
        self.parts.append(("markup", f"<!{decl}>"))

    def handle_pi(self, data):
        self.parts.append(("markup", f"<?{data}>"))

    def unknown_decl(self, data):
        self.parts.append(("markup", f"<![{data}]>"))


def html_fragments(markup: str) -> List[Tuple[str, str]]:
    parser = _Fragments()
    parser.feed(markup)
    parser.close()
    return parser.parts


def html_texts(parts: List[Tuple[str, str]]) -> List[str]:
    """The texts to translate (stripped), in order."""
    return [data.strip() for kind, data in parts if kind == "text" and _HAS_WORD.search(data)]


def html_rebuild(parts: List[Tuple[str, str]], translations: List[str]) -> str:
    """The markup with each translatable text node replaced, its surrounding spaces kept."""
    out, it = [], iter(translations)
    for kind, data in parts:
        if kind == "text" and _HAS_WORD.search(data):
            lead = data[: len(data) - len(data.lstrip())]
            trail = data[len(data.rstrip()):]
            out.append(lead + html.escape(next(it), quote=False) + trail)
        elif kind == "text":
            out.append(html.escape(data, quote=False))
        else:
            out.append(data)
    return "".join(out)
