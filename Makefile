# disttrain: `make demo` (set-up + the quickstart job) and `make test` (set-up + tests).
# Both create .venv once and reuse it; torch is installed first and pinned through
# constraints.txt so no later install can change it (constraints.txt: which build you get).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
TORCH_PIP_ARGS ?=
# extra pip arguments for the torch install only (constraints.txt says when to set them)

.PHONY: setup demo test test-fast bench gpu-check clean

setup: $(STAMP)

$(STAMP): setup.py constraints.txt $(wildcard csrc/*.cpp csrc/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt --upgrade pip setuptools wheel ninja
	$(PIP) install -c constraints.txt $(TORCH_PIP_ARGS) torch==2.13.0
	$(PIP) install -c constraints.txt --no-build-isolation -e '.[test,hf,ray,peers,gpu]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/quickstart
	$(VENV)/bin/disttrain check examples/quickstart.yaml
	$(VENV)/bin/disttrain plan examples/quickstart.yaml
	$(VENV)/bin/disttrain train examples/quickstart.yaml --plan runs/quickstart/plan/plan.json

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/run_all.py

# On >= 1 GPU: the `gpu` tests + predicted vs measured for a plan made with cluster.preset: probe.
# Without a GPU it prints "no GPU: nothing checked" and succeeds.
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache
