"""The report's data: the paper's figures and the groups of runs it compares, results JSONs
loaded and grouped by variant, statistics over seeds (mean, half the range), routing
concentration and distances, and the formatting every section shares."""

import json
from pathlib import Path

from research.study.grid import TRAINED, VARIANTS, ZERO_SHOT

# Kudugunta et al. 2021, Table 1 (WMT, 30 directions, 32 experts): average BLEU.
PAPER = {"dense": 20.0, "token_token": 22.6, "sentence_sentence": 19.9,
         "lang_pair_lang_pair": 21.4, "target_target": 22.9, "token_target": 23.6}
MAIN = list(PAPER)
# rows of the Table 1 comparison that the paper does not have (balance-loss variants)
TABLE1_EXTRA = ["target_target_tasks"]
BALANCE = ["target_target_gl0", "target_target", "target_target_gl0.1", "target_target_tasks"]
SCOPES = ("target_target", "target_target_tasks")  # weight 0.01 over tokens, over tasks
# research.distill (issue 10): dense students distilled from token / token seed 1
DISTILLED = {"distilled": "dense student distilled from token / token",
             "distilled_random": "dense student distilled from token / token (random init)"}
PRUNED = "target_target"  # its pruned sub-network has the student's size


def load_results(folder: Path):
    """{run name: results dict} of every *.json in `folder`."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        out[data.get("run", path.stem)] = data
    return out


def by_variant(results):
    groups = {}
    for data in results.values():
        groups.setdefault(data["variant"], []).append(data)
    for v in groups.values():
        v.sort(key=lambda d: d["seed"])
    return groups


def stat(values):
    """(mean, half the range) of the non-None values; (None, None) if there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, (max(values) - min(values)) / 2 if len(values) > 1 else None


def fmt(mean, spread=None, digits=1, pct=False):
    if mean is None:
        return "–"
    scale, unit = (100, "%") if pct else (1, "")
    text = f"{mean * scale:.{digits}f}{unit}"
    return text + (f" ± {spread * scale:.{digits}f}" if spread is not None else "")


def signed(x, digits=1):
    return "–" if x is None else f"{x:+.{digits}f}"


def gain_share(x, dense, token):
    """(BLEU_x - BLEU_dense) / (BLEU_token_token - BLEU_dense) as text; "–" when undefined."""
    if x is None or dense is None or token is None or token <= dense:
        return "–"
    return f"{(x - dense) / (token - dense):.0%}"


def cell(runs_of_variant, getter, digits=1, pct=False):
    return fmt(*stat([getter(r) for r in runs_of_variant]), digits=digits, pct=pct)


def direction_value(key, pair):
    return lambda r: r["directions"].get(pair, {}).get(key)


def avg_value(group, key):
    """A run's average over its trained or zero-shot directions, from the per-direction values
    (the stored average is rounded to 2 decimals; re-rounding it can differ by 0.1 from the
    pruned average computed from the same directions)."""
    pairs = TRAINED if group == "trained" else ZERO_SHOT

    def get(r):
        vals = [r["directions"].get(p, {}).get(key) for p in pairs]
        if None not in vals:
            return sum(vals) / len(vals)
        return (r["averages"].get(group) or {}).get(key)
    return get


def trained_mean(runs_of_variant):
    """Mean over seeds of the trained-direction average BLEU (None without runs)."""
    return stat([avg_value("trained", "bleu")(r) for r in runs_of_variant])[0]


def seeds_note(group):
    return ", ".join(str(r["seed"]) for r in group)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pruned_bleu(pair):
    """A task-routed run's BLEU for `pair` from its checkpoint pruned for `pair` (trained
    directions); zero-shot directions from the full model, which computes each task's experts
    merged, as a sub-network pruned for the pair's target would."""
    def get(r):
        rec = (r.get("pruned") or {}).get(pair) or r["directions"].get(pair) or {}
        return rec.get("bleu")
    return get


def pruned_trained_avg(r):
    vals = [pruned_bleu(p)(r) for p in TRAINED]
    return None if None in vals else sum(vals) / len(vals)


def unseen_policies(r):
    """{policy: {zero-shot pair: record}} of a lang_pair run, {} when not evaluated."""
    return (r.get("unseen_pairs") or {}).get("directions") or {}


def top1_weight(r):
    """Mean over pruned pairs and layers of the larger gate weight of the kept top-2 experts."""
    ws = [max(w for _e, w in kept) for p in (r.get("pruned") or {}).values()
          for kept in (p.get("kept_experts") or {}).values() if kept]
    return sum(ws) / len(ws) if ws else None


def balance_settings(v):
    flags = [str(f) for f in VARIANTS[v]["flags"]]
    wt = flags[flags.index("--moe-gate-loss-wt") + 1]
    scope = flags[flags.index("--moe-balance-scope") + 1]  # study.moe() always sets it
    return wt, scope + (" (the plugin's default)" if scope == default_balance_scope() else "")


def default_balance_scope():
    from dataclasses import fields

    from fairseq_taskmoe.integration.config import MoEConfig

    return next(f.default for f in fields(MoEConfig) if f.name == "moe_balance_scope")


def top2_share(usage_of_layer):
    """Mean over language pairs of the share of a pair's assignments on its two most used
    experts: 1.0 when every pair keeps to two experts (task routing, top-2), 2/E when each pair
    spreads evenly over all E experts. Concentration only: pair_distance says whether pairs
    differ."""
    shares = [sum(sorted(row, reverse=True)[:2]) for row in usage_of_layer.values()]
    return sum(shares) / len(shares) if shares else None


def pair_distance(usage_of_layer):
    """Mean total-variation distance between two pairs' expert shares: 0 when every pair is
    routed alike, 1 when no two pairs share an expert."""
    rows = list(usage_of_layer.values())
    d = [sum(abs(a - b) for a, b in zip(x, y)) / 2
         for i, x in enumerate(rows) for y in rows[i + 1:]]
    return sum(d) / len(d) if d else None


def seeds_phrase(n):
    return "in 1 seed" if n == 1 else f"over {n} seeds"


def span(values, digits=2):
    """'0.73' for one value (or equal values), '0.04-0.09' for a range."""
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo}-{hi}"


def tag_only_distance(usage_of_layer, source="en"):
    """pair_distance among the pairs that translate from `source`. Multi30k is 4-way parallel,
    so those pairs' encoders read the same sentences, which differ only in the target-language
    tag that `--encoder-langtok tgt` puts first: in an encoder layer, how far the tag alone moves
    the routing."""
    return pair_distance({p: u for p, u in usage_of_layer.items() if p.split("-")[0] == source})


def level_with(best, others, mean, spreads):
    """The variants among `others` whose trained mean lies within the summed seed half-ranges
    of `best`'s and theirs (a variant run with one seed, spread None, adds no spread)."""
    return [v for v in others
            if mean[best] - mean[v] <= (spreads[best] or 0) + (spreads[v] or 0)]
