import torch

from fairseq_taskmoe.routing import (
    FrozenTaskRouting, SentenceGate, TaskGate, TaskIds, TokenGate, top_k_route,
)


def test_top_k_route_exact_values():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    d = top_k_route(logits, 2)
    assert d.expert_indices.tolist() == [[3, 2]]
    # renormalised top-2: softmax of (3, 2) = (e/(e+1), 1/(e+1))
    e = torch.e
    torch.testing.assert_close(d.expert_weights, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    d1 = top_k_route(logits, 1)  # k=1 keeps the raw probability (Switch)
    torch.testing.assert_close(d1.expert_weights, torch.softmax(logits, -1)[:, 3:])


def test_token_gate_routes_each_token_on_its_own_representation():
    gate = TokenGate(embed_dim=2, num_experts=3, top_k=1)
    with torch.no_grad():
        gate.wg.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    x = torch.tensor([[[5.0, 0.0], [0.0, 5.0]], [[-5.0, -5.0], [0.0, 5.0]]])  # [T=2, B=2, C=2]
    routed = torch.tensor([[True, True], [True, False]])  # last position of row 1 is pad
    d = gate(x, routed)
    assert d.expert_indices[:, 0].tolist() == [0, 1, 2]  # pad not routed


def test_task_gate_routes_whole_row_by_its_own_task():
    torch.manual_seed(0)
    gate = TaskGate("target", num_tasks=3, num_experts=8, top_k=2)
    T, B = 5, 3
    x = torch.randn(T, B, 4)
    routed = torch.ones(T, B, dtype=torch.bool)
    ids = TaskIds(src_lang=torch.tensor([0, 0, 1]), tgt_lang=torch.tensor([1, 2, 1]), num_langs=3)
    d = gate(x, routed, task_ids=ids)
    per_row = d.expert_indices.view(T, B, 2)
    for b in range(B):
        assert (per_row[:, b] == per_row[0, b]).all(), "a row's tokens must share experts"
        expected = gate.wg.weight[ids.tgt_lang[b]].topk(2).indices
        assert per_row[0, b].tolist() == expected.tolist()
    # rows 0 and 2 have the same target language: same route, whatever the source
    assert per_row[0, 0].tolist() == per_row[0, 2].tolist()
    # the route does not depend on the token representations
    d2 = gate(torch.randn(T, B, 4), routed, task_ids=ids)
    assert torch.equal(d.expert_indices, d2.expert_indices)


def test_lang_pair_ids_distinguish_sources():
    ids = TaskIds(torch.tensor([0, 2]), torch.tensor([1, 1]), num_langs=3)
    assert ids.for_routing("lang_pair").tolist() == [1, 7]
    assert ids.for_routing("target").tolist() == [1, 1]
    assert ids.index_select(torch.tensor([1, 1, 0])).src_lang.tolist() == [2, 2, 0]


def test_sentence_gate_encoder_uses_mean_of_non_pad_tokens():
    gate = SentenceGate(embed_dim=2, num_experts=2, top_k=1, causal=False)
    with torch.no_grad():
        gate.wg.weight.copy_(torch.eye(2))
    x = torch.tensor([[[1.0, 3.0]], [[3.0, 1.0]], [[100.0, 0.0]]])  # [T=3, B=1, C=2]
    routed = torch.tensor([[True], [True], [False]])  # the 100 is padding
    logits = gate.logits(x, routed)
    torch.testing.assert_close(logits, torch.tensor([[2.0, 2.0], [2.0, 2.0]]))


def test_sentence_gate_decoder_incremental_equals_full():
    torch.manual_seed(0)
    gate = SentenceGate(embed_dim=4, num_experts=4, top_k=2, causal=True)
    x = torch.randn(6, 2, 4)
    routed = torch.ones(6, 2, dtype=torch.bool)
    full = gate.logits(x, routed).view(6, 2, 4)
    state = {}
    steps = [gate.logits(x[t : t + 1], routed[t : t + 1], incremental_state=state)
             for t in range(6)]
    torch.testing.assert_close(torch.stack(steps).view(6, 2, 4), full)
    # beam reordering moves the running mean with its row
    gate.reorder_incremental_state(state, torch.tensor([1, 1]))
    assert torch.equal(state[gate.state_key]["sum"][0], state[gate.state_key]["sum"][1])


def test_eval_routing_is_deterministic():
    torch.manual_seed(0)
    gate = TokenGate(8, 4, 2).eval()
    x = torch.randn(3, 2, 8)
    routed = torch.ones(3, 2, dtype=torch.bool)
    a, b = gate(x, routed), gate(x, routed)
    assert torch.equal(a.expert_indices, b.expert_indices)
    assert torch.equal(a.expert_weights, b.expert_weights)


def test_frozen_routing_refuses_unserved_task():
    frozen = FrozenTaskRouting("target", num_tasks=3, slots=1, served="*-de")
    frozen.slot_indices[1] = 0
    frozen.slot_weights[1] = 1.0
    routed = torch.ones(2, 1, dtype=torch.bool)
    ok = TaskIds(torch.tensor([0]), torch.tensor([1]), 3)
    assert frozen(None, routed, task_ids=ok).expert_indices.tolist() == [[0], [0]]
    bad = TaskIds(torch.tensor([0]), torch.tensor([2]), 3)
    try:
        frozen(None, routed, task_ids=bad)
    except RuntimeError as err:
        assert "serves only *-de" in str(err)
    else:
        raise AssertionError("an unserved task must be refused")
