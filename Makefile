# Two set-up commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build. The package itself
# accepts a range (setup.cfg).
TORCH  ?= torch==2.13.0
# fairseq-fixed (imports as `fairseq`, stock 0.12.2 fails on Python 3.11) compiles C++/Cython
# extensions against the installed torch and numpy, hence --no-build-isolation. It also requires
# torchaudio, which has no release for torch 2.13 and which we never use, hence --no-deps plus its
# real runtime requirements listed here.
FAIRSEQ_RUNTIME := cffi hydra-core==1.3.2 omegaconf==2.3.0 regex tqdm bitarray scikit-learn packaging

.PHONY: venv argos-venv system-deps test test-all demo serve clean study study-report distill \
  bench bench-inference bench-moe-layer bench-export bench-serve bench-ray-serve lohelp
venv: $(STAMP)

$(STAMP): setup.cfg setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH)
	$(PIP) install -q cython "numpy>=1.21.3"
	$(PY) -c "import fairseq" 2>/dev/null || \
	  $(PIP) install -q --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
	$(PIP) install -q $(FAIRSEQ_RUNTIME)
	$(PIP) install -q --no-deps -e .
	$(PIP) install -q fairscale==0.4.13 sentencepiece "sacrebleu[ja]>=2.0" pytest ctranslate2 matplotlib  # [ja]: MeCab for BLEU into Japanese
	$(PIP) install -q spacy  # the blank pipeline an Argos package ships (the argos extra)
	$(PIP) install -q "py3langid>=0.4"  # language detection beyond en/de/fr/cs (the langid extra)
	$(PIP) install -q fastapi uvicorn prometheus-client limits httpx aiohttp python-multipart psutil libretranslatepy sentencex
	$(PIP) install -q "ray[serve]==2.60.0"
	$(PIP) install -q selenium
	@echo "(a pip note that fairseq-fixed requires torchaudio is expected: it is never imported)"
	touch $(STAMP)

# Argos Translate 1.11 (what `taskmoe-export --format argos` packages are for) in a virtualenv
# of its own, unchanged: tests/test_export_argos.py installs a package with it and translates
# offline (skipped without it). The same pinned CPU torch goes in first, else stanza (which
# argostranslate imports) would pull a multi-GB CUDA build.
ARGOS_VENV := .venv-argos
argos-venv: $(ARGOS_VENV)/.installed
$(ARGOS_VENV)/.installed: Makefile
	test -x $(ARGOS_VENV)/bin/python || $(PYTHON) -m venv $(ARGOS_VENV)
	$(ARGOS_VENV)/bin/python -m pip install -q --upgrade pip
	$(ARGOS_VENV)/bin/python -m pip install -q $(TORCH)
	$(ARGOS_VENV)/bin/python -m pip install -q argostranslate==1.11.0
	touch $@

# LibreTranslate 1.9.6 unchanged, in a virtualenv of its own (it pins its own dependencies,
# argos-translate-lt among them): research/libretranslate.py starts it offline on our Argos
# packages for tests/test_libretranslate.py (skipped without it), the compatibility matrix and
# the benchmark. The pinned CPU torch goes in first (else stanza would pull a CUDA build); spaCy
# because our packages split sentences with the blank spaCy pipeline they ship
# (ARGOS_CHUNK_TYPE=SPACY): LibreTranslate's default splitter downloads its models.
LT_VENV := .venv-lt
.PHONY: lt-venv
lt-venv: $(LT_VENV)/.installed
$(LT_VENV)/.installed: Makefile
	test -x $(LT_VENV)/bin/python || $(PYTHON) -m venv $(LT_VENV)
	$(LT_VENV)/bin/python -m pip install -q --upgrade pip
	$(LT_VENV)/bin/python -m pip install -q $(TORCH)
	$(LT_VENV)/bin/python -m pip install -q libretranslate==1.9.6 spacy
	touch $@

# The web page's browser test (tests/test_serve_browser.py) drives Debian's Chromium; installed
# when missing and possible (root with apt-get, as on CI), else the test says it is skipped.
system-deps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "system-deps: no /usr/bin/chromium and no root apt-get to install it:" \
	  "tests/test_serve_browser.py will be skipped (apt-get install chromium chromium-driver)"; fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q tests

test-all: $(STAMP) system-deps argos-venv
	$(PY) -m pytest -q -m "" tests

demo: $(STAMP)
	$(PY) scripts/demo.py

# taskmoe-serve on the demo's model (after `make demo`): the web page and the API at the URL shown
DEMO := work/demo
HOST ?= 127.0.0.1
PORT ?= 5000
serve: $(STAMP)
	@test -f $(DEMO)/checkpoints/checkpoint_last.pt || { echo "make serve: no demo model" \
	  "($(DEMO)/checkpoints/checkpoint_last.pt): run \`make demo\` first (about 15 minutes)"; exit 1; }
	@echo "make serve: http://$(HOST):$(PORT)/ (the first start builds each pair's sub-network; Ctrl+C stops)"
	$(VENV)/bin/taskmoe-serve $(DEMO)/checkpoints/checkpoint_last.pt --data $(DEMO)/multi30k/bin \
	  --spm-model $(DEMO)/multi30k/spm.model --cache-dir $(DEMO)/serve-cache --host $(HOST) --port $(PORT)

# The research harness (research/, not installed): what wrote docs/results.md and
# docs/benchmarks.md. Long jobs resume where a kill left them: run the same target again.
# ARGS passes flags on, e.g. make study ARGS="--only dense,target_target".
# the routing quality study, all 22 runs (hours on 2 cores): results/study/*.json
study: $(STAMP)
	$(PY) -m research.study $(ARGS)
# docs/results.md from results/study/*.json
study-report: $(STAMP)
	$(PY) -m research.study.report $(ARGS)
# the distillation baseline (after the study's token_token-s1): results/study/distilled-s1.json
distill: $(STAMP)
	$(PY) -m research.distill $(ARGS)
# docs/benchmarks.md's three benchmarks in turn (bench-export needs `make demo` first)
bench: bench-inference bench-moe-layer bench-export
# pruned task-MoE vs token-MoE vs dense (Figure 2): results/inference_benchmark.* and its plot
bench-inference: $(STAMP)
	$(PY) -m research.bench.inference --experts 8,32,128 --batch-sizes 1,16,64 \
	  --reps 3 --serve-parallel 2 --serve-batch 16 $(ARGS)
# our MoE layer vs fairscale's MOELayer: results/moe_layer_bench.*
bench-moe-layer: $(STAMP)
	$(PY) -m research.bench.moe_layer --experts 8,32,128 --tokens 2048 --embed-dim 512 \
	  --ffn-dim 1024 --threads 1 --reps 20 --warmup 3 $(ARGS)
# the demo's pair served five ways (after `make demo`): results/export_benchmark.*
bench-export: $(STAMP)
	@test -f $(DEMO)/checkpoints/checkpoint_last.pt || { echo "make bench-export: no demo model" \
	  "($(DEMO)/checkpoints/checkpoint_last.pt): run \`make demo\` first (about 15 minutes)"; exit 1; }
	$(PY) -m research.bench.export --work $(DEMO) --pair en-de --beam 5 --repeats 3 $(ARGS)
# taskmoe-serve under load (after `make demo`): batching on/off, token- vs task-MoE served
# (results/serve_benchmark.*); the embedded server vs Ray Serve with 1 and 2 replicas
# (results/serve_ray_benchmark.*)
bench-serve: $(STAMP)
	@test -f $(DEMO)/checkpoints/checkpoint_last.pt || { echo "make bench-serve: no demo model" \
	  "($(DEMO)/checkpoints/checkpoint_last.pt): run \`make demo\` first (about 15 minutes)"; exit 1; }
	$(PY) -m research.bench.serve --arch-requests 32 $(ARGS)
bench-ray-serve: $(STAMP)
	@test -f $(DEMO)/checkpoints/checkpoint_last.pt || { echo "make bench-ray-serve: no demo model" \
	  "($(DEMO)/checkpoints/checkpoint_last.pt): run \`make demo\` first (about 15 minutes)"; exit 1; }
	$(PY) -m research.bench.ray_serve --pairs-per-replica 4 $(ARGS)
# The real LibreTranslate 1.9.6 (.venv-lt) on the demo's pairs as Argos packages, against
# taskmoe-serve on the checkpoint (issue 29; docs/serving.md; after `make demo`):
# compat-matrix sends both the same requests, valid and invalid, and writes them side by side to
# results/compat_matrix.{json,md} and docs/serving.md (exit 1 on a difference neither fixed nor
# listed with its reason; a minute); bench-libretranslate measures both (and LibreTranslate tuned)
# under load, one server at a time: results/libretranslate_benchmark.{json,md} (hours on 2 cores)
.PHONY: compat-matrix bench-libretranslate
compat-matrix: $(STAMP) lt-venv
	@test -f $(DEMO)/checkpoints/checkpoint_last.pt || { echo "make compat-matrix: no demo model" \
	  "($(DEMO)/checkpoints/checkpoint_last.pt): run \`make demo\` first (about 15 minutes)"; exit 1; }
	$(PY) -m research.compat_matrix --docs docs/serving.md $(ARGS)
bench-libretranslate: $(STAMP) lt-venv
	@test -f $(DEMO)/checkpoints/checkpoint_last.pt || { echo "make bench-libretranslate: no demo" \
	  "model ($(DEMO)/checkpoints/checkpoint_last.pt): run \`make demo\` first (about 15 minutes)"; \
	  exit 1; }
	$(PY) -m research.bench.libretranslate $(ARGS)
# taskmoe-serve on many languages (after `make study-lohelp` has trained LoHelp's target / target
# and token / token runs): every en<->X direction and 12 X-Y pairs through English, sub-network
# sizes, start-up, Zipf and uniform loads under a quarter of the sub-networks' bytes and without
# a budget, and the token model served whole: results/serve_many.{json,md} (docs/serving.md)
.PHONY: bench-serve-many
LOHELP_RUNS := work/study-lohelp/runs
bench-serve-many: $(STAMP)
	@for run in target_target-s1 token_token-s1; do test -f $(LOHELP_RUNS)/$$run/train.done.json \
	  || { echo "make bench-serve-many: $(LOHELP_RUNS)/$$run has not finished training (no" \
	  "train.done.json): run \`make study-lohelp\` first"; exit 1; }; done
	$(PY) -m research.bench.serve_many $(ARGS)

# The upcycling study (issue 28; docs/results-upcycle.md): the study's dense-s1 (reused from
# work/study when trained with its CPU seconds recorded), taskmoe-upcycle of it to target / target
# (2 seeds) and token / token, the dense model continued (2 seeds), all M = 300 more updates,
# and target / target from scratch for 1,000 + M, a checkpoint and a curve point every 300
# updates: what results/upcycle holds, about 2.5 hours on 2 idle cores (2026-12-08), resumable
# like `make study`. ARGS overrides (e.g. ARGS="--upcycle-updates 500": its own m500/ folder;
# report it with make study-upcycle-report ARGS="--upcycle-updates 500").
UPCYCLE_M := --upcycle-updates 300
.PHONY: study-upcycle study-upcycle-report
study-upcycle: $(STAMP)
	$(PY) -m research.upcycle_study $(UPCYCLE_M) --curve-every 300 $(ARGS)
study-upcycle-report: $(STAMP)
	$(PY) -m research.upcycle_study.report $(UPCYCLE_M) $(ARGS)

# LoHelp, a many-way parallel corpus from LibreOffice's translated help (docs/corpus-lohelp.md):
# Debian's libreoffice-help-* packages (apt-get download) -> work/lohelp/bin for en<->13
# languages, and its table results/lohelp/corpus.md. ARGS passes flags on (e.g. --langs).
lohelp: $(STAMP)
	$(PY) scripts/prepare_lohelp.py $(ARGS)

# The routing study on LoHelp (after `make lohelp`; docs/measuring.md): dense, token / token,
# target / target and lang-pair / lang-pair on the 28 en<->X directions, 800 updates each (the
# first three side by side: about 80 minutes on 2 cores), resumable like `make study`:
# results/study-lohelp/*.json. Japanese BLEU uses sacreBLEU's MeCab tokenizer (sacrebleu[ja]).
# ARGS passes flags on, e.g. make study-lohelp ARGS="--only dense,target_target".
.PHONY: study-lohelp study-lohelp-report
study-lohelp: $(STAMP)
	$(PY) -m research.study --corpus lohelp $(ARGS)
# docs/results-many.md from results/study-lohelp/*.json
study-lohelp-report: $(STAMP)
	$(PY) -m research.study.report --corpus lohelp $(ARGS)

# Pairs nobody trained, on LoHelp (docs/results-many.md): once the study's target / target run
# has finished training, pivot through English vs direct zero-shot on the 14 X-Y directions of
# the ring (research/pivot_eval.py), as taskmoe-serve serves them:
# results/pivot_eval-lohelp-target_target-s1.{json,md}. The language detector's accuracy on
# LoHelp's references (no model needed): results/langid-lohelp.{json,md}.
.PHONY: pivot-lohelp langid-lohelp
LOHELP_TT := work/study-lohelp/runs/target_target-s1
pivot-lohelp: $(STAMP)
	@test -f $(LOHELP_TT)/train.done.json || { echo "make pivot-lohelp: $(LOHELP_TT) has not" \
	  "finished training (no train.done.json): run \`make study-lohelp\` first"; exit 1; }
	$(PY) -m research.pivot_eval --corpus lohelp $(LOHELP_TT)/checkpoints/checkpoint_last.pt \
	  --name lohelp-target_target-s1 $(ARGS)
langid-lohelp: $(STAMP)
	$(PY) -m research.langid_eval $(ARGS)

clean:
	rm -rf $(VENV) $(ARGOS_VENV) build *.egg-info
