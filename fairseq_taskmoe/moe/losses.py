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


def task_balancing_loss(decision: RoutingDecision, task_of_token: Tensor,
                        num_experts: int) -> Tensor:
    """The same loss with each task of the batch counted once instead of each token.

    task_of_token: [N] task id of every routed token. With task gates all tokens of a task share
    one distribution, so the token-level loss weighs tasks by their token counts; here every
    task present is one unit (f_e: share of the tasks whose top-1 is e; P_e: mean over tasks).
    """
    if decision.router_logits is None or task_of_token.numel() == 0:
        return decision.expert_weights.new_zeros(())
    tasks, inverse = torch.unique(task_of_token, return_inverse=True)  # [U], [N]
    N = task_of_token.numel()
    first = torch.full((tasks.numel(),), N, dtype=torch.long, device=task_of_token.device)
    first = first.scatter_reduce(0, inverse, torch.arange(N, device=first.device), "amin")
    one_per_task = RoutingDecision(decision.expert_indices[first], decision.expert_weights[first],
                                   decision.router_logits[first])
    return load_balancing_loss(one_per_task, num_experts)
