import torch
import torch.nn as nn

from fairseq_taskmoe import dispatch as D
from fairseq_taskmoe.experts import ExpertFFNs, FeedForward
from fairseq_taskmoe.moe_layer import MoELayer
from fairseq_taskmoe.routing import TokenGate, top_k_route


def _experts(C=6, F=10, E=4):
    return ExpertFFNs(C, [F] * E, torch.relu, nn.Identity())


def naive_moe(x, indices, weights, experts, capacity=None):
    """Reference: per token, per slot, loop over experts; capacity counted in GShard order."""
    N, K = indices.shape
    out = torch.zeros_like(x)
    load = [0] * len(experts)
    keep = torch.ones(N, K, dtype=torch.bool)
    for k in range(K):  # top-1 choices claim capacity first
        for n in range(N):
            e = int(indices[n, k])
            if capacity is not None and load[e] >= capacity:
                keep[n, k] = False
            else:
                load[e] += 1
    for n in range(N):
        for k in range(K):
            if keep[n, k]:
                out[n] += weights[n, k] * experts.experts[int(indices[n, k])](x[n])
    return out, int((~keep).sum())


def test_vectorised_dispatch_equals_naive_loop():
    torch.manual_seed(0)
    experts = _experts()
    x = torch.randn(13, 6)
    d = top_k_route(torch.randn(13, 4), 2)
    for capacity in (None, 3, 7):
        plan = D.make_plan(d.expert_indices, 4, capacity)
        expert_out = experts(D.dispatch(x, plan), plan.group_sizes())
        got = D.combine(expert_out, d.expert_weights, plan, 13)
        want, dropped = naive_moe(x, d.expert_indices, d.expert_weights, experts, capacity)
        torch.testing.assert_close(got, want)
        assert int(plan.dropped) == dropped


def test_dropless_plan_touches_only_chosen_experts():
    indices = torch.tensor([[2, 0]] * 5)  # one task: every token to experts 2 and 0
    plan = D.make_plan(indices, num_experts=8)
    assert plan.group_sizes() == [5, 0, 5, 0, 0, 0, 0, 0]
    assert int(plan.dropped) == 0


def test_capacity_drops_second_choices_first():
    indices = torch.tensor([[0, 1], [0, 1], [1, 0]])
    plan = D.make_plan(indices, num_experts=2, capacity=2)
    # top-1 choices: 0, 0, 1 (all kept); top-2 choices: 1 (kept, expert 1 has room), 1, 0 dropped
    assert plan.expert_counts.tolist() == [2, 2]
    assert int(plan.dropped) == 2
    assert D.expert_capacity(num_tokens=10, top_k=2, num_experts=4, factor=1.25) == 7


def test_one_expert_moe_equals_dense_ffn_outputs_and_gradients():
    torch.manual_seed(0)
    C, F = 6, 10
    moe = MoELayer(TokenGate(C, 1, 1), _experts(C, F, 1), capacity_factor=None)
    dense = FeedForward(C, F, torch.relu, nn.Identity())
    dense.load_state_dict(moe.experts.experts[0].state_dict())
    x = torch.randn(4, 3, C)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_moe, _ = moe(x1)
    y_dense = dense(x2)
    torch.testing.assert_close(y_moe, y_dense)  # a 1-expert softmax weight is exactly 1
    (y_moe * torch.arange(C)).sum().backward()
    (y_dense * torch.arange(C)).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for p_moe, p_dense in zip(moe.experts.experts[0].parameters(), dense.parameters()):
        torch.testing.assert_close(p_moe.grad, p_dense.grad)


def test_pads_are_not_routed_and_get_zero_ffn_output():
    torch.manual_seed(0)
    moe = MoELayer(TokenGate(6, 4, 2), _experts(), capacity_factor=None).eval()
    x = torch.randn(5, 2, 6)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    y, stats = moe(x, pad)
    assert torch.all(y[3:, 1] == 0)
    assert stats.assignments == (10 - 2) * 2
    assert int(stats.expert_counts.sum()) == 16
    # padding content does not change the outputs of real tokens
    x2 = x.clone()
    x2[3:, 1] = 1e3
    y2, _ = moe(x2, pad)
    torch.testing.assert_close(y, y2)
