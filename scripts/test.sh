#!/usr/bin/env bash
# The test command (CI runs exactly this): set up what is missing, lint, check the import layers, type-check,
# then run the suite.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== import layers"; .venv/bin/lint-imports --no-cache   # the contracts in pyproject.toml
echo "== mypy (strict)"; .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest "${@:-tests}"
