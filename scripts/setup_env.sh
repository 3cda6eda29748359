#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv with everything the toolkit needs.
#
#   bash scripts/setup_env.sh              # then: source .venv/bin/activate
#
# torch is installed first, on its own, and then pinned with a constraints file, so no
# later requirement can swap it for another build (an unpinned `torch` on a CPU machine
# pulls several GB of CUDA packages). Which build you get is pip's choice unless you name
# an index: a local wheel pip is pointed at (find-links) first, else the default index,
# whose torch for Linux is the CUDA build (several GB); macOS and Windows get the CPU one.
#   TORCH_SPEC       what to install for torch (default: torch==2.13.0)
#   TORCH_INDEX_URL  optional index for it, e.g. https://download.pytorch.org/whl/cpu for the
#                    CPU build, or .../whl/cuXXX for a CUDA build (see pytorch.org)
#   PYTHON           the interpreter for a new environment: Python 3.10 or newer (default python3)
#   VENV             where the environment lives (default: .venv in the repository)
#   EXTRAS           extra pip requirements, e.g. "comet_ml"
#   LOCK             the versions to install (default requirements-lock.txt: exactly what the test suite last
#                    passed with); LOCK=none installs the newest that requirements.txt allows
#   INSTALLER        uv (default) or pip, for everything after torch. uv (itself a pip package, put in the
#                    environment) installs the same versions as pip in about half the time; pip reads
#                    your pip.conf (a private index, say), which uv does not: INSTALLER=pip then.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
LOCK=${LOCK:-requirements-lock.txt}
if [[ $LOCK != none && ! -f $LOCK ]]; then
  echo "error: LOCK=$LOCK: no such file (LOCK=none installs the newest versions instead)" >&2
  exit 1
fi

stamp_input="$TORCH_SPEC ${TORCH_INDEX_URL:-} ${EXTRAS:-} $LOCK $(cat requirements.txt requirements-dev.txt)
$([[ $LOCK == none ]] || cat "$LOCK")"
stamp="$VENV/.installed-$(printf '%s' "$stamp_input" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0  # already set up with these requirements
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "error: $PYTHON is $("$PYTHON" --version 2>/dev/null || echo "not found"); the toolkit needs Python 3.10 or newer" \
      "(set PYTHON=python3.11, for example)" >&2
    exit 1
  fi
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
torch_info=$("$VENV/bin/python" -W ignore -c "import torch; v = torch.version
print(torch.__version__, f'CUDA-{v.cuda}' if v.cuda else f'ROCm-{v.hip}' if getattr(v, 'hip', None) else 'CPU')")
read -r torch_version torch_build <<<"$torch_info"
echo "torch $torch_version: the $torch_build build (TORCH_INDEX_URL chooses another, see the header of this script)"
constraints="$VENV/constraints.txt"
echo "torch==$torch_version" >"$constraints"

locked=()
if [[ $LOCK != none ]]; then
  locked=(-c "$LOCK")
fi
installer=("${pip[@]}")
if [[ ${INSTALLER:-uv} == uv ]]; then
  if "${pip[@]}" "${locked[@]}" uv && "$VENV/bin/uv" --version >/dev/null 2>&1; then
    # --compile-bytecode: pip writes each module's .pyc at install, uv does not. Without them every process compiles
    # the sources it imports (diffusers, transformers, peft...: about 6 s a process here) wherever Python may not
    # write .pyc files (PYTHONDONTWRITEBYTECODE, a read-only environment), and the first run everywhere else.
    installer=("$VENV/bin/uv" pip install --quiet --compile-bytecode --python "$VENV/bin/python")
  else
    echo "uv is not available here; installing with pip (slower)"
  fi
fi
echo "installing requirements (torch held at $torch_version; versions: ${LOCK/#none/the newest})"
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}  # DeepSpeed installs from source: its C++ ops compile on first use, not here
# shellcheck disable=SC2086  # EXTRAS is a list of requirement words
"${installer[@]}" -c "$constraints" "${locked[@]}" -r requirements.txt -r requirements-dev.txt ${EXTRAS:-}
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "environment ready: source $VENV/bin/activate"
