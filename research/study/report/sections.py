"""The report's sections: set-up, runs, Table 1, per-direction tables, off-target, unseen pairs,
parameters, pruning, balance loss, heatmaps and commands (the distillation section and the
reading have their own modules)."""

import os
from pathlib import Path

from research.common import REPO, current_command, hms
from research.study.grid import DIRECTIONS, TRAINED, VARIANTS, ZERO_SHOT, runs
from research.study.report.stats import (BALANCE, DISTILLED, MAIN, PAPER, TABLE1_EXTRA,
                                         avg_value, balance_settings, cell, direction_value, fmt,
                                         gain_share, pair_distance, seeds_note, signed, stat,
                                         table, tag_only_distance, top1_weight, top2_share,
                                         trained_mean, unseen_policies)


def section_setup(results):
    any_run = next(iter(results.values()))
    shared = " ".join(k if v is None else f"{k} {v}"
                      for k, v in any_run["config"]["shared_flags"].items())
    budgets = sorted({(r["budget"]["updates_done"], r["budget"]["max_tokens"])
                      for r in results.values()})
    sizes = sorted({str(r["data"]["train_lines_per_direction"]) for r in results.values()})
    lid = any_run["langid"]
    acc = ", ".join(f"{lang} {v['on_target']:.1%}" for lang, v in
                    lid["accuracy_on_test_references"].items())
    evaluated = sorted({tuple(r["data"]["evaluated_directions"]) for r in results.values()})
    lines = [
        "## Set-up",
        "",
        f"- Shared backbone and recipe (every run): `{shared}`.",
        "- Budget (updates × max tokens per update): " + "; ".join(
            f"{u:,} × {t:,} = {u * t:,} tokens" for u, t in budgets)
        + (" **(runs differ in budget: compare with care)**" if len(budgets) > 1 else "") + ".",
        f"- Training lines per direction: {', '.join(sizes)}; trained directions "
        f"{', '.join(TRAINED)}; zero-shot (never trained) {', '.join(ZERO_SHOT)}.",
        f"- Test set: {any_run['data']['test_set']}, beam 5; BLEU signature "
        f"`{any_run['signatures']['bleu']}`, chrF signature `{any_run['signatures']['chrf']}`.",
        f"- Off-target: share of hypotheses detected as a language other than the target "
        f"(detector: {lid['method']}; hypotheses without evidence count as neither). The "
        f"detector's accuracy on the test references: {acc}.",
    ]
    if len(evaluated) > 1 or list(evaluated[0]) != DIRECTIONS:
        lines.append("- **Some runs were evaluated on a subset of the directions** (smoke "
                     "settings); their averages are left empty.")
    lens = {r["commands"].get("generate_max_len_b") for r in results.values()}
    if lens != {None}:
        lines.append(f"- **Generation length capped** (`--max-len-b {sorted(lens, key=str)}`: "
                     "smoke settings).")
    return "\n".join(lines)


def section_status(results, distilled=None):
    def done(name, r):
        threads = (r.get("environment") or {}).get("omp_num_threads") or "all (2)"
        return [f"`{name}`", r["label"], r["seed"], "done", f"{r['budget']['updates_done']:,}",
                hms(r["wall_seconds"]["training"]), hms(r["wall_seconds"]["evaluation"]),
                threads]

    rows, distilled = [], distilled or {}
    for name, variant, seed in runs():
        r = results.get(name)
        rows.append(done(name, r) if r is not None else
                    [f"`{name}`", VARIANTS[variant]["label"], seed, "not yet run", "–", "–", "–",
                     "–"])
    rows += [done(name, r) for name, r in sorted(distilled.items())]  # research.distill's
    return ("## Runs\n\nWall-clock times on this project's 2-core machine. Runs with 1 thread "
            "(`OMP_NUM_THREADS=1`) trained two to three at a time, each on a share of the cores, "
            "and runs with all threads often shared them with tests: compare the times as a "
            "rough cost, not as speeds.\n\n" + table(
                ["run", "encoder / decoder routing", "seed", "state", "updates", "training time",
                 "evaluation time", "threads"], rows))


def section_table1(groups, distilled=None):
    dense = groups.get("dense", [])
    dense_mean = trained_mean(dense)
    token_mean = trained_mean(groups.get("token_token", []))
    rows = []
    for v in MAIN + TABLE1_EXTRA:
        g = groups.get(v, [])
        label = (f"target / target, balance over {balance_settings(v)[1]}" if v in TABLE1_EXTRA
                 else VARIANTS[v]["label"])
        paper = (fmt(PAPER[v]), signed(PAPER[v] - PAPER["dense"])) if v in PAPER else ("–", "–")
        if not g:
            rows.append([label, *paper, "not yet run", "–", "–", "–", "–"])
            continue
        mean = trained_mean(g)
        ours_delta = mean - dense_mean if (mean is not None and dense_mean is not None) else None
        rows.append([label, *paper, cell(g, avg_value("trained", "bleu")), signed(ours_delta),
                     gain_share(mean, dense_mean, token_mean),
                     cell(g, avg_value("zero_shot", "bleu")), seeds_note(g)])
    for v, label in DISTILLED.items():
        g = [r for r in (distilled or {}).values() if r["variant"] == v]
        if not g:
            if v == "distilled":
                rows.append([label, "–", "–", "not yet run", "–", "–", "–", "–"])
            continue
        mean = trained_mean(g)
        ours_delta = mean - dense_mean if (mean is not None and dense_mean is not None) else None
        rows.append([label, "–", "–", cell(g, avg_value("trained", "bleu")), signed(ours_delta),
                     gain_share(mean, dense_mean, token_mean),
                     cell(g, avg_value("zero_shot", "bleu")), seeds_note(g)])
    return ("## Against the paper's Table 1\n\nPaper: WMT, 30 directions, 32 experts, average "
            "BLEU. Here: Multi30k, the 6 trained directions averaged (and the 6 zero-shot ones), "
            "8 experts. Δ is against the dense model of the same table; ± is half the range over "
            "seeds. \"Gain of token / token kept\" is (BLEU − BLEU dense) / (BLEU token / "
            "token − BLEU dense) of the trained averages. The target / target row balances "
            "the experts over tokens, as every other MoE row does; \"target / target, balance "
            "over tasks\" is the same model balanced over tasks (not in the paper; section "
            "\"Balance loss\"). The dense student "
            "(`python -m research.distill`, section \"Distillation baseline\") is not in the "
            "paper's table.\n\n" + table(
                ["encoder / decoder routing", "paper BLEU", "paper Δ vs dense",
                 "ours: trained avg BLEU", "ours Δ vs dense", "gain of token / token kept",
                 "ours: zero-shot avg BLEU", "seeds"], rows))


def variant_rows(groups, width, cells):
    """One table row per model variant: its label (with the seed count) and cells(runs), or
    "not yet run" padded to `width` columns when it has no finished run."""
    rows = []
    for v in VARIANTS:
        g = groups.get(v, [])
        if not g:
            rows.append([VARIANTS[v]["label"], "not yet run"] + [""] * (width - 2))
        else:
            label = VARIANTS[v]["label"] + (f" ({len(g)} seeds)" if len(g) > 1 else "")
            rows.append([label, *cells(g)])
    return rows


def section_directions(groups, key, title, digits=1, pct=False, pairs=DIRECTIONS,
                       averages=True):
    header = ["model", *pairs]
    if averages:
        header += ["trained avg", "zero-shot avg"]
    def cells(g):
        row = [cell(g, direction_value(key, p), digits, pct) for p in pairs]
        if averages:
            row += [cell(g, avg_value("trained", key), digits, pct),
                    cell(g, avg_value("zero_shot", key), digits, pct)]
        return row

    return f"## {title}\n\n" + table(header, variant_rows(groups, len(header), cells))


def section_off_target(groups):
    header = ["model", *ZERO_SHOT, "avg off-target", "avg undetected"]

    def zs_mean(key):
        def get(r):
            vals = [r["directions"].get(p, {}).get(key) for p in ZERO_SHOT]
            return None if None in vals else sum(vals) / len(vals)
        return get

    rows = variant_rows(groups, len(header), lambda g: [
        *[cell(g, direction_value("off_target", p), pct=True) for p in ZERO_SHOT],
        cell(g, zs_mean("off_target"), pct=True), cell(g, zs_mean("undetected"), pct=True)])
    return ("## Off-target rate, zero-shot directions\n\nShare of hypotheses detected as a "
            "language other than the target; \"undetected\" hypotheses (no stop word or "
            "language-specific letter, or a tie) are counted apart.\n\n" + table(header, rows))


def section_unseen(groups):
    title = "## Unseen pairs under lang-pair routing\n\n"
    g = groups.get("lang_pair_lang_pair", [])
    if not g:
        return title + "lang-pair / lang-pair: not yet run."
    rows, notes, policies = [], [], []
    for r in g:
        unseen = r.get("unseen_pairs") or {}
        if "skipped" in unseen:
            notes.append(f"seed {r['seed']}: {unseen['skipped']}.")
            continue
        by_policy = unseen_policies(r)
        policies = sorted(by_policy)
        for pair in ZERO_SHOT:
            recs = [by_policy[p].get(pair) for p in policies]
            if any(x is None for x in recs):
                continue
            rows.append([f"{pair} (seed {r['seed']})", *[fmt(x["bleu"]) for x in recs],
                         *[fmt(x["off_target"], pct=True) for x in recs]])
        notes.append(f"seed {r['seed']}: the checkpoint's own setting is "
                     f"`{unseen['checkpoint_default']}`; the other was applied with "
                     f"`{unseen['override']}`.")
    text = (title + "A zero-shot pair's own gate row is never trained. `moe_unseen_pairs` "
            "chooses how lang-pair routing treats such a pair: `own_row` reads that untrained "
            "row, `target_mean` routes by the mean logits of the trained pairs into the same "
            "target language.")
    parts = [text]
    if rows:
        parts.append(table(["direction", *[f"BLEU {p}" for p in policies],
                            *[f"off-target {p}" for p in policies]], rows))
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts)


def section_params(groups):
    rows = []
    for v in VARIANTS:
        g = groups.get(v, [])
        if not g:
            rows.append([VARIANTS[v]["label"], "not yet run", "", "", ""])
            continue
        r = g[0]
        p = r["params"]
        rows.append([r["label"], f"{p['total']:,}", f"{p['active_per_token']:,}",
                     p["active_how"], f"{r['checkpoint_bytes']:,}"])
    return ("## Parameters\n\n" + table(
        ["model", "parameters", "active per token", "how 'active' is counted",
         "checkpoint_last.pt bytes (with Adam state)"], rows))


def section_pruning(results):
    rows = []
    for name, r in results.items():
        for pair, p in (r.get("pruned") or {}).items():
            full = r["directions"][pair]
            rows.append([f"`{name}`", pair, fmt(full["bleu"], digits=2), fmt(p["bleu"], digits=2),
                         "yes" if p["identical_hypotheses"] else "**no**",
                         f"{p['bytes']:,}", f"{p['bytes'] / r['checkpoint_bytes']:.1%}",
                         f"{p['params']:,}"])
    if not rows:
        return "## Pruned checkpoints\n\nNo task-routed run has finished yet."
    return ("## Pruned checkpoints\n\nEvery task-routed run, pruned for each trained direction "
            "with `taskmoe-prune CHECKPOINT --lang-pair PAIR` and re-evaluated.\n\n" + table(
                ["run", "direction", "BLEU full", "BLEU pruned", "identical hypotheses",
                 "pruned bytes", "of the full checkpoint", "pruned parameters"], rows))


def section_balance(groups):
    rows = []
    for v in BALANCE:
        wt, scope = balance_settings(v)
        g = groups.get(v, [])
        if not g:
            rows.append([wt, scope, "not yet run", "", "", "", ""])
            continue
        rows.append([wt, scope, cell(g, avg_value("trained", "bleu")),
                     cell(g, avg_value("trained", "chrf")), cell(g, avg_value("zero_shot", "bleu")),
                     cell(g, avg_value("zero_shot", "off_target"), pct=True),
                     fmt(stat([top1_weight(r) for r in g])[0], digits=3)])
    return ("## Balance loss for target / target routing\n\nThe top-1 weight is the larger of "
            "the two gate weights a task's route gives its experts, averaged over pruned pairs "
            "and layers (0.5 = a tie between the two experts).\n\n" + table(
                ["gate loss weight", "balance over", "trained avg BLEU", "trained avg chrF",
                 "zero-shot avg BLEU", "zero-shot off-target", "top-1 gate weight"], rows))


def section_heatmaps(results, out_dir: Path):
    parts, rows, layers = [], [], []
    for name, r in results.items():
        png = r.get("heatmap")
        if png and not Path(png).exists():  # recorded on another checkout: same name here
            png = str(REPO / "docs" / "img" / Path(png).name)
        if png and Path(png).exists():
            rel = os.path.relpath(png, out_dir)
            parts.append(f"### `{name}` ({r['label']})\n\n![{name}]({rel})")
        usage = r.get("routing_usage_valid") or {}
        if usage:
            layers += [l for l in usage if l not in layers]
            rows.append((name, r["label"], {l: (top2_share(u), pair_distance(u))
                                            for l, u in usage.items()},
                         {l: tag_only_distance(u) for l, u in usage.items()
                          if l.startswith("enc")}))
    intro = ("## Routing heatmaps\n\nShare of each language pair's (token, expert) assignments "
             "per expert, per MoE layer, on the validation set "
             "(`python -m research.study.heatmap`).")
    spec = ""
    if rows:
        enc_layers = [l for l in layers if l.startswith("enc")]
        experts = next(iter(results.values()))["config"]["shared_flags"]["--moe-expert-count"]
        spec = ("\n\nPer layer, two numbers from the same shares: how concentrated each pair's "
                "routing is (the mean over pairs of the share of its assignments on its two most "
                f"used experts: 1.00 as task routing with top-2, {2 / experts:.2f} when a pair "
                "spreads evenly over all experts), and how much it depends on the pair (the mean "
                "total-variation distance between two pairs' expert shares: 0 when every pair is "
                "routed alike, 1 when no two pairs share an expert). For encoder layers, a "
                "third: the same distance among en-de, en-fr and en-cs only, whose encoders read "
                "the same English sentences (Multi30k is 4-way parallel) with only the "
                "target-language tag of `--encoder-langtok tgt` differing, so it is what the tag "
                "alone does to the routing.\n\n" + table(
                    ["run", "routing", *[f"{l} {m}" for l in layers
                                         for m in ("top-2 share", "pair distance")],
                     *[f"{l} tag-only distance" for l in enc_layers]],
                    [[f"`{n}`", label, *[fmt(x, digits=2) for l in layers
                                         for x in v.get(l, (None, None))],
                      *[fmt(tag.get(l), digits=2) for l in enc_layers]]
                     for n, label, v, tag in rows]))
    return intro + spec + "\n\n" + ("\n\n".join(parts) if parts else "None yet.")


def section_commands(results):
    any_run = next(iter(results.values()))
    lines = ["## Commands", "", "```bash",
             current_command(any_run["commands"]["study"]),
             ".venv/bin/python -m research.study.report", "```", "",
             "Data preparation and, per run, the exact training command:", "", "```bash",
             any_run["commands"]["prepare"]]
    for name, r in results.items():
        lines += [f"# {name} (finished by: {current_command(r['commands']['study'])})",
                  r["commands"]["train"]]
    lines += ["# evaluation, e.g. en-de (every direction alike; zero-shot ones too)",
              any_run["commands"]["generate_example"], "```"]
    return "\n".join(lines)
