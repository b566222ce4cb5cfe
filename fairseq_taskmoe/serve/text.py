"""Text handling around the engines: the TooLong refusal, and HTML text nodes.

Texts are cut into sentences by `sentences.split`; a single sentence that does not fit the
model's positions is refused (`TooLong`, naming the limit), never cut silently.

HTML (`format=html`): the string is cut into markup and text by the boundaries of HTML's
tokenizer (a small scanner here, not html.parser, whose output cannot be put back together byte
for byte and which raises on some inputs). Markup (tags as written, comments, CDATA, doctype,
processing instructions, script/style content) is kept byte for byte; every text with a word
character is translated, its entities decoded first and the translation escaped again. Text that
is not translated, or whose translation is itself, is kept as written (entities included).
"""

import html
import re
from typing import List, Tuple

from .sentences import HAS_WORD  # what is worth translating: the one rule


class TooLong(ValueError):
    """A sentence longer than the model takes; the message names the limit."""


_WS = " \t\n\r\f"
# raw text elements: their content is markup (never translated) up to their end tag
_RAW_TEXT_END = {tag: re.compile(rf"</{tag}(?=[\s/>]|$)", re.IGNORECASE)
                 for tag in ("script", "style")}
_ENTITY_OR_CHAR = re.compile(r"&(?:#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[a-zA-Z][a-zA-Z0-9]*;?)|.",
                             re.DOTALL)


def _find_end(s: str, start: int, closer: str) -> int:
    """The index after the first `closer` at or after `start`, or len(s) when there is none."""
    j = s.find(closer, start)
    return len(s) if j < 0 else j + len(closer)


def _tag_end(s: str, i: int) -> int:
    """The index after the `>` closing the tag that starts at s[i] == '<' (HTML's tag states:
    a quote only counts where an attribute value starts); len(s) for a tag left open."""
    n = len(s)
    j = i + 1
    while j < n and s[j] not in _WS + "/>":  # the tag name
        j += 1
    while j < n:
        c = s[j]
        if c == ">":
            return j + 1
        if c in _WS or c == "/":
            j += 1
            continue
        j += 1  # an attribute name: its first character may be anything, even "="
        while j < n and s[j] not in _WS + "/>=":
            j += 1
        while j < n and s[j] in _WS:
            j += 1
        if j < n and s[j] == "=":
            j += 1
            while j < n and s[j] in _WS:
                j += 1
            if j < n and s[j] in "\"'":
                j = _find_end(s, j + 1, s[j])
            else:
                while j < n and s[j] not in _WS + ">":
                    j += 1
    return n


def _markup_end(s: str, i: int) -> int:
    """s[i] is '<': the index after the markup starting there, or i when that '<' is text."""
    nxt = s[i + 1:i + 2]
    if nxt.isascii() and nxt.isalpha():
        return _tag_end(s, i)
    if nxt == "/":
        after = s[i + 2:i + 3]
        if after.isascii() and after.isalpha():
            return _tag_end(s, i + 1)
        if after == "":
            return i  # "</" at the very end is text
        return _find_end(s, i + 2, ">")  # "</>" and bogus comments
    if s.startswith("<!--", i):
        if s.startswith((">", "->"), i + 4):  # "<!-->", "<!--->": empty comments
            return s.index(">", i + 4) + 1
        return _find_end(s, i + 4, "-->")
    if s.startswith("<![CDATA[", i):
        return _find_end(s, i + 9, "]]>")
    if nxt in ("!", "?"):  # doctype, declarations, processing instructions
        return _find_end(s, i + 2, ">")
    return i


def _tag_name(tag: str) -> str:
    m = re.match(r"</?([^\s/>]*)", tag)
    return m.group(1).lower() if m else ""


def html_fragments(markup: str) -> List[Tuple[str, str]]:
    """The string cut into ('markup', raw) and ('text', raw) fragments whose concatenation is
    `markup` byte for byte: tags (attributes, quotes and case as written), comments, CDATA,
    doctype and processing instructions, and the content of script/style are markup; the rest,
    a `<` that starts no markup included, is text. Never raises: every string is cut somehow
    (markup left open runs to the end, as HTML's tokenizer reads it)."""
    parts: List[Tuple[str, str]] = []
    text_start = i = 0
    n = len(markup)

    def push(kind, start, end):
        if end > start:
            if kind == "text" and parts and parts[-1][0] == "text":
                parts[-1] = ("text", parts[-1][1] + markup[start:end])
            else:
                parts.append((kind, markup[start:end]))

    while True:
        i = markup.find("<", i)
        if i < 0:
            break
        end = _markup_end(markup, i)
        if end == i:
            i += 1
            continue
        push("text", text_start, i)
        push("markup", i, end)
        name = _tag_name(markup[i:end]) if markup[i + 1:i + 2] != "/" else ""
        if name in _RAW_TEXT_END and not markup[i:end].endswith("/>"):
            close = _RAW_TEXT_END[name].search(markup, end)
            raw_end = close.start() if close else n
            push("markup", end, raw_end)
            end = raw_end
        text_start = i = end
    push("text", text_start, n)
    return parts


def _edges(raw: str) -> Tuple[str, str, str]:
    """raw text as (lead, core, trail): lead and trail are the whitespace around it, written as
    characters or entities (`&nbsp;`)."""
    tokens = _ENTITY_OR_CHAR.findall(raw)
    blank = [html.unescape(t).isspace() for t in tokens]
    a = 0
    while a < len(tokens) and blank[a]:
        a += 1
    b = len(tokens)
    while b > a and blank[b - 1]:
        b -= 1
    return "".join(tokens[:a]), "".join(tokens[a:b]), "".join(tokens[b:])


def _text_of(raw: str) -> str:
    return html.unescape(_edges(raw)[1]).strip()


def html_texts(parts: List[Tuple[str, str]]) -> List[str]:
    """The texts to translate, in order: each text fragment with a word character in it, its
    entities decoded, without the whitespace around it."""
    texts = (_text_of(raw) for kind, raw in parts if kind == "text")
    return [t for t in texts if HAS_WORD.search(t)]


def html_rebuild(parts: List[Tuple[str, str]], translations: List[str]) -> str:
    """The markup with each translated text replaced (escaped), the whitespace around it kept;
    markup, word-less text, and text whose translation is the text itself are kept as written."""
    out, it = [], iter(translations)
    for kind, raw in parts:
        text = _text_of(raw) if kind == "text" else ""
        if not HAS_WORD.search(text):
            out.append(raw)
            continue
        new = next(it)
        if new == text:
            out.append(raw)
        else:
            lead, _, trail = _edges(raw)
            out.append(lead + html.escape(new, quote=False) + trail)
    return "".join(out)
