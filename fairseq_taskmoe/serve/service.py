"""The translation service without HTTP: routes + registry + batcher, and what a request does.

A request (texts, source, target) is planned by `routes` (direct / pivot / zero-shot). Each text
(or, for HTML, each text node) is cut into sentences (`sentences.split`: models are trained on
sentences, and the whitespace between them, newlines included, is kept); each sentence is
tokenized once and checked against the model's positions; and each leg of the route goes through
the batcher as one job, the output of leg 1 being the input of leg 2. The CPU work around the
engine (segmenting, tokenizing, HTML parsing) runs in a worker thread, except for a small
request (a few short texts: `_off_loop`), which takes less on the event loop than the hand-off;
the request's deadline starts when the HTTP layer received it. The HTTP layer (app.py) only
parses, validates and answers.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .. import langid
from ..moe.pairs import LANGUAGE_NAMES
from .batcher import Batcher, Job
from .registry import Registry, Unavailable
from .routes import Route, plan_routes
from .sentences import split
from .text import TooLong, html_fragments, html_rebuild, html_texts

log = logging.getLogger("taskmoe.serve")

class RequestTimeout(RuntimeError):
    pass


class LimitExceeded(ValueError):
    """A request over --batch-limit once its HTML text nodes are counted; the message names
    the limit."""


@dataclass
class ServeLimits:
    char_limit: Optional[int] = None  # characters per request (all texts)
    batch_limit: Optional[int] = None  # texts per request
    alternatives_limit: int = 3
    body_limit: int = 1 << 20  # bytes
    timeout: float = 60.0  # seconds per request
    beam: int = 4


class Service:
    def __init__(self, registry: Registry, batcher: Batcher, routes: Dict[Tuple[str, str], Route],
                 limits: ServeLimits, spm_model: Optional[str] = None):
        self.registry, self.batcher, self.routes, self.limits = registry, batcher, routes, limits
        self.langs = list(registry.facts.langs)
        self.detector = langid.detector_for(self.langs)  # stop words for en/de/fr/cs models
        self.spm = None
        if spm_model:
            import sentencepiece

            self.spm = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
        # language token and </s> take two of the model's source positions
        self.max_tokens = registry.max_source_positions - 2
        # what /metrics, /health and /pairs await before answering: nothing for the embedded
        # server; under Ray Serve, asking every replica for its metrics (ray_engine.py)
        self.refresh = None
        # what /health asks besides the sub-networks: None when this server can serve, else a
        # function saying why not (under Ray Serve: no Translator replica answered; ray_engine.py)
        self.unready = None

    async def refreshed(self):
        if self.refresh is not None:
            await self.refresh()

    @classmethod
    def build(cls, registry: Registry, limits: ServeLimits, pivot: str = "auto",
              allowed=None, spm_model=None, **batcher_options) -> "Service":
        routes = plan_routes(registry.facts, pivot, allowed)
        return cls(registry, Batcher(registry, metrics=registry.metrics, **batcher_options),
                   routes, limits, spm_model)

    # --- what is served ----------------------------------------------------------------------

    def route(self, src: str, tgt: str) -> Route:
        return self.routes[(src, tgt)]

    def languages(self) -> List[dict]:
        out = []
        for src in self.langs:
            routes = {tgt: self.routes[(src, tgt)] for tgt in self.langs if tgt != src}
            served = {t: r for t, r in routes.items() if r.available}
            out.append({"code": src, "name": LANGUAGE_NAMES.get(src, src),
                        "targets": [t for t in self.langs if t in served],
                        "routes": {t: r.as_json() for t, r in served.items()}})
        return out

    def pair_info(self, src: str, tgt: str) -> dict:
        route = self.routes[(src, tgt)]
        reg = self.registry
        subnets = []
        for leg in route.legs:
            sub = reg.subnetwork(reg.key_of(leg))
            subnets.append({
                "leg": "-".join(leg), "subnetwork": sub.key, "serves": sub.served,
                "backend": reg.backend, "quantization": reg.quantization,
                "parameters": sub.params or None, "bytes": sub.bytes, "disk_bytes": sub.disk_bytes,
                "whole": sub.whole, "loaded": sub.key in reg.loaded_keys(), "error": sub.error,
                "layers": sub.layers})
        return {"source": src, "target": tgt, "route": route.as_json(), "kind": route.kind,
                "available": route.available, "why": route.why or None, "subnetworks": subnets,
                "full_model": {"parameters": reg.full_params, "bytes": reg.full_bytes}}

    # --- detection ---------------------------------------------------------------------------

    def detect(self, text: str) -> List[dict]:
        """LibreTranslate's shape: [{"confidence" (0-100), "language"}], best first, over the
        languages of this model (`langid.detector_for`: stop-word votes for a model of en, de,
        fr and cs, as every Multi30k figure was measured; py3langid's probabilities, renormalised
        over the model's languages, for any other); no evidence gives [] (and a tie of votes
        gives the tied languages at equal confidence)."""
        if self.detector.method == "stop-words":
            votes = {lang: n for lang, n in langid.votes(text).items() if lang in self.langs}
            total = sum(votes.values())
            return [{"confidence": round(100.0 * n / total, 1), "language": lang}
                    for lang, n in sorted(votes.items(), key=lambda kv: -kv[1])]
        found = [(lang, round(100.0 * p, 1)) for lang, p in langid.ranked(text, self.langs)]
        return [{"confidence": c, "language": lang} for lang, c in found if c > 0]

    # --- translation -------------------------------------------------------------------------

    def _encode(self, sentence: str) -> List[str]:
        """The source pieces of one sentence, as the engines make them."""
        return self.spm.encode(sentence, out_type=str) if self.spm is not None else \
            sentence.split()

    def _pieces(self, sentence: str, what: str = "a sentence") -> List[str]:
        """The source pieces of `sentence` (tokenized once: the engines take them as they
        are); TooLong past the model's positions (never cut silently)."""
        pieces = self._encode(sentence)
        if len(pieces) > self.max_tokens:
            raise TooLong(f"{what} of {len(pieces)} tokens is longer than this model takes "
                          f"({self.max_tokens} tokens per sentence; the text was split at "
                          f"sentence ends): split it, starting {sentence[:40]!r}")
        return pieces

    def _inputs(self, sentences: Sequence[str], what: str = "a sentence"):
        """(pieces of each sentence, its size with the language token and </s>)."""
        pieces = [self._pieces(s, what) for s in sentences]
        return pieces, [len(p) + 2 for p in pieces]

    def _prepare(self, texts: Sequence[str], src: str, fmt: str):
        """(per text: its Segmented units and, for HTML, its fragments; the pieces of every
        sentence in order; their sizes). Runs in a worker thread, or for a small request on the
        event loop (`_off_loop`)."""
        docs = []
        for text in texts:
            if fmt == "html":
                parts = html_fragments(text)
                docs.append((parts, [split(node, src) for node in html_texts(parts)]))
            else:
                docs.append((None, [split(text, src)]))
        units = sum(len(d[1]) for d in docs)
        if fmt == "html" and self.limits.batch_limit and units > self.limits.batch_limit:
            raise LimitExceeded(f"Invalid request: request ({units} HTML text nodes) exceeds "
                                f"text limit ({self.limits.batch_limit})")
        sentences = [s for _, segs in docs for seg in segs for s in seg.sentences]
        return (docs, *self._inputs(sentences))

    async def translate(self, texts: Sequence[str], src: str, tgt: str, alternatives: int = 0,
                        fmt: str = "text", deadline: Optional[float] = None
                        ) -> Tuple[List[str], List[List[str]], Route]:
        """texts -> (translations, alternatives per text, route). Each text is translated
        sentence by sentence and put back together with its own spacing and newlines; text
        without any word character is returned as it is (as LibreTranslate does). `deadline`:
        time.monotonic() by which to answer (default: now + the request timeout)."""
        route = self.routes[(src, tgt)]
        if not route.available:
            raise Unavailable(route.why)
        if deadline is None:
            deadline = time.monotonic() + self.limits.timeout
        docs, current, sizes = await _off_loop(texts, self._prepare, texts, src, fmt)
        hyps: List[List[str]] = []
        for n, leg in enumerate(route.legs):
            if not current:
                break  # nothing to translate: no job, no sub-network loaded
            if n:  # leg 2 of a pivot: its input is leg 1's output, in the pivot language
                current, sizes = await _off_loop(
                    current, self._inputs, current,
                    f"the {leg[0]} pivot translation of a sentence")
            if time.monotonic() >= deadline:  # nobody would wait for the answer
                raise RequestTimeout(f"translation took longer than {self.limits.timeout:g} s")
            last = n == len(route.legs) - 1
            nbest = 1 + alternatives if last else 1
            job = Job(list(current), leg[0], leg[1], beam=self.limits.beam, nbest=nbest,
                      sizes=sizes, deadline=deadline)
            future = self.batcher.submit(self.registry.key_of(leg), job)
            try:
                hyps = await asyncio.wait_for(asyncio.wrap_future(future),
                                              timeout=max(0.001, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                future.cancel()
                raise RequestTimeout(f"translation took longer than {self.limits.timeout:g} s")
            except asyncio.CancelledError:  # the client went away: drop what has not started
                future.cancel()
                raise
            current = [h[0] if h else "" for h in hyps]
        return (*_reassemble(docs, hyps, alternatives), route)


# Up to this many characters a request is prepared (split, parsed, tokenized) on the event
# loop itself: a one-sentence text takes about 5 us there, against about 70 us of CPU and wall
# time to hand it to a worker thread and back (measured on the demo's SentencePiece model); a
# larger one goes to a worker thread, so that the loop keeps answering (/health stays quick
# while a 250,000-character text is prepared).
INLINE_CHARS, INLINE_TEXTS = 1000, 16


async def _off_loop(texts: Sequence[str], fn, *args):
    """fn(*args), on the event loop when `texts` (what it works on) are at most INLINE_TEXTS of
    at most INLINE_CHARS characters in all, else in a worker thread."""
    if len(texts) <= INLINE_TEXTS and sum(map(len, texts)) <= INLINE_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _reassemble(docs, hyps: List[List[str]], alternatives: int):
    """The texts with their sentences translated, and the k-th alternative of each text (each
    sentence by its k-th hypothesis; only where every sentence has one)."""
    out: List[str] = []
    alts: List[List[str]] = []
    it = iter(hyps)
    for parts, segs in docs:
        mine = [[next(it) for _ in seg.sentences] for seg in segs]
        best = [seg.join([h[0] if h else "" for h in hs]) for seg, hs in zip(segs, mine)]
        if parts is not None:
            out.append(html_rebuild(parts, best))
            alts.append([])
            continue
        out.append(best[0])
        seg, hs = segs[0], mine[0]
        alts.append([seg.join([h[k] for h in hs]) for k in range(1, 1 + alternatives)
                     if hs and all(len(h) > k for h in hs)])
    return out, alts
