# Both entry points create .venv/ when it is missing. torch is pinned and installed first so
# that a CPU-only machine never resolves a multi-GB CUDA build through a bare `torch` requirement.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdbatch-installed

.PHONY: test demo bench venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(VENV)/bin/sdbatch run manifests/demo.parquet --model builtin:tiny --output out --overwrite
	@echo "dataset written to ./out (images in out/images, metadata in out/metadata)"

bench: $(STAMP)
	$(PY) -m bench.run
