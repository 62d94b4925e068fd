#!/usr/bin/env bash
# The demo: set up what is missing, then start a private redis-server and a worker, and serve real embedding
# and generation jobs (see `gpufleet demo --help`; pass --gpu N to run the worker on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/gpufleet demo "$@"
