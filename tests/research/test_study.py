"""The study runner's and report's pure parts (no training): research/study/ (the grid of runs,
the runner, evaluation's scoring and pruning log, the report, the heatmap)."""

import json

import pytest

from research.common import generate_command
from research.study import evaluation, grid, heatmap, runner
from research.study.report import distillation, page, stats


# ---------------------------------------------------------------- runner


def test_runs_and_selection():
    names = [r[0] for r in grid.runs()]
    assert len(names) == 22 and len(set(names)) == 22
    for v in ("dense", "token_token", "token_target", "sentence_sentence", "lang_pair_lang_pair",
              "target_target_gl0", "target_target_gl0.1"):
        assert f"{v}-s1" in names and f"{v}-s2" in names
    args = runner.parse_args(["--only", "dense,token_target-s2"])
    assert [r[0] for r in args.selected] == ["dense-s1", "dense-s2", "token_target-s2"]
    with pytest.raises(SystemExit):
        runner.parse_args(["--only", "nonsense"])
    with pytest.raises(SystemExit):
        runner.parse_args(["--directions", "en-xx"])


def test_train_command_shares_the_backbone(tmp_path):
    cmd = [str(c) for c in grid.train_command(tmp_path, "token_target", 2, tmp_path / "ck", 300)]
    joined = " ".join(cmd)
    for flag, value in grid.SHARED_FLAGS.items():
        assert flag in cmd and (value is None or cmd[cmd.index(flag) + 1] == str(value))
    assert "--encoder-moe-routing token --decoder-moe-routing target" in joined
    assert "--max-update 300" in joined and "--seed 2" in joined
    assert "--lang-pairs en-de,de-en,en-fr,fr-en,en-cs,cs-en" in joined
    dense = [str(c) for c in grid.train_command(tmp_path, "dense", 1, tmp_path, 10)]
    assert dense[dense.index("--moe-freq") + 1] == "0"


def test_gpu_preset_scales_up_in_its_own_folders(tmp_path):
    cpu, gpu = runner.parse_args([]), runner.parse_args(["--preset", "gpu"])
    assert (cpu.work.name, cpu.results.name, cpu.max_update) == ("study", "study", 1000)
    assert (gpu.work.name, gpu.results.name, gpu.img_dir.name) == ("study-gpu",) * 3
    assert gpu.max_update == 30000
    assert runner.parse_args(["--preset", "gpu", "--max-update", "7"]).max_update == 7
    cmd = [str(c) for c in grid.train_command(tmp_path, "target_target", 1, tmp_path, 5,
                                               preset="gpu")]
    assert "--cpu" not in cmd and "--amp" in cmd
    assert cmd[cmd.index("--encoder-embed-dim") + 1] == "512"
    assert cmd[cmd.index("--moe-expert-count") + 1] == "32"
    assert "--cpu" in [str(c) for c in grid.train_command(tmp_path, "dense", 1, tmp_path, 5)]
    gen = generate_command(tmp_path, tmp_path / "c.pt", "en-de")
    assert "--cpu" in gen and "--cpu" not in grid.on_device(gen, "gpu")
    assert grid.on_device(gen, "cpu") == gen


def test_skip_finished_runs_without_touching_data(tmp_path, capsys):
    results, work = tmp_path / "results", tmp_path / "work"
    results.mkdir()
    (results / "dense-s1.json").write_text(json.dumps(fake_result("dense-s1", "dense", 1)))
    args = ["--work", str(work), "--results", str(results)]
    assert runner.main(["--only", "dense-s1", *args]) == 0
    assert "exists, skipped" in capsys.readouterr().out
    assert not work.exists()  # no data preparation, no training
    runner.main(["--list", "--only", "dense", *args])
    listed = capsys.readouterr().out
    assert "dense-s1" in listed and "done" in listed and "not started" in listed


def test_run_state_follows_the_files(tmp_path):
    args = runner.parse_args(["--work", str(tmp_path / "w"), "--results", str(tmp_path / "r")])
    run_dir = tmp_path / "w" / "runs" / "dense-s1"
    assert runner.run_state(args, "dense-s1")[0] == "not started"
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").write_text("x | train_inner | num_updates=25, y\nnum_updates=50,\n")
    assert runner.run_state(args, "dense-s1")[0] == ("training started (last logged update 50, "
                                                    "last checkpoint at update 0)")
    (run_dir / "train.done.json").write_text(json.dumps({"num_updates": 2000}))
    assert runner.run_state(args, "dense-s1")[0].startswith("trained (2000 updates)")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "dense-s1.json").write_text("{}")
    assert runner.run_state(args, "dense-s1")[0] == "done"


def test_parse_prune_log():
    text = ("serves: *-de\n"
            "  encoder.layers.1   target    pruned 8 -> 1 FFN (dim 1024) merged (one route)"
            "   de: e3*0.612 e5*0.388\n"
            "  decoder.layers.1   token     kept whole (8 experts: routing depends on the input)\n"
            "parameters: 10 -> 5 (50.0%)\n")
    assert evaluation.parse_prune_log(text) == {"encoder.layers.1": [[3, 0.612], [5, 0.388]]}


# ---------------------------------------------------------------- report


def fake_result(name, variant, seed, base=20.0, heatmap=None):
    """A results JSON shaped like evaluation.evaluate()'s, with made-up scores."""
    directions = {}
    for i, pair in enumerate(grid.DIRECTIONS):
        zero = pair in grid.ZERO_SHOT
        directions[pair] = {"zero_shot": zero, "bleu": base + i / 10 - (8 if zero else 0),
                            "chrf": 40.0 + i, "on_target": 0.9, "off_target": 0.1 if zero else 0,
                            "undetected": 0.0, "tokens_per_s": 100.0}
    spec = grid.VARIANTS[variant]
    routing = spec["routing"]
    task_routed = bool(routing and set(routing) & grid.TASK_ROUTING)
    pruned = {p: {"bleu": directions[p]["bleu"], "chrf": 1.0, "on_target": 1.0,
                  "off_target": 0.0, "undetected": 0.0, "identical_hypotheses": True,
                  "bytes": 12_000_000, "params": 5_000_000, "params_active_per_token": 5_000_000,
                  "tokens_per_s": 1.0, "kept_experts": {"encoder.layers.1": [[1, 0.6], [2, 0.4]]}}
              for p in grid.TRAINED} if task_routed else {}

    def avg(names, key):
        return sum(directions[d][key] for d in names) / len(names)

    return {
        "run": name, "variant": variant, "label": spec["label"], "seed": seed,
        "routing": {"encoder": routing[0], "decoder": routing[1]} if routing else None,
        "task_routed": task_routed,
        "config": {"shared_flags": grid.SHARED_FLAGS, "variant_flags": spec["flags"]},
        "budget": {"max_update": 2000, "updates_done": 2000, "max_tokens": 4096,
                   "updates_x_max_tokens": 2000 * 4096},
        "data": {"train_lines_per_direction": "all (29,000)", "trained_directions": grid.TRAINED,
                 "zero_shot_directions": grid.ZERO_SHOT, "test_set": "test_2016_flickr",
                 "evaluated_directions": grid.DIRECTIONS},
        "commands": {"study": "-m research.study", "prepare": "prepare_multi30k.py --out X",
                     "train": f"fairseq-train X --seed {seed}",
                     "generate_example": "fairseq-generate X",
                     "generate_max_len_b": None},
        "wall_seconds": {"training": 1500.0, "evaluation": 600.0, "evaluation_steps": {}},
        "params": {"total": 9_000_000, "active_per_token": 5_000_000, "active_how": "test"},
        "checkpoint_bytes": 100_000_000,
        "signatures": {"bleu": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
                       "chrf": "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0"},
        "langid": {"method": "stop words", "accuracy_on_test_references": {
            lang: {"on_target": 0.99, "off_target": 0.0, "undetected": 0.01}
            for lang in grid.LANGS}},
        "directions": directions,
        "averages": {"trained": {k: avg(grid.TRAINED, k) for k in ("bleu", "chrf")},
                     "zero_shot": {k: avg(grid.ZERO_SHOT, k)
                                   for k in ("bleu", "chrf", "off_target")}},
        "pruned": pruned, "unseen_pairs": {}, "heatmap": heatmap, "routing_usage_valid": None,
    }


def test_report_from_two_runs(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    png = tmp_path / "img" / "target_target-s1.png"
    png.parent.mkdir()
    png.write_bytes(b"png")
    (results / "dense-s1.json").write_text(json.dumps(fake_result("dense-s1", "dense", 1)))
    (results / "target_target-s1.json").write_text(json.dumps(
        fake_result("target_target-s1", "target_target", 1, base=21.0, heatmap=str(png))))
    out = tmp_path / "docs" / "results.md"
    assert page.main(["--results", str(results), "--out", str(out)]) == 0
    md = out.read_text()
    # dense trained avg = 20 + mean(0..5)/10 = 20.25; target/target 21.25; Δ +1.0
    assert "| dense | 20.0 | +0.0 | 20.2 | +0.0 |" in md
    assert "| target / target | 22.9 | +2.9 | 21.2 | +1.0 |" in md
    assert "| token / target | 23.6 | +3.6 | not yet run |" in md
    assert "not yet run" in md and "`token_token-s2`" in md
    assert "target / target +1.0 (paper +2.9)" in md  # the reading, from the data
    assert "6 of 6 pruned checkpoints produce hypotheses identical" in md
    assert "![target_target-s1](../img/target_target-s1.png)" in md
    assert "fairseq-train X --seed 1" in md
    for absent in ("None", "nan", "{", "TODO"):
        assert absent not in md.replace("{'", ""), absent


def test_report_mean_and_spread_over_seeds(tmp_path):
    results = {"dense-s1": fake_result("dense-s1", "dense", 1, base=20.0),
               "dense-s2": fake_result("dense-s2", "dense", 2, base=21.0)}
    md = page.render(results, tmp_path)
    assert "20.8 ± 0.5" in md  # trained averages 20.25 and 21.25
    assert "dense ±0.50" in md
    empty = page.render({}, tmp_path)
    assert "No run has finished yet." in empty and empty.count("not yet run") == len(grid.runs())


def test_report_unseen_pair_policies(tmp_path):
    r = fake_result("lang_pair_lang_pair-s1", "lang_pair_lang_pair", 1)
    zero = {p: r["directions"][p] for p in grid.ZERO_SHOT}
    own = {p: dict(v, bleu=v["bleu"] - 5, off_target=0.5) for p, v in zero.items()}
    r["unseen_pairs"] = {"option": "moe_unseen_pairs", "checkpoint_default": "target_mean",
                         "override": "--model-overrides X",
                         "directions": {"target_mean": zero, "own_row": own}}
    md = page.render({r["run"]: r}, tmp_path)
    assert "| direction | BLEU own_row | BLEU target_mean | off-target own_row |" in md
    assert "| de-fr (seed 1) | 7.6 | 12.6 | 50.0% | 10.0% |" in md  # 20 + 0.6 - 8 = 12.6
    assert "`own_row` 7.9, `target_mean` 12.8" in md  # zero-shot averages 12.85 - 5, 12.85
    r["unseen_pairs"] = {"skipped": "skipped: no option"}
    assert "- seed 1: skipped: no option." in page.render({r["run"]: r}, tmp_path)


def test_heatmap_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    usage = {"dec1": {"en-de": [0.5, 0.5, 0.0, 0.0], "en-fr": [0.0, 0.25, 0.25, 0.5]},
             "enc1": {"en-de": [1.0, 0.0, 0.0, 0.0], "en-fr": [0.0, 0.0, 0.5, 0.5]}}
    out = tmp_path / "h.png"
    heatmap.draw(usage, out, title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        heatmap.draw({}, tmp_path / "dense.png")


def test_report_distillation_speed_and_claim(tmp_path):
    results = {n: fake_result(n, v, 1, base=b) for n, v, b in [
        ("dense-s1", "dense", 20.0), ("token_token-s1", "token_token", 22.0),
        ("target_target-s1", "target_target", 21.0)]}
    student = fake_result("distilled-s1", "dense", 1, base=20.5)
    student.update(variant="distilled", distillation={"data": {"directions": {
        "en-de": {"mean_pieces_teacher": 13.0, "mean_pieces_reference": 16.0}}}},
        speed={"pair": "en-de", "beam": 5, "how": "alternated",
               "student": {"sentences_per_s": 20.0, "tokens_per_s": 400.0, "params": 7},
               "pruned": {"sentences_per_s": 40.0, "tokens_per_s": 500.0, "params": 7}})
    results["distilled-s1"] = student
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"date": "d", "command": "bench", "experts": {"8": {"variants": {
        "c": {"throughput": {"decode": {"peak": 600.0}}},
        "e": {"throughput": {"decode": {"peak": 500.0}}}}}}}))
    notes = " ".join(distillation.speed_notes(student["speed"], {
        "en-de": {"mean_pieces_teacher": 13.0, "mean_pieces_reference": 16.0}}, bench))
    assert "0.50x the pruned model's sentences/s and 0.80x its tokens/s" in notes
    assert "20.0 generated tokens per sentence against 12.5" in notes
    assert "training targets average 13.0 pieces (references 16.0)" in notes
    assert "gives the pruned task-MoE 600 tokens/s" in notes and "(1.20x)" in notes
    assert "(1.20x)" not in " ".join(distillation.speed_notes(student["speed"], None,
                                                              tmp_path / "absent.json"))
    md = page.render(results, tmp_path)
    # trained averages: dense 20.25, token 22.25, pruned target 21.25, student 20.75
    assert "the student keeps 25% (+0.5 BLEU over dense)" in md
    assert "the pruned target / target 50% (+1.0), +0.5 BLEU over the student" in md
    assert "Direction as in the paper" in md
    assert "Balanced over tasks" not in md  # no such run yet
    results["target_target_tasks-s1"] = fake_result("target_target_tasks-s1",
                                                    "target_target_tasks", 1, base=22.0)
    md = page.render(results, tmp_path)
    assert "the pruned target / target keeps 100% (+2.0 BLEU over dense), +1.5 BLEU" in md
    # its Table 1 row has no paper figures: the paper balances its own way
    assert "| target / target, balance over tasks (the plugin's default) | – | – | 22.2 | +2.0 " \
        "| 100% |" in md
    student["directions"] = fake_result("x", "dense", 1, base=21.5)["directions"]
    assert "Unlike the paper, the student is not behind" in page.render(results, tmp_path)


def test_score_reports_length_ratio_and_runaway_hypotheses(tmp_path):
    (tmp_path / "text").mkdir()
    refs = ["ein Mann sitzt auf einer Bank .", "zwei Hunde spielen im Schnee .",
            "eine Frau liest ein Buch ."]
    (tmp_path / "text" / "test.de").write_text("\n".join(refs) + "\n")
    hyps = {0: refs[0], 1: " ".join([refs[1]] * 3), 2: refs[2]}
    got = evaluation.score(hyps, tmp_path, "en-de")
    words = [len(r.split()) for r in refs]
    assert got["length_ratio"] == round((words[0] + 3 * words[1] + words[2]) / sum(words), 4)
    assert got["over_twice_reference"] == round(1 / 3, 4)
    assert evaluation.score(dict(enumerate(refs)), tmp_path, "en-de")["over_twice_reference"] == 0


def test_routing_concentration_and_pair_distance():
    task = {"en-de": [0.5, 0.5, 0, 0], "en-fr": [0, 0, 0.5, 0.5]}
    alike = {"en-de": [0.25] * 4, "en-fr": [0.25] * 4}
    assert stats.top2_share(task) == 1.0 and stats.top2_share(alike) == 0.5
    assert stats.pair_distance(task) == 1.0 and stats.pair_distance(alike) == 0.0
    half = {"en-de": [0.5, 0.5, 0, 0], "en-fr": [0.5, 0, 0.5, 0]}
    assert stats.pair_distance(half) == 0.5
    assert stats.top2_share({}) is None and stats.pair_distance({"a": [1]}) is None


def test_tag_only_distance_compares_the_pairs_from_one_source():
    usage = {"en-de": [1, 0, 0, 0], "en-fr": [0, 1, 0, 0], "en-cs": [0, 1, 0, 0],
             "de-en": [0, 0, 1, 0], "fr-en": [0, 0, 0, 1]}
    assert stats.tag_only_distance(usage) == pytest.approx(2 / 3)  # 1, 1, 0
    assert stats.tag_only_distance(usage, source="de") is None  # one pair only
    assert stats.span([0.731]) == "0.73" and stats.span([0.09, 0.04]) == "0.04-0.09"


def test_report_reads_the_tag_only_distance(tmp_path):
    def run(variant, enc_rows):
        r = fake_result(f"{variant}-s1", variant, 1)
        r["routing_usage_valid"] = {"enc1": dict(zip(("en-de", "en-fr", "en-cs", "de-en"),
                                                     enc_rows)),
                                    "dec1": {"en-de": [1, 0], "de-en": [0, 1]}}
        return r

    apart, alike = ([1, 0], [0, 1], [0, 1], [1, 0]), ([0.5, 0.5],) * 4
    results = {r["run"]: r for r in (run("sentence_sentence", apart),
                                     run("target_target", apart),
                                     run("token_token", alike))}
    md = page.render(results, tmp_path)
    assert "sends them to different experts (tag-only distance 0.67 in 1 seed, against " \
           "token / token's 0.00)" in md
    assert "| enc1 tag-only distance |" in md
    del results["token_token-s1"]  # nothing to compare against: no claim
    assert "tag-only distance 0.67" not in page.render(results, tmp_path)


def test_report_weighs_best_and_zero_shot_against_seed_noise(tmp_path):
    def runs(variant, bases):
        out = {f"{variant}-s{i + 1}": fake_result(f"{variant}-s{i + 1}", variant, i + 1, base=b)
               for i, b in enumerate(bases)}
        for r in out.values():
            r["unseen_pairs"] = {"skipped": "skipped: not under test"}
        return out

    # trained means: lang-pair 21.0 ± 0.5, target 20.6 ± 0.6 (level), token 19.0 ± 0.1 (not)
    results = {**runs("dense", [18, 18.2]), **runs("lang_pair_lang_pair", [20.5, 21.5]),
               **runs("target_target", [20, 21.2]), **runs("token_token", [18.9, 19.1])}
    md = page.render(results, tmp_path)
    assert ("lang-pair / lang-pair (21.2 BLEU), level within seed noise (the summed half-ranges) "
            "with target / target; among") in md
    assert "level with it within seed noise (-0.4 BLEU against a summed seed half-range of " \
           "1.1)" in md
    # zero-shot: a lead larger than the seeds' spread is stated as one
    results.update(runs("target_target", [23, 23.2]))
    md = page.render(results, tmp_path)
    assert "target routing is ahead by 2.1 BLEU, more than the seed noise, as in the paper" in md
    # balance settings: weight 0 (23.25 ± 0.4) is level with 0.01 over tokens (23.35 ± 0.1)
    results.update(runs("target_target_gl0", [22.6, 23.4]))
    md = page.render(results, tmp_path)
    assert "gate loss weight 0.01 over tokens has the best trained average (23.4 BLEU); spread " \
           "across settings 0.1 BLEU; level within seed noise with 1 of the other 1." in md


def test_report_compares_balance_scopes_against_seed_noise(tmp_path):
    def runs(tok, tasks):
        return {f"{v}-s{i + 1}": fake_result(f"{v}-s{i + 1}", v, i + 1, base=b)
                for v, bases in (("target_target", tok), ("target_target_tasks", tasks))
                for i, b in enumerate(bases)}

    # trained averages are base + 0.25: over tokens 20.25, 21.25; over tasks 22.25, 22.45
    md = page.render(runs((20.0, 21.0), (22.0, 22.2)), tmp_path)
    assert "over tokens 20.25, 21.25, over tasks 22.25, 22.45" in md
    assert "difference +1.60 BLEU against a summed seed half-range of 0.60: larger" in md
    md = page.render(runs((20.0, 22.0), (21.5, 22.0)), tmp_path)
    assert "difference +0.75 BLEU against a summed seed half-range of 1.25: not larger" in md
    assert "Balance scope" not in page.render(runs((20.0,), ()), tmp_path)


def test_a_run_stopped_at_its_last_update_is_finished_without_training(tmp_path, monkeypatch):
    """A run whose checkpoint_last.pt is at --max-update already (stopped right after that
    save) is recorded as trained, without starting fairseq-train; one past it is refused."""
    import torch

    from research.study import training

    save = tmp_path / "run" / "checkpoints"
    save.mkdir(parents=True)
    torch.save({"optimizer_history": [{"num_updates": 40}],
                "extra_state": {"previous_training_time": 12.0}}, save / "checkpoint_last.pt")
    (save / "checkpoint_1_40.pt").write_bytes(b"interval copy")
    monkeypatch.setattr(training.subprocess, "Popen", lambda *a, **k: pytest.fail("trained"))
    record = training.fairseq_train(["fairseq-train"], tmp_path / "run", 40, "t")
    assert record["num_updates"] == 40 == record["max_update"]
    assert record["training_seconds"] == 12.0
    assert not (save / "checkpoint_1_40.pt").exists()
    assert json.loads((tmp_path / "run" / "train.done.json").read_text())["num_updates"] == 40
    with pytest.raises(RuntimeError, match="past --max-update 30"):
        training.fairseq_train(["fairseq-train"], tmp_path / "run", 30, "t")
