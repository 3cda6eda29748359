#!/usr/bin/env bash
# Set up .venv if needed, lint, then run the whole test suite, spread over the CPU cores (pytest-xdist): the fast
# tests first (a failure there shows in a few minutes), then the slow ones (several processes, killed runs, the
# benchmark). About 11 minutes on 2 CPU cores, plus the set-up.
#   bash scripts/test.sh                      # everything, as CI runs it
#   bash scripts/test.sh -m "not slow"        # the quick edit loop (about 4 minutes)
#   bash scripts/test.sh tests/test_step.py   # any pytest arguments: one run with just those
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
.venv/bin/ruff check training tests tools benchmarks scripts  # lint first: seconds, and catches unused or missing names
if [[ $# -gt 0 ]]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q -m "not slow" -n auto --durations=10
exec .venv/bin/python -m pytest -q -m slow -n auto --durations=15
