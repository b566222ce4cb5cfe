import pytest
import torch

from fairseq_taskmoe.moe.routing import (
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


def test_token_routing_of_a_token_does_not_depend_on_the_rest_of_the_batch():
    """What makes incremental decoding route as full decoding: a token's route is a function
    of its own representation only (no batch-level normalisation or noise in eval)."""
    torch.manual_seed(0)
    gate = TokenGate(8, 4, 2).eval()
    x = torch.randn(3, 2, 8)
    routed = torch.ones(3, 2, dtype=torch.bool)
    whole = gate(x, routed)
    alone = gate(x[1:2, 1:2], routed[1:2, 1:2])  # token (t=1, b=1) in a batch of its own
    row = 1 * 2 + 1  # its row in the [N] order of the whole batch
    assert torch.equal(alone.expert_indices[0], whole.expert_indices[row])
    torch.testing.assert_close(alone.expert_weights[0], whole.expert_weights[row])


@pytest.mark.parametrize("gate_kind", ["token", "sentence"])
def test_gating_stays_fp32_under_autocast(gate_kind):
    """--amp / torch.autocast must not recast the gate's matmul to low precision."""
    torch.manual_seed(0)
    gate = (TokenGate(16, 8, 2) if gate_kind == "token" else SentenceGate(16, 8, 2, False)).eval()
    x = torch.randn(5, 3, 16)
    routed = torch.ones(5, 3, dtype=torch.bool)
    want = gate(x, routed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gate(x.bfloat16(), routed)
    assert got.router_logits.dtype == torch.float32
    # bf16 inputs are rounded, so compare with the fp32 gate on the same rounded inputs
    want = gate(x.bfloat16().float(), routed)
    assert torch.equal(got.router_logits, want.router_logits)
    assert torch.equal(got.expert_indices, want.expert_indices)


def test_task_ids_with_an_unknown_side_fail_clearly_only_when_needed():
    ids = TaskIds(None, torch.tensor([1, 2]), num_langs=3, origin="the batch's language tags")
    assert ids.for_routing("target").tolist() == [1, 2]
    with pytest.raises(RuntimeError, match="lang_pair routing needs each row's source language"):
        ids.for_routing("lang_pair")
    assert not ids.complete
    assert ids.index_select(torch.tensor([1])).src_lang is None


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


def test_unseen_pairs_read_the_mean_of_the_trained_rows_into_their_target():
    from fairseq_taskmoe.moe.routing import task_logit_table, unseen_pair_mixing

    L = 3  # en, de, fr; trained: en-de, fr-de, de-en
    trained = [(0, 1), (2, 1), (1, 0)]
    mixing = unseen_pair_mixing(L, trained, "target_mean")
    table = torch.randn(L * L, 4)
    mixed = task_logit_table(table, mixing)
    for s, t in trained:  # trained pairs keep their own row
        assert torch.equal(mixed[s * L + t], table[s * L + t])
    torch.testing.assert_close(mixed[2 * L + 0], table[1 * L + 0])  # fr-en <- de-en
    # no trained pair into fr: en-fr keeps its own row
    assert torch.equal(mixed[0 * L + 2], table[0 * L + 2])
    assert unseen_pair_mixing(L, trained, "own_row") is None
    gate = TaskGate("lang_pair", L * L, 4, 2, mixing)
    ids = TaskIds(torch.tensor([2]), torch.tensor([0]), L)  # fr-en, zero-shot
    got = gate.logits(torch.zeros(1, 1, 8), torch.ones(1, 1, dtype=torch.bool), task_ids=ids)
    torch.testing.assert_close(got[0], gate.wg.weight[1 * L + 0])
