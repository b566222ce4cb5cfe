"""Which language pairs a pruned or exported task-MoE serves, and whether it serves a pair (and
`language_tokens`: the tokens fairseq's multilingual task adds for a pair): the one rule used
by taskmoe-prune (what a pruned checkpoint records), the plugin's start-up check (task.py),
taskmoe-export (what an export records), the CTranslate2 API (ct2.py) and the server's engines.
Plain Python that imports nothing, so that ct2.py (and a translation service) can use it without
torch or fairseq: with it the pair syntax of --lang-pair / --pairs (`parse_pairs`, raising
PruningError), the pruner's rule of untrained routes (`untrained_routes`) and the task-routed
kinds (`TASK_ROUTING_KINDS`), which the server's routes read.

A served entry is `SRC-TGT` (that pair), `*-TGT` (any source language into TGT) or `*-*` (any
pair). What a model serves follows from how its task-specific MoE layers route:

- a `lang_pair`-routed layer keeps the experts of the exact pairs it was pruned (or exported)
  for: any such layer -> exactly those pairs (`en-de` and `fr-de` are different tasks);
- a `target`-routed layer keeps those of the target languages, whatever the source: only such
  layers -> `*-TGT` for each target;
- token- and sentence-routed layers and dense FFNs are whole and serve any pair: no task-routed
  layer -> `*-*`.

    served_pairs(["target", "lang_pair"], ["en-de", "fr-de"])   # ['en-de', 'fr-de']
    served_pairs(["token", "target"], [("en", "de")])            # ['*-de']
    serves(["*-de"], "fr", "de")                                 # True
"""

from typing import Iterable, List, Sequence, Tuple, Union

TARGET, LANG_PAIR = "target", "lang_pair"
TASK_ROUTING_KINDS = (TARGET, LANG_PAIR)  # the kinds a sub-network is pruned by (routing.py's)
ANY = "*"


class PruningError(ValueError):
    """Bad input to the pruner; the message names the problem and the fix. Defined here, with
    the pair syntax it reports on, so that the server catches it without importing torch
    (deploy/pruning.py raises it too and exports the same class)."""

Pair = Union[str, Tuple[str, str]]  # "en-de" or ("en", "de")


# names of the languages the demo, the LoHelp corpus and most task-MoE setups use, shown by the
# server's /languages and in Argos packages' metadata; others are shown by their code
LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "cs": "Czech", "es": "Spanish",
    "it": "Italian", "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese",
    "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "hi": "Hindi", "tr": "Turkish",
    "pl": "Polish", "uk": "Ukrainian", "sv": "Swedish", "ro": "Romanian", "fi": "Finnish",
    "el": "Greek",
}


def split_pair(pair: Pair) -> Tuple[str, str]:
    """'en-de' or ('en', 'de') -> ('en', 'de'); ValueError for anything else."""
    if isinstance(pair, str):
        src, sep, tgt = pair.partition("-")
    else:
        src, tgt = pair
        sep = "-"
    if not sep or not src or not tgt:
        raise ValueError(f"bad language pair {pair!r}: write it as SRC-TGT, e.g. en-de")
    return src, tgt


def served_pairs(kinds: Iterable[str], pairs: Iterable[Pair]) -> List[str]:
    """What a model serves whose MoE layers route by `kinds` (one routing kind per layer, in any
    order; token and sentence are ignored: those layers are whole) and whose task-routed layers
    hold the experts of `pairs`: the exact pairs (in order, without repeats) if any layer is
    lang_pair-routed, else `*-TGT` per target (sorted) if any is target-routed, else `*-*`."""
    kinds = set(kinds)
    pairs = [split_pair(p) for p in pairs]
    if LANG_PAIR in kinds:
        return list(dict.fromkeys(f"{src}-{tgt}" for src, tgt in pairs))
    if TARGET in kinds:
        return sorted({f"{ANY}-{tgt}" for _, tgt in pairs})
    return [f"{ANY}-{ANY}"]


def serves(served: Iterable[str], src: str, tgt: str) -> bool:
    """Whether a model that serves `served` (a list from served_pairs) translates src -> tgt."""
    return any(entry in (f"{src}-{tgt}", f"{ANY}-{tgt}", f"{ANY}-{ANY}") for entry in served)


def language_tokens(convention: dict, src: str, tgt: str) -> Tuple[List[str], List[str]]:
    """(source prefix, target prefix) that fairseq's translation_multi_simple_epoch adds for
    src -> tgt, from a convention's `lang_tok_format` (`__{}__`), `encoder_langtok` (src: the
    source's token before the pieces, tgt: the target's, none: nothing) and `decoder_langtok`
    (the target's token forced first). The one rule for the tokens of a pair: the exporter
    records them, the engines compute them for the pair asked."""
    fmt = convention["lang_tok_format"]
    encoder = convention.get("encoder_langtok")
    source = {"src": [fmt.format(src)], "tgt": [fmt.format(tgt)]}.get(encoder, [])
    target = [fmt.format(tgt)] if convention.get("decoder_langtok") else []
    return source, target


def parse_pairs(spec: str, langs: Sequence[str]) -> List[Tuple[str, str]]:
    """'en-de,en-fr' -> [('en','de'), ('en','fr')]; '*-de' -> every other language into de.
    PruningError names a bad item and the languages known."""
    pairs = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        src, sep, tgt = item.partition("-")
        if not sep or not src or not tgt:
            raise PruningError(f"bad language pair {item!r}: write it as SRC-TGT, e.g. en-de")
        for lang in (src, tgt):
            if lang != ANY and lang not in langs:
                raise PruningError(
                    f"unknown language {lang!r} in {item!r}; this checkpoint knows "
                    f"{', '.join(langs)}"
                )
        if tgt == ANY:
            raise PruningError(f"{item!r}: the target language must be given")
        if src == tgt:
            raise PruningError(f"{item!r}: source and target are the same language")
        sources = [l for l in langs if l != tgt] if src == ANY else [src]
        pairs += [(s, tgt) for s in sources if (s, tgt) not in pairs]
    if not pairs:
        raise PruningError("no language pair given: use e.g. --lang-pair en-de")
    return pairs


def untrained_routes(pairs, kinds, trained, unseen_policy: str) -> List[str]:
    """Pairs whose route some pruned layer reads from a gate row that training never updated:
    lang_pair routing of a pair not trained (unless the target_mean policy routes it by the
    trained pairs into its target), target routing into a language never a target."""
    out = []
    targets = {tt for _, tt in trained}
    for s, t in pairs:
        borrowed = unseen_policy == "target_mean" and t in targets
        if LANG_PAIR in kinds and (s, t) not in trained and not borrowed:
            out.append(f"{s}-{t} (lang_pair routing: pair never trained)")
        elif TARGET in kinds and t not in targets:
            out.append(f"{s}-{t} (target routing: {t} was never a training target)")
    return out
