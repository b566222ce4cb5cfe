"""The translation service without HTTP: routes + registry + batcher, and what a request does.

A request (texts, source, target) is planned by `routes` (direct / pivot / zero-shot), its texts
are split where they exceed the model's positions (`text.split_to_fit`), and each leg of the
route goes through the batcher as one job, the output of leg 1 being the input of leg 2. The
HTTP layer (app.py) only parses, validates and answers.
"""

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .. import langid
from .batcher import Batcher, Job
from .registry import Registry, Unavailable
from .routes import Route, plan_routes
from .text import split_to_fit

log = logging.getLogger("taskmoe.serve")
_HAS_WORD = re.compile(r"\w")

# names of the languages the demo and most task-MoE setups use; others are shown by code
LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "cs": "Czech", "es": "Spanish",
    "it": "Italian", "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese",
    "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "hi": "Hindi", "tr": "Turkish",
    "pl": "Polish", "uk": "Ukrainian", "sv": "Swedish", "ro": "Romanian", "fi": "Finnish",
}


class RequestTimeout(RuntimeError):
    pass


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
        self.spm = None
        if spm_model:
            import sentencepiece

            self.spm = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
        # language token and </s> take two of the model's source positions
        self.max_tokens = registry.max_source_positions - 2
        # what /metrics, /health and /pairs await before answering: nothing for the embedded
        # server; under Ray Serve, asking every replica for its metrics (ray_engine.py)
        self.refresh = None

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

    def count_tokens(self, text: str) -> int:
        """Source tokens as the engines count them (SentencePiece pieces, else words)."""
        return len(self.spm.encode(text, out_type=str)) if self.spm is not None else len(
            text.split())

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
        """LibreTranslate's shape: [{"confidence" (0-100), "language"}], best first. Only the
        languages fairseq_taskmoe.langid knows (en, de, fr, cs) can be detected; no evidence
        gives [] (and a tie gives the tied languages at equal confidence)."""
        votes = langid.votes(text)
        total = sum(votes.values())
        return [{"confidence": round(100.0 * n / total, 1), "language": lang}
                for lang, n in votes.most_common()]

    # --- translation -------------------------------------------------------------------------

    async def translate(self, texts: Sequence[str], src: str, tgt: str,
                        alternatives: int = 0) -> Tuple[List[str], List[List[str]], Route]:
        """texts -> (translations, alternatives per text, route). Texts without any word
        character are returned as they are (as LibreTranslate does)."""
        route = self.routes[(src, tgt)]
        if not route.available:
            raise Unavailable(route.why)
        todo = [i for i, t in enumerate(texts) if _HAS_WORD.search(t)]
        segments: List[str] = []
        owner: List[int] = []
        for i in todo:
            for seg in split_to_fit(texts[i].strip(), self.count_tokens, self.max_tokens):
                segments.append(seg)
                owner.append(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.timeout
        current = segments
        hyps: List[List[str]] = []
        for n, leg in enumerate(route.legs):
            last = n == len(route.legs) - 1
            nbest = 1 + alternatives if last else 1
            job = Job(list(current), leg[0], leg[1], beam=self.limits.beam, nbest=nbest,
                      tokens=sum(self.count_tokens(t) + 2 for t in current))
            future = self.batcher.submit(self.registry.key_of(leg), job)
            try:
                hyps = await asyncio.wait_for(asyncio.wrap_future(future),
                                              timeout=max(0.001, deadline - loop.time()))
            except asyncio.TimeoutError:
                future.cancel()
                raise RequestTimeout(f"translation took longer than {self.limits.timeout:g} s")
            current = [h[0] if h else "" for h in hyps]
        out = list(texts)
        alts: List[List[str]] = [[] for _ in texts]
        parts: Dict[int, List[List[str]]] = {}
        for i, h in zip(owner, hyps):
            parts.setdefault(i, []).append(h)
        for i, segs in parts.items():
            out[i] = " ".join(s[0] if s else "" for s in segs)
            for k in range(1, 1 + alternatives):
                if all(len(s) > k for s in segs):
                    alts[i].append(" ".join(s[k] for s in segs))
        return out, alts, route
