"""Routing statistics per task and layer, for analysis (usage tables, heatmaps).

Runs a model over a dataset split (teacher-forced, eval mode) and sums each MoE layer's
`counts_by_pair` ([P, E]: expert assignments per language-pair id and expert).
"""

from typing import Dict

import torch
from torch import Tensor


@torch.no_grad()
def collect_routing_counts(model, task, split: str, max_tokens: int = 4000) -> Dict[str, Tensor]:
    """{layer name (enc1, dec3, ...): counts [P, E]} summed over `split`; P = len(langs)^2,
    row `src * L + tgt`."""
    if split not in task.datasets:
        task.load_dataset(split)
    itr = task.get_batch_iterator(task.dataset(split), max_tokens=max_tokens,
                                  max_positions=task.max_positions(), seed=1)
    model.eval()
    totals: Dict[str, Tensor] = {}
    for batch in itr.next_epoch_itr(shuffle=False):
        _, extra = model(**batch["net_input"])
        for name, stats in extra.get("moe_stats", []):
            if stats.counts_by_pair is not None:
                totals[name] = totals.get(name, 0) + stats.counts_by_pair.cpu()
    return totals


def usage_by_pair(totals: Dict[str, Tensor], langs) -> Dict[str, Dict[str, list]]:
    """{layer: {"en-de": [share of that pair's assignments per expert], ...}}, pairs present."""
    L = len(langs)
    out = {}
    for name, counts in totals.items():
        rows = {}
        for pid in range(counts.size(0)):
            total = counts[pid].sum()
            if total > 0:
                rows[f"{langs[pid // L]}-{langs[pid % L]}"] = (counts[pid] / total).tolist()
        out[name] = rows
    return out
