from conftest import build_task_and_model
from fairseq_taskmoe.moe.analysis import collect_routing_counts, usage_by_pair
from tiny_data import LANGS


def test_routing_counts_per_pair_and_layer(tiny_data):
    args, task, model = build_task_and_model(
        tiny_data, ["--encoder-moe-routing", "token", "--decoder-moe-routing", "target"])
    totals = collect_routing_counts(model, task, "valid")
    assert set(totals) == {"enc1", "dec1"}
    dataset = task.dataset("valid")
    target_tokens = sum(int(dataset.size(i)[1]) for i in range(len(dataset)))
    assert int(totals["dec1"].sum()) == 2 * target_tokens  # every real token, top-2, no pads
    assert totals["enc1"].shape == (9, 4)  # 3 languages -> 9 pair ids
    usage = usage_by_pair(totals, LANGS)
    assert set(usage["dec1"]) == {"en-de", "de-en", "en-fr"}
    for pair, shares in usage["dec1"].items():  # target routing: k=2 experts, half each
        assert sorted(shares)[-2:] == [0.5, 0.5] and sum(s > 0 for s in shares) == 2
    # token routing spreads a pair over more experts than task routing does
    assert max(sum(s > 0 for s in shares) for shares in usage["enc1"].values()) > 2
