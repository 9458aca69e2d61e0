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

.PHONY: test demo demo-modes bench venv image push gpu-wheels

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

# Every generation mode on builtin:tiny (manifests/modes.parquet), with the seeded tiny LoRA and
# embedding that sdcore.builtin writes: they are made here, not committed.
ADAPTERS := out-adapters
demo-modes: $(STAMP)
	$(PY) -c "from sdcore.builtin import write_tiny_adapters; write_tiny_adapters('$(ADAPTERS)')"
	RAY_AUTH_MODE=disabled $(VENV)/bin/sdbatch run manifests/modes.parquet --model builtin:tiny \
		--lora style=$(ADAPTERS)/style.safetensors --embedding '<toy>=$(ADAPTERS)/toy.safetensors' \
		--output out-modes --overwrite
	@echo "dataset written to ./out-modes (mode, strength, loras, embeddings in out-modes/metadata)"

bench: $(STAMP)
	$(PY) -m bench.run

# The Python packages bench/gpu_check.sh needs beyond what a lent GPU machine's image has (torch, typer,
# pyarrow, safetensors and an older transformers; it reaches no registry), as wheels for its Python, in an
# ignored folder that the device call carries (57 MiB of the 64 MiB a call may carry). The tests' pins:
# diffusers and transformers as pyproject.toml's test extra, Ray as RAY_VERSION. Ray's wheel alone is over
# 64 MiB; its Java workers, web UI and libraries (RLlib, Tune, Train, Serve, Data, LLM), which a local job
# of Python actors never loads, come out of it.
GPU_WHEELS ?= .whl
GPU_PYTHON_VERSION ?= 3.12
DIFFUSERS_VERSION := 0.42.1
TRANSFORMERS_VERSION := 5.24.0
RAY_UNUSED := 'ray/jars/*' 'ray/dashboard/client/*' 'ray/rllib/*' 'ray/tune/*' 'ray/train/*' 'ray/serve/*' \
	'ray/data/*' 'ray/llm/*'

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_WHEELS) ray==$(RAY_VERSION) diffusers==$(DIFFUSERS_VERSION) \
		jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
		importlib_metadata==10.2.0 transformers==$(TRANSFORMERS_VERSION)
	zip -qd $(GPU_WHEELS)/ray-*.whl $(RAY_UNUSED)
	du -sh $(GPU_WHEELS)

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
