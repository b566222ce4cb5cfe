"""The fairseq internals this plugin patches, checked before it patches them.

trainer_patch.py, compat.py and teardown.py replace functions, methods and properties of
fairseq-fixed 0.12.3.1 (the version setup.cfg pins), and rely on how fairseq calls them: which
arguments, which names a function looks up when it runs. Another fairseq may rename or
reshape any of them. Patching would then fail deep inside fairseq with a bare AttributeError,
or, worse, succeed on something fairseq no longer calls: training would run with every expert
on every rank's checkpoint name, without re-sharding, or resume from the wrong file, with no
error at all. So each patching module lists what it relies on (`Expect`) and `require` checks
the list at start-up (when the plugin is imported), refusing with one message that names the
fairseq found and every difference, before anything is patched.
"""

import inspect
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

TESTED_FAIRSEQ = "0.12.3.1"


class FairseqMismatch(RuntimeError):
    """The installed fairseq lacks (or has reshaped) something this plugin patches."""


@dataclass(frozen=True)
class Expect:
    """One thing the plugin relies on: `owner.name` (owner a module or class, shown as
    `label`) is of `kind`:

    - "function": a function whose first parameters are `params`;
    - "property": a property (of a class);
    - "attribute": anything (a module, class or object);
    - "field": a field of a dataclass (`owner` the dataclass);
    - "uses": `owner` is a function that looks up each of `params` when it runs (a global
      or attribute name in its code), so replacing that name reaches it.
    """

    owner: object
    label: str
    name: str
    kind: str
    params: Tuple[str, ...] = ()


def _params(function) -> Tuple[str, ...]:
    try:
        return tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return ()


def problem(expect: Expect) -> Optional[str]:
    """What is wrong with one expectation, or None."""
    where = f"{expect.label}.{expect.name}"
    if expect.kind == "field":
        fields = getattr(expect.owner, "__dataclass_fields__", {})
        return None if expect.name in fields else f"{where} (a config field) is missing"
    if expect.kind == "uses":
        code = getattr(inspect.unwrap(expect.owner), "__code__", None)
        names = set(code.co_names) if code is not None else set()
        lacking = [n for n in expect.params if n not in names]
        return (f"{expect.label} no longer uses {', '.join(lacking)}" if lacking else None)
    if isinstance(expect.owner, type):  # the class's own attribute, not an instance's
        value = inspect.getattr_static(expect.owner, expect.name, None)
    else:
        value = getattr(expect.owner, expect.name, None)
    if value is None:
        return f"{where} is missing"
    if expect.kind == "property":
        return None if isinstance(value, property) else f"{where} is not a property"
    if expect.kind == "function":
        if not callable(value):
            return f"{where} is not a function"
        found = _params(value)
        if found[: len(expect.params)] != tuple(expect.params):
            return (f"{where} takes ({', '.join(found)}), expected "
                    f"({', '.join(expect.params)}, ...)")
    return None


def fairseq_description() -> str:
    import fairseq

    version = getattr(fairseq, "__version__", "of unknown version")
    return f"fairseq {version} ({getattr(fairseq, '__file__', '?')})"


def require(expectations: Iterable[Expect], patcher: str):
    """Raise FairseqMismatch listing every expectation the installed fairseq does not meet."""
    problems = [p for p in map(problem, expectations) if p]
    if problems:
        raise FairseqMismatch(
            f"{__package__}.{patcher} patches internals of fairseq-fixed {TESTED_FAIRSEQ}, "
            f"but the installed {fairseq_description()} differs: {'; '.join(problems)}. "
            f"Install fairseq-fixed=={TESTED_FAIRSEQ} (`make venv` does), or port "
            f"{__package__.replace('.', '/')}/{patcher}.py to this fairseq; the plugin does not "
            "run half-patched.")
