"""The package's layout is its architecture (fairseq_taskmoe/__init__.py): moe/ is plain torch,
dependencies point one way, and checkpoints name no module of the package, so that moving a module
never breaks a checkpoint written before the move."""

import ast
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "fairseq_taskmoe"

# What each part may import of the package (None: anything). Besides these, every part may use
# the top-level utilities atomic.py and langid.py.
ALLOWED = {
    "moe": {"moe"},
    "distributed": {"moe", "distributed", "integration.compat"},
    "integration": {"moe", "distributed", "integration"},
    "deploy": {"moe", "deploy", "integration.config"},
    # the service is a library: the console commands (cli/) parse options and call it
    "serve": {"moe", "distributed", "integration", "deploy", "serve", "hub", "ct2"},
    "cli": None,
}
UTILITIES = {"atomic", "langid"}


def modules(part):
    return sorted(p for p in (PKG / part).glob("*.py") if p.name != "__init__.py")


def package_imports(path: Path):
    """The fairseq_taskmoe modules (dotted, without the `fairseq_taskmoe.` prefix) that the file
    imports, at module level or inside functions, relative imports resolved."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]  # ("fairseq_taskmoe", "moe")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[0] != "fairseq_taskmoe":
                continue
            module = ".".join(target[1:])
            for alias in node.names:  # `from .distributed import checkpoints`: a module
                sub = PKG.joinpath(*target[1:], alias.name)
                if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                    found.add(f"{module}.{alias.name}" if module else alias.name)
                elif module:
                    found.add(module)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names
                      if a.name.startswith("fairseq_taskmoe.")}
    return found


def test_moe_imports_no_fairseq():
    """Every module of fairseq_taskmoe.moe imports in a fresh process without loading fairseq
    (the MoE core is plain torch, unit-testable and reusable alone), and pairs.py (which ct2.py
    and the service use) without loading torch either."""
    names = [f"fairseq_taskmoe.moe.{p.stem}" for p in modules("moe")]
    assert "fairseq_taskmoe.moe.routing" in names and "fairseq_taskmoe.moe.pairs" in names
    code = (
        "import importlib, sys\n"
        "importlib.import_module('fairseq_taskmoe.moe.pairs')\n"
        "assert 'torch' not in sys.modules, 'moe.pairs loaded torch'\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'fairseq' or m.startswith('fairseq.'))\n"
        "assert not loaded, loaded\n"
        "print('ok', len(" + repr(names) + "))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"ok {len(names)}"


def test_the_servers_modules_import_neither_torch_nor_fairseq():
    """taskmoe-serve's modules (the command, the service, the registry, the engines) import
    torch and fairseq only where a checkpoint is read, an artifact built or the fairseq backend
    run: a warm start on CTranslate2 needs neither (tests/test_serve_registry.py serves one)."""
    import importlib.util

    if importlib.util.find_spec("fastapi") is None:
        pytest.skip("the serve extra is not installed")
    names = ["fairseq_taskmoe.cli.serve", "fairseq_taskmoe.serve.factory",
             "fairseq_taskmoe.serve.app", "fairseq_taskmoe.serve.engines"]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "from fairseq_taskmoe.serve.registry import ARTIFACT_CODE, FACTS_CODE, code_version\n"
        "code_version(ARTIFACT_CODE), code_version(FACTS_CODE)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fairseq'))\n"
        "print(loaded[:5])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", f"imported {done.stdout.strip()}"


def test_package_imports_point_one_way():
    """moe <- distributed, integration, deploy <- serve <- cli, with the middle edges
    fairseq_taskmoe/__init__.py names; the subpackages' __init__ files import nothing."""
    problems = []
    for part, allowed in ALLOWED.items():
        init = PKG / part / "__init__.py"
        if package_imports(init) or any(isinstance(n, (ast.Import, ast.ImportFrom))
                                        for n in ast.walk(ast.parse(init.read_text()))):
            problems.append(f"{part}/__init__.py imports something")
        if allowed is None:
            continue
        for path in modules(part):
            for name in package_imports(path):
                if name in UTILITIES:
                    continue
                if not any(name == a or name.startswith(a + ".") for a in allowed):
                    problems.append(f"{part}/{path.name} imports fairseq_taskmoe.{name}")
    for name in UTILITIES:
        if package_imports(PKG / f"{name}.py"):
            problems.append(f"{name}.py, a utility, imports from the package")
    assert not problems, "\n".join(problems)


def test_import_check_reads_relative_imports():
    path = PKG / "integration" / "trainer_patch.py"
    assert {"distributed.checkpoints", "distributed.sharding", "atomic"} <= package_imports(path)
    assert "integration.plugin" in package_imports(PKG / "hub.py")
    assert package_imports(PKG / "integration" / "plugin.py") >= {
        "integration.compat", "integration.model", "integration.trainer_patch"}


def pickled_globals(path: Path):
    """The (module, name) of every class or function a torch zip checkpoint's pickle refers to,
    read without unpickling."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if isinstance(arg, str):
            strings.append(arg)
        if op.name == "STACK_GLOBAL":
            found.add(tuple(strings[-2:]))
        elif op.name in ("GLOBAL", "INST"):
            found.add(tuple(arg.split(" ", 1)))
    return found


def test_checkpoints_name_no_module_of_the_package(trained_tiny, tmp_path):
    """fairseq pickles the training config and our state into a checkpoint. Had it pickled a
    class of fairseq_taskmoe (an enum, a dataclass), its module path would be part of every
    checkpoint and moving the module would break loading old ones. It pickles none: only
    argparse.Namespace, OrderedDict and torch's tensor rebuilders (and the plugin loads
    checkpoints weights-only with an allow-list that holds no class of ours: integration/compat)."""
    from fairseq_taskmoe.cli.prune import main as prune_main

    pruned = tmp_path / "pruned.pt"
    prune_main([str(trained_tiny), "--lang-pair", "en-de", "--output", str(pruned)])
    for path in (trained_tiny, pruned):
        found = pickled_globals(path)
        assert ("argparse", "Namespace") in found  # the scan sees the globals there are
        ours = sorted(g for g in found if g[0].split(".")[0] == "fairseq_taskmoe")
        assert not ours, f"{path.name} pickles {ours}"
        assert {g[0].split(".")[0] for g in found} <= {"argparse", "collections", "torch"}, found
