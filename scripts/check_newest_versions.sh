#!/usr/bin/env bash
# Run the test suite with the newest of everything requirements.txt allows: the other end of
# scripts/check_min_versions.sh, and what a fresh `pip install -r requirements.txt` gives a user today.
# scripts/setup_env.sh builds a separate environment with LOCK=none (the newest, not requirements-lock.txt) and
# VENV=$NEWEST_DIR/venv, torch held at TORCH_SPEC; then pytest runs in it as scripts/test.sh runs it in .venv.
#
#   bash scripts/check_newest_versions.sh                          # the whole suite (about 12 minutes on 2 cores,
#                                                                  # plus the set-up)
#   bash scripts/check_newest_versions.sh tests/test_install.py    # any pytest arguments: one run with just those
#   UPDATE_LOCK=1 bash scripts/check_newest_versions.sh            # and, if the whole suite passes, write
#                                                                  # requirements-lock.txt from that environment
#
# Run by hand, not in CI: the newest versions change from day to day, so the environment is built afresh each time
# (REUSE_ENV=1 keeps it). The versions it got and the result go to $NEWEST_DIR/result.txt.
# Variables:
#   NEWEST_DIR       where the environment and result go (default outputs/newest-versions, ignored by git)
#   REUSE_ENV=1      keep an environment built by an earlier run (default: build afresh)
#   UPDATE_LOCK=1    after a passing run of the whole suite (no pytest arguments), write the environment's versions,
#                    torch aside, to requirements-lock.txt (LOCK_OUT names another file), the lock that
#                    scripts/setup_env.sh installs from by default
#   TORCH_SPEC, TORCH_INDEX_URL, PYTHON, INSTALLER, EXTRAS: passed on to scripts/setup_env.sh (see there)
# Tests that start .venv/bin/... by its path (not sys.executable or PATH) still run .venv's programs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mkdir -p "${NEWEST_DIR:=outputs/newest-versions}"
NEWEST_DIR=$(cd "$NEWEST_DIR" && pwd)
VENV="$NEWEST_DIR/venv" RESULT="$NEWEST_DIR/result.txt"
: >"$RESULT"
note() { echo "$*" | tee -a "$RESULT"; }
started=$(date +%s)
note "newest-versions check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), ${PYTHON:-python3}:" \
  "$("${PYTHON:-python3}" --version 2>&1)"

# LOCK=none: scripts/setup_env.sh installs the newest, not requirements-lock.txt, and the tests know it (the check
# that the environment is the lock skips)
export LOCK=none
if [[ ${REUSE_ENV:-0} != 1 ]]; then
  rm -rf "$VENV"
fi
t0=$(date +%s)
VENV="$VENV" bash scripts/setup_env.sh
"$VENV/bin/python" -m pip freeze --disable-pip-version-check >"$NEWEST_DIR/freeze.txt"
note "environment: $VENV ($(($(date +%s) - t0)) s; every version in $NEWEST_DIR/freeze.txt)"
"$VENV/bin/python" -W ignore - <<'EOF' | tee -a "$RESULT"
from importlib.metadata import version

names = ["torch", "diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors", "torchao",
         "bitsandbytes", "deepspeed", "numpy"]
print("  " + ", ".join(f"{name} {version(name)}" for name in names))
EOF

export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PATH="$VENV/bin:$PATH"  # `accelerate`, `hf`, `torchrun` found by name are the newest environment's
pytest=("$VENV/bin/python" -m pytest -q)
if [[ $# -gt 0 ]]; then
  pytest+=("$@")
else
  pytest+=(-n auto --dist worksteal --durations=25)
fi
note "running: ${pytest[*]}"
set +e
"${pytest[@]}" 2>&1 | tee "$NEWEST_DIR/pytest.log"
status=${PIPESTATUS[0]}
set -e
note "pytest: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$NEWEST_DIR/pytest.log" | tail -n 1)"
if [[ $status -ne 0 ]]; then
  note "RESULT: FAILED (pytest exit $status) after $(($(date +%s) - started)) s (log: $NEWEST_DIR/pytest.log)"
  exit "$status"
fi
note "RESULT: PASSED in $(($(date +%s) - started)) s (log: $NEWEST_DIR/pytest.log)"

if [[ ${UPDATE_LOCK:-0} == 1 ]]; then
  if [[ $# -gt 0 ]]; then
    note "lock not updated: UPDATE_LOCK=1 writes it only after the whole suite (this run had pytest arguments)"
    exit 0
  fi
  lock=${LOCK_OUT:-requirements-lock.txt}
  python_version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  torch_info=$("$VENV/bin/python" -W ignore -c "import torch
print(torch.__version__.split('+')[0], 'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU')")
  made="$(date -u +%Y-%m-%d), Python $python_version, $(uname -s) $(uname -m), torch $torch_info"
  {
    cat <<EOF
# The exact versions \`bash scripts/test.sh\` last passed with ($made).
# scripts/setup_env.sh and CI install from it (as pip/uv constraints), so a new machine gets what was tested, whatever
# PyPI serves that day. LOCK=none bash scripts/setup_env.sh installs the newest that requirements.txt allows instead.
# Update it on purpose: scripts/check_newest_versions.sh runs the suite on the newest of everything and, with
# UPDATE_LOCK=1, writes this file from that environment when the suite passes. torch is not here: TORCH_SPEC chooses it.
EOF
    # name==version a line, names as pip compares them (PEP 503), sorted; torch left out
    "$VENV/bin/python" - "$NEWEST_DIR/freeze.txt" <<'EOF'
import re
import sys

pins = []
for line in open(sys.argv[1]):
    name, sep, version = line.strip().partition("==")
    name = re.sub(r"[-_.]+", "-", name).lower()
    if sep and name != "torch":
        pins.append(f"{name}=={version}")
print("\n".join(sorted(pins)))
EOF
  } >"$lock"
  note "lock written: $lock ($(grep -vc '^#' "$lock") packages)"
fi
