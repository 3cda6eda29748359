#!/usr/bin/env bash
# Set up .venv if needed, lint, then run the whole test suite in one pytest run spread over the CPU cores
# (pytest-xdist, work stealing): the slow tests (several processes, killed runs, the benchmark) start first and the
# quick ones fill the gaps (tests/conftest.py orders them). About 11 minutes on 2 CPU cores, set-up included.
#   bash scripts/test.sh                      # everything, as CI runs it
#   bash scripts/test.sh -m "not slow"        # the quick edit loop (about 5 minutes)
#   bash scripts/test.sh tests/test_step.py   # any pytest arguments: one run with just those
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
.venv/bin/ruff check training tests tools benchmarks scripts  # lint first: seconds, and catches unused or missing names
if [[ $# -gt 0 ]]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n auto --dist worksteal --durations=25
