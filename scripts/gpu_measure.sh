#!/usr/bin/env bash
# Every GPU check and measurement the issues owe, in one command, for a session lent a GPU machine.
# On the GPU host, from the project root, after ../shared/device/stage.sh here and with .device carried:
#   source .device/bootstrap.sh && scripts/gpu_measure.sh
# Results land in benchmarks/results/ (and are copied to $OUT when set, for the device tool to bring back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
status=0
step() { echo "== $*"; "$@" || { echo "!! failed: $*"; status=1; }; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
step "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider
step "$PY" scripts/test_gpu_warmup.py --test all --device cuda
step "$PY" -m workers.tools.bench --out benchmarks/results                  # 7B-shaped loader benchmark (issue 5)
step "$PY" benchmarks/runtime_bench.py --device cuda --cycles 50   # warm-up, 50 load/evict cycles, hit cost (issue 4)
step "$PY" -m workers.cli demo --gpu 0 --workdir /tmp/gpufleet-demo   # the demo with a real GPU worker
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json benchmarks/results/*.md "$OUT"/ 2>/dev/null; fi
exit $status
