#!/usr/bin/env bash
# Full fine-tuning (SFT) of CogVideoX1.5 image-to-video
# (training/cogvideox_image_to_video_sft.py) on two GPUs with DeepSpeed ZeRO-2
# (accelerate_configs/deepspeed.yaml), at 77 frames. Each run writes
# transformer/ in its output directory. Swept like the other scripts, over
# LEARNING_RATES x LR_SCHEDULES x OPTIMIZERS x MAX_TRAIN_STEPS.
#
# Validation needs one first-frame image per validation prompt. VALIDATION_IMAGES
# is empty by default, and then the runs skip validation (the script says so);
# set it to paths (or URLs) joined by ::: in the order of VALIDATION_PROMPT:
#   VALIDATION_IMAGES="/path/to/goat.png:::/path/to/gramophone.png" ./train_image_to_video_sft.sh
#
# Every setting can be overridden from the environment, for example:
#   DRY_RUN=1 ./train_image_to_video_sft.sh          # print the commands only
#   TRAIN_BATCH_SIZE=4 MAX_TRAIN_STEPS=5000 ...
#   MODEL_PATH=THUDM/CogVideoX-5b-I2V FRAME_BUCKETS=49 ...   # CogVideoX 1.0 takes 4k+1 frames
#   GPU_IDS=2,3 ...        # deepspeed.yaml starts 2 processes: edit it for more GPUs
# The settings shared by the train_*.sh scripts (their defaults, how lists,
# EXTRA_ARGS and relative paths work) are listed in scripts/sweep_lib.sh.

set -euo pipefail

# shellcheck source=scripts/sweep_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/sweep_lib.sh"
# Like upstream, keep NCCL peer-to-peer transfers on (the data-centre GPUs this
# needs support them); NCCL_P2P_DISABLE=1 turns them off if NCCL hangs.
: "${NCCL_P2P_DISABLE:=0}"
sweep_begin
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-true}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-16}"

: "${GPU_IDS:=0,1}"
: "${ACCELERATE_CONFIG_FILE:=accelerate_configs/deepspeed.yaml}"
: "${MODEL_PATH:=THUDM/CogVideoX1.5-5B-I2V}"
sweep_data data/disney prompt.txt
: "${ID_TOKEN=BW_STYLE}"
: "${VALIDATION_PROMPT=BW_STYLE A black and white cartoon goat stands among floating musical notes, then a grinning mouse leans in and tugs at its beard.:::BW_STYLE A black and white cartoon cat cranks a gramophone and dances stiffly as the record spins faster and faster.}"
: "${VALIDATION_IMAGES=}"
: "${NOISED_IMAGE_DROPOUT:=0.05}"
# CogVideoX1.5 takes 8k-3 frames (53, 77, ...); MAX_NUM_FRAMES follows the largest bucket.
: "${FRAME_BUCKETS:=77}"
: "${LEARNING_RATES:=1e-4}"
: "${OPTIMIZERS:=adamw}"
: "${MAX_TRAIN_STEPS:=20000}"
: "${VALIDATION_EPOCHS:=1}"
: "${CHECKPOINTING_STEPS:=2000}"
: "${LR_WARMUP_STEPS:=800}"
# Accumulate 4 batches per optimizer step, as upstream did. Under DeepSpeed the
# trainer hands this (and TRAIN_BATCH_SIZE, per GPU) to the DeepSpeed config, so
# the effective batch is TRAIN_BATCH_SIZE x GPUs x GRADIENT_ACCUMULATION_STEPS.
: "${GRADIENT_ACCUMULATION_STEPS:=4}"

sweep_run training/cogvideox_image_to_video_sft.py cogvideox-i2v-sft \
  --noised_image_dropout "$NOISED_IMAGE_DROPOUT"
