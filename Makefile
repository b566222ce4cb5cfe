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

.PHONY: venv system-deps test test-all demo serve clean
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
	$(PIP) install -q fairscale==0.4.13 sentencepiece "sacrebleu>=2.0" pytest ctranslate2 matplotlib
	$(PIP) install -q fastapi uvicorn prometheus-client limits httpx python-multipart psutil libretranslatepy
	$(PIP) install -q selenium
	@echo "(a pip note that fairseq-fixed requires torchaudio is expected: it is never imported)"
	touch $(STAMP)

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

test-all: $(STAMP) system-deps
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

clean:
	rm -rf $(VENV) build *.egg-info
