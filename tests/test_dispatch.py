import pytest
import torch
import torch.nn as nn

from fairseq_taskmoe.moe import dispatch as D
from fairseq_taskmoe.moe.experts import ExpertFFNs, FeedForward
from fairseq_taskmoe.moe.moe_layer import MoELayer
from fairseq_taskmoe.moe.routing import TokenGate, top_k_route


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


def _split_all_experts(experts, grouped, group_sizes):
    """The former ExpertFFNs.forward: split into all E groups, run the non-empty ones."""
    outputs = [expert(chunk) for expert, chunk in zip(experts.experts, grouped.split(group_sizes))
               if chunk.size(0) > 0]
    return torch.cat(outputs, dim=0) if outputs else grouped.new_zeros(grouped.shape)


def test_experts_visit_only_groups_with_tokens_with_identical_outputs_and_gradients():
    """A task-routed batch sends every token to k of E experts: only those run, and outputs and
    gradients (input and expert weights) are bit-identical to splitting all E groups."""
    torch.manual_seed(0)
    E = 32
    experts = _experts(E=E)
    ran = []
    for e, expert in enumerate(experts.experts):
        expert.register_forward_pre_hook(lambda module, args, e=e: ran.append(e))
    for sizes in ([0] * 5 + [7] + [0] * 20 + [4] + [0] * 5,  # one task: 2 experts, 11 rows
                  [1] * E,  # every expert
                  [3] + [0] * (E - 2) + [2],  # the first and the last
                  [0] * E):  # nothing routed (all pads)
        x = torch.randn(sum(sizes), 6)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ran.clear()
        got = experts(x1, sizes)
        assert ran == [e for e, n in enumerate(sizes) if n]
        want = _split_all_experts(experts, x2, sizes)
        assert torch.equal(got, want)
        if not got.requires_grad:  # nothing routed: no expert ran
            continue
        proj = torch.randn_like(got)
        grads_got = torch.autograd.grad((got * proj).sum(), [x1, *experts.parameters()],
                                        allow_unused=True)
        grads_want = torch.autograd.grad((want * proj).sum(), [x2, *experts.parameters()],
                                         allow_unused=True)
        for a, b in zip(grads_got, grads_want):
            assert (a is None and b is None) or torch.equal(a, b)


def test_experts_refuse_group_sizes_that_do_not_cover_the_rows():
    experts = _experts(E=4)
    with pytest.raises(ValueError, match="group sizes sum to 3, but 5 rows were dispatched"):
        experts(torch.randn(5, 6), [1, 0, 2, 0])
