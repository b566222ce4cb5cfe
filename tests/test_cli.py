"""End to end through the real command lines: fairseq-train -> taskmoe-prune -> fairseq-generate
(and fairseq-interactive), on tiny generated data."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROUTINGS, TASK_FLAGS

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
ENV = dict(os.environ, PYTHONWARNINGS="ignore")


def run(cmd, check=True, env=ENV, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env,
                          cwd=REPO, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def train(data, save_dir, routing_flags, updates):
    return run([BIN / "fairseq-train", data, "--user-dir", "user_dir", *TASK_FLAGS,
                "--arch", "task_moe_tiny", "--criterion", "moe_label_smoothed_cross_entropy",
                "--label-smoothing", "0.1", "--share-all-embeddings", "--optimizer", "adam",
                "--lr", "0.005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20",
                "--max-tokens", "1500", "--max-update", updates, "--cpu", "--seed", "1",
                "--save-dir", save_dir, "--no-epoch-checkpoints", "--no-last-checkpoints",
                "--log-format", "simple", "--log-interval", "5", "--num-workers", "0",
                *routing_flags])


def generate(data, checkpoint, pair="en-fr", check=True):
    src, tgt = pair.split("-")
    return run([BIN / "fairseq-generate", data, "--user-dir", "user_dir", *TASK_FLAGS,
                "--source-lang", src, "--target-lang", tgt, "--gen-subset", "test",
                "--path", checkpoint, "--beam", "4", "--max-tokens", "2000", "--cpu"],
               check=check)


def hypotheses(stdout):
    """{sentence id: (score, hypothesis)} from fairseq-generate's H- lines."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("H-"):
            key, score, *hyp = line.split("\t")
            out[int(key[2:])] = (float(score), hyp[0] if hyp else "")
    return out


@pytest.mark.parametrize("routing", ROUTINGS)
def test_train_and_generate_with_each_routing(tiny_data, tmp_path, routing):
    proc = train(tiny_data, tmp_path, ["--encoder-moe-routing", routing,
                                      "--decoder-moe-routing", routing], updates=6)
    log = proc.stdout + proc.stderr
    assert re.search(r"moe_top_share_enc1[ =]\d", log), "expert usage must be in the logs"
    assert re.search(r"moe_overflow_dec1[ =]\d", log)
    gen = generate(tiny_data, tmp_path / "checkpoint_best.pt")
    assert len(hypotheses(gen.stdout)) == 24


@pytest.fixture(scope="module")
def trained(trained_tiny):
    """A task-MoE (target/target) trained long enough to produce real translations."""
    return trained_tiny  # conftest: one 120-update training for the whole session


def test_train_prune_generate_gives_identical_translations(tiny_data, trained, tmp_path):
    pruned = tmp_path / "en-fr.pt"
    proc = run([BIN / "taskmoe-prune", trained, "--lang-pair", "en-fr", "--output", pruned])
    assert "serves: *-fr" in proc.stdout and "pruned 4 -> 1 FFN" in proc.stdout
    assert os.path.getsize(pruned) < os.path.getsize(trained) / 2
    full = hypotheses(generate(tiny_data, trained).stdout)
    small = hypotheses(generate(tiny_data, pruned).stdout)
    assert full.keys() == small.keys() and len(full) == 24
    assert sum(1 for _, h in full.values() if h) >= 20, "the model should really translate"
    for i in full:
        assert small[i][1] == full[i][1]
        assert small[i][0] == pytest.approx(full[i][0], abs=1e-3)  # printed rounding
    # fairseq-interactive serves the pruned checkpoint too, with the same output
    text = "e1 e2 e3\ne4 e5\n"
    outs = [run([BIN / "fairseq-interactive", tiny_data, "--user-dir", "user_dir", *TASK_FLAGS,
                 "--source-lang", "en", "--target-lang", "fr", "--path", ckpt, "--beam", "4",
                 "--cpu"], input=text).stdout for ckpt in (trained, pruned)]
    assert hypotheses(outs[0]).keys() == {0, 1}
    assert [h for _, h in hypotheses(outs[0]).values()] == \
        [h for _, h in hypotheses(outs[1]).values()]


def test_training_resumes_from_a_checkpoint_with_the_stock_cli(tiny_data, trained, tmp_path):
    """--restore-file goes through fairseq's loader, which torch >= 2.6 would otherwise refuse."""
    proc = train(tiny_data, tmp_path, ["--restore-file", trained], updates=124)
    log = proc.stdout + proc.stderr
    assert "Loaded checkpoint" in log
    assert re.search(r"num_updates[ =]124", log)


def test_pruned_checkpoint_refuses_a_task_it_does_not_serve(tiny_data, trained, tmp_path):
    pruned = tmp_path / "en-fr.pt"
    run([BIN / "taskmoe-prune", trained, "--lang-pair", "en-fr", "--output", pruned])
    proc = generate(tiny_data, pruned, pair="en-de", check=False)
    assert proc.returncode != 0
    assert "serves only *-fr" in proc.stderr and "cannot translate en-de" in proc.stderr


def _prune_fails(args, output, message):
    proc = run([BIN / "taskmoe-prune", *args, "--output", output], check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    return proc


def test_prune_bad_inputs_give_clear_errors_and_write_nothing(trained, tmp_path):
    out = tmp_path / "out.pt"
    _prune_fails([trained, "--lang-pair", "en-xx"], out, "unknown language 'xx'")
    _prune_fails([trained, "--lang-pair", "en-xx"], out, "this checkpoint knows en, de, fr")
    _prune_fails([tmp_path / "missing.pt", "--lang-pair", "en-de"], out, "does not exist")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(trained.read_bytes()[: os.path.getsize(trained) // 2])
    _prune_fails([truncated, "--lang-pair", "en-de"], out, "cannot read")
    dense = tmp_path / "dense.pt"
    torch.save({"cfg": {"model": None}, "args": None, "model": {}}, dense)
    _prune_fails([dense, "--lang-pair", "en-de"], out, "not a task-MoE checkpoint")
    assert not out.exists()
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left behind"
    out.write_bytes(b"keep me")
    _prune_fails([trained, "--lang-pair", "en-de"], out, "exists; pass --force")
    assert out.read_bytes() == b"keep me"
    run([BIN / "taskmoe-prune", trained, "--lang-pair", "en-de", "--output", out, "--force"])
    assert out.stat().st_size > 1000
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask, "a plain file's permissions"


def test_python_api_translates_raw_strings_like_the_cli(tiny_data, trained, tmp_path):
    from fairseq_taskmoe.hub import load_translator

    pruned = tmp_path / "en-fr.pt"
    run([BIN / "taskmoe-prune", trained, "--lang-pair", "en-fr", "--output", pruned])
    outs = []
    for ckpt in (trained, pruned):
        mt = load_translator(ckpt, data=tiny_data, source_lang="en", target_lang="fr", beam=4)
        outs.append(mt.translate(["e1 e2 e3", "e4 e5"], beam=4))
    assert outs[0] == outs[1]
    assert all(w.startswith("f") for w in " ".join(outs[0]).split()), outs[0]
    cli = run([BIN / "fairseq-interactive", tiny_data, "--user-dir", "user_dir", *TASK_FLAGS,
               "--source-lang", "en", "--target-lang", "fr", "--path", pruned, "--beam", "4",
               "--cpu"], input="e1 e2 e3\ne4 e5\n").stdout
    assert [h for _, h in hypotheses(cli).values()] == outs[0]


def test_flags_command_lists_every_plugin_flag_with_help(capsys):
    from fairseq_taskmoe.cli.flags import main

    main([])
    out = capsys.readouterr().out
    for flag in ("--moe-freq", "--moe-expert-count", "--moe-top-k", "--encoder-moe-routing",
                 "--decoder-moe-routing", "--moe-capacity-factor", "--moe-eval-capacity-factor",
                 "--moe-gate-loss-wt", "--moe-z-loss-wt"):
        assert flag in out
    assert "{token,sentence,target,lang_pair}" in out and "(default: 2)" in out


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_ranks(data, save_dir, updates, extra=()):
    port = _free_port()
    procs = [subprocess.Popen(
        [str(BIN / "fairseq-train"), str(data), "--user-dir", "user_dir", *TASK_FLAGS,
         "--arch", "task_moe_tiny", "--criterion", "moe_label_smoothed_cross_entropy",
         "--share-all-embeddings", "--optimizer", "adam", "--lr", "0.005", "--max-tokens",
         "1000", "--max-update", str(updates), "--cpu", "--disable-validation",
         "--save-dir", str(save_dir), "--no-epoch-checkpoints",
         "--num-workers", "0", "--log-format", "simple", "--log-interval", "2",
         "--encoder-moe-routing", "token", "--decoder-moe-routing", "target",
         "--distributed-world-size", "2", "--distributed-backend", "gloo",
         "--ddp-backend", "legacy_ddp", "--distributed-no-spawn",
         "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-rank", str(r),
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env=dict(ENV, OMP_NUM_THREADS="1"))  # one thread per rank: 2 ranks share 2 cores
        for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    failed = [f"rank {r}:\n{log[-2500:]}" for r, (p, log) in enumerate(zip(procs, logs))
              if p.returncode != 0]
    assert not failed, "\n".join(failed)
    return logs


def test_data_parallel_training_saves_and_resumes_on_two_cpu_processes(tiny_data, tmp_path):
    """Replicated experts, 2 ranks over gloo with fairseq's legacy_ddp (which gives experts
    that got no token in a step a zero gradient before the all-reduce). On resume rank 0 reads
    the checkpoint and sends it to rank 1 (fairseq's broadcast_object, a weights_only load
    under torch >= 2.6 on the receiving side)."""
    replicated = ["--moe-expert-parallel", "off"]
    logs = _train_two_ranks(tiny_data, tmp_path, 6, replicated)
    assert "done training" in logs[0]  # only rank 0 logs
    assert re.search(r"moe_top_share_enc1[ =]\d", logs[0])
    assert (tmp_path / "checkpoint_last.pt").exists()
    logs = _train_two_ranks(tiny_data, tmp_path, 10, replicated)
    assert "Loaded checkpoint" in logs[0] and re.search(r"num_updates[ =]10", logs[0])


def test_resume_with_reordered_langs_is_refused(tiny_data, trained, tmp_path):
    for flag in ("--restore-file", "--finetune-from-model"):
        proc = run([BIN / "fairseq-train", tiny_data, "--user-dir", "user_dir", *TASK_FLAGS,
                    "--langs", "de,en,fr", "--arch", "task_moe_tiny", "--criterion",
                    "moe_label_smoothed_cross_entropy", "--share-all-embeddings", "--optimizer",
                    "adam", "--lr", "0.005", "--max-tokens", "1500", "--max-update", "130",
                    "--cpu", "--save-dir", tmp_path / flag, "--num-workers", "0", flag, trained],
                   check=False)
        assert proc.returncode != 0
        assert "trained with --langs en,de,fr, but this run has --langs de,en,fr" in proc.stderr


def test_validation_during_training_uses_the_current_weights(tiny_data, tmp_path):
    """Issue 19.1 as a user meets it: 9 updates validating every 3; the last logged valid loss
    must be what fairseq-validate computes on the checkpoint written at that moment (the
    merged-FFN cache of task-routed layers used to keep the first validation's experts)."""
    proc = run([BIN / "fairseq-train", tiny_data, "--user-dir", "user_dir", *TASK_FLAGS,
                "--arch", "task_moe_tiny", "--criterion", "moe_label_smoothed_cross_entropy",
                "--share-all-embeddings", "--optimizer", "adam", "--lr", "0.01",
                "--max-tokens", "1500", "--max-update", "9", "--validate-interval-updates", "3",
                "--save-interval-updates", "3", "--cpu", "--seed", "1", "--save-dir", tmp_path,
                "--no-epoch-checkpoints", "--log-format", "simple", "--num-workers", "0",
                "--encoder-moe-routing", "target", "--decoder-moe-routing", "lang_pair"])
    logged = [float(m) for m in re.findall(r"valid on 'valid' subset \| loss (\S+)",
                                           proc.stdout + proc.stderr)]
    assert len(logged) >= 3, proc.stderr[-2000:]
    assert len(set(logged)) == len(logged)  # it learns: each validation differs
    check = run([BIN / "fairseq-validate", tiny_data, "--user-dir", "user_dir", *TASK_FLAGS,
                 "--path", tmp_path / "checkpoint_last.pt", "--max-tokens", "1500", "--cpu",
                 "--log-format", "simple", "--num-workers", "0"])
    final = re.findall(r"valid on 'valid' subset \| loss (\S+)",
                       check.stdout + check.stderr)
    assert final and float(final[-1]) == pytest.approx(logged[-1], abs=2e-3), (final, logged)
