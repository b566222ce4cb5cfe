"""The docs are checked like code: README.md and docs/*.md cannot name what does not exist.

For every ```bash block: each command exists (a console script of setup.cfg, a scripts/ file, a
`python -m research...` module of the research harness, a make target of the Makefile, a
fairseq-* program in .venv/bin, or an ordinary shell tool of OTHER_COMMANDS), and each flag it is
given is one its parser accepts: taskmoe-* through their build_parser(), scripts/*.py and
research modules through the argparse parser their parse_args()/main() builds (a package's
through its __main__), fairseq-* through fairseq's own parser with the plugin loaded (as
fairseq-train would parse the line, model / task / criterion flags included). For ```python
blocks: what they import from fairseq_taskmoe exists and takes the keyword arguments given.
Everywhere: each repository path the text names (fairseq_taskmoe/..., research/..., scripts/...,
docs/..., results/..., tests/...) and each link (with its #anchor) exists, each `--flag` named
in prose belongs to one of those parsers, and the README's code map lists exactly the modules and
subpackages of fairseq_taskmoe/ and the modules of each subpackage (serve/ and cli/ described
whole).

Shell placeholders are fine: $DATA, CHECKPOINT, <work>, [--port 5000], `...`. Variables assigned
in a doc's earlier bash blocks (DATA=..., TASK="...") are expanded as the shell would.
Nothing is run: a few seconds, most of it importing fairseq.
"""

import argparse
import ast
import configparser
import contextlib
import functools
import glob
import importlib
import importlib.util
import inspect
import io
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Commands that are not this project's and need no check beyond being named.
OTHER_COMMANDS = {"cd", "source", ".", "export", "curl", "git", "echo", "cat", "ls", "mkdir",
                  "grep", "head", "tail", "wc", "pip", "apt-get", "sacrebleu", "time", "bash",
                  "ray", "serve"}  # the last two: Ray's CLI (docs/serving.md, scale-out)
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
# A flag's value that the command writes: it need not exist yet.
OUTPUT_FLAGS = {"--out", "--output", "--save-dir", "--work", "--results", "--cache-dir"}
# Files the docs name that a command writes when it runs, and that command has not run yet.
NOT_WRITTEN_YET = {
    "results/study-gpu": "python -m research.study --preset gpu (never run: no GPU lent)",
    "docs/img/study-gpu": "python -m research.study --preset gpu",
    "docs/results-gpu.md": "python -m research.study.report --results results/study-gpu",
}
# Flags the prose names that belong to other programs, said so where they are named.
FOREIGN_FLAGS = {"--record-a2a-perf-stats"}  # fairseq's moe branch, named for comparison
# scripts/*.sh: (the program whose flags it passes on, positional arguments before them)
SHELL_SCRIPTS = {"scripts/train_multiproc.sh": ("fairseq-train", 2),
                 "scripts/gpu_check.sh": (None, 1)}
PATH_RE = re.compile(r"(?<![\w/.$-])((?:fairseq_taskmoe|research|scripts|docs|results|tests)/"
                     r"[\w.*{},/-]*|user_dir\b)")
LINK_RE = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
FENCE_RE = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)
FLAG_RE = re.compile(r"^--[A-Za-z0-9][\w-]*")


# ---------------------------------------------------------------- what the repository holds


@functools.lru_cache(None)
def console_scripts():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): target.strip() for name, target in (ln.split("=") for ln in lines)}


@functools.lru_cache(None)
def make_targets():
    text = (REPO / "Makefile").read_text()
    targets = set()
    for m in re.finditer(r"^([\w.$()/ -]+?)\s*:(?!=)", text, re.M):
        targets.update(t for t in m.group(1).split() if "$" not in t)
    return targets


def _quiet_parse(parse):
    """Runs an argparse parse; returns (result, None) or (None, argparse's error message)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parse(), None
    except SystemExit:
        lines = [ln for ln in err.getvalue().strip().splitlines() if "error:" in ln]
        return None, (lines[-1].split("error:", 1)[1].strip() if lines else err.getvalue())


@functools.lru_cache(None)
def taskmoe_parser(command):
    module = console_scripts()[command].split(":")[0]
    return importlib.import_module(module).build_parser()


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


_CAPTURE = "--docs-test-capture-parser"


# `python -m MODULE` of the research harness (research/), as the docs write it
MODULE_RE = re.compile(r"(?<![\w.])-m\s+(research(?:\.\w+)*)")


@functools.lru_cache(None)
def script_parser(rel):
    """The argparse parser of scripts/NAME.py (see parser_of)."""
    for folder in (str(REPO), str(REPO / "scripts")):  # scripts import their siblings
        if folder not in sys.path:
            sys.path.insert(0, folder)
    return parser_of(importlib.import_module(Path(rel).stem), rel)


def runnable_module(name):
    """The module `python -m name` runs (a package's __main__), or None if there is none."""
    try:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations is not None:  # a package
            spec = importlib.util.find_spec(name + ".__main__")
    except ModuleNotFoundError:  # a parent package is missing
        return None
    return spec.name if spec is not None else None


@functools.lru_cache(None)
def module_parser(name):
    """The argparse parser of `python -m name` (research/...; see parser_of)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return parser_of(importlib.import_module(runnable_module(name)), f"python -m {name}")


def parser_of(mod, label):
    """A command's argparse parser: its module's own build_parser(), else the parser that its
    parse_args(argv) or main(argv) builds, caught at its parse_args call (nothing else runs)."""
    own = getattr(mod, "build_parser", None)
    if own is not None and own.__module__ == mod.__name__:
        return own()
    original = argparse.ArgumentParser.parse_args

    def catch(self, args=None, namespace=None):
        if args is None or _CAPTURE in list(args):
            raise _Captured(self)
        return original(self, args, namespace)  # e.g. research.distill reading the study's defaults

    entry = getattr(mod, "parse_args", None) or mod.main
    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        try:
            entry([_CAPTURE]) if inspect.signature(entry).parameters else entry()
        except _Captured as c:
            return c.parser
    raise AssertionError(f"{label}: no argparse parser found through parse_args() or main()")


FAIRSEQ_PARSERS = {"fairseq-train": "get_training_parser",
                   "fairseq-generate": "get_generation_parser",
                   "fairseq-interactive": "get_interactive_generation_parser",
                   "fairseq-validate": "get_validation_parser",
                   "fairseq-preprocess": "get_preprocessing_parser"}


def fairseq_parse(command, tokens):
    """Parses tokens as `command` would (fairseq's parser; --user-dir loads the plugin, --arch,
    --task, --criterion, ... add their flags). Returns (parser, problems)."""
    from fairseq import options

    tokens = [str(REPO / "user_dir") if t == "user_dir" else t for t in tokens]
    parser = getattr(options, FAIRSEQ_PARSERS[command])()
    result, error = _quiet_parse(
        lambda: options.parse_args_and_arch(parser, tokens, parse_known=True))
    if error:
        return parser, [f"{command}: {error}"]
    extra = result[1]
    return parser, [f"{command} does not take {x}" for x in extra if x.startswith("-")] + \
        [f"{command}: unexpected argument {x!r}" for x in extra if not x.startswith("-")]


def _options(parser):
    return set(parser._option_string_actions)


@functools.lru_cache(None)
def known_flags():
    """Every flag of our commands and scripts, and of fairseq's commands with the plugin's model,
    task and criterion and the usual optimizer, scheduler and BPE: what prose may name."""
    base = ["DATA", "--user-dir", "user_dir", "--task", "translation_task_moe", "--langs",
            "en,de", "--lang-pairs", "en-de", "--arch", "task_moe", "--criterion",
            "moe_label_smoothed_cross_entropy", "--optimizer", "adam", "--lr-scheduler",
            "inverse_sqrt", "--bpe", "sentencepiece"]
    flags = set()
    for command in FAIRSEQ_PARSERS:
        tokens = base if command != "fairseq-preprocess" else []
        if command in ("fairseq-generate", "fairseq-interactive", "fairseq-validate"):
            tokens = [t for t in base if t not in ("--arch", "task_moe", "--optimizer", "adam",
                                                  "--lr-scheduler", "inverse_sqrt")]
        flags |= _options(fairseq_parse(command, tokens)[0])
    for command in console_scripts():
        flags |= _options(taskmoe_parser(command))
    named = {m for doc in DOCS for m in re.findall(r"scripts/\w+\.py", doc.read_text())}
    for rel in sorted(named):
        if (REPO / rel).exists():
            flags |= _options(script_parser(rel))
    modules = {m for doc in DOCS for m in MODULE_RE.findall(doc.read_text())}
    for name in sorted(modules):
        if runnable_module(name):
            flags |= _options(module_parser(name))
    return flags


# ---------------------------------------------------------------- reading markdown


def fences(text):
    """[(language, first line number of the body, body)] of the fenced blocks."""
    return [(m.group(1), text.count("\n", 0, m.start(2)) + 1, m.group(2))
            for m in FENCE_RE.finditer(text)]


def prose(text):
    """The text outside fenced blocks (blocks blanked, so line numbers still hold)."""
    return FENCE_RE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.lru_cache(None)
def anchors(text):
    seen, out = {}, set()
    for line in prose(text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def expand_braces(path):
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",")
            for p in expand_braces(path[:m.start()] + alt + path[m.end():])]


def repo_path_problem(path):
    """None when the repository path exists (globs must match something), else the problem."""
    path = path.rstrip(".,;:")
    if path.endswith("..."):
        path = path[:-3]
    for p in expand_braces(path):
        if p.rstrip("/") in NOT_WRITTEN_YET:
            continue
        if not (glob.glob(str(REPO / p)) if "*" in p else (REPO / p).exists()):
            return f"names {p}, which does not exist"
    return None


# ---------------------------------------------------------------- shell blocks


def shell_commands(code, env):
    """Yields (line offset, argv) for each simple command of a bash block; variable assignments
    of their own (DATA=...) go into env and are expanded in later commands, as the shell does."""
    pending, start = "", 0
    for i, line in enumerate(code.split("\n")):
        if not pending:
            start = i
        if line.endswith("\\"):  # continued on the next line (also inside quotes)
            pending += line[:-1] + " "
            continue
        pending += line
        expanded = re.sub(r"\$\{?([A-Za-z_]\w*)\}?",
                          lambda m: env.get(m.group(1), m.group(0)), pending)
        expanded = re.sub(r"<[A-Za-z][^<>\s]*>", "PLACEHOLDER", expanded)
        expanded = re.sub(r"(?<!\S)\d*>&\d+|(?<!\S)\d(?=>)", "", expanded)  # 2>&1, 2> f
        lex = shlex.shlex(expanded, posix=True, punctuation_chars="|&;<>")
        lex.whitespace_split, lex.commenters = True, "#"
        try:
            tokens = list(lex)
        except ValueError:  # an open quote: the command goes on on the next line
            pending += "\n"
            continue
        pending = ""
        argv, skip = [], False
        for tok in tokens + [";"]:
            if skip:
                skip = False
            elif tok and set(tok) <= set("<>&") and tok.strip("&"):  # redirection: > file
                skip = True
            elif tok and set(tok) <= set("|&;"):
                if argv:
                    yield start, argv
                argv = []
            else:
                argv.append(tok)


def check_bash(code, env):
    """[(line offset, problem)] for one bash block."""
    problems = []
    for offset, argv in shell_commands(code, env):
        while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
            name, value = argv.pop(0).split("=", 1)
            if not argv:
                env[name] = value
        while argv and argv[0] in ("time", "env", "nohup", "exec"):
            argv.pop(0)
        if argv:
            problems += [(offset, p) for p in check_command(argv)]
    return problems


def _strip_placeholders(args):
    """[--port 5000] -> --port 5000; drops `...`."""
    out = []
    for a in args:
        a = a[1:] if a.startswith("[") else a
        a = a[:-1] if a.endswith("]") and "[" not in a else a
        if a and a != "...":
            out.append(a)
    return out


def _paths_in_args(args):
    problems, prev = [], None
    for a in args:
        value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
        if prev not in OUTPUT_FLAGS and PATH_RE.fullmatch(value.rstrip("/")):
            problem = repo_path_problem(value)
            if problem:
                problems.append(problem)
        prev = a
    return problems


def check_command(argv):
    """Problems of one command line: does the command exist, does it take these flags, do the
    repository paths it is given exist."""
    cmd, args = argv[0], _strip_placeholders(argv[1:])
    problems = _paths_in_args(args)
    if cmd.startswith(".venv/bin/") and cmd not in PYTHONS:
        if not (REPO / cmd).exists():
            return problems + [f"{cmd} does not exist"]
        cmd = cmd[len(".venv/bin/"):]
    if cmd in PYTHONS:
        if args[:1] == ["-m"] and args[1:2] and args[1].split(".")[0] == "research":
            if not runnable_module(args[1]):
                return problems + [f"no module {args[1]} to run (research/)"]
            return problems + parse_with(module_parser(args[1]), f"python -m {args[1]}", args[2:])
        if args[:1] == ["-m"]:
            if args[1:2] != ["pytest"] and importlib.util.find_spec(args[1]) is None:
                problems.append(f"no module {args[1]}")
            return problems
        if not args or args[0] == "-c":
            return problems
        return problems + check_script(args[0], args[1:])
    if cmd == "make":
        return problems + [f"make has no target {a!r} (Makefile)" for a in args
                           if not a.startswith("-") and "=" not in a
                           and a not in make_targets()]
    if cmd.startswith("taskmoe-"):
        if cmd not in console_scripts():
            return problems + [f"{cmd} is not a console script of setup.cfg"]
        return problems + parse_with(taskmoe_parser(cmd), cmd, args)
    if cmd.startswith("fairseq-"):
        if not (VENV_BIN / cmd).exists():
            return problems + [f"{cmd} is not installed in .venv/bin"]
        if cmd in FAIRSEQ_PARSERS and not {"-h", "--help"} & set(args):
            problems += fairseq_parse(cmd, args)[1]
        return problems
    if cmd.startswith(("scripts/", "./scripts/")) or cmd in ("bash", "sh") and args:
        if cmd in ("bash", "sh"):
            cmd, args = args[0], args[1:]
        return problems + check_script(cmd, args)
    if cmd in OTHER_COMMANDS:
        return problems
    return problems + [f"unknown command {cmd!r} (not ours, not in OTHER_COMMANDS)"]


def check_script(path, args):
    rel = path[2:] if path.startswith("./") else path
    if not (REPO / rel).is_file():
        return [f"{rel} does not exist"]
    if rel.startswith("scripts/") and rel.endswith(".py"):
        return parse_with(script_parser(rel), rel, args)
    if rel in SHELL_SCRIPTS:
        passes_to, positional = SHELL_SCRIPTS[rel]
        if passes_to:
            return fairseq_parse(passes_to, ["DATA"] + args[positional:])[1]
        return [f"{rel} takes no flag {a}" for a in args if a.startswith("-")] + \
            ([f"{rel} takes at most {positional} arguments"] if len(args) > positional else [])
    return []


def parse_with(parser, name, args):
    """Each --flag must be one the parser defines (spelled out: no abbreviations), and the
    whole line must parse (choices, required arguments, values)."""
    options = _options(parser)
    problems = [f"{name} does not take {a.split('=')[0]}" for a in args
                if FLAG_RE.match(a) and a.split("=")[0] not in options]
    if not problems and not {"-h", "--help"} & set(args):
        _, error = _quiet_parse(lambda: parser.parse_args(args))
        if error:
            problems.append(f"{name}: {error}")
    return problems


# ---------------------------------------------------------------- python blocks


def check_python(code):
    problems, imported = [], {}
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fairseq_taskmoe"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    problems.append(f"{node.module} has no {alias.name}")
                else:
                    imported[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in imported:
            try:
                inspect.signature(imported[node.func.id]).bind(
                    *node.args, **{k.arg: None for k in node.keywords if k.arg})
            except TypeError as e:
                problems.append(f"{node.func.id}(...): {e}")
    return problems


# ---------------------------------------------------------------- one document


def check_markdown(text, path, check_prose_flags=True):
    """Every problem of one markdown document, as 'FILE:LINE: problem'."""
    path = REPO / path  # an absolute path stays as it is
    name = path.relative_to(REPO)
    problems, env = [], {}
    for lang, line, body in fences(text):
        if lang in ("bash", "sh", "shell"):
            problems += [f"{name}:{line + off}: {p}" for off, p in check_bash(body, env)]
        elif lang == "python":
            problems += [f"{name}:{line}: {p}" for p in check_python(body)]
    outside = prose(text)
    for n, line in enumerate(outside.splitlines(), 1):
        for target in LINK_RE.findall(line):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, frag = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if file and not dest.exists():
                problems.append(f"{name}:{n}: link to {target}, which does not exist")
            elif frag and dest.suffix == ".md" and \
                    frag not in anchors(dest.read_text() if file else text):
                problems.append(f"{name}:{n}: link to {target}: no heading #{frag}")
        no_links = re.sub(r"\]\([^)]*\)", "]", line)
        for p in PATH_RE.findall(no_links):
            problem = repo_path_problem(p)
            if problem:
                problems.append(f"{name}:{n}: {problem}")
        if check_prose_flags:
            for span in re.findall(r"`([^`]+)`", line):
                if span.startswith("--"):
                    for flag in re.findall(r"(?<![\w-])--[A-Za-z0-9][\w-]*", span):
                        if flag not in known_flags() and flag not in FOREIGN_FLAGS:
                            problems.append(f"{name}:{n}: names {flag}, which no command "
                                            "of ours or fairseq's takes")
    return problems


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_doc_names_only_what_exists(doc):
    problems = check_markdown(doc.read_text(), doc)
    assert not problems, "\n".join(problems)


# Subpackages the code map describes in one line, as a whole (a command and its parts); every
# other subpackage is listed module by module.
ONE_LINE_PACKAGES = {"serve", "cli"}


def code_map(block):
    """{"": the entries two spaces in under `fairseq_taskmoe/`, "moe": the entries four spaces in
    under `  moe/`, ...} of a Layout block; deeper-indented lines continue a description."""
    listed, package, inside = {}, None, False
    for line in block.splitlines():
        entry = re.match(r"^(  |    )([^\s#]\S*)", line)
        if line.startswith("fairseq_taskmoe/"):
            inside, package = True, None
            listed[""] = set()
        elif inside and entry and len(entry.group(1)) == 2:
            name = entry.group(2)
            listed[""].add(name.rstrip("/"))
            package = name.rstrip("/") if name.endswith("/") else None
        elif inside and entry and package:
            listed.setdefault(package, set()).add(entry.group(2).rstrip("/"))
        elif line and not line.startswith(" "):
            inside = False
    return listed


def package_tree(pkg):
    """What code_map should read for the package folder `pkg`."""
    def names(folder):
        return {p.name for p in folder.glob("*.py") if p.name != "__init__.py"} | \
            {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}

    tree = {"": names(pkg)}
    for name in tree[""]:
        if (pkg / name).is_dir() and name not in ONE_LINE_PACKAGES:
            tree[name] = names(pkg / name)
    return tree


def code_map_problems(listed, present):
    problems = []
    for package in sorted(set(listed) | set(present)):
        where = f"fairseq_taskmoe/{package}/" if package else "fairseq_taskmoe/"
        extra = sorted(listed.get(package, set()) - present.get(package, set()))
        missing = sorted(present.get(package, set()) - listed.get(package, set()))
        if extra:
            problems.append(f"README Layout lists under {where} what is not there: {extra}")
        if missing:
            problems.append(f"README Layout misses in {where}: {missing}")
    return problems


def test_readme_code_map_is_the_tree():
    """The README's Layout block lists every module and subpackage of fairseq_taskmoe/, and the
    modules of each subpackage (but serve/ and cli/, described whole), and nothing else."""
    text = (REPO / "README.md").read_text()
    block = fences(text.split("\n## Layout", 1)[1])[0][2]
    problems = code_map_problems(code_map(block), package_tree(REPO / "fairseq_taskmoe"))
    assert not problems, "\n".join(problems)


def test_code_map_check_catches_drift(tmp_path):
    pkg = tmp_path / "fairseq_taskmoe"
    for path in ["__init__.py", "hub.py", "moe/__init__.py", "moe/routing.py", "moe/experts.py",
                 "serve/__init__.py", "serve/app.py", "notes/readme.txt"]:
        (pkg / path).parent.mkdir(parents=True, exist_ok=True)
        (pkg / path).write_text("")
    block = """\
fairseq_taskmoe/    top line
                    continued
  moe/              the core
    routing.py      gates
    dispatch.py     moved away
  serve/            the service (described whole)
  ct2.py            gone
user_dir/           not the package
    hub.py          not under fairseq_taskmoe/
"""
    assert code_map_problems(code_map(block), package_tree(pkg)) == [
        "README Layout lists under fairseq_taskmoe/ what is not there: ['ct2.py']",
        "README Layout misses in fairseq_taskmoe/: ['hub.py']",
        "README Layout lists under fairseq_taskmoe/moe/ what is not there: ['dispatch.py']",
        "README Layout misses in fairseq_taskmoe/moe/: ['experts.py']"]


# Negative tests: the checker must catch what drifts.
BAD = """\
# Guide

See [the guide](docs/nothing-here.md) and [usage](#no-such-heading), and
`fairseq_taskmoe/no_such_module.py`.

```bash
DATA=work/multi30k/bin
TASK="--user-dir user_dir --task translation_task_moe --langs en,de --lang-pairs en-de"
taskmoe-prune CHECKPOINT --lang-pair en-de --output x.pt --no-such-flag
taskmoe-frobnicate CHECKPOINT
fairseq-train $DATA $TASK --arch task_moe_small --moe-expert-cnt 8
.venv/bin/python scripts/demo.py --train-hours 3
.venv/bin/python scripts/no_such_script.py
.venv/bin/python -m research.study --only dense --no-such-flag
.venv/bin/python -m research.bench.no_such_bench
python -m research.study.report --results
make no-such-target
frobnicate --now
```

```python
from fairseq_taskmoe.hub import load_translator, no_such_function
mt = load_translator("x.pt", no_such_keyword=1)
```

The flag `--moe-no-such-option` does not exist.
"""


def test_checker_catches_drift():
    problems = "\n".join(check_markdown(BAD, "BAD.md"))
    for expected in ["link to docs/nothing-here.md", "no heading #no-such-heading",
                     "fairseq_taskmoe/no_such_module.py, which does not exist",
                     "taskmoe-prune does not take --no-such-flag",
                     "taskmoe-frobnicate is not a console script",
                     "fairseq-train does not take --moe-expert-cnt",
                     "scripts/demo.py does not take --train-hours",
                     "scripts/no_such_script.py does not exist",
                     "python -m research.study does not take --no-such-flag",
                     "no module research.bench.no_such_bench to run",
                     "python -m research.study.report: argument --results: expected one",
                     "make has no target 'no-such-target'",
                     "unknown command 'frobnicate'",
                     "fairseq_taskmoe.hub has no no_such_function",
                     "load_translator(...)",
                     "names --moe-no-such-option"]:
        assert expected in problems, f"not caught: {expected}\n{problems}"


GOOD = """\
# Guide

## Set up

```bash
DATA=work/multi30k/bin
TASK="--user-dir user_dir --task translation_task_moe --langs en,de \\
  --lang-pairs en-de,de-en --encoder-langtok tgt --decoder-langtok"
fairseq-train $DATA $TASK --arch task_moe_small --moe-expert-count 8 \\
  --criterion moe_label_smoothed_cross_entropy --moe-gate-loss-wt 0.01 --optimizer adam \\
  --adam-betas '(0.9, 0.98)' --save-dir work/ckpt --cpu   # a comment
taskmoe-prune CHECKPOINT --lang-pair '*-de' --output <out>/en-de.pt --force
taskmoe-serve CHECKPOINT --data $DATA [--port 5000] > work/serve.log 2>&1
curl -s 127.0.0.1:5000/translate -d 'q=Hallo&source=de&target=en' | head -1
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_docs.py && make test
scripts/train_multiproc.sh 2 $DATA $TASK --arch task_moe_small --max-update 50
.venv/bin/python -m research.study --only dense,target_target-s1 --work /tmp/s   # resumable
python -m research.bench.inference --experts 8 [--reps 3] && make study-report
```

See [Set up](#set-up), `scripts/demo.py`, `research/study/`, `--moe-top-k`, `--only-steps` and
`results/study/*.json`.
"""


def test_checker_accepts_placeholders_and_shell():
    assert check_markdown(GOOD, "GOOD.md") == []


def test_wrong_value_and_abbreviation_are_caught():
    assert any("invalid choice" in p for p in check_command(
        ["taskmoe-export", "CKPT", "--lang-pair", "en-de", "--format", "onnx", "--output", "x"]))
    assert check_command(["taskmoe-prune", "CKPT", "--lang-p", "en-de", "--output", "x"]) == \
        ["taskmoe-prune does not take --lang-p"]
