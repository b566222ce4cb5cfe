import pytest
import math

import torch

from fairseq_taskmoe.moe.losses import load_balancing_loss, router_z_loss
from fairseq_taskmoe.moe.routing import RoutingDecision, top_k_route


def test_balance_loss_uniform_routing_is_one():
    E = 4
    # 8 tokens, top-1 spread evenly, uniform router probabilities
    logits = torch.zeros(8, E)
    indices = torch.tensor([[i % E, (i + 1) % E] for i in range(8)])
    d = RoutingDecision(indices, torch.full((8, 2), 0.5), logits)
    torch.testing.assert_close(load_balancing_loss(d, E), torch.tensor(1.0))


def test_balance_loss_total_collapse_is_num_experts():
    E = 4
    logits = torch.tensor([[1e4, 0.0, 0.0, 0.0]] * 6)  # probability 1 on expert 0
    d = top_k_route(logits, 2)
    torch.testing.assert_close(load_balancing_loss(d, E), torch.tensor(float(E)))


def test_z_loss_hand_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    d = top_k_route(logits, 1)
    # logsumexp: log 2 and log 4
    want = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    torch.testing.assert_close(router_z_loss(d), torch.tensor(want))


def test_frozen_routing_has_no_aux_loss():
    d = RoutingDecision(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), None)
    assert float(load_balancing_loss(d, 4)) == 0.0 and float(router_z_loss(d)) == 0.0


def test_task_balance_counts_each_task_once():
    from fairseq_taskmoe.moe.losses import task_balancing_loss
    from fairseq_taskmoe.moe.routing import top_k_route

    # task 0 (9 tokens) prefers expert 0, task 1 (1 token) expert 1: by tokens the batch looks
    # collapsed onto expert 0, by tasks it is balanced
    rows = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    task = torch.tensor([0] * 9 + [1])
    decision = top_k_route(rows[task], 1)
    by_task = task_balancing_loss(decision, task, 2)
    p = torch.softmax(rows, -1)[0, 0]
    # f = (1/2, 1/2), P = (mean of the two rows) = (1/2, 1/2) -> 2 * (1/4 + 1/4) = 1
    assert float(by_task) == pytest.approx(1.0)
    by_token = load_balancing_loss(decision, 2)
    assert float(by_token) == pytest.approx(2 * (0.9 * (0.9 * p + 0.1 * (1 - p))
                                                 + 0.1 * (0.9 * (1 - p) + 0.1 * p)))
