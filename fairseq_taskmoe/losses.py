"""Auxiliary router losses, as pure functions of a layer's routing decision.

Axis legend: N routed (non-pad) tokens, E experts.
"""

import torch
from torch import Tensor

from .routing import RoutingDecision


def load_balancing_loss(decision: RoutingDecision, num_experts: int) -> Tensor:
    """GShard / Switch load-balancing loss: `E * sum_e f_e * P_e`.

    f_e: share of tokens whose top-1 expert is e; P_e: mean router probability of e (Lepikhin et
    al. 2020, eq. 4 scaled as in Fedus et al. 2021, eq. 4). Uniform routing gives 1, total collapse
    onto one expert gives E. Only routed (non-pad) tokens are passed in, so pads never count.
    """
    if decision.router_logits is None or decision.expert_indices.numel() == 0:
        return decision.expert_weights.new_zeros(())
    top1 = decision.expert_indices[:, 0]  # [N]
    fraction = torch.bincount(top1, minlength=num_experts).float() / top1.numel()  # [E]
    mean_prob = decision.router_probs.mean(dim=0)  # [E]
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(decision: RoutingDecision) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (Zoph et al. 2022, eq. 5)."""
    if decision.router_logits is None or decision.router_logits.numel() == 0:
        return decision.expert_weights.new_zeros(())
    return torch.logsumexp(decision.router_logits, dim=-1).pow(2).mean()
