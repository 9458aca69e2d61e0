#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) from the repository root, on a bare lent GPU machine: installs the
# wheels that `make gpu-wheels` put in .whl/ (that machine reaches no registry), runs the check into
# $OUT/gpu.json, then renders it ($OUT/BENCHMARKS.md). Under 8 minutes on one H100.
#   bash bench/gpu_check.sh                  on the GPU machine (OUT: what comes back from it)
#   bash bench/gpu_check.sh --cpu-dry-run    here, on the CPU at tiny sizes (OUT defaults to bench/results/gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu-check}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1

python=.venv/bin/python
if [[ ! -x $python ]]; then  # the GPU machine: its own python3 holds a CUDA torch
    python=python3
    site=/tmp/sdbatch-site
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl
    export PYTHONPATH=$site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
$python -m bench.gpu_check --out "$out/gpu.json" "$@"
$python -m bench.run --render-only --gpu-from "$out/gpu.json" --out "$out/BENCHMARKS"
