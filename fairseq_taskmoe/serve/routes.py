"""Which ordered pairs a task-MoE serves, and how: direct, through a pivot, zero-shot, or not.

A multilingual server that advertises a pair it cannot really translate is the most common
complaint about such servers (REFERENCE.md, "Multi-pair translation servers"). A task-MoE knows
exactly what it was trained on, so every ordered pair (src != tgt) gets one honest route:

- **direct**: the pair was trained (`moe_trained_pairs`, else the task's `--lang-pairs`);
- **pivot** via X: src-X and X-tgt were both trained; `--pivot auto` picks, among the languages
  with both legs trained, the one in most trained pairs (ties: the first in `--langs`);
  `--pivot LANG` forces X;
- **zero-shot**: only with `--pivot none`, and only when no task-routed layer would read a gate
  row that training never updated (the pruner's rule, `pairs.untrained_routes`: lang_pair
  routing with `--moe-unseen-pairs own_row`, or target routing into a language never a target);
- **unavailable**, with the reason: anything else, or a pair left out by `--pairs`.

Pure functions of the checkpoint's model args and task config: no model is built, nothing is
loaded, so `/languages` and every request are planned by the same code. `ModelFacts` is what
they read of a checkpoint, kept as JSON in the server's cache (`as_json`, `from_json`; the
registry's facts.json) so that a warm start plans its routes without torch or fairseq: this
module imports neither (the model args are read through integration/config.py, which imports
fairseq, only in `from_checkpoint`).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..moe.pairs import TASK_ROUTING_KINDS, PruningError, parse_pairs, serves, untrained_routes

Pair = Tuple[str, str]
DIRECT, PIVOT, ZERO_SHOT, UNAVAILABLE = "direct", "pivot", "zero-shot", "unavailable"


class RouteError(ValueError):
    """A bad --pairs / --pivot value; the message names the problem and the fix."""


@dataclass(frozen=True)
class Route:
    """How (src, tgt) is served. legs: the pairs actually translated, in order (one for direct
    and zero-shot, two for pivot, none when unavailable); why: for unavailable routes."""

    src: str
    tgt: str
    kind: str
    via: Optional[str] = None
    legs: Tuple[Pair, ...] = ()
    why: str = ""

    @property
    def available(self) -> bool:
        return self.kind != UNAVAILABLE

    def as_json(self) -> dict:
        return {"kind": self.kind, "via": self.via}


@dataclass(frozen=True)
class ModelFacts:
    """What routing needs to know about a checkpoint. trained: the trained pairs (None when the
    checkpoint does not record them); kinds: the routing kind of each side's MoE layers (empty
    for a dense model); unseen_policy: how lang_pair routing reads an untrained pair's row."""

    langs: Tuple[str, ...]
    trained: Optional[Tuple[Pair, ...]]
    kinds: Tuple[str, ...]
    unseen_policy: str = "own_row"
    served: Optional[Tuple[str, ...]] = None  # a pruned checkpoint's served_pairs

    @classmethod
    def from_checkpoint(cls, args, task_pairs: Optional[Sequence[Pair]]) -> "ModelFacts":
        """args: the model namespace (pruning.model_args); task_pairs: pruning.trained_pairs."""
        from ..integration.config import MoEConfig  # imports fairseq: only to read a checkpoint

        moe = MoEConfig.from_namespace(args)
        recorded = [tuple(p.split("-")) for p in (moe.moe_trained_pairs or "").split(",") if p]
        trained = recorded or (list(task_pairs) if task_pairs else None)
        bad = ["-".join(p) for p in trained or () if len(p) != 2 or not all(p)]
        if bad:
            raise PruningError(f"the checkpoint records trained pairs that are not SRC-TGT: "
                               f"{', '.join(repr(b) for b in bad)} (its --moe-trained-pairs or "
                               "--lang-pairs), so its routes cannot be planned: serve a "
                               "checkpoint trained with --lang-pairs of SRC-TGT pairs")
        kinds = (moe.encoder_moe_routing, moe.decoder_moe_routing) if moe.moe_freq > 0 else ()
        # the pruner's rule: checkpoints that do not record their trained pairs route every
        # pair by its own row
        policy = moe.moe_unseen_pairs if moe.moe_trained_pairs else "own_row"
        served = moe.pruned_layout().get("served_pairs")
        return cls(tuple(moe.langs), tuple(trained) if trained is not None else None,
                   tuple(kinds), policy, tuple(served) if served else None)

    def as_json(self) -> dict:
        """A JSON object that from_json turns back into these facts."""
        return {"langs": [str(x) for x in self.langs],
                "trained": (None if self.trained is None
                            else [[str(s), str(t)] for s, t in self.trained]),
                "kinds": [str(k) for k in self.kinds], "unseen_policy": str(self.unseen_policy),
                "served": None if self.served is None else [str(x) for x in self.served]}

    @classmethod
    def from_json(cls, data: dict) -> "ModelFacts":
        """The facts as_json wrote; KeyError, TypeError or ValueError on anything else."""
        def strings(value) -> tuple:
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise TypeError(f"not a list of strings: {value!r}")
            return tuple(value)

        def pair(value) -> Pair:
            if len(strings(value)) != 2:
                raise ValueError(f"not a pair: {value!r}")
            return tuple(value)

        trained, served = data["trained"], data["served"]
        if not isinstance(data["unseen_policy"], str) or not (trained is None
                                                            or isinstance(trained, list)):
            raise TypeError("unseen_policy must be a string, trained a list or null")
        return cls(strings(data["langs"]),
                   None if trained is None else tuple(pair(p) for p in trained),
                   strings(data["kinds"]), data["unseen_policy"],
                   None if served is None else strings(served))

    @property
    def task_kinds(self) -> set:
        return {k for k in self.kinds if k in TASK_ROUTING_KINDS}

    def is_trained(self, pair: Pair) -> bool:
        return self.trained is None or pair in self.trained

    def untrained_gate(self, pair: Pair) -> Optional[str]:
        """Why a direct route for `pair` would read an untrained gate row, or None."""
        if self.trained is None:
            return None
        found = untrained_routes([pair], self.task_kinds, list(self.trained),
                                  self.unseen_policy)
        return found[0] if found else None

    def in_pruned(self, pair: Pair) -> bool:
        """A pruned checkpoint holds experts only for the pairs it serves."""
        if self.served is None:
            return True
        return serves(self.served, *pair)


def parse_pairs_option(spec: str, langs: Sequence[str]) -> Optional[List[Pair]]:
    """--pairs: 'all' -> None (every pair), else 'en-de,*-fr' -> the pairs (pruning's syntax)."""
    if spec.strip() in ("", "all"):
        return None
    try:
        return parse_pairs(spec, langs)
    except ValueError as err:
        raise RouteError(f"--pairs: {err}") from None


def pivot_candidates(facts: ModelFacts, src: str, tgt: str) -> List[str]:
    """Languages X with src-X and X-tgt both trained, the most used in training first."""
    if facts.trained is None:
        return []
    uses = {lang: sum(lang in p for p in facts.trained) for lang in facts.langs}
    found = [x for x in facts.langs if x not in (src, tgt)
             and (src, x) in facts.trained and (x, tgt) in facts.trained
             and facts.in_pruned((src, x)) and facts.in_pruned((x, tgt))]
    return sorted(found, key=lambda x: (-uses[x], facts.langs.index(x)))


def plan_route(facts: ModelFacts, src: str, tgt: str, pivot: str = "auto",
               allowed: Optional[Sequence[Pair]] = None) -> Route:
    """The route of one ordered pair (see the module docstring)."""
    if src == tgt or src not in facts.langs or tgt not in facts.langs:
        return Route(src, tgt, UNAVAILABLE, why=f"{src}-{tgt} is not a pair of this model "
                     f"(languages: {', '.join(facts.langs)})")
    if allowed is not None and (src, tgt) not in allowed:
        return Route(src, tgt, UNAVAILABLE, why=f"{src}-{tgt} is not served (--pairs)")
    pair = (src, tgt)
    if facts.is_trained(pair) and facts.in_pruned(pair):
        return Route(src, tgt, DIRECT, legs=(pair,))
    if pivot != "none":
        candidates = pivot_candidates(facts, src, tgt)
        if pivot != "auto":
            candidates = [x for x in candidates if x == pivot]
        if candidates:
            x = candidates[0]
            return Route(src, tgt, PIVOT, via=x, legs=((src, x), (x, tgt)))
        what = "no language" if pivot == "auto" else pivot
        return Route(src, tgt, UNAVAILABLE,
                     why=f"{src}-{tgt} was not trained and {what} has both legs "
                     f"({src}-X, X-{tgt}) trained; --pivot none serves zero-shot pairs whose "
                     "gate rows were trained")
    if not facts.in_pruned(pair):
        return Route(src, tgt, UNAVAILABLE, why=f"the pruned checkpoint serves only "
                     f"{', '.join(facts.served)}")
    untrained = facts.untrained_gate(pair)
    if untrained:
        return Route(src, tgt, UNAVAILABLE, why=f"untrained route: {untrained}; it would be "
                     "served through a gate row training never updated (use --pivot auto)")
    return Route(src, tgt, ZERO_SHOT, legs=(pair,))


def plan_routes(facts: ModelFacts, pivot: str = "auto",
                allowed: Optional[Sequence[Pair]] = None) -> Dict[Pair, Route]:
    """The route of every ordered pair of the model's languages."""
    if pivot not in ("auto", "none") and pivot not in facts.langs:
        raise RouteError(f"--pivot {pivot}: not a language of this model "
                         f"({', '.join(facts.langs)}); use auto, none or one of them")
    return {(s, t): plan_route(facts, s, t, pivot, allowed)
            for s in facts.langs for t in facts.langs if s != t}


def legs_needed(routes: Dict[Pair, Route]) -> List[Pair]:
    """Every pair some available route translates, in a stable order (what to build)."""
    out: List[Pair] = []
    for route in routes.values():
        for leg in route.legs:
            if leg not in out:
                out.append(leg)
    return out
