#!/usr/bin/env bash
# Set up .venv if needed, lint, then run the whole test suite (a few minutes on 2 CPU cores).
#   bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
.venv/bin/ruff check training tests tools benchmarks  # lint first: seconds, and catches unused or missing names
exec .venv/bin/python -m pytest -q "$@"
