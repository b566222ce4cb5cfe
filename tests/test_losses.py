import math

import torch

from fairseq_taskmoe.losses import load_balancing_loss, router_z_loss
from fairseq_taskmoe.routing import RoutingDecision, top_k_route


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
