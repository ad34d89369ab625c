# Two commands on a fresh CPU-only machine (README quickstart):
#   make demo   - install into .venv, then run the bundled default model on the CPU
#   make test   - install into .venv, then run the test suite (what CI runs: .ci/run)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench-smoke clean

$(STAMP): $(wildcard pyproject.toml setup.py CMakeLists.txt) $(shell find csrc -type f 2>/dev/null)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: on CPU machines this takes the local CPU build, never a CUDA one
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.11"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ursa-engine demo --out samples

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-smoke: $(STAMP)
	$(BIN)/ursa-engine bench run --mode smoke --out benchmarks/smoke --report

clean:
	rm -rf $(VENV) build *.egg-info samples
