"""fairseq_taskmoe/deploy/params.py: parameters in total and active per token."""

import torch

from fairseq_taskmoe.deploy.params import active_parameters, expert_units


def _expert(d=4, f=6):
    return {"fc1.weight": torch.zeros(f, d), "fc1.bias": torch.zeros(f),
            "fc2.weight": torch.zeros(d, f), "fc2.bias": torch.zeros(d)}


def _state(units_per_layer, shared=100):
    state = {"encoder.embed_tokens.weight": torch.zeros(shared)}
    for layer, units in units_per_layer.items():
        for u, unit in enumerate(units):
            for k, v in unit.items():
                state[f"{layer}.ffn.experts.experts.{u}.{k}"] = v
        state[f"{layer}.ffn.router.wg.weight"] = torch.zeros(len(units), 4)
    return state


def test_active_parameters_subtracts_idle_experts():
    per_expert = 6 * 4 + 6 + 4 * 6 + 4  # 58
    state = _state({"encoder.layers.1": [_expert() for _ in range(8)],
                    "decoder.layers.1": [_expert() for _ in range(8)]})
    total = 100 + 2 * (8 * per_expert + 8 * 4)
    assert expert_units(state) == {f"{s}.layers.1.ffn": {u: per_expert for u in range(8)}
                                   for s in ("encoder", "decoder")}
    assert active_parameters(state, top_k=2) == total - 2 * 6 * per_expert


def test_active_parameters_of_pruned_and_dense_models_is_their_total():
    merged = _state({"decoder.layers.1": [_expert(f=12)]})  # one merged FFN (k=2 experts)
    unmerged = _state({"decoder.layers.1": [_expert(), _expert()]})
    dense = {"encoder.layers.0.fc1.weight": torch.zeros(6, 4)}
    for state in (merged, unmerged, dense):
        assert active_parameters(state, top_k=2) == sum(v.numel() for v in state.values())
