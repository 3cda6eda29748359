# shellcheck shell=bash
# The command of run_infer_{text,image}_to_video.sh (sourced by them, after they set CALLER_DIR and cd).
source scripts/sweep_lib.sh

infer_main() {
  local model=${MODEL_NAME_OR_PATH:-THUDM/CogVideoX-5b} gpus=${NUM_GPUS:-1} output=${OUTPUT_DIR:-inference-output}
  local name
  for name in LORA_PATH TRANSFORMER_PATH PROMPTS_FILE IMAGE IMAGES_FILE; do
    resolve_from_caller "$name"
  done
  resolve_from_caller model existing
  resolve_from_caller output
  [[ -z "${LORA_PATH:-}" || -z "${TRANSFORMER_PATH:-}" ]] || die "set LORA_PATH or TRANSFORMER_PATH, not both"
  [[ -n "${PROMPT:-}${PROMPTS_FILE:-}" ]] || die "set PROMPT or PROMPTS_FILE"
  local accelerate=${ACCELERATE_BIN:-accelerate}
  if [[ "${DRY_RUN:-0}" != 1 ]] && ! command -v "$accelerate" >/dev/null 2>&1; then
    die "'$accelerate' not found: activate the environment with accelerate installed, or set ACCELERATE_BIN"
  fi
  local command=("$accelerate" launch --num_processes "$gpus")
  if ((gpus > 1)); then
    command+=(--multi_gpu)
  fi
  command+=(tools/infer.py --model_name_or_path "$model" --output_dir "$output"
    --num_inference_steps "${STEPS:-50}")
  [[ -z "${LORA_PATH:-}" ]] || command+=(--lora_path "$LORA_PATH")
  [[ -z "${TRANSFORMER_PATH:-}" ]] || command+=(--transformer_path "$TRANSFORMER_PATH")
  [[ -z "${PROMPT:-}" ]] || command+=(--prompt "$PROMPT")
  [[ -z "${PROMPTS_FILE:-}" ]] || command+=(--prompts_file "$PROMPTS_FILE")
  [[ -z "${IMAGE:-}" ]] || command+=(--image "$IMAGE")
  [[ -z "${IMAGES_FILE:-}" ]] || command+=(--images_file "$IMAGES_FILE")
  [[ -z "${H:-}" ]] || command+=(--height "$H")
  [[ -z "${W:-}" ]] || command+=(--width "$W")
  [[ -z "${F:-}" ]] || command+=(--num_frames "$F")
  [[ -z "${SP_SIZE:-}" ]] || command+=(--sequence_parallel_shards "$SP_SIZE")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
    return 0
  fi
  "${command[@]}"
}
