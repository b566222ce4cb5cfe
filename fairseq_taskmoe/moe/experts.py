"""Expert FFNs. They know nothing about routing: they get token groups and return outputs.

Axis legend: A grouped tokens, C channels, F FFN inner dim.
"""

from typing import Callable, Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class FeedForward(nn.Module):
    """`fc2(dropout(act(fc1(x))))`, the transformer FFN. Also the shape of a merged expert."""

    def __init__(self, embed_dim: int, ffn_dim: int, activation: Callable, activation_dropout):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.activation = activation
        self.activation_dropout = activation_dropout

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(self.activation(self.fc1(x))))

    def params(self) -> Dict[str, Tensor]:
        """The weights under their state-dict names (fc1.weight, ...), as merge_ffns takes them."""
        return {"fc1.weight": self.fc1.weight, "fc1.bias": self.fc1.bias,
                "fc2.weight": self.fc2.weight, "fc2.bias": self.fc2.bias}

    def apply_params(self, x: Tensor, params: Dict[str, Tensor]) -> Tensor:
        """This FFN's computation with other weights (a merged FFN of any inner dim)."""
        hidden = self.activation(F.linear(x, params["fc1.weight"], params["fc1.bias"]))
        return F.linear(self.activation_dropout(hidden), params["fc2.weight"], params["fc2.bias"])


def merge_ffns(units: Sequence[Dict[str, Tensor]], weights: Sequence[float]) -> Dict[str, Tensor]:
    """One FFN equal to sum_k w_k * FFN_k, exactly (the activation is element-wise):
    fc1 = [W1_a; W1_b], b1 = [b1_a; b1_b], fc2 = [w_a*W2_a | w_b*W2_b], b2 = w_a*b2_a + w_b*b2_b.
    The scaled sums are computed in fp64 and cast back. Used by taskmoe-prune and by the eval-time
    merged FFNs of a full model (task_merge.py), so both hold bit-identical weights."""
    dtype = units[0]["fc1.weight"].dtype
    w = [torch.tensor(float(g), dtype=torch.float64) for g in weights]
    return {
        "fc1.weight": torch.cat([u["fc1.weight"] for u in units], 0),
        "fc1.bias": torch.cat([u["fc1.bias"] for u in units], 0),
        "fc2.weight": torch.cat([g * u["fc2.weight"].double() for g, u in zip(w, units)],
                                1).to(dtype),
        "fc2.bias": sum(g * u["fc2.bias"].double() for g, u in zip(w, units)).to(dtype),
    }


class ExpertFFNs(nn.Module):
    """A list of FFNs, possibly of different inner dims (merged experts are wider).

    State-dict keys are `experts.{i}.fc1.weight` etc., so the pruner renumbers experts with one
    regex on the index.
    """

    def __init__(self, embed_dim: int, ffn_dims: Sequence[int], activation, activation_dropout):
        super().__init__()
        self.experts = nn.ModuleList(
            FeedForward(embed_dim, dim, activation, activation_dropout) for dim in ffn_dims
        )

    def __len__(self):
        return len(self.experts)

    def forward(self, grouped: Tensor, group_sizes: List[int]) -> Tensor:
        """grouped: [A, C] rows sorted by expert; group_sizes: [E] ints summing to A.

        Only the experts that received tokens are visited: a task-routed batch touches k of E,
        and slicing all E groups (empty views included) cost ~0.2 ms per call at E = 128."""
        if sum(group_sizes) != grouped.size(0):
            raise ValueError(f"group sizes sum to {sum(group_sizes)}, but {grouped.size(0)} "
                             "rows were dispatched")
        outputs, start = [], 0
        for e, size in enumerate(group_sizes):
            if size:  # an expert without tokens costs nothing
                outputs.append(self.experts[e](grouped.narrow(0, start, size)))
                start += size
        if not outputs:
            return grouped.new_zeros(grouped.shape)
        return torch.cat(outputs, dim=0)
