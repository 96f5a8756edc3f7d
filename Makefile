# `make demo` and `make test` create and reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL ?= models/tiny-qwen3_5_moe

.PHONY: venv demo test test-all bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/moed make-model $(DEMO_MODEL) --arch qwen3_5_moe --preset tiny --skip-existing
	$(BIN)/moed generate --model $(DEMO_MODEL) --prompt "The paged expert cache" --max-tokens 48 --cache-fraction 0.25 --workers 2

test: venv
	$(BIN)/python -m pytest -q

test-all: venv
	$(BIN)/python -m pytest -q -m ""

bench: venv
	$(BIN)/moed make-model models/med-qwen3_moe --arch qwen3_moe --preset med --skip-existing
	$(BIN)/moed bench --model models/med-qwen3_moe --out bench/results/med-qwen3_moe.json --cold --sampling random,greedy

clean:
	rm -rf $(VENV) models
