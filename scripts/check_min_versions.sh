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
#   bash scripts/check_min_versions.sh        # about 5 minutes on 2 CPU cores (README has the last result)
#
# Linux (the DeepSpeed steps need DeepSpeed, which requirements.txt installs there). Run by hand, not in CI: it
# downloads every package at its floor.
#
# Variables:
#   MIN_DIR          where the environment, models and logs go (default outputs/min-versions, ignored by git);
#                    the last result is written to $MIN_DIR/result.txt
#   TORCH_SPEC       the torch to install (default torch==2.13.0). requirements.txt's torch floor is tested only
#                    when this names it, e.g. TORCH_SPEC=torch==2.6.0 TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu,
#                    or from PyPI (the CUDA build, several GB; with NO_TRITON=1 on a machine without a GPU)
#   TORCH_INDEX_URL  optional index for torch (as in scripts/setup_env.sh)
#   NO_TRITON=1      uninstall triton once everything is installed: how a CUDA torch build (PyPI's default on Linux)
#                    is tested on a machine without a GPU. Triton cannot start without a GPU driver ("0 active
#                    drivers"), and DeepSpeed 0.14.4 imports its Triton kernels whenever triton imports; the CPU build
#                    has no triton. Recorded in result.txt.
#   PYTHON           the interpreter for the environment (default python3)
#   REUSE_ENV=1      keep an existing environment built from the same constraints (default: build afresh)
# DeepSpeed's CPU communication op is compiled on first use (about 2 minutes) into $MIN_DIR/torch_extensions,
# apart from the main environment's cache; it is kept between runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
mkdir -p "${MIN_DIR:=outputs/min-versions}"
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
# step NAME COMMAND...: run with output in $LOGS/NAME.log; PASS/FAIL with its time goes to result.txt
step() {
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
    note "RESULT: FAILED after $(($(date +%s) - started)) s"
    exit 1
  fi
  note "PASS $name ($(($(date +%s) - t0)) s)"
}

note "minimum-version check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $("$PYTHON" --version 2>&1)"

# --- the environment ----------------------------------------------------------------------------------------------
install_env() {
  if [[ ${REUSE_ENV:-0} != 1 || ! -x "$VENV/bin/python" ]]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local pip=("$VENV/bin/python" -m pip install --disable-pip-version-check)
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
  else
    "${pip[@]}" "$TORCH_SPEC"
  fi
  local torch_version
  torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
  "$PYTHON" scripts/check_min_versions.py constraints requirements.txt --torch "$torch_version" \
    >"$MIN_DIR/constraints.txt"
  "${pip[@]}" -c "$MIN_DIR/constraints.txt" -r requirements.txt
  if [[ ${NO_TRITON:-0} == 1 ]]; then
    "$VENV/bin/python" -m pip uninstall --disable-pip-version-check -y triton
  fi
  "$VENV/bin/python" scripts/check_min_versions.py installed "$MIN_DIR/constraints.txt"
}
step install install_env
sed -n '/^package/,$p' "$LOGS/install.log" | tee -a "$RESULT"
torch_floor=$(sed -n 's/^torch>=\([0-9.]*\).*/\1/p' requirements.txt)
torch_built=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
note "torch: requirements.txt floor $torch_floor, installed $torch_built (TORCH_SPEC=$TORCH_SPEC)"
if [[ ${NO_TRITON:-0} == 1 ]]; then
  note "triton uninstalled (NO_TRITON=1): the CUDA torch build runs as the CPU build does"
fi

PY="$VENV/bin/python"
ACCELERATE="$VENV/bin/accelerate"
MODEL="$RUNS/tiny-cogvideox"
TINY=(--height_buckets 32 48 64 --width_buckets 32 64 96 --frame_buckets 5 9 --max_num_frames 9
  --train_batch_size 2 --rank 4 --lora_alpha 8 --learning_rate 1e-2 --lr_warmup_steps 0 --seed 7)
TRAINER=training/cogvideox_text_to_video_lora.py

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
