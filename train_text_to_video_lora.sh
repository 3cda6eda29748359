#!/usr/bin/env bash
# LoRA fine-tuning of CogVideoX text-to-video (training/cogvideox_text_to_video_lora.py),
# swept over LEARNING_RATES x LR_SCHEDULES x OPTIMIZERS x MAX_TRAIN_STEPS. Every
# run gets its own output directory whose name encodes its settings.
# Fits one 24 GB GPU with these defaults (the --dry_run estimate; tests/test_presets.py checks it).
#
# Every setting can be overridden from the environment, for example:
#   GPU_IDS=1 LEARNING_RATES="1e-4" OPTIMIZERS="adamw" ./train_text_to_video_lora.sh
#   DRY_RUN=1 ./train_text_to_video_lora.sh          # print the commands only
#   ACCELERATE_CONFIG_FILE=accelerate_configs/cpu.yaml MIXED_PRECISION=no ...
#   EXTRA_ARGS="--checkpoints_total_limit 2 --resume_from_checkpoint latest" ...
#   RANK=64 LORA_ALPHA=64 VALIDATION_PROMPT= ...      # smaller adapter, no validation
#   CONFIG=run.toml LEARNING_RATES="1e-4 3e-4" ./train_text_to_video_lora.sh   # a run config, two learning rates
# The settings shared by the train_*.sh scripts (their defaults, how lists,
# EXTRA_ARGS and relative paths work) are listed in scripts/sweep_lib.sh.

set -euo pipefail

# shellcheck source=scripts/sweep_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/sweep_lib.sh"
sweep_begin

: "${MODEL_PATH:=THUDM/CogVideoX-5b}"
# LOAD_TENSORS=1 (upstream's behaviour) trains on the latents and prompt
# embeddings written by prepare_dataset.sh (run it first, with the same
# ID_TOKEN): DATA_ROOT defaults to its output, data/disney-prepared.
# LOAD_TENSORS=0 trains from the raw videos in data/disney (captions in prompt.txt).
: "${LOAD_TENSORS:=1}"
sweep_data data/disney prompt.txt
: "${ID_TOKEN=BW_STYLE}"
: "${VALIDATION_PROMPT=BW_STYLE A black and white cartoon mouse in a sailor cap steers a small paddle steamer down a river, whistling a tune as the wheel churns the water.:::BW_STYLE A black and white cartoon dog chases a bouncing ball across a farmyard while startled chickens flap out of the way.}"
: "${LEARNING_RATES:=1e-4 1e-3}"
: "${OPTIMIZERS:=adamw adam}"
: "${MAX_TRAIN_STEPS:=3000}"
: "${RANK:=128}"
: "${LORA_ALPHA:=128}"

# --enable_model_cpu_offload only affects the validation pipeline.
sweep_run training/cogvideox_text_to_video_lora.py cogvideox-lora \
  --rank "$RANK" --lora_alpha "$LORA_ALPHA" --enable_model_cpu_offload
