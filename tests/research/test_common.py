"""research/common.py: what the harness's commands share."""

from research.common import MOVED, REPO, current_command, hms, show


def test_current_command_runs_what_was_recorded_under_scripts():
    assert current_command("scripts/study.py --only dense-s1") == \
        ".venv/bin/python -m research.study --only dense-s1"
    assert current_command("-m research.study --only x") == \
        ".venv/bin/python -m research.study --only x"
    assert current_command(".venv/bin/python scripts/bench_export.py --work w") == \
        ".venv/bin/python -m research.bench.export --work w"
    assert current_command("scripts/distill.py (teacher: x)") == \
        ".venv/bin/python -m research.distill (teacher: x)"
    # what did not move stays as it was
    kept = ".venv/bin/python scripts/prepare_multi30k.py --out work/m"
    assert current_command(kept) == kept
    for module in MOVED.values():  # each runs with `python -m`
        assert (REPO / module.replace(".", "/")).with_suffix(".py").exists() or \
            (REPO / module.replace(".", "/") / "__main__.py").exists(), module


def test_hms_and_show():
    assert (hms(None), hms(247), hms(3900)) == ("–", "4m07s", "1h05m")
    assert show([REPO / "work" / "x y", "--a", 1]) == "'work/x y' --a 1"
