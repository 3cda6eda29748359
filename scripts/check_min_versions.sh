#!/usr/bin/env bash
# Prove requirements.txt's floors: build a separate environment with every requirement at exactly its `>=` floor,
# then, in it:
#   1. build a tiny random CogVideoX (tools/build_tiny_model.py, with the video readers loaded as in the tests)
#   2. a LoRA run from the bundled clips: validation, a checkpoint, wandb (offline), the trainer's final test
#   3. a one-process DeepSpeed run from the shipped accelerate_configs/deepspeed.yaml (ZeRO-2, optimizer offloaded
#      to the CPU), CSV data, tensorboard; checkpointed, then resumed from the checkpoint in a second run
#   4. every optional optimizer (bitsandbytes 8-bit, torchao 8/4-bit, prodigy, came) steps, built by the trainer
#   5. the LoRA from 2 reloaded with diffusers' pipe.load_lora_weights: alpha applied, output changed
#
#   bash scripts/check_min_versions.sh        # about 5 minutes on 2 CPU cores (docs/install.md says what it checks)
#
# MODE=each-floor: each floor on its own, with everything else at the newest version requirements.txt allows (what
# `pip install -r requirements.txt` gives someone who has pinned that one package at its floor). One environment
# with the newest of everything is built first and checked; then, for each floor in turn, it is synced back to the
# newest and only that package (and whatever its own requirements move) is reinstalled at the floor, and checked:
#   imports    the CogVideoX pipelines, T5, peft, accelerate, and every requirement (a mismatch shows here first)
#   tiny_model tools/build_tiny_model.py's model
#   lora_run   a two-step LoRA run: a checkpoint, a validation, the trainer's parity test (wandb for wandb's floor,
#              tensorboard for the others)
#   reload     that LoRA loaded with pipe.load_lora_weights
#   and every optional optimizer for the optimizers' floors (bitsandbytes, torchao, prodigyopt, came-pytorch) and the
#   newest environment; a one-process DeepSpeed run for DeepSpeed's floor.
# PASS/FAIL per floor goes to result.txt with what moved besides the package; a failing floor does not stop the
# others. About a minute a floor on 2 CPU cores, plus a few minutes for the newest environment.
#   MODE=each-floor bash scripts/check_min_versions.sh
#   MODE=each-floor FLOORS="diffusers peft" bash scripts/check_min_versions.sh   # only these floors
#
# Linux (the DeepSpeed steps need DeepSpeed, which requirements.txt installs there). Run by hand, not in CI: it
# downloads every package at its floor.
#
# Variables:
#   MODE             all-floors (default: every floor at once) or each-floor (above)
#   MIN_DIR          where the environment, models and logs go (default outputs/min-versions, with MODE=each-floor
#                    outputs/each-floor; ignored by git); the last result is written to $MIN_DIR/result.txt
#   FLOORS           MODE=each-floor: the packages whose floors to check, e.g. "diffusers peft" (default: all of
#                    them; torch is held at TORCH_SPEC)
#   REQUIREMENTS     the requirements file whose floors are checked (default requirements.txt)
#   TORCH_SPEC       the torch to install (default torch==2.13.0). requirements.txt's torch floor is tested only
#                    when this names it, e.g. TORCH_SPEC=torch==2.6.0 TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu,
#                    or from PyPI (the CUDA build, several GB; with NO_TRITON=1 on a machine without a GPU)
#   TORCH_INDEX_URL  optional index for torch (as in scripts/setup_env.sh)
#   NO_TRITON=1      uninstall triton once everything is installed: how a CUDA torch build (PyPI's default on Linux)
#                    is tested on a machine without a GPU. Triton cannot start without a GPU driver ("0 active
#                    drivers"), and DeepSpeed 0.14.4 imports its Triton kernels whenever triton imports; the CPU build
#                    has no triton. Recorded in result.txt. MODE=all-floors only.
#   PYTHON           the interpreter for the environment (default python3)
#   REUSE_ENV=1      keep an existing environment built from the same constraints (default: build afresh); with
#                    MODE=each-floor, keep the newest environment and its list if both are there
# DeepSpeed's CPU communication op is compiled on first use (about 2 minutes) into $MIN_DIR/torch_extensions,
# apart from the main environment's cache; it is kept between runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
MODE=${MODE:-all-floors}
REQUIREMENTS=${REQUIREMENTS:-requirements.txt}
case $MODE in
  all-floors) : "${MIN_DIR:=outputs/min-versions}" ;;
  each-floor) : "${MIN_DIR:=outputs/each-floor}" ;;
  *) echo "error: MODE=$MODE: all-floors or each-floor" >&2; exit 2 ;;
esac
mkdir -p "$MIN_DIR"
MIN_DIR=$(cd "$MIN_DIR" && pwd)
VENV="$MIN_DIR/venv" LOGS="$MIN_DIR/logs" RUNS="$MIN_DIR/runs" RESULT="$MIN_DIR/result.txt"
rm -rf "$LOGS" "$RUNS"
mkdir -p "$LOGS" "$RUNS"
: >"$RESULT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
export WANDB_MODE=offline WANDB_DIR="$RUNS" WANDB_ERROR_REPORTING=false
export TORCH_EXTENSIONS_DIR="$MIN_DIR/torch_extensions"

started=$(date +%s)
note() { echo "$*" | tee -a "$RESULT"; }
# run_step NAME COMMAND...: run with output in $LOGS/NAME.log; PASS/FAIL with its time goes to result.txt; returns
# the command's status
run_step() {
  local name=$1 t0 status
  shift
  t0=$(date +%s)
  echo "== $name"
  set +e
  (set -e; "$@") >"$LOGS/$name.log" 2>&1  # a subshell, so that set -e stops a failing function too
  status=$?
  set -e
  if [[ $status -ne 0 ]]; then
    tail -n 40 "$LOGS/$name.log"
    note "FAIL $name ($(($(date +%s) - t0)) s, exit $status; log: $LOGS/$name.log)"
    return "$status"
  fi
  note "PASS $name ($(($(date +%s) - t0)) s)"
}
# step NAME COMMAND...: run_step, and the check stops at the first failure
step() {
  if ! run_step "$@"; then
    note "RESULT: FAILED after $(($(date +%s) - started)) s"
    exit 1
  fi
}

PY="$VENV/bin/python"
ACCELERATE="$VENV/bin/accelerate"
MODEL="$RUNS/tiny-cogvideox"
TINY=(--height_buckets 32 48 64 --width_buckets 32 64 96 --frame_buckets 5 9 --max_num_frames 9
  --train_batch_size 2 --rank 4 --lora_alpha 8 --learning_rate 1e-2 --lr_warmup_steps 0 --seed 7)
TRAINER=training/cogvideox_text_to_video_lora.py

# new_venv: $VENV with $TORCH_SPEC installed by pip (TORCH_INDEX_URL as in scripts/setup_env.sh)
new_venv() {
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip install --disable-pip-version-check)
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
  else
    "${pip[@]}" "$TORCH_SPEC"
  fi
}

# --- MODE=each-floor: one floor at a time, everything else newest ------------------------------------------------
if [[ $MODE == each-floor ]]; then
  note "each-floor check (one floor at a time, the rest the newest $REQUIREMENTS allows)," \
    "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $("$PYTHON" --version 2>&1)"
  NEWEST="$MIN_DIR/newest.txt" PINS="$MIN_DIR/pins"
  UV="$VENV/bin/uv"
  export DS_BUILD_OPS=0  # DeepSpeed installs from source: its ops compile on first use, not at install
  # the newest of everything, torch held; its `uv pip freeze` is what each floor's environment starts from
  install_newest() {
    if [[ ${REUSE_ENV:-0} == 1 && -x "$UV" && -s "$NEWEST" && -s "$MIN_DIR/torch.txt" ]]; then
      echo "reusing $VENV and $NEWEST (REUSE_ENV=1)"
      "$UV" pip sync --python "$PY" "$NEWEST"
      return
    fi
    new_venv
    "$PY" -m pip install --disable-pip-version-check uv
    "$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >"$MIN_DIR/torch.txt"
    "$UV" pip install --python "$PY" -c "$MIN_DIR/torch.txt" -r "$REQUIREMENTS"
    "$UV" pip freeze --python "$PY" >"$NEWEST"
  }
  # floor_install NAME FLOOR: back to the newest, then NAME at FLOOR and the rest as the resolver keeps it (the newest
  # that NAME's own requirements allow); then what the newest needed and nothing needs now is uninstalled, as a fresh
  # install would not have it. `|| return`: run_step runs this where set -e is ignored (inside an `if`).
  floor_install() {
    local unneeded
    "$UV" pip sync --python "$PY" "$NEWEST" || return
    echo "$1==$2" >"$PINS/$1.txt"
    "$UV" pip install --python "$PY" -c "$MIN_DIR/torch.txt" -c "$PINS/$1.txt" -r "$REQUIREMENTS" || return
    unneeded=$("$PY" scripts/check_min_versions.py unneeded "$REQUIREMENTS") || return
    if [[ -n $unneeded ]]; then
      echo "no longer needed: $unneeded"
      # shellcheck disable=SC2086  # one name a line
      "$UV" pip uninstall --python "$PY" $unneeded || return
    fi
    "$PY" scripts/check_min_versions.py installed "$PINS/$1.txt"
  }
  # checks NAME: the checks in this environment, logs under $LOGS/NAME-*; returns non-zero at the first that fails
  checks() {
    local name=$1 runs="$RUNS/$1" report=tensorboard
    [[ $name == wandb ]] && report=wandb
    run_step "$name-imports" "$PY" -W ignore scripts/check_min_versions.py imports "$REQUIREMENTS" || return
    grep "^versions:" "$LOGS/$name-imports.log" | sed 's/^/  /' | tee -a "$RESULT"
    run_step "$name-tiny_model" "$PY" scripts/check_min_versions.py tiny-model "$runs/model" || return
    run_step "$name-lora_run" "$ACCELERATE" launch --config_file accelerate_configs/cpu.yaml \
      --num_cpu_threads_per_process "$(nproc)" "$TRAINER" --pretrained_model_name_or_path "$runs/model" \
      --output_dir "$runs/lora" "${TINY[@]}" --data_root assets/tests --caption_column prompts.txt \
      --video_column videos.txt --max_train_steps 2 --checkpointing_steps 2 \
      --validation_prompt "a cat walks on the grass" --validation_steps 2 --num_inference_steps 2 --height 32 \
      --width 32 --validation_num_frames 9 --report_to "$report" || return
    run_step "$name-reload" "$PY" scripts/check_min_versions.py reload "$runs/model" "$runs/lora" --rank 4 \
      --lora_alpha 8 || return
    case $name in
      newest | bitsandbytes | torchao | prodigyopt | came-pytorch)
        run_step "$name-optimizers" "$PY" scripts/check_min_versions.py options || return ;;
      deepspeed)
        run_step "$name-deepspeed_config" "$PY" scripts/check_min_versions.py deepspeed-config \
          accelerate_configs/deepspeed.yaml "$runs" || return
        run_step "$name-deepspeed_run" "$ACCELERATE" launch --config_file "$runs/deepspeed_cpu.yaml" "$TRAINER" \
          --pretrained_model_name_or_path "$runs/model" --output_dir "$runs/deepspeed" "${TINY[@]}" \
          --dataset_file assets/tests/metadata.csv --caption_column caption --video_column video \
          --gradient_accumulation_steps 2 --max_train_steps 2 --checkpointing_steps 2 --report_to none || return ;;
    esac
  }

  mkdir -p "$PINS"
  step install_newest install_newest
  note "torch held at $(cat "$MIN_DIR/torch.txt") (TORCH_SPEC=$TORCH_SPEC)"
  passed=() failed=() same=()
  t0=$(date +%s)
  if checks newest; then
    note "PASS newest: everything at the newest allowed ($(($(date +%s) - t0)) s)"
  else
    note "FAIL newest: everything at the newest allowed ($(($(date +%s) - t0)) s)"
    failed+=(newest)
  fi
  canonical() { local name=${1,,}; name=${name//_/-}; echo "${name//./-}"; }
  wanted=" "
  for name in ${FLOORS:-}; do wanted+="$(canonical "$name") "; done
  while read -r name floor <&3; do  # fd 3: nothing the checks start can read the list
    if [[ -n ${FLOORS:-} && $wanted != *" $(canonical "$name") "* ]]; then
      continue
    fi
    newest=$("$PY" -c "import sys; from importlib.metadata import version; print(version(sys.argv[1]))" "$name")
    if [[ $newest == "$floor" ]]; then
      note "SAME $name==$floor is also the newest: checked with the newest environment"
      same+=("$name")
      continue
    fi
    t0=$(date +%s)
    ok=1
    if run_step "$name-install" floor_install "$name" "$floor"; then
      "$UV" pip freeze --python "$PY" >"$PINS/$name-freeze.txt"
      note "  moved from the newest: $("$PY" scripts/check_min_versions.py moved "$NEWEST" "$PINS/$name-freeze.txt")"
      checks "$name" || ok=0
    else
      ok=0
    fi
    if [[ $ok == 1 ]]; then
      note "PASS $name==$floor with the rest newest ($(($(date +%s) - t0)) s)"
      passed+=("$name")
    else
      note "FAIL $name==$floor with the rest newest ($(($(date +%s) - t0)) s)"
      failed+=("$name")
    fi
  done 3< <("$PY" scripts/check_min_versions.py floors "$REQUIREMENTS")
  "$UV" pip sync --python "$PY" "$NEWEST" >/dev/null 2>&1 || true  # leave the newest environment behind
  note "floors passed: ${passed[*]:-none}"
  note "floors that are also the newest: ${same[*]:-none}"
  note "failed: ${failed[*]:-none}"
  if [[ ${#failed[@]} -gt 0 ]]; then
    note "RESULT: FAILED after $(($(date +%s) - started)) s (result: $RESULT, logs: $LOGS)"
    exit 1
  fi
  note "RESULT: PASSED in $(($(date +%s) - started)) s (result: $RESULT, logs: $LOGS)"
  exit 0
fi

# --- MODE=all-floors: every floor at once -------------------------------------------------------------------------
note "minimum-version check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $("$PYTHON" --version 2>&1)"

# --- the environment ----------------------------------------------------------------------------------------------
install_env() {
  if [[ ${REUSE_ENV:-0} != 1 || ! -x "$VENV/bin/python" ]]; then
    new_venv
  fi
  local pip=("$VENV/bin/python" -m pip install --disable-pip-version-check)
  local torch_version
  torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
  "$PYTHON" scripts/check_min_versions.py constraints "$REQUIREMENTS" --torch "$torch_version" \
    >"$MIN_DIR/constraints.txt"
  "${pip[@]}" -c "$MIN_DIR/constraints.txt" -r "$REQUIREMENTS"
  if [[ ${NO_TRITON:-0} == 1 ]]; then
    "$VENV/bin/python" -m pip uninstall --disable-pip-version-check -y triton
  fi
  "$VENV/bin/python" scripts/check_min_versions.py installed "$MIN_DIR/constraints.txt"
}
step install install_env
sed -n '/^package/,$p' "$LOGS/install.log" | tee -a "$RESULT"
torch_floor=$(sed -n 's/^torch>=\([0-9.]*\).*/\1/p' "$REQUIREMENTS")
torch_built=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
note "torch: $REQUIREMENTS floor $torch_floor, installed $torch_built (TORCH_SPEC=$TORCH_SPEC)"
if [[ ${NO_TRITON:-0} == 1 ]]; then
  note "triton uninstalled (NO_TRITON=1): the CUDA torch build runs as the CPU build does"
fi

# --- the runs -----------------------------------------------------------------------------------------------------
step tiny_model "$PY" scripts/check_min_versions.py tiny-model "$MODEL"

step lora_run "$ACCELERATE" launch --config_file accelerate_configs/cpu.yaml --num_cpu_threads_per_process "$(nproc)" \
  "$TRAINER" --pretrained_model_name_or_path "$MODEL" --output_dir "$RUNS/lora" "${TINY[@]}" \
  --data_root assets/tests --caption_column prompts.txt --video_column videos.txt \
  --max_train_steps 4 --checkpointing_steps 2 --validation_prompt "a cat walks on the grass" --validation_steps 2 \
  --num_inference_steps 2 --height 32 --width 32 --validation_num_frames 9 --report_to wandb

step deepspeed_config "$PY" scripts/check_min_versions.py deepspeed-config accelerate_configs/deepspeed.yaml "$RUNS"
DEEPSPEED=("$ACCELERATE" launch --config_file "$RUNS/deepspeed_cpu.yaml" "$TRAINER"
  --pretrained_model_name_or_path "$MODEL" --output_dir "$RUNS/deepspeed" "${TINY[@]}"
  --dataset_file assets/tests/metadata.csv --caption_column caption --video_column video
  --gradient_accumulation_steps 2 --checkpointing_steps 2 --report_to tensorboard)
check_deepspeed_outputs() {
  grep "resumed from .*checkpoint-2" "$LOGS/deepspeed_resume.log"
  ls -d "$RUNS/deepspeed/checkpoint-4" "$RUNS/deepspeed/pytorch_lora_weights.safetensors"
  find "$RUNS/deepspeed/logs" -name 'events.out.tfevents.*' | grep .  # tensorboard wrote its events
}
step deepspeed_run "${DEEPSPEED[@]}" --max_train_steps 2
step deepspeed_resume "${DEEPSPEED[@]}" --max_train_steps 4 --resume_from_checkpoint latest
step deepspeed_outputs check_deepspeed_outputs

step optimizers "$PY" scripts/check_min_versions.py options
grep -E ": (ok|FAILED)" "$LOGS/optimizers.log" | sed 's/^/  /' | tee -a "$RESULT"

step lora_reload "$PY" scripts/check_min_versions.py reload "$MODEL" "$RUNS/lora" --rank 4 --lora_alpha 8
grep -E "^(trainer's parity|LoRA layers|max \||adapter weight 0)" "$LOGS/lora_reload.log" | sed 's/^/  /' | tee -a "$RESULT"

note "RESULT: PASSED in $(($(date +%s) - started)) s (result: $RESULT, logs: $LOGS)"
