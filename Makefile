# disttrain: `make demo` (set-up + the quickstart job) and `make test` (set-up + tests).
# Both create .venv once and reuse it; torch is pinned to the local CPU build through
# constraints.txt so no install can pull a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): setup.py constraints.txt $(wildcard csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt --upgrade pip setuptools wheel ninja
	$(PIP) install -c constraints.txt torch==2.13.0
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

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache
