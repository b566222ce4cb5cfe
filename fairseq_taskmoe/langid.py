"""Language detection for off-target rates of zero-shot translation (and the server's /detect).

Two detectors behind one call shape (sentence -> language code or None):

- `detect`: a tiny stop-word detector for en / de / fr / cs, no dependency. A sentence is
  lowercased and split into letter runs (`l'homme` -> `l`, `homme`); every word found in a
  language's list of frequent function words gives that language a vote, and every letter that
  only one of the four languages writes (German `ß ä ö ü`, French `à â ç è ê ë î ï ô œ ù û`,
  Czech `á č ď ě í ň ó ř š ť ú ů ý ž`) gives its language a vote too. The language with most
  votes wins; ties and sentences without any evidence give None. It is meant for Multi30k-style
  image captions (short, full of articles and prepositions), where its accuracy is measured on
  the references of the test set by the quality study (`python -m research.study`) and
  reported next to every off-target rate. It is not a general-purpose detector.
- `identify`: py3langid (a maintained fork of langid.py: a naive Bayes model over byte n-grams
  for 140 languages, shipped inside the package, nothing downloaded), optionally restricted to
  a model's languages: for everything beyond those four (LoHelp's 15 languages). Needs the
  `langid` extra (`pip install 'fairseq-taskmoe[langid]'`); its accuracy per language on the
  LoHelp references is measured by `python -m research.langid_eval`.

`detector_for(langs)` picks one for a model's languages: the stop-word detector when they are
all among its four (what every Multi30k figure was measured with), else py3langid restricted
to `langs`.
"""
import functools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

LANGS = ("en", "de", "fr", "cs")  # what the stop-word detector knows

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


# ---------------------------------------------------------------- many languages: py3langid

# Our language codes (fairseq's, without "-") that are not py3langid's (ISO 639-1) codes.
ISO_CODES = {"zhtw": "zh", "ptbr": "pt", "engb": "en"}
NO_LANGUAGE = "zxx"  # py3langid's label for text without linguistic content


@functools.lru_cache(maxsize=1)
def _identifier():
    """py3langid's model (loaded once, about a second; never changed afterwards, so threads may
    share it): probabilities over its 140 languages."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as err:
        raise ImportError("fairseq_taskmoe.langid.identify needs py3langid (its model ships "
                          "inside the package): pip install 'fairseq-taskmoe[langid]'") from err
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> List[str]:
    """py3langid's language codes."""
    return list(_identifier().labels)


def ranked(sentence: str, langs: Optional[Sequence[str]] = None) -> List[Tuple[str, float]]:
    """[(language, probability)] best first by py3langid: over `langs` (our codes, e.g. "zh",
    "zhtw"; renormalised over them) when given, else over all its languages but "zxx".
    [] for text without a letter. Two of `langs` with one ISO code (zh, zhtw) are one language
    to it: the first of them is named."""
    if not any(ch.isalpha() for ch in sentence):
        return []
    scores = dict(_identifier().rank(sentence))
    if langs is None:
        names = {code: code for code in scores if code != NO_LANGUAGE}
    else:
        names = {}
        for lang in langs:
            code = ISO_CODES.get(lang, lang)
            if code not in scores:
                raise ValueError(f"py3langid does not know {lang!r} (codes: "
                                 f"{', '.join(sorted(scores))})")
            names.setdefault(code, lang)
    total = sum(scores[code] for code in names) or 1.0
    return sorted(((lang, scores[code] / total) for code, lang in names.items()),
                  key=lambda kv: -kv[1])


def identify(sentence: str, langs: Optional[Sequence[str]] = None) -> Optional[str]:
    """The language of `sentence` by py3langid (one of `langs` when given), or None for text
    without a letter."""
    best = ranked(sentence, langs)
    return best[0][0] if best else None


@dataclass(frozen=True)
class Detector:
    """sentence -> language (or None), by `method`: "stop-words" (detect) or "py3langid"
    (identify, restricted to `langs`)."""

    method: str
    langs: Tuple[str, ...]

    def __call__(self, sentence: str) -> Optional[str]:
        if self.method == "stop-words":
            return detect(sentence)
        return identify(sentence, self.langs)


def detector_for(langs: Sequence[str]) -> Detector:
    """The detector for a model's languages: stop words when they are all among LANGS (as every
    Multi30k figure was measured), else py3langid restricted to them."""
    langs = tuple(langs)
    return Detector("stop-words" if set(langs) <= set(LANGS) else "py3langid", langs)


def language_shares(sentences: Iterable[str], target: str,
                    detector: Callable[[str], Optional[str]] = detect) -> Dict[str, float]:
    """{"on_target", "off_target", "undetected"}: shares of sentences detected (by `detector`,
    default the stop-word one) as `target`, as another language, or as nothing (no evidence /
    tie). Empty input gives zeros."""
    n = on = off = 0
    for s in sentences:
        n += 1
        lang = detector(s)
        if lang == target:
            on += 1
        elif lang is not None:
            off += 1
    if n == 0:
        return {"on_target": 0.0, "off_target": 0.0, "undetected": 0.0}
    return {"on_target": on / n, "off_target": off / n, "undetected": (n - on - off) / n}
