"""The upcycling study's rows, the continuation schedule, every row's commands and the compute
accounting, as pure functions of the study's preset (research.study.grid)."""

import math
from dataclasses import dataclass
from pathlib import Path

from research.common import BIN
from research.study.grid import PRESETS, VARIANTS, train_command

DEFAULT_CONTINUATION = 500  # --upcycle-updates: M, the updates every continued row trains
CURVE_EVERY = 100  # --curve-every: a checkpoint saved, and a curve point, every N updates
# Adam starts afresh under --finetune-from-model: its second-moment average has a horizon of
# 1 / (1 - beta2) = 50 updates for the study's betas (0.9, 0.98), so the continuation re-warms
# over that many before taking full steps.
REWARM_UPDATES = 50
# Token-routed copies of one FFN behind a learned gate: Gaussian noise of 1% of each weight
# matrix's std breaks their symmetry while keeping step 0 near the dense function (Drop-
# Upcycling's re-initialisation of half the units is tuned for runs far longer than M updates).
TOKEN_NOISE = 0.01
GOAL_MARGIN, GOAL_SHARE = 1.0, 0.6  # issue 28: +1.0 BLEU over dense continued, <= 60% compute


@dataclass(frozen=True)
class Row:
    """One training run of the study. kind: dense (the study's dense-s1, trained from scratch),
    upcycled (taskmoe-upcycle of the dense checkpoint, then M updates), continued (the dense
    checkpoint, M more updates) or scratch (the study's task-MoE from scratch for the dense
    run's updates plus M). variant: the study variant (grid.VARIANTS) whose model and flags the
    row trains."""

    kind: str
    variant: str
    seed: int

    @property
    def name(self) -> str:
        prefix = {"dense": "", "upcycled": "upcycled_", "continued": "",
                  "scratch": "scratch_"}[self.kind]
        variant = "dense_continued" if self.kind == "continued" else self.variant
        return f"{prefix}{variant}-s{self.seed}"

    @property
    def label(self) -> str:
        routing = VARIANTS[self.variant]["label"]
        return {"dense": "dense (pre-training)", "upcycled": f"upcycled {routing}",
                "continued": "dense, continued", "scratch": f"{routing} from scratch"}[self.kind]

    @property
    def from_dense(self) -> bool:
        """Starts from the dense checkpoint: its pre-training counts in the row's compute."""
        return self.kind in ("upcycled", "continued")

    @property
    def task_routed(self) -> bool:
        routing = VARIANTS[self.variant]["routing"] or ()
        return bool(set(routing) & {"target", "lang_pair"})


# Study order: after the first four the main comparison exists for one seed.
ROWS = [Row("dense", "dense", 1), Row("upcycled", "target_target", 1),
        Row("continued", "dense", 1), Row("scratch", "target_target", 1),
        Row("upcycled", "target_target", 2), Row("continued", "dense", 2),
        Row("upcycled", "token_token", 1)]
DENSE = ROWS[0]


def row_named(name: str) -> Row:
    return next(r for r in ROWS if r.name == name)


def select(only):
    """The rows of --only (comma-separated names, kinds or variants), in study order; the dense
    row always, first: every other row needs it (its checkpoint, its compute, its hypotheses)."""
    if not only:
        return list(ROWS)
    wanted = {w for w in only.split(",") if w}
    known = {r.name for r in ROWS} | {r.kind for r in ROWS} | {r.variant for r in ROWS}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; rows: {', '.join(r.name for r in ROWS)}")
    return [r for r in ROWS if r is DENSE or wanted & {r.name, r.kind, r.variant}]


def row_updates(row: Row, dense_steps: int, continuation: int) -> int:
    """The updates a row trains itself (its --max-update): the dense pre-training's length
    (the study's budget, 1,000 updates for cpu), plus M for the scratch run, M for the rest."""
    if row.kind == "dense":
        return dense_steps
    if row.kind == "scratch":
        return dense_steps + continuation
    return continuation


# ---------------------------------------------------------------- the schedule


def inverse_sqrt_lr(flags: dict, update: int) -> float:
    """fairseq's inverse_sqrt learning rate at `update` for the preset's --lr and warm-up
    (warmup_init_lr 0): linear up to --lr, then lr * sqrt(warmup / update)."""
    lr, warmup = float(flags["--lr"]), int(flags["--warmup-updates"])
    return lr * update / warmup if update < warmup else lr * math.sqrt(warmup / update)


def continuation_schedule(preset: str, dense_steps: int, continuation: int) -> dict:
    """The flags that replace the preset's schedule for every continued row (upcycled and dense
    alike): the dense run's own inverse-sqrt schedule carried on where it stopped, from its rate
    at its last update to the rate it would reach M updates later, re-warmed over
    REWARM_UPDATES for the fresh Adam: fairseq's polynomial_decay with power 1 (linear decay
    after the warm-up; within 3% of the inverse-sqrt curve for 1,000 + 500 updates)."""
    flags, n = PRESETS[preset]["flags"], dense_steps
    if flags["--lr-scheduler"] != "inverse_sqrt":
        raise ValueError(f"preset {preset}: the continuation carries on an inverse_sqrt "
                         f"schedule, not {flags['--lr-scheduler']}")
    return {"--lr-scheduler": "polynomial_decay",
            "--lr": f"{inverse_sqrt_lr(flags, n):.6g}",
            "--warmup-updates": REWARM_UPDATES,
            "--end-learning-rate": f"{inverse_sqrt_lr(flags, n + continuation):.6g}",
            "--total-num-update": continuation, "--power": 1}


# ---------------------------------------------------------------- commands


def with_flags(cmd, flags: dict):
    """cmd with each flag's value replaced where the flag is there, else appended."""
    out = list(cmd)
    for flag, value in flags.items():
        names = [str(c) for c in out]
        if flag in names:
            out[names.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def expert_dim(row: Row, preset: str) -> int:
    """The experts' width of an upcycled row: the preset's (512 for cpu, half the dense FFN: the
    dense FFN split in two pieces, exact for task routing) where the routing lets it split,
    else the dense FFN's width (copies: token routing picks each token's experts, so every
    piece would not run for every token)."""
    flags = PRESETS[preset]["flags"]
    if row.task_routed:
        return int(flags["--moe-expert-ffn-dim"])
    return int(flags["--encoder-ffn-embed-dim"])


def upcycle_command(row: Row, dense_checkpoint: Path, output: Path, preset: str):
    """taskmoe-upcycle of the dense checkpoint into the row's MoE (the preset's experts, top-k
    and MoE layers), seeded by the row's seed; token routing gets TOKEN_NOISE."""
    flags = PRESETS[preset]["flags"]
    enc, dec = VARIANTS[row.variant]["routing"]
    cmd = [BIN / "taskmoe-upcycle", dense_checkpoint, "--output", output,
           "--moe-expert-count", flags["--moe-expert-count"], "--moe-top-k", flags["--moe-top-k"],
           "--moe-expert-ffn-dim", expert_dim(row, preset),
           "--encoder-moe-routing", enc, "--decoder-moe-routing", dec, "--seed", row.seed]
    if "--moe-freq" in flags:
        cmd += ["--moe-freq", flags["--moe-freq"]]
    if not row.task_routed:
        cmd += ["--noise", TOKEN_NOISE]
    return cmd


def training_command(row: Row, data: Path, save_dir: Path, dense_steps: int, continuation: int,
                     preset: str, langs, pairs, save_interval: int, init: Path = None):
    """The row's fairseq-train command: the study's (grid.train_command) for its variant and
    seed; for continued rows with continuation_schedule, --finetune-from-model `init` (the
    upcycled or the dense checkpoint), and an upcycled row's expert width."""
    cmd = train_command(data, row.variant, row.seed, save_dir,
                        row_updates(row, dense_steps, continuation), save_interval, preset,
                        langs, pairs)
    if not row.from_dense:
        return cmd
    if init is None:
        raise ValueError(f"{row.name} continues a checkpoint: give init")
    extra = {**continuation_schedule(preset, dense_steps, continuation),
             "--finetune-from-model": init}
    if row.kind == "upcycled":
        extra["--moe-expert-ffn-dim"] = expert_dim(row, preset)
    return with_flags(cmd, extra)


# ---------------------------------------------------------------- compute accounting


def add(*parts):
    """The sum of compute records {"updates", "cpu_seconds", "wall_seconds"}; a None part or
    value makes that figure None (unknown), never a smaller number."""
    out = {}
    for key in ("updates", "cpu_seconds", "wall_seconds"):
        values = [None if p is None else p.get(key) for p in parts]
        out[key] = None if None in values else round(sum(values), 1)
    return out


def row_compute(row: Row, own: dict, dense: dict = None, upcycle: dict = None) -> dict:
    """A row's training compute: its own, and its total with the dense pre-training (counted
    once, for every row that starts from it) and the taskmoe-upcycle command (CPU and wall;
    no updates). own / dense / upcycle: {"updates", "cpu_seconds", "wall_seconds"}."""
    parts = [own]
    if row.from_dense:
        parts.append(dense)
    if row.kind == "upcycled":
        parts.append(dict(upcycle or {}, updates=0) if upcycle is not None else None)
    return {"own": own, "dense_pretraining": dense if row.from_dense else None,
            "upcycle": upcycle if row.kind == "upcycled" else None, "total": add(*parts)}


def budget_continuation(dense_cpu: float, dense_steps: int, continued_per_update: float,
                        scratch_per_update: float, share: float = 0.6):
    """The continuations M for which dense_cpu + M * continued_per_update stays within `share`
    of a scratch run of dense_steps + M updates at scratch_per_update CPU seconds each:
    ("at most", M), ("at least", M), ("any", None) or ("none", None)."""
    room = share * dense_steps * scratch_per_update - dense_cpu  # M * (u - share * s) <= room
    slope = continued_per_update - share * scratch_per_update
    if slope > 0:
        return ("at most", math.floor(room / slope)) if room >= 0 else ("none", None)
    if slope < 0:
        return ("any", None) if room >= 0 else ("at least", math.ceil(room / slope))
    return ("any", None) if room >= 0 else ("none", None)
