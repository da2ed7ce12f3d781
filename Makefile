# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast venv clean

# torch first, pinned: its CPU wheel is what the machine has; an unpinned torch pulls a CUDA build
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/chatfactory pretrain --config demo --out runs/demo
	@echo
	@echo "--- a sample from the pretrained model ---"
	$(BIN)/chatfactory sample --run runs/demo --prompt "The built-in function" --max-tokens 80 --seed 0
	@echo
	@echo "run directory: runs/demo  (metrics: runs/demo/pretrain/metrics.jsonl)"
	@echo "sample again:  $(BIN)/chatfactory sample --run runs/demo --prompt 'Return the'"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
