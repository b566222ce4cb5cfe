"""What the harness's commands share (scripts/demo.py too): the repository's paths and Multi30k
languages, running a command with its output logged atomically, fairseq-generate's command line
and output, BLEU, JSON files, and how a command is shown."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # fairseq-* and taskmoe-* of this Python's environment
LANGS = ["en", "de", "fr", "cs"]
PAIRS = ["en-de", "de-en", "en-fr", "fr-en", "en-cs", "cs-en"]  # the directions models train on

# Where the harness's commands were before research/ (results JSONs record the command that made
# them, as it was then; current_command shows it as it runs now).
MOVED = {
    "scripts/study.py": "research.study",
    "scripts/study_report.py": "research.study.report",
    "scripts/routing_heatmap.py": "research.study.heatmap",
    "scripts/routing_stats.py": "research.study.routing_stats",
    "scripts/distill.py": "research.distill",
    "scripts/benchmark_inference.py": "research.bench.inference",
    "scripts/bench_moe_layer.py": "research.bench.moe_layer",
    "scripts/bench_export.py": "research.bench.export",
    "scripts/bench_generate.py": "research.bench.generate",
    "scripts/bench_train_speed.py": "research.bench.train_speed",
    "scripts/bench_expert_parallel.py": "research.bench.expert_parallel",
    "scripts/bench_ct2_batch.py": "research.bench.ct2_batch",
    "scripts/pivot_eval.py": "research.pivot_eval",
    "scripts/bench_serve.py": "research.bench.serve",
    "scripts/bench_ray_serve.py": "research.bench.ray_serve",
}


def logger(name: str, clock: bool = False):
    """print() with a "[name] " prefix, flushed: long jobs are watched as they run. clock: the
    prefix also gives the seconds since the logger was made ("[name    12.3s] ")."""
    started = time.time()

    def log(msg):
        when = f" {time.time() - started:7.1f}s" if clock else ""
        print(f"[{name}{when}] {msg}", flush=True)
    return log


def run(cmd, log_path: Path = None, threads: int = None):
    """Run a command; its output goes to log_path (written atomically) or to our stdout.
    threads: the command's OMP_NUM_THREADS (default: inherited)."""
    cmd = [str(c) for c in cmd]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if log_path is None:
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        return None
    tmp = log_path.with_name(log_path.name + ".tmp")
    with open(tmp, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed; see {tmp}\n" + tmp.read_text()[-3000:])
    tmp.rename(log_path)
    return log_path.read_text()


def task_flags(data, langs=",".join(LANGS), pairs=",".join(PAIRS)):
    return [data, "--user-dir", "user_dir", "--task", "translation_task_moe", "--langs", langs,
            "--lang-pairs", pairs, "--encoder-langtok", "tgt", "--decoder-langtok"]


def generate_command(data, checkpoint, pair, beam=5, max_tokens=8000, **task):
    """fairseq-generate on the test set of `pair`, hypotheses detokenized (SentencePiece)."""
    src, tgt = pair.split("-")
    return [BIN / "fairseq-generate", *task_flags(data, **task), "--source-lang", src,
            "--target-lang", tgt, "--gen-subset", "test", "--path", checkpoint, "--beam", beam,
            "--max-tokens", max_tokens, "--post-process", "sentencepiece", "--cpu"]


def parse_generate(text):
    """fairseq-generate output -> ({sentence id: detokenized hypothesis}, tokens/s or None)."""
    hyps = {}
    for line in text.splitlines():
        if line.startswith("D-"):
            key, _score, *hyp = line.split("\t")
            hyps[int(key[2:])] = hyp[0] if hyp else ""
    speed = re.search(r"Translated .*\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", text)
    return hyps, float(speed.group(2)) if speed else None


def bleu(hyps, ref_path: Path):
    """sacreBLEU (corpus_bleu defaults) of {id: hypothesis} against the lines of ref_path."""
    import sacrebleu

    refs = ref_path.read_text().splitlines()
    order = sorted(hyps)
    return sacrebleu.corpus_bleu([hyps[i] for i in order], [[refs[i] for i in order]]).score


def hms(seconds):
    """1h05m, 4m07s; "–" for None."""
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def rel(path) -> str:
    """A path inside the repository, relative to it."""
    return str(path).replace(f"{REPO}/", "")


def show(cmd):
    """A command as a shell line, paths inside the repository made relative to it."""
    return rel(" ".join(shlex.quote(str(c)) for c in cmd))


def current_command(recorded: str) -> str:
    """A command line recorded in a results file, as it runs today: a script that moved to
    research/ becomes its module, and a bare `-m module ...` gets the interpreter in front.

    "scripts/study.py --only dense-s1" -> ".venv/bin/python -m research.study --only dense-s1"
    """
    for old, module in MOVED.items():
        recorded = re.sub(rf"(?<![\w/.]){re.escape(old)}(?![\w.])", f"-m {module}", recorded)
    return ".venv/bin/python " + recorded if recorded.startswith("-m ") else recorded


def write_json(path: Path, obj):
    from fairseq_taskmoe.atomic import atomic_file

    with atomic_file(str(path), "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")


def read_json(path: Path):
    return json.loads(path.read_text())
