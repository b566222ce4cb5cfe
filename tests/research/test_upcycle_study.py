"""The upcycling study (research/upcycle_study/): its rows, schedule, commands and compute
accounting; the shared trainer's compute ledger across a killed and resumed sitting (a fake
fairseq-train); which dense run it uses; the curves' resumable points; the page on fake result
files, pending and complete; and one end-to-end run of the real CLI on the tiny data (slow)."""

import json
import math
import os
import sys
import textwrap

import pytest

from research.study import grid, training
from research.upcycle_study import curves, evaluation, folders, plan, report, runner, stages
from research.upcycle_study.plan import DENSE, ROWS

TRAINED = grid.TRAINED


def flag(cmd, name):
    cmd = [str(c) for c in cmd]
    return cmd[cmd.index(name) + 1] if name in cmd else None


# ---------------------------------------------------------------- the plan


def test_rows_seeds_and_selection():
    names = [r.name for r in ROWS]
    assert names == ["dense-s1", "upcycled_target_target-s1", "dense_continued-s1",
                     "scratch_target_target-s1", "upcycled_target_target-s2",
                     "dense_continued-s2", "upcycled_token_token-s1"]
    assert [r.name for r in plan.select("scratch")] == ["dense-s1", "scratch_target_target-s1"]
    assert [r.name for r in plan.select("upcycled_token_token-s1,continued")] == [
        "dense-s1", "dense_continued-s1", "dense_continued-s2", "upcycled_token_token-s1"]
    with pytest.raises(ValueError):
        plan.select("nonsense")
    updates = {r.name: plan.row_updates(r, 1000, 500) for r in ROWS}
    assert updates["dense-s1"] == 1000 and updates["scratch_target_target-s1"] == 1500
    assert {updates[r.name] for r in ROWS if r.from_dense} == {500}
    assert [r.task_routed for r in ROWS] == [False, True, False, True, True, False, False]


def test_continuation_schedule_carries_the_dense_schedule_on():
    sched = plan.continuation_schedule("cpu", 1000, 500)
    peak, end = 0.002 * math.sqrt(400 / 1000), 0.002 * math.sqrt(400 / 1500)
    assert sched["--lr-scheduler"] == "polynomial_decay" and sched["--power"] == 1
    assert float(sched["--lr"]) == pytest.approx(peak, rel=1e-5)
    assert float(sched["--end-learning-rate"]) == pytest.approx(end, rel=1e-5)
    assert sched["--warmup-updates"] == plan.REWARM_UPDATES == 50
    assert sched["--total-num-update"] == 500
    # the dense run's own rate at its last update is where the continuation starts
    assert float(sched["--lr"]) == pytest.approx(plan.inverse_sqrt_lr(grid.SHARED_FLAGS, 1000),
                                                 rel=1e-5)
    # after the re-warm, within 3% of the inverse-sqrt curve it replaces (as documented)
    for u in range(50, 501, 10):
        linear = end + (peak - end) * (1 - (u - 50) / 450)
        assert abs(linear / plan.inverse_sqrt_lr(grid.SHARED_FLAGS, 1000 + u) - 1) < 0.03
    assert plan.inverse_sqrt_lr(grid.SHARED_FLAGS, 200) == pytest.approx(0.001)


def test_commands(tmp_path):
    data, ck, init = tmp_path / "bin", tmp_path / "ck", tmp_path / "init.pt"
    args = (data, ck, 1000, 500, "cpu", grid.LANGS, TRAINED, 100)
    by = {r.name: r for r in ROWS}
    # the dense and scratch rows are the study's own commands
    assert plan.training_command(DENSE, *args) == grid.train_command(
        data, "dense", 1, ck, 1000, 100)
    assert plan.training_command(by["scratch_target_target-s1"], *args) == grid.train_command(
        data, "target_target", 1, ck, 1500, 100)
    sched = plan.continuation_schedule("cpu", 1000, 500)
    for name, variant, seed in [("upcycled_target_target-s2", "target_target", 2),
                                ("dense_continued-s1", "dense", 1),
                                ("upcycled_token_token-s1", "token_token", 1)]:
        cmd = plan.training_command(by[name], *args, init=init)
        base = [str(c) for c in grid.train_command(data, variant, seed, ck, 500, 100)]
        assert flag(cmd, "--finetune-from-model") == str(init)
        assert flag(cmd, "--max-update") == "500" and flag(cmd, "--seed") == str(seed)
        for f, v in sched.items():  # the same schedule for every continued row
            assert flag(cmd, f) == str(v) and [str(c) for c in cmd].count(f) == 1
        for f in ("--encoder-moe-routing", "--decoder-moe-routing", "--moe-freq",
                  "--moe-gate-loss-wt", "--moe-expert-count", "--arch", "--max-tokens"):
            assert flag(cmd, f) == flag(base, f)
        assert "--reset-optimizer" not in cmd and "--restore-file" not in cmd
    token = plan.training_command(by["upcycled_token_token-s1"], *args, init=init)
    assert flag(token, "--moe-expert-ffn-dim") == "1024"  # copies: the dense FFN's width
    target = plan.training_command(by["upcycled_target_target-s1"], *args, init=init)
    assert flag(target, "--moe-expert-ffn-dim") == "512"
    with pytest.raises(ValueError):
        plan.training_command(by["dense_continued-s2"], *args)  # needs init
    up = plan.upcycle_command(by["upcycled_target_target-s2"], init, tmp_path / "o.pt", "cpu")
    assert (flag(up, "--moe-expert-ffn-dim"), flag(up, "--encoder-moe-routing"),
            flag(up, "--seed"), flag(up, "--moe-top-k")) == ("512", "target", "2", "2")
    assert "--noise" not in up and "--moe-freq" not in up  # the plugin's default, as training
    up = plan.upcycle_command(by["upcycled_token_token-s1"], init, tmp_path / "o.pt", "cpu")
    assert flag(up, "--noise") == str(plan.TOKEN_NOISE)
    assert flag(up, "--decoder-moe-routing") == "token" and flag(up, "--moe-expert-ffn-dim") == \
        "1024"
    assert plan.with_flags(["a", "--x", 1], {"--x": 2, "--y": 3}) == ["a", "--x", 2, "--y", 3]


def test_compute_accounting_counts_the_dense_run_once():
    own = {"updates": 500, "cpu_seconds": 900.0, "wall_seconds": 500.0}
    dense = {"updates": 1000, "cpu_seconds": 1500.0, "wall_seconds": 800.0}
    upcycle = {"cpu_seconds": 4.5, "wall_seconds": 5.0}
    by = {r.name: r for r in ROWS}
    up = plan.row_compute(by["upcycled_target_target-s1"], own, dense, upcycle)
    assert up["total"] == {"updates": 1500, "cpu_seconds": 2404.5, "wall_seconds": 1305.0}
    dc = plan.row_compute(by["dense_continued-s2"], own, dense, upcycle)
    assert dc["total"] == {"updates": 1500, "cpu_seconds": 2400.0, "wall_seconds": 1300.0}
    assert dc["upcycle"] is None
    scratch = plan.row_compute(by["scratch_target_target-s1"], own, dense, upcycle)
    assert scratch["total"] == own and scratch["dense_pretraining"] is None
    # unknown parts make the total unknown, never smaller
    assert plan.row_compute(by["dense_continued-s1"], own, None)["total"]["cpu_seconds"] is None
    unknown = dict(own, cpu_seconds=None)
    assert plan.row_compute(DENSE, unknown)["total"]["cpu_seconds"] is None


def test_budget_continuation():
    # dense 1.0 CPU s per update, continuation 1.2, scratch 1.2: 600 + 0.48 M >= 1000... ->
    # 1000 + 1.2 M <= 0.6 * 1.2 * (1000 + M)  <=>  M <= (720 - 1000) / 0.48 < 0: no M
    assert plan.budget_continuation(1000, 1000, 1.2, 1.2) == ("none", None)
    # a cheap dense run (0.5 per update): 500 + 1.2 M <= 720 + 0.72 M  <=>  M <= 458
    assert plan.budget_continuation(500, 1000, 1.2, 1.2) == ("at most", 458)
    assert plan.budget_continuation(500, 1000, 0.5, 1.2) == ("any", None)


# ---------------------------------------------------------------- the trainer's ledger

FAKE_TRAIN = textwrap.dedent("""
    import os, sys, time, torch
    from pathlib import Path
    argv = sys.argv
    save = Path(argv[argv.index("--save-dir") + 1])
    last_update = int(argv[argv.index("--max-update") + 1])
    every = int(argv[argv.index("--save-interval-updates") + 1])
    die_after = int(os.environ.get("FAKE_DIE_AFTER", 0))
    last = save / "checkpoint_last.pt"
    start = 0
    if last.exists():
        start = torch.load(last)["optimizer_history"][-1]["num_updates"]
        print(f"Loaded checkpoint {last} (epoch 1 @ {start} updates)", flush=True)
    else:
        print(f"No existing checkpoint found {last}", flush=True)
    for u in range(start + 1, last_update + 1):
        t = time.process_time()
        while time.process_time() - t < 0.03:  # an update's CPU
            pass
        print(f"epoch 001: | train_inner | loss=1.0, num_updates={u}", flush=True)
        if u % every == 0 or u == last_update:
            path = save / f"checkpoint_1_{u}.pt"
            torch.save({"optimizer_history": [{"num_updates": u}],
                        "extra_state": {"previous_training_time": 1.0}}, path)
            last.write_bytes(path.read_bytes())
            for old in save.glob("checkpoint_1_*.pt"):
                if old != path:
                    old.unlink()
            print(f"Saved checkpoint {path} (epoch 1 @ {u} updates, score None)", flush=True)
        if u == die_after:
            os._exit(137)
""")


def test_ledger_survives_a_kill_and_counts_what_each_checkpoint_cost(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    run_dir = tmp_path / "run"

    def cmd(last):
        return [sys.executable, script, "--save-dir", run_dir / "checkpoints", "--max-update",
                last, "--save-interval-updates", 2]

    saved = []
    monkeypatch.setenv("FAKE_DIE_AFTER", "3")
    with pytest.raises(RuntimeError, match="exit 137"):
        training.fairseq_train(cmd(6), run_dir, 6, "t", on_save=lambda u, p: saved.append(u))
    ledger = json.loads((run_dir / "compute.json").read_text())
    assert list(ledger["checkpoints"]) == ["2"]  # update 3's work is lost, and not counted
    at2 = ledger["checkpoints"]["2"]["cpu_seconds"]
    assert at2 >= 0.06 and ledger["sittings"][0]["exit_code"] == 137
    monkeypatch.delenv("FAKE_DIE_AFTER")
    done = training.fairseq_train(cmd(6), run_dir, 6, "t", on_save=lambda u, p: saved.append(u))
    assert saved == [2, 4, 6]
    ledger = json.loads((run_dir / "compute.json").read_text())
    assert set(ledger["checkpoints"]) == {"2", "4", "6"}
    # the resumed sitting adds to what checkpoint 2 cost: 4 more updates of 0.03 s at least
    assert ledger["checkpoints"]["6"]["cpu_seconds"] >= at2 + 0.12
    assert ledger["sittings"][1]["from_update"] == 2 and ledger["sittings"][1]["compute_known"]
    assert done["num_updates"] == 6 and done["cpu_seconds"] == ledger["checkpoints"]["6"][
        "cpu_seconds"]
    assert json.loads((run_dir / "train.done.json").read_text()) == done
    assert not list((run_dir / "checkpoints").glob("checkpoint_1_*.pt"))  # last kept only
    assert training.fairseq_train(cmd(6), run_dir, 6, "t") == done  # done: nothing runs
    # a checkpoint the ledger has no record of (trained before it): CPU seconds unknown
    (run_dir / "compute.json").unlink()
    done = training.fairseq_train(cmd(8), run_dir, 8, "t")
    assert done["num_updates"] == 8 and done["cpu_seconds"] is None


def test_process_cpu_seconds_reads_this_process():
    here = training.process_cpu_seconds(os.getpid())
    assert here is not None and here > 0
    assert training.process_cpu_seconds(2 ** 22 + 7) is None  # no such process


# ---------------------------------------------------------------- runner


def parse(tmp_path, *extra):
    return runner.parse_args(["--work", str(tmp_path / "w"), "--results", str(tmp_path / "r"),
                              "--study-work", str(tmp_path / "s"), *extra])


def test_arguments(tmp_path):
    args = parse(tmp_path)
    assert args.upcycle_updates == 500 and args.dense_updates == 1000
    assert args.directions == TRAINED and args.m_work == tmp_path / "w" / "m500"
    assert parse(tmp_path, "--upcycle-updates", "200").m_work.name == "m200"
    with pytest.raises(SystemExit):
        parse(tmp_path, "--directions", "de-fr")  # zero-shot: not a trained direction
    with pytest.raises(SystemExit):
        parse(tmp_path, "--only", "dense_contiued")


def test_multi30k_data_is_the_studys_own(tmp_path, monkeypatch):
    """Without --prepared the study's Multi30k folder is used as research.study prepares it
    (prepare_data read an attribute this study did not set, and the real run stopped there)."""
    args = parse(tmp_path)
    done = tmp_path / "s" / "multi30k" / "bin" / ".done"
    done.parent.mkdir(parents=True)
    done.write_text("")  # prepared already: research.study runs nothing
    monkeypatch.setattr(evaluation, "build_sample", lambda *a: 0)
    assert runner.prepare(args) == tmp_path / "s" / "multi30k"
    assert args.train_data == done.parent and "prepare_multi30k.py" in args.prepare_command


def test_dense_run_is_the_studys_when_its_compute_is_known(tmp_path):
    args = parse(tmp_path)
    study, own = tmp_path / "s" / "runs" / "dense-s1", tmp_path / "w" / "dense-s1"
    assert folders.dense_train_dir(args)[0] == study  # not started: trained there
    (study / "checkpoints").mkdir(parents=True)
    (study / "checkpoints" / "checkpoint_last.pt").write_bytes(b"x")
    (study / "compute.json").write_text("{}")
    assert folders.dense_train_dir(args)[0] == study  # part-trained with a ledger: resumed
    (study / "compute.json").unlink()
    assert folders.dense_train_dir(args)[0] == own  # part-trained without one
    done = {"max_update": 1000, "num_updates": 1000, "training_seconds": 1600.0}
    (study / "train.done.json").write_text(json.dumps(done))
    path, why = folders.dense_train_dir(args)
    assert path == own and "no CPU seconds recorded" in why
    (study / "train.done.json").write_text(json.dumps(dict(done, cpu_seconds=3000.0)))
    assert folders.dense_train_dir(args)[0] == study  # reused
    (study / "train.done.json").write_text(json.dumps(dict(done, cpu_seconds=1.0,
                                                           max_update=40)))
    assert "another budget" in folders.dense_train_dir(args)[1]
    (own / "checkpoints").mkdir(parents=True)  # once started, its own run stays the source
    (study / "train.done.json").write_text(json.dumps(dict(done, cpu_seconds=3000.0)))
    assert folders.dense_train_dir(args)[0] == own


def test_curve_points_resume_and_count_the_offsets(tmp_path, monkeypatch):
    args = parse(tmp_path)
    args.sample, args.sample_sentences = tmp_path / "sample", 200
    row = plan.row_named("upcycled_target_target-s1")
    files = folders.files_dir(args, row)
    (files / "curve").mkdir(parents=True)
    (files / "checkpoints").mkdir()
    for u in (100, 200):
        (files / "curve" / f"u{u}.pt").write_bytes(b"ck")
    (files / "checkpoints" / "checkpoint_last.pt").write_bytes(b"ck")
    (files / "upcycled.pt").write_bytes(b"ck")
    (files / "compute.json").write_text(json.dumps({"checkpoints": {
        str(u): {"cpu_seconds": 2.0 * u, "wall_seconds": 1.0 * u} for u in (100, 200, 500)},
        "sittings": []}))
    evaluated = []

    def fake_bleu(_args, _sample, ckpt, _out, tag):
        evaluated.append((tag, ckpt.name))
        return {"bleu": {p: 20.0 for p in TRAINED}, "avg_bleu": 20.0 + len(evaluated)}

    monkeypatch.setattr(evaluation, "curve_bleu", fake_bleu)
    offset = {"dense": {"updates": 1000, "cpu_seconds": 3000.0, "wall_seconds": 2000.0},
              "upcycle": {"cpu_seconds": 5.0, "wall_seconds": 6.0}}
    (tmp_path / "r").mkdir()
    record = stages.stage_curve(args, row, offset, "t")
    assert evaluated == [("u0", "upcycled.pt"), ("u100", "u100.pt"), ("u200", "u200.pt"),
                         ("u500", "checkpoint_last.pt")]
    assert [p["update"] for p in record["points"]] == [0, 100, 200, 500]
    assert record["points"][1]["total"] == {"updates": 1100, "cpu_seconds": 3205.0,
                                            "wall_seconds": 2106.0}
    assert record["points"][0]["total"]["cpu_seconds"] == 3005.0
    assert not list((files / "curve").glob("*.pt"))  # links go once their point is written
    saved = json.loads((tmp_path / "r" / "curve-upcycled_target_target-s1.json").read_text())
    assert saved == record
    evaluated.clear()
    assert stages.stage_curve(args, row, offset, "t") == record and evaluated == []
    # another M's files are never mixed in
    with pytest.raises(RuntimeError, match="--upcycle-updates 500"):
        stages.stage_curve(parse(tmp_path, "--upcycle-updates", "300"), row, offset, "t")
    # a continued row's update 0 is the dense model's last point, not evaluated again
    cont = plan.row_named("dense_continued-s1")
    (folders.files_dir(args, cont) / "checkpoints").mkdir(parents=True)
    start = {"update": 1000, "bleu": {"en-de": 1.0}, "avg_bleu": 1.0, "from": "dense-s1 at 1000"}
    record = stages.stage_curve(args, cont, offset, "t", start)
    assert record["points"][0]["avg_bleu"] == 1.0 and record["points"][0]["update"] == 0
    assert record["points"][0]["total"]["cpu_seconds"] == 3000.0  # no upcycling in its total
    assert evaluated == [("u500", "checkpoint_last.pt")]


def test_curve_linker_keeps_every_curve_checkpoint(tmp_path):
    args = parse(tmp_path)
    row = plan.row_named("scratch_target_target-s1")
    src, last = tmp_path / "checkpoint_1_100.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"weights 100")
    last.write_bytes(b"weights 800")
    keep = stages.curve_linker(args, row, 1500)
    keep(100, src)
    keep(1500, tmp_path / "checkpoint_3_1500.pt")  # the last: checkpoint_last.pt is used
    keep(703, last)  # an epoch's end between curve points
    keep(800, last)  # an epoch's end on a curve point: fairseq saved checkpoint_last.pt only
    curve = folders.files_dir(args, row) / "curve"
    assert sorted(p.name for p in curve.iterdir()) == ["u100.pt", "u800.pt"]
    assert (curve / "u100.pt").stat().st_ino == src.stat().st_ino  # a link, no copy
    assert (curve / "u800.pt").stat().st_ino != last.stat().st_ino  # a copy: fairseq
    last.write_bytes(b"weights 900")  # overwrites checkpoint_last.pt in place later
    src.unlink()  # and deletes the interval file's name at the next save
    assert (curve / "u100.pt").read_bytes() == b"weights 100"
    assert (curve / "u800.pt").read_bytes() == b"weights 800"


def test_sample_indices():
    assert evaluation.sample_indices(5, 10) == [0, 1, 2, 3, 4]
    picked = evaluation.sample_indices(1000, 200)
    assert len(picked) == 200 and picked == sorted(picked) == evaluation.sample_indices(1000, 200)
    assert evaluation.sample_indices(1000, 0) == list(range(1000))


# ---------------------------------------------------------------- the report


def fake_row(name, bleu, own_cpu, dense_cpu=3000.0, upcycle_cpu=5.0):
    row = plan.row_named(name)
    own = {"updates": plan.row_updates(row, 1000, 500), "cpu_seconds": own_cpu,
           "wall_seconds": own_cpu / 2}
    dense = {"updates": 1000, "cpu_seconds": dense_cpu, "wall_seconds": dense_cpu / 2}
    up = {"cpu_seconds": upcycle_cpu, "wall_seconds": upcycle_cpu}
    directions = {p: {"bleu": bleu + i / 10, "chrf": 50.0} for i, p in enumerate(TRAINED)}
    pruned = {p: {"identical_hypotheses": True} for p in TRAINED} if row.task_routed else {}
    return {"run": name, "kind": row.kind, "variant": row.variant, "label": row.label,
            "seed": row.seed, "upcycle_updates": None if row is DENSE else 500,
            "dense_updates": 1000, "task_routed": row.task_routed,
            "commands": {"upcycle": "taskmoe-upcycle X" if row.kind == "upcycled" else None,
                         "train": f"fairseq-train X --seed {row.seed}"},
            "compute": plan.row_compute(row, own, dense, up),
            "data": {"evaluated_directions": TRAINED}, "directions": directions,
            "averages": {"bleu": bleu + 0.25, "chrf": 50.0}, "pruned": pruned,
            "pruned_identical": len(pruned) if pruned else None}


def fake_curve(name, points, offset=0.0):
    """points: [(update, own CPU s, avg BLEU)]."""
    row = plan.row_named(name)
    return {"run": name, "kind": row.kind, "seed": row.seed,
            "upcycle_updates": None if row is DENSE else 500, "sentences": 200,
            "points": [{"update": u, "avg_bleu": b,
                        "own": {"updates": u, "cpu_seconds": c},
                        "total": {"updates": u, "cpu_seconds": c + offset}}
                       for u, c, b in points]}


def write_results(folder, rows, curves, step0=(), upcycles=()):
    folder.mkdir(parents=True, exist_ok=True)
    for r in rows:
        (folder / f"{r['run']}.json").write_text(json.dumps(r))
    for c in curves:
        (folder / f"curve-{c['run']}.json").write_text(json.dumps(c))
    for name, ok in step0:
        d = {p: {"sentences": 1000, "upcycled_identical_to_dense": ok,
                 "pruned_identical_to_dense": ok} for p in TRAINED}
        (folder / f"step0-{name}.json").write_text(json.dumps(
            {"run": name, "upcycle_updates": 500, "directions": d, "all_identical": ok}))
    for name in upcycles:
        (folder / f"upcycle-{name}.json").write_text(json.dumps(
            {"run": name, "upcycle_updates": 500, "cpu_seconds": 4.5, "exact": True}))


def generate_page(tmp_path, *extra):
    out, img = tmp_path / "docs" / "results-upcycle.md", tmp_path / "docs" / "img"
    assert report.main(["--results", str(tmp_path / "res"), "--out", str(out),
                        "--img-dir", str(img), *extra]) == 0
    return out.read_text(), img / report.FIGURE


def test_report_pending_has_no_numbers(tmp_path):
    md, figure = generate_page(tmp_path)
    assert md.count("pending: not yet run") == len(ROWS)
    assert "Pending: no row has finished yet." in md and "Pending: no curve yet." in md
    assert md.count("pending") >= 4 + len(ROWS) and "**at least dense continued + 1.0 BLEU**:" \
        " pending" in md
    assert not figure.exists()
    assert "0.00126491" in md and "--finetune-from-model" in md  # the design, from the code
    for absent in ("None", "nan", "met.", "CPU s in total"):
        assert absent not in md, absent
    # a partial study: what exists is reported, the rest pending
    write_results(tmp_path / "res", [fake_row("dense-s1", 27.0, 3000.0)],
                  [fake_curve("dense-s1", [(500, 1500, 20.0), (1000, 3000, 26.0)])])
    md, figure = generate_page(tmp_path)
    assert "| dense (pre-training) | `dense-s1` | 1,000 / 1,000 | 3,000 / 3,000 | – | 27.25 |" \
        in md
    assert "The upcycled target / target model: pending" in md and figure.exists()
    assert "| upcycled target / target | `upcycled_target_target-s1` | pending |" in md


def test_report_complete(tmp_path):
    rows = [fake_row("dense-s1", 27.0, 3000.0),
            fake_row("upcycled_target_target-s1", 29.0, 1700.0),
            fake_row("upcycled_target_target-s2", 29.4, 1700.0),
            fake_row("dense_continued-s1", 27.6, 1500.0),
            fake_row("dense_continued-s2", 27.8, 1500.0),
            fake_row("scratch_target_target-s1", 28.8, 5100.0),
            fake_row("upcycled_token_token-s1", 28.0, 2500.0)]
    dense = fake_curve("dense-s1", [(100, 300, 5.0), (500, 1500, 20.0), (1000, 3000, 26.0)])
    # continuation points: (update, own CPU s, BLEU), offset the dense run (+ upcycling)
    up = [fake_curve("upcycled_target_target-s1",
                     [(0, 0, 26.0), (100, 340, 25.5), (200, 680, 27.5), (500, 1700, 29.0)],
                     3005.0),
          fake_curve("upcycled_target_target-s2",
                     [(0, 0, 26.0), (100, 340, 25.7), (200, 680, 27.7), (500, 1700, 29.2)],
                     3005.0)]
    dc = [fake_curve(f"dense_continued-s{s}",
                     [(0, 0, 26.0), (100, 300, 26.5), (200, 600, 26.8), (500, 1500, 27.5)],
                     3000.0) for s in (1, 2)]
    scratch = fake_curve("scratch_target_target-s1",
                         [(500, 1700, 22.0), (1000, 3400, 27.0), (1500, 5100, 28.5)])
    write_results(tmp_path / "res", rows, [dense, *up, *dc, scratch],
                  step0=[("upcycled_target_target-s1", True),
                         ("upcycled_target_target-s2", True)],
                  upcycles=["upcycled_target_target-s1", "upcycled_target_target-s2"])
    md, figure = generate_page(tmp_path)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![BLEU against total CPU seconds](img/{report.FIGURE})" in md
    # totals: upcycled 3000 + 5 + 1700 = 4705 = 92% of the scratch run's 5100
    assert ("| upcycled target / target | `upcycled_target_target-s1` | 500 / 1,500 | "
            "1,700 / 4,705 | 92% | 29.25 | 50.00 | 6 of 6 |") in md
    assert "| dense, continued | 2 of 2 | 27.95 ± 0.10 | 4,500 |" in md
    # goals: upcycled 29.45 against dense continued 27.95 (+1.50) and scratch 29.05
    assert "**at least dense continued + 1.0 BLEU**: met. 29.45 against 27.95: +1.50" in md
    assert "**at least the scratch task-MoE**: met. 29.45 against 29.05 (+0.40)." in md
    assert "**at most 60% of the scratch run's total compute**: not met. 4,705 CPU s" in md
    assert "pruned sub-network gives the dense model's hypotheses**: met." in md
    assert "6 of 6 directions give the dense model's hypotheses, 6 of 6 pruned" in md
    # the curves: update 100 is behind dense continued, update 200 ahead for good
    assert "passes dense continued at 3,685 CPU s in total (continuation update 200: 27.60 " \
           "against 26.87)" in md
    # scratch at 3,685 CPU s: 27.0 + 1.5 * 285 / 1700 = 27.25 < 27.6: passed at update 200
    assert "passes the scratch task-MoE at 3,685 CPU s" in md
    # the scratch run's final 28.5 is reached between 3,685 (27.6) and 4,705 (29.1)
    assert "the upcycled model reaches that at 4,297 CPU s, 84% of it." in md
    # budget: dense 3.00 per update > 0.6 * 3.40: no M can meet the 60%
    assert "stays within 60% of its compute for no M" in md
    assert "None" not in md and "nan" not in md
    # another M's files are left out, named
    other = fake_row("dense_continued-s1", 1.0, 1.0)
    other["upcycle_updates"] = 200
    (tmp_path / "res" / "dense_continued-s1.json").write_text(json.dumps(other))
    md, _ = generate_page(tmp_path)
    assert "Left out (another `--upcycle-updates`): `dense_continued-s1.json`." in md
    assert "Seeds still missing: `dense_continued-s1`." in md


def test_curve_crossings():
    a = [(0, 10, 0), (1, 9, 1), (2, 12, 2), (3, 13, 3)]
    b = [(0, 10, 0), (3, 11.5, 3)]
    assert curves.passes(a, b) == (2, 12, 2)
    assert curves.passes(b, a) is None
    assert curves.interpolate(b, 1.5) == pytest.approx(10.75) and curves.interpolate(b, 4) is None
    assert curves.reaches(a, 12.5) == pytest.approx(2.5) and curves.reaches(a, 14) is None
    assert curves.passes([(0, 1, 0), (5, 2, 5)], b) is None  # outside b's range


# ---------------------------------------------------------------- end to end (the real CLI)

TINY = {**grid.SHARED_FLAGS,
        "--encoder-layers": 2, "--decoder-layers": 2, "--encoder-embed-dim": 32,
        "--decoder-embed-dim": 32, "--encoder-ffn-embed-dim": 64, "--decoder-ffn-embed-dim": 64,
        "--encoder-attention-heads": 2, "--decoder-attention-heads": 2,
        "--moe-expert-count": 4, "--moe-expert-ffn-dim": 32, "--lr": 0.005,
        "--warmup-updates": 4, "--max-tokens": 1500}


@pytest.mark.slow
def test_end_to_end_on_tiny_data(tiny_data, tmp_path, monkeypatch):
    """Dense 6 updates, upcycled target / target and dense continued 2 more, through the real
    fairseq-train, taskmoe-upcycle, taskmoe-prune and fairseq-generate; then again (nothing is
    redone) and the page."""
    monkeypatch.setitem(grid.PRESETS, "tiny", dict(flags=TINY, max_update=6, device=["--cpu"],
                                                   folder="tiny"))
    monkeypatch.setitem(grid.PRESET_CORPUS, "tiny", "multi30k")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--prepared", str(tiny_data.parent), "--preset", "tiny", "--work",
            str(tmp_path / "w"), "--results", str(tmp_path / "res"), "--study-work",
            str(tmp_path / "s"), "--upcycle-updates", "2", "--curve-every", "2", "--curve-cap",
            "8", "--directions", "en-de", "--max-len-b", "8",
            "--only", "upcycled_target_target-s1,dense_continued-s1"]
    assert runner.main(argv) == 0
    res = tmp_path / "res"
    dense = json.loads((res / "dense-s1.json").read_text())
    assert dense["trained_updates"] == 6 and dense["compute"]["own"]["cpu_seconds"] > 0
    step0 = json.loads((res / "step0-upcycled_target_target-s1.json").read_text())
    assert step0["all_identical"], step0  # exact: the upcycled and pruned = dense
    up = json.loads((res / "upcycled_target_target-s1.json").read_text())
    assert up["pruned_identical"] == 1 and up["trained_updates"] == 2
    upcycle = json.loads((res / "upcycle-upcycled_target_target-s1.json").read_text())
    total = up["compute"]["total"]
    assert total["updates"] == 8 and total["cpu_seconds"] == pytest.approx(
        dense["compute"]["own"]["cpu_seconds"] + upcycle["cpu_seconds"]
        + up["compute"]["own"]["cpu_seconds"], abs=0.2)
    assert "--finetune-from-model" in up["commands"]["train"]
    curve = json.loads((res / "curve-dense_continued-s1.json").read_text())
    assert [p["update"] for p in curve["points"]] == [0, 2]
    dense_curve = json.loads((res / "curve-dense-s1.json").read_text())
    assert [p["update"] for p in dense_curve["points"]] == [2, 4, 6]
    assert curve["points"][0]["bleu"] == dense_curve["points"][-1]["bleu"]
    before = {p.name: p.stat().st_mtime for p in res.iterdir()}
    assert runner.main(argv) == 0  # resumed: every stage skipped
    assert {p.name: p.stat().st_mtime for p in res.iterdir()} == before
    md, figure = generate_page(tmp_path, "--upcycle-updates", "2")
    assert figure.exists() and "`upcycled_target_target-s1` | 2 / 8 |" in md
