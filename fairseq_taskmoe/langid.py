"""A tiny language detector for en / de / fr / cs, for off-target rates of zero-shot translation.

Stop-word voting: a sentence is lowercased and split into letter runs (`l'homme` -> `l`,
`homme`); every word found in a language's list of frequent function words gives that language a
vote, and every letter that only one of the four languages writes (German `ß ä ö ü`, French
`à â ç è ê ë î ï ô œ ù û`, Czech `á č ď ě í ň ó ř š ť ú ů ý ž`) gives its language a vote too. The
language with most votes wins; ties and sentences without any evidence give None.

It is meant for Multi30k-style image captions (short, full of articles and prepositions), where
its accuracy is measured on the references of the test set by the quality study
(`python -m research.study`) and reported next to every off-target rate. It is not a
general-purpose detector.
"""

import re
from collections import Counter
from typing import Dict, Iterable, Optional

LANGS = ("en", "de", "fr", "cs")

STOP_WORDS: Dict[str, frozenset] = {
    "en": frozenset("""a an the and of in on at with is are his her their its to from by for
        while two three man woman men women people boy girl dog who wearing into near after as
        he she it up down over out off through under some one small large little young child
        children red white black blue""".split()),
    "de": frozenset("""ein eine einen einem einer eines der die das den dem des und mit im auf
        ist sind zwei drei am vor von zu zum zur bei sich mann frau männer frauen junge mädchen
        hund trägt vom beim neben während in an leute personen kinder menschen mehrere
        kleine""".split()),
    "fr": frozenset("""un une des le la les du de et en dans sur avec est sont au aux l d qu qui
        deux trois homme femme hommes femmes garçon fille chien pendant devant près son sa ses
        leur""".split()),
    "cs": frozenset("""a se na v ve s z ze do u je jsou před pro dva dvě tři muž žena muži ženy
        chlapec dívka pes který která které kteří jeho její nějaké nějaký vedle při po lidé lidí
        děti okolo jdou malý malá""".split()),
}

UNIQUE_LETTERS: Dict[str, str] = {
    "de": "ßäöü",
    "fr": "àâçèêëîïôœùû",
    "cs": "áčďěíňóřšťúůýž",
}

_WORD = re.compile(r"[^\W\d_]+")


def votes(sentence: str) -> Counter:
    """Votes per language for `sentence` (a Counter over LANGS; languages without votes absent)."""
    text = sentence.lower()
    counts: Counter = Counter()
    for word in _WORD.findall(text):
        for lang, words in STOP_WORDS.items():
            if word in words:
                counts[lang] += 1
    for lang, letters in UNIQUE_LETTERS.items():
        n = sum(text.count(ch) for ch in letters)
        if n:
            counts[lang] += n
    return counts


def detect(sentence: str) -> Optional[str]:
    """The language of `sentence` (one of LANGS), or None when there is no evidence or a tie."""
    ranked = votes(sentence).most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def language_shares(sentences: Iterable[str], target: str) -> Dict[str, float]:
    """{"on_target", "off_target", "undetected"}: shares of sentences detected as `target`, as
    another language, or as nothing (no evidence / tie). Empty input gives zeros."""
    n = on = off = 0
    for s in sentences:
        n += 1
        lang = detect(s)
        if lang == target:
            on += 1
        elif lang is not None:
            off += 1
    if n == 0:
        return {"on_target": 0.0, "off_target": 0.0, "undetected": 0.0}
    return {"on_target": on / n, "off_target": off / n, "undetected": (n - on - off) / n}
