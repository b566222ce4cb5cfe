"""Expert FFNs. They know nothing about routing: they get token groups and return outputs.

Axis legend: A grouped tokens, C channels, F FFN inner dim.
"""

from typing import Callable, List, Sequence

import torch
import torch.nn as nn
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
        """grouped: [A, C] rows sorted by expert; group_sizes: [E] ints summing to A."""
        outputs = [
            expert(chunk)
            for expert, chunk in zip(self.experts, grouped.split(group_sizes))
            if chunk.size(0) > 0  # an expert without tokens costs nothing
        ]
        if not outputs:
            return grouped.new_zeros(grouped.shape)
        return torch.cat(outputs, dim=0)
