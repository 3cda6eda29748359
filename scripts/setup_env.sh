#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv with everything the toolkit needs.
#
#   bash scripts/setup_env.sh              # then: source .venv/bin/activate
#
# torch is installed first, on its own, and then pinned with a constraints file, so no
# later requirement can swap it for another build (an unpinned `torch` on a CPU machine
# pulls several GB of CUDA packages).
#   TORCH_SPEC       what to install for torch (default: torch==2.13.0)
#   TORCH_INDEX_URL  optional index for it, e.g. https://download.pytorch.org/whl/cpu for a
#                    CPU build on a machine without a local wheel, or .../whl/cu124 for CUDA
#   VENV             where the environment lives (default: .venv in the repository)
#   EXTRAS           extra pip requirements, e.g. "wandb deepspeed"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

stamp_input="$TORCH_SPEC ${TORCH_INDEX_URL:-} ${EXTRAS:-} $(cat requirements.txt requirements-dev.txt)"
stamp="$VENV/.installed-$(printf '%s' "$stamp_input" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0  # already set up with these requirements
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

echo "installing $TORCH_SPEC"
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  "${pip[@]}" --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
else
  "${pip[@]}" "$TORCH_SPEC"
fi
torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
constraints="$VENV/constraints.txt"
echo "torch==$torch_version" >"$constraints"

echo "installing requirements (torch held at $torch_version)"
# shellcheck disable=SC2086  # EXTRAS is a list of requirement words
"${pip[@]}" -c "$constraints" -r requirements.txt -r requirements-dev.txt ${EXTRAS:-}
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "environment ready: source $VENV/bin/activate"
