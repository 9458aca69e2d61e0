# Both entry points create .venv/ when it is missing. torch is pinned and installed first, from
# TORCH_INDEX when it is set, so that sdbatch's own `torch` requirement is already met.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdbatch-installed

# The versions the tests run, and the ones the container image pins: docker/Dockerfile's ARG
# defaults are the same (tests/test_cluster_config.py checks them, and pyproject.toml's ranges).
TORCH_VERSION := 2.13.0
RAY_VERSION := 2.60.0
# The image's CUDA: PyTorch's wheel index for it, and the nvidia/cuda base image of that version.
TORCH_CUDA := cu128
CUDA_VERSION := 12.8.1
# The image's name: cluster.yaml and k8s/rayjob.yaml name the same placeholder. Push to your own
# registry with `make push IMAGE=<registry>/sdbatch:<tag>`, and put that name in both files.
IMAGE ?= registry.example.com/sdbatch:0.1.0
# Where pip takes torch for .venv/: PyPI's default (on Linux, the CUDA build) unless set, e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build on a machine without a GPU.
TORCH_INDEX ?=

.PHONY: test demo bench venv image push

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[test]' 'ray[default]==$(RAY_VERSION)'
	touch $(STAMP)

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(VENV)/bin/sdbatch run manifests/demo.parquet --model builtin:tiny --output out --overwrite
	@echo "dataset written to ./out (images in out/images, metadata in out/metadata)"

bench: $(STAMP)
	$(PY) -m bench.run

# The image for every cluster node (docker/Dockerfile), built from this checkout. Needs Docker,
# not a GPU; the build context is only what .dockerignore lets through (the package's sources).
image:
	docker build -f docker/Dockerfile \
		--build-arg CUDA_VERSION=$(CUDA_VERSION) \
		--build-arg TORCH_VERSION=$(TORCH_VERSION) \
		--build-arg TORCH_CUDA=$(TORCH_CUDA) \
		--build-arg RAY_VERSION=$(RAY_VERSION) \
		-t $(IMAGE) .

push: image
	docker push $(IMAGE)
