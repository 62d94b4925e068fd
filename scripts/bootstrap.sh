#!/usr/bin/env bash
# Set up everything a fresh machine lacks, idempotently: redis-server (Debian package), a virtual environment in
# .venv with torch (the CPU build on machines without a GPU) and gpufleet[dev] installed editable.
# Sourced or run by scripts/demo.sh and scripts/test.sh; safe to run again (it skips what is done).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null 2>&1; then
  echo "bootstrap: installing redis-server" >&2
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

# Debian's docker-compose validates docker-compose.yml (`docker-compose config`) without a Docker engine.
if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: installing docker-compose (for the compose check)" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null \
    || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; } \
    || echo "bootstrap: docker-compose unavailable; the compose file gets the structural check only" >&2
fi

# Debian's chromium loads the dashboard page headless in tests/integration/test_api.py.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: installing chromium (for the dashboard's browser test)" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
    || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
    || echo "bootstrap: chromium unavailable; the dashboard's browser test will be skipped" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.gpufleet-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing gpufleet[dev] into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # GPUFLEET_TORCH picks the torch requirement (a CUDA build, another version); the default is the CPU
    # build pinned for CI, installed before gpufleet[dev] so pip does not pull a CUDA build in its place.
    .venv/bin/python -m pip install -q "${GPUFLEET_TORCH:-torch==2.13.0}"
  fi
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
