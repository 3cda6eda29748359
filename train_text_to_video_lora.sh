#!/usr/bin/env bash
# LoRA fine-tuning of CogVideoX text-to-video, swept over a small grid:
#   LEARNING_RATES x LR_SCHEDULES x OPTIMIZERS x MAX_TRAIN_STEPS
# Every run gets its own output directory whose name encodes its settings.
#
# Every setting below can be overridden from the environment, for example:
#   GPU_IDS=1 LEARNING_RATES="1e-4" OPTIMIZERS="adamw" ./train_text_to_video_lora.sh
#   DRY_RUN=1 ./train_text_to_video_lora.sh          # print the commands only
#   ACCELERATE_CONFIG_FILE=accelerate_configs/cpu.yaml MIXED_PRECISION=no ...
#   EXTRA_ARGS="--checkpoints_total_limit 2 --resume_from_checkpoint latest" ...
#
# The sweep lists are space-separated strings. EXTRA_ARGS is split on
# whitespace (no quoting, no globbing) and appended to every training command;
# a flag given there overrides the same flag set earlier in the command.
# For accelerate_configs/uncompiled_2.yaml or deepspeed.yaml set GPU_IDS=0,1.
# The script stops at the first run that fails.
#
# Relative paths given in the environment are taken from the directory you
# run the script from (inputs only when they exist there); the defaults are
# relative to this repository, which the script changes into.
# The script is plain bash 3.2+ (it also runs with macOS's /bin/bash).

set -euo pipefail

CALLER_DIR=$PWD

# shellcheck source=scripts/sweep_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/sweep_lib.sh"

resolve_from_caller ACCELERATE_CONFIG_FILE existing
resolve_from_caller MODEL_PATH existing
resolve_from_caller DATA_ROOT existing
resolve_from_caller OUTPUT_ROOT

cd "$(dirname "${BASH_SOURCE[0]}")"

# ---------------------------------------------------------------- environment
# Upstream always set TORCH_LOGS="+dynamo,recompiles,graph_breaks" and
# TORCHDYNAMO_VERBOSE=1, which floods the log on every run. Here it is opt-in:
# set TORCH_LOGS yourself (e.g. when debugging accelerate_configs/compiled_1.yaml).
if [[ -n "${TORCH_LOGS:-}" ]]; then
  export TORCH_LOGS
  export TORCHDYNAMO_VERBOSE="${TORCHDYNAMO_VERBOSE:-1}"
fi
# wandb cannot reach its server offline; `wandb sync` uploads the runs later.
export WANDB_MODE="${WANDB_MODE:-offline}"
# Disables NCCL peer-to-peer transfers, which hang on some consumer GPUs that
# lack P2P support; set NCCL_P2P_DISABLE=0 on NVLink machines for speed.
export NCCL_P2P_DISABLE="${NCCL_P2P_DISABLE:-1}"
export TORCH_NCCL_ENABLE_MONITORING="${TORCH_NCCL_ENABLE_MONITORING:-0}"

# ------------------------------------------------------------------- settings
: "${GPU_IDS:=0}"
: "${ACCELERATE_CONFIG_FILE:=accelerate_configs/uncompiled_1.yaml}"
: "${ACCELERATE_BIN:=accelerate}"
: "${MODEL_PATH:=THUDM/CogVideoX-5b}"
# LOAD_TENSORS=1 (upstream's behaviour) trains on the latents and prompt
# embeddings written by prepare_dataset.sh; LOAD_TENSORS=0 trains from raw
# videos, encoding them with the VAE and T5 at every step.
: "${LOAD_TENSORS:=1}"
case $LOAD_TENSORS in
  0 | 1) ;;
  *) die "LOAD_TENSORS must be 0 or 1, got '$LOAD_TENSORS'" ;;
esac
# The defaults match prepare_dataset.sh: it reads data/disney (whose captions
# are in prompt.txt) and writes data/disney-prepared (with prompts.txt).
if [[ "$LOAD_TENSORS" == 1 ]]; then
  : "${DATA_ROOT:=data/disney-prepared}"
  : "${CAPTION_COLUMN:=prompts.txt}"
else
  : "${DATA_ROOT:=data/disney}"
  : "${CAPTION_COLUMN:=prompt.txt}"
fi
: "${VIDEO_COLUMN:=videos.txt}"
: "${OUTPUT_ROOT:=outputs}"
: "${ID_TOKEN:=BW_STYLE}"
# Buckets: used when training from raw videos (LOAD_TENSORS=0). With prepared
# data every clip keeps the bucket prepare_dataset.sh gave it, and these only
# set the validation video length (the largest frame bucket).
: "${HEIGHT_BUCKETS:=480}"
: "${WIDTH_BUCKETS:=720}"
: "${FRAME_BUCKETS:=49}"
: "${MAX_NUM_FRAMES:=49}"
: "${MIXED_PRECISION:=bf16}"
: "${REPORT_TO:=wandb}"
: "${VALIDATION_PROMPT:=BW_STYLE A black and white cartoon mouse in a sailor cap steers a small paddle steamer down a river, whistling a tune as the wheel churns the water.:::BW_STYLE A black and white cartoon dog chases a bouncing ball across a farmyard while startled chickens flap out of the way.}"
: "${EXTRA_ARGS:=}"
: "${DRY_RUN:=0}"
case $DRY_RUN in
  0 | 1) ;;
  *) die "DRY_RUN must be 0 or 1, got '$DRY_RUN'" ;;
esac

# The sweep grid (space-separated lists).
: "${LEARNING_RATES:=1e-4 1e-3}"
: "${LR_SCHEDULES:=cosine_with_restarts}"
: "${OPTIMIZERS:=adamw adam}"
: "${MAX_TRAIN_STEPS:=3000}"

split_list LEARNING_RATES && learning_rates=("${words[@]}")
split_list LR_SCHEDULES && lr_schedules=("${words[@]}")
split_list OPTIMIZERS && optimizers=("${words[@]}")
split_list MAX_TRAIN_STEPS && max_train_steps=("${words[@]}")
split_list HEIGHT_BUCKETS && height_buckets=("${words[@]}")
split_list WIDTH_BUCKETS && width_buckets=("${words[@]}")
split_list FRAME_BUCKETS && frame_buckets=("${words[@]}")
# ${a[@]+"${a[@]}"} expands an empty array safely under set -u in bash < 4.4.
split_words "$EXTRA_ARGS" && extra_args=(${words[@]+"${words[@]}"})

if [[ "$LOAD_TENSORS" == 1 && ! -f "$DATA_ROOT/manifest.json" ]]; then
  message="LOAD_TENSORS=1 but $DATA_ROOT/manifest.json does not exist: run prepare_dataset.sh with OUTPUT_DIR=$DATA_ROOT first, or set LOAD_TENSORS=0 to train from raw videos"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "warning: $message" >&2
  else
    die "$message"
  fi
fi

if [[ "$DRY_RUN" == 0 ]] && ! command -v "$ACCELERATE_BIN" >/dev/null 2>&1; then
  die "'$ACCELERATE_BIN' not found: activate the environment with accelerate installed, or set ACCELERATE_BIN"
fi

# ---------------------------------------------------------------------- sweep
for learning_rate in "${learning_rates[@]}"; do
  for lr_schedule in "${lr_schedules[@]}"; do
    for optimizer in "${optimizers[@]}"; do
      for steps in "${max_train_steps[@]}"; do
        output_dir="$OUTPUT_ROOT/cogvideox-lora__optimizer_${optimizer}__steps_${steps}__lr-schedule_${lr_schedule}__learning-rate_${learning_rate}"

        cmd=(
          "$ACCELERATE_BIN" launch
          --config_file "$ACCELERATE_CONFIG_FILE"
          --gpu_ids "$GPU_IDS"
          training/cogvideox_text_to_video_lora.py
          --pretrained_model_name_or_path "$MODEL_PATH"
          --data_root "$DATA_ROOT"
          --caption_column "$CAPTION_COLUMN"
          --video_column "$VIDEO_COLUMN"
          --id_token "$ID_TOKEN"
          --height_buckets "${height_buckets[@]}"
          --width_buckets "${width_buckets[@]}"
          --frame_buckets "${frame_buckets[@]}"
          --dataloader_num_workers 8
          --pin_memory
          --validation_prompt "$VALIDATION_PROMPT"
          --validation_prompt_separator :::
          --num_validation_videos 1
          --validation_epochs 10
          --seed 42
          --rank 128
          --lora_alpha 128
          --mixed_precision "$MIXED_PRECISION"
          --output_dir "$output_dir"
          --max_num_frames "$MAX_NUM_FRAMES"
          --train_batch_size 1
          --max_train_steps "$steps"
          --checkpointing_steps 1000
          --gradient_accumulation_steps 1
          --gradient_checkpointing
          --learning_rate "$learning_rate"
          --lr_scheduler "$lr_schedule"
          --lr_warmup_steps 400
          --lr_num_cycles 1
          --enable_slicing
          --enable_tiling
          --enable_model_cpu_offload
        )
        # --load_tensors needs prepared data: run prepare_dataset.sh first (same
        # ID_TOKEN), and point DATA_ROOT at its OUTPUT_DIR (checked above through
        # its manifest.json).
        if [[ "$LOAD_TENSORS" == 1 ]]; then
          cmd+=(--load_tensors)
        fi
        cmd+=(
          --optimizer "$optimizer"
          --beta1 0.9
          --beta2 0.95
          --weight_decay 0.001
          --max_grad_norm 1.0
          --allow_tf32
          --report_to "$REPORT_TO"
          --nccl_timeout 1800
        )
        cmd+=(${extra_args[@]+"${extra_args[@]}"})

        printf '%q ' "${cmd[@]}"
        printf '\n'
        if [[ "$DRY_RUN" == 0 ]]; then
          "${cmd[@]}"
          echo "-------------------- finished $output_dir --------------------"
        fi
      done
    done
  done
done
