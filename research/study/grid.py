"""The study's grid of runs: the backbone and recipe every model shares, the scale presets (cpu
and gpu for Multi30k, lohelp for LoHelp), the routing variants and their seeds, the runs of each
corpus, and a run's fairseq-train command."""

from pathlib import Path

from research.common import BIN, LANGS, PAIRS, task_flags

TRAINED = PAIRS  # the six en<->{de,fr,cs} directions every model trains on
ZERO_SHOT = ["de-fr", "fr-de", "de-cs", "cs-de", "fr-cs", "cs-fr"]
DIRECTIONS = TRAINED + ZERO_SHOT
BEAM = 5
MAX_TOKENS = 4096
# LoHelp's budget: three runs, trained side by side, and their evaluation within one 3-hour
# working session (a session's work folder does not outlive it). Measured 2026-12-07 with the
# three runs side by side on 2 cores, one thread each: 5-7.6 s per update each, so 800 updates
# take about 80 minutes. (Sized first at 4,500 updates, about 3 hours per run: 2.4 s per update
# on 2 idle cores from the CPU time per update against Multi30k's; no such run ever finished.)
LOHELP_MAX_UPDATE = 800

# The backbone and training recipe of every model in the study; VARIANTS only add routing and
# balance-loss flags. Values of None are switches.
SHARED_FLAGS = {
    "--arch": "task_moe",
    "--encoder-layers": 3, "--decoder-layers": 3,
    "--encoder-embed-dim": 256, "--decoder-embed-dim": 256,
    "--encoder-ffn-embed-dim": 1024, "--decoder-ffn-embed-dim": 1024,
    "--encoder-attention-heads": 4, "--decoder-attention-heads": 4,
    "--share-all-embeddings": None,
    "--moe-expert-count": 8, "--moe-expert-ffn-dim": 512, "--moe-top-k": 2,
    "--criterion": "moe_label_smoothed_cross_entropy", "--label-smoothing": 0.1,
    "--optimizer": "adam", "--adam-betas": "(0.9, 0.98)",
    "--lr-scheduler": "inverse_sqrt", "--lr": 0.002, "--warmup-updates": 400,
    "--dropout": 0.1,
    "--max-tokens": MAX_TOKENS,
}

# The scale of the study (--preset). "cpu" is what results/study/ holds: ~25-40 minutes per model
# on 2 CPU cores. "gpu" is the same study near Transformer-Base scale for one GPU (d=512, 6+6
# layers, 32 experts of width 1024 in every second layer, mixed precision, 30k updates of 16k
# tokens); it has its own work, results and image folders and has not been run here (no GPU was
# lent to this project), so its flags are a starting point, not a tuned recipe.
PRESETS = {
    "cpu": dict(flags=SHARED_FLAGS, max_update=1000, device=["--cpu"], folder="study"),
    "gpu": dict(flags={
        **SHARED_FLAGS,
        "--encoder-layers": 6, "--decoder-layers": 6,
        "--encoder-embed-dim": 512, "--decoder-embed-dim": 512,
        "--encoder-ffn-embed-dim": 2048, "--decoder-ffn-embed-dim": 2048,
        "--encoder-attention-heads": 8, "--decoder-attention-heads": 8,
        "--moe-freq": 2, "--moe-expert-count": 32, "--moe-expert-ffn-dim": 1024,
        "--lr": 0.0007, "--warmup-updates": 4000, "--dropout": 0.1,
        "--max-tokens": 16384, "--amp": None,
    }, max_update=30000, device=[], folder="study-gpu"),
    # LoHelp (--corpus lohelp, its own preset): 28 en<->X directions of 15 languages, paragraphs
    # of 17.5 English words on average, 10.8k-23.7k per pair, sampled with temperature 5 (nearly
    # uniform over the pairs: 20.3k-23.7k per epoch of 4,761 updates). The Multi30k study's
    # backbone, LOHELP_MAX_UPDATE updates (the three runs side by side in about 80 minutes on 2
    # cores; docs/measuring.md, "Quality study on LoHelp").
    "lohelp": dict(flags={
        **SHARED_FLAGS,
        "--sampling-method": "temperature", "--sampling-temperature": 5,
    }, max_update=LOHELP_MAX_UPDATE, device=["--cpu"], folder="study-lohelp", corpus="lohelp"),
}
# the corpus each preset is for (--corpus must match)
PRESET_CORPUS = {name: spec.get("corpus", "multi30k") for name, spec in PRESETS.items()}
CORPUS_PRESET = {"multi30k": "cpu", "lohelp": "lohelp"}  # --preset's default per --corpus


def moe(enc, dec, gate_loss_wt=0.01, scope="tokens"):
    # the scope is explicit: the plugin's default became "tasks" (from this study's evidence)
    # after most runs had trained with "tokens", which every variant but one keeps
    return ["--encoder-moe-routing", enc, "--decoder-moe-routing", dec,
            "--moe-gate-loss-wt", gate_loss_wt, "--moe-balance-scope", scope]


# name -> label (encoder / decoder routing), flags, seeds, routing kinds, what the run needs
VARIANTS = {
    "dense": dict(label="dense", flags=["--moe-freq", 0], seeds=(1, 2), routing=None),
    "token_token": dict(label="token / token", flags=moe("token", "token"), seeds=(1, 2, 3),
                        routing=("token", "token")),
    "sentence_sentence": dict(label="sentence / sentence", flags=moe("sentence", "sentence"),
                              seeds=(1, 2), routing=("sentence", "sentence")),
    "target_target": dict(label="target / target", flags=moe("target", "target"), seeds=(1, 2, 3),
                          routing=("target", "target")),
    "lang_pair_lang_pair": dict(label="lang-pair / lang-pair",
                                flags=moe("lang_pair", "lang_pair"), seeds=(1, 2),
                                routing=("lang_pair", "lang_pair")),
    "token_target": dict(label="token / target", flags=moe("token", "target"), seeds=(1, 2, 3),
                         routing=("token", "target")),
    # balance-loss study on target / target (target_target itself is the 0.01 point)
    "target_target_gl0": dict(label="target / target, gate loss 0",
                              flags=moe("target", "target", 0), seeds=(1, 2),
                              routing=("target", "target")),
    "target_target_gl0.1": dict(label="target / target, gate loss 0.1",
                                flags=moe("target", "target", 0.1), seeds=(1, 2),
                                routing=("target", "target")),
    "target_target_tasks": dict(label="target / target, gate loss 0.01 over tasks",
                                flags=moe("target", "target", 0.01, "tasks"),
                                seeds=(1, 2, 3), routing=("target", "target"),
                                needs="moe_balance_scope"),
}
TASK_ROUTING = {"target", "lang_pair"}
# How lang_pair routing treats a pair never trained (a model option, overridable at generation):
# the study evaluates the zero-shot directions under each policy.
UNSEEN_OPTION, UNSEEN_POLICIES = "moe_unseen_pairs", ("own_row", "target_mean")


# The runs of each corpus: {variant: seeds}, in study order (None: every variant, its seeds).
# LoHelp first runs one seed of dense and of the token- and task-routed MoE (lang-pair routing
# last: 28 gate rows, one per direction).
CORPUS_RUNS = {"multi30k": None,
               "lohelp": {"dense": (1,), "token_token": (1,), "target_target": (1,),
                          "lang_pair_lang_pair": (1,)}}


def runs(corpus="multi30k"):
    """[(run name, variant name, seed)] in study order."""
    chosen = CORPUS_RUNS[corpus]
    if chosen is None:
        return [(f"{v}-s{seed}", v, seed) for v, spec in VARIANTS.items()
                for seed in spec["seeds"]]
    return [(f"{v}-s{seed}", v, seed) for v, seeds in chosen.items() for seed in seeds]


def flag_list(flags: dict):
    out = []
    for k, v in flags.items():
        out += [k] if v is None else [k, v]
    return out


def train_command(data: Path, variant: str, seed: int, save_dir: Path, max_update: int,
                  save_interval: int = 200, preset: str = "cpu", langs=LANGS, pairs=TRAINED):
    return [BIN / "fairseq-train", *task_flags(data, ",".join(langs), ",".join(pairs)),
            *flag_list(PRESETS[preset]["flags"]), *VARIANTS[variant]["flags"],
            "--max-update", max_update, "--seed", seed, "--save-dir", save_dir,
            "--no-epoch-checkpoints", "--save-interval-updates", save_interval,
            "--keep-interval-updates", 1, "--disable-validation", "--num-workers", 0,
            "--log-format", "simple", "--log-interval", 25, *PRESETS[preset]["device"]]


def on_device(cmd, preset: str):
    """A fairseq command (built with --cpu) for the preset's device."""
    return cmd if "--cpu" in PRESETS[preset]["device"] else [c for c in cmd if c != "--cpu"]


def library_has(option: str) -> bool:
    """Whether the plugin has a model or criterion option (options other engineers add)."""
    from dataclasses import fields

    from fairseq_taskmoe.integration.config import MoEConfig
    from fairseq_taskmoe.integration.criterion import MoELabelSmoothedCrossEntropyConfig

    return any(option in {f.name for f in fields(cls)}
               for cls in (MoEConfig, MoELabelSmoothedCrossEntropyConfig))


def preset_flags(args):
    """The backbone and recipe flags of the run's --preset (SHARED_FLAGS for cpu)."""
    return PRESETS[args.preset]["flags"]


def unmet_needs(variant):
    needs = VARIANTS[variant].get("needs")
    if needs and not library_has(needs):
        return f"the plugin has no option {needs} yet"
    return None
