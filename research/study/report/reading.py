"""The report's reading: the statements the present data supports (against the paper, against
seed noise), nothing else."""

from research.study.grid import TRAINED, VARIANTS, ZERO_SHOT, runs
from research.study.report.stats import (BALANCE, MAIN, PAPER, SCOPES, avg_value,
                                         balance_settings, fmt, level_with, pair_distance,
                                         seeds_phrase, span, stat, tag_only_distance, top1_weight,
                                         trained_mean, unseen_policies)


def scope_reading(scopes):
    """Balance over tokens against over tasks (target / target, weight 0.01), seed by seed: is
    the difference of the means larger than the seeds' spread?"""
    per = {v: [avg_value("trained", "bleu")(r) for r in g] for v, g in scopes.items()}
    (tok, tok_s), (tas, tas_s) = (stat(per[v]) for v in SCOPES)
    diff, noise = tas - tok, (tok_s or 0) + (tas_s or 0)
    seeds = {v: ", ".join(f"{b:.2f}" for b in per[v]) for v in SCOPES}
    weights = {v: fmt(stat([top1_weight(r) for r in scopes[v]])[0], digits=3) for v in SCOPES}
    return (f"Balance scope (target / target, weight 0.01, trained average per seed): over "
            f"tokens {seeds[SCOPES[0]]}, over tasks {seeds[SCOPES[1]]}; means {tok:.2f} and "
            f"{tas:.2f}, difference {diff:+.2f} BLEU against a summed seed half-range of "
            f"{noise:.2f}: " + ("larger than the seed noise." if abs(diff) > noise and noise else
                                "not larger than the seed noise, so not evidence by itself.")
            + f" Top-1 gate weight {weights[SCOPES[0]]} over tokens, {weights[SCOPES[1]]} over "
            "tasks (0.5 = a tie).")


def section_reading(results, groups):
    """Statements that the present data supports, nothing else."""
    out = []
    missing = [name for name, _v, _s in runs() if name not in results]
    if missing:
        out.append(f"Not yet run: {', '.join(f'`{m}`' for m in missing)}; statements below "
                   "cover the finished runs only.")
    budgets = sorted({r["budget"]["updates_done"] for r in results.values()})
    out.append(f"Scale: {', '.join(f'{b:,}' for b in budgets)} updates of at most "
               f"{next(iter(results.values()))['budget']['max_tokens']:,} tokens on Multi30k "
               f"({len(TRAINED)} trained directions, "
               f"{next(iter(results.values()))['config']['shared_flags']['--moe-expert-count']} "
               "experts) against the paper's WMT (30 directions, 32 experts, far longer "
               "training): absolute BLEU is not comparable, only the sign and order of the "
               "differences between routings are.")
    mean = {v: trained_mean(g) for v, g in groups.items()}
    spreads = {v: stat([avg_value("trained", "bleu")(r) for r in g])[1] for v, g in groups.items()}
    zs_stats = {v: stat([avg_value("zero_shot", "bleu")(r) for r in g]) for v, g in groups.items()}
    zs = {v: m for v, (m, _s) in zs_stats.items()}
    if mean.get("dense") is not None:
        agree, disagree = [], []
        for v in MAIN[1:]:
            if mean.get(v) is None:
                continue
            ours, paper = mean[v] - mean["dense"], PAPER[v] - PAPER["dense"]
            text = f"{VARIANTS[v]['label']} {ours:+.1f} (paper {paper:+.1f})"
            (agree if (ours > 0) == (paper > 0) else disagree).append(text)
        if agree:
            out.append("Same direction of change against dense as the paper: " + "; ".join(agree)
                       + ".")
        if disagree:
            out.append("Opposite direction of change against dense: " + "; ".join(disagree) + ".")
    ranked = sorted((m, v) for v, m in mean.items() if m is not None and v in MAIN)
    if len(ranked) >= 2:
        top = ranked[-1][0]
        best = [v for m, v in ranked if top - m < 0.05]  # equal at the precision shown
        paper_best = max((v for _m, v in ranked), key=PAPER.get)
        level = level_with(best[0], [v for _m, v in ranked[::-1]
                                     if v not in best and v != "dense"], mean, spreads)
        out.append(f"Best trained average among the finished Table 1 models: "
                   + " and ".join(VARIANTS[v]["label"] for v in best)
                   + f" ({top:.1f} BLEU)"
                   + (f", level within seed noise (the summed half-ranges) with "
                      + ", ".join(VARIANTS[v]["label"] for v in level) if level else "")
                   + "; among the same models the paper's best is "
                   f"{VARIANTS[paper_best]['label']}.")
    noisy = [(v, s) for v, s in spreads.items() if s is not None]
    if noisy:
        out.append("Seed noise (half the range of the trained average over the seeds run): "
                   + ", ".join(f"{VARIANTS[v]['label']} ±{s:.2f}" for v, s in noisy)
                   + ". Differences between models smaller than this are not evidence.")
    checks = [(name, pair, p) for name, r in results.items()
              for pair, p in (r.get("pruned") or {}).items()]
    if checks:
        same = [c for c in checks if c[2]["identical_hypotheses"]]
        equal = [(n, p) for n, p, x in checks if x["bleu"] == results[n]["directions"][p]["bleu"]]
        text = (f"Pruning: {len(same)} of {len(checks)} pruned checkpoints produce hypotheses "
                f"identical to the full model's; {len(equal)} of {len(checks)} have the same BLEU.")
        bad = [f"`{n}` {p}" for n, p, x in checks if not x["identical_hypotheses"]]
        if bad:
            text += " Not identical: " + ", ".join(bad) + "."
        out.append(text)
    if zs.get("target_target") is not None and zs.get("lang_pair_lang_pair") is not None:
        off = {v: stat([avg_value("zero_shot", "off_target")(r) for r in groups[v]])[0]
               for v in ("target_target", "lang_pair_lang_pair")}
        zs_noise = [zs_stats[v][1] for v in ("target_target", "lang_pair_lang_pair")]
        lead = zs["target_target"] - zs["lang_pair_lang_pair"]
        if None in zs_noise:
            verdict = (f"ahead by {lead:.1f} BLEU, as in the paper." if lead > 0 else
                       f"not ahead ({lead:+.1f} BLEU), unlike the paper.")
        elif abs(lead) <= sum(zs_noise):
            policies = sorted({(r.get("unseen_pairs") or {}).get("checkpoint_default")
                               for r in groups["lang_pair_lang_pair"]} - {None})
            verdict = (f"level with it within seed noise ({lead:+.1f} BLEU against a summed seed "
                       f"half-range of {sum(zs_noise):.1f})"
                       + (", with unseen pairs routed by the checkpoints' `moe_unseen_pairs` ("
                          + ", ".join(f"`{p}`" for p in policies) + "; the other policy below)"
                          if policies else "") + ".")
        else:
            verdict = (f"ahead by {lead:.1f} BLEU, more than the seed noise, as in the paper."
                       if lead > 0 else f"behind by {-lead:.1f} BLEU, more than the seed noise, "
                       "unlike the paper.")
        out.append(
            f"Zero-shot: target / target averages {zs['target_target']:.1f} BLEU "
            f"({fmt(off['target_target'], pct=True)} off-target), lang-pair / lang-pair "
            f"{zs['lang_pair_lang_pair']:.1f} ({fmt(off['lang_pair_lang_pair'], pct=True)} "
            "off-target). The paper reports lang-pair routing collapsing on unseen pairs and "
            "target routing generalising; here target routing is " + verdict)
    for r in groups.get("lang_pair_lang_pair", []):
        by_policy = unseen_policies(r)
        avgs = {p: stat([x["bleu"] for x in recs.values()])[0] for p, recs in by_policy.items()
                if len(recs) == len(ZERO_SHOT)}
        if len(avgs) >= 2:
            out.append(f"Unseen-pair routing under lang-pair routing (seed {r['seed']}, zero-shot "
                       "average BLEU): " + ", ".join(f"`{p}` {v:.1f}" for p, v in
                                                    sorted(avgs.items())) + ".")
    first = {v: g[0] for v, g in groups.items()}  # one seed's routing is enough to show it
    usage = {v: r.get("routing_usage_valid") for v, r in first.items()}
    if usage.get("sentence_sentence") and usage.get("target_target"):
        dist = {v: {l: pair_distance(u) for l, u in usage[v].items()}
                for v in ("sentence_sentence", "target_target")}
        out.append(
            "Sentence routing depends on the language pair here (mean distance between two "
            f"pairs' expert shares, seed {first['sentence_sentence']['seed']}: "
            + ", ".join(f"{l} {d:.2f}" for l, d in dist["sentence_sentence"].items())
            + "; target / target " + ", ".join(f"{l} {d:.2f}"
                                               for l, d in dist["target_target"].items())
            + "): it acts as a learned task routing, where the paper's sentence routing gained "
            f"nothing over dense ({PAPER['sentence_sentence'] - PAPER['dense']:+.1f}).")
        tag = {v: [tag_only_distance(u) for r in groups.get(v, [])
                   for l, u in (r.get("routing_usage_valid") or {}).items() if l.startswith("enc")]
               for v in ("sentence_sentence", "token_token")}
        if all(tag.values()):
            out[-1] += (
                " The target-language tag is why: en-de, en-fr and en-cs feed the encoder the "
                "same English sentences (Multi30k is 4-way parallel), differing only in the tag "
                "that `--encoder-langtok tgt` puts first, and sentence routing's encoder still "
                "sends them to different experts (tag-only distance "
                f"{span(tag['sentence_sentence'])} {seeds_phrase(len(groups['sentence_sentence']))}"
                ", against token / token's "
                f"{span(tag['token_token'])}). The pooled sentence representation carries the tag "
                "to the gate, so sentence routing learns to route by target language.")
    bal = [(mean[v], v) for v in BALANCE if mean.get(v) is not None]
    if len(bal) >= 2:
        best = max(bal)[1]
        wt, scope = balance_settings(best)
        level = level_with(best, [v for _m, v in sorted(bal, reverse=True) if v != best], mean,
                           spreads)
        out.append(f"Balance loss: among {len(bal)} finished settings, gate loss weight {wt} "
                   + ("(no balance loss)" if float(wt) == 0 else f"over {scope}")
                   + f" has the best trained average ({max(bal)[0]:.1f} BLEU); spread "
                   f"across settings {max(bal)[0] - min(bal)[0]:.1f} BLEU"
                   + (f"; level within seed noise with {len(level)} of the other "
                      f"{len(bal) - 1}" if level else "") + ".")
    scopes = {v: groups[v] for v in SCOPES if groups.get(v)}
    if len(scopes) == 2:
        out.append(scope_reading(scopes))
    if not out:
        out.append("No finished runs yet.")
    return "## Reading\n\n" + "\n".join(f"- {s}" for s in out)
