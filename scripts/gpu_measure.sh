#!/usr/bin/env bash
# Every GPU check and measurement in one command, on a host with a CUDA device and gpufleet[dev] installed
# (PYTHON names the interpreter; default python3). From the project root:
#   scripts/gpu_measure.sh [OUT_DIR]        # OUT_DIR defaults to benchmarks/results
# Runs the GPU tests, the warm-up smoke check, the loader, runtime, queue and generation benchmarks and the demo on
# GPU 0, and writes every result file and a log of each step into OUT_DIR; exits 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
status=0
step() { echo "== $*"; "$@" || { echo "!! failed: $*"; status=1; }; }

out=${1:-benchmarks/results}
mkdir -p "$out"
exec > >(tee "$out/gpu_measure.log") 2>&1   # the whole run's output beside its results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
step "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider --junitxml="$out/gpu-tests.xml"
step "$PY" scripts/test_gpu_warmup.py --test all --device cuda
step "$PY" -m gpufleet.workers.tools.bench --out "$out"                          # 7B-shaped loader benchmark
step "$PY" benchmarks/runtime_bench.py --device cuda --cycles 50 --out-dir "$out"  # warm-up, load/evict cycles
step "$PY" -m benchmarks.queue_bench --gpu 0 --quick --out "$out"       # batching off vs on, a GPU worker
step "$PY" -m benchmarks.generation_bench --gpu 0 --quick --out "$out"  # continuous vs static vs transformers CB
step "$PY" -m gpufleet.workers.cli demo --gpu 0 --workdir /tmp/gpufleet-demo     # the demo with a real GPU worker
exit $status
