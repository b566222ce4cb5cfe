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

.PHONY: venv test test-all demo clean
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
	@echo "(a pip note that fairseq-fixed requires torchaudio is expected: it is never imported)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" tests

demo: $(STAMP)
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
