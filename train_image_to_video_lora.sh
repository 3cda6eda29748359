#!/usr/bin/env bash
# LoRA fine-tuning of CogVideoX image-to-video (training/cogvideox_image_to_video_lora.py):
# the first frame of each clip conditions the video. Swept like the text-to-video
# script, over LEARNING_RATES x LR_SCHEDULES x OPTIMIZERS x MAX_TRAIN_STEPS.
# Fits one 40 GB GPU with these defaults (the --dry_run estimate; tests/test_presets.py checks it):
# from raw videos, T5 and the VAE share the GPU with training (presets/5b-i2v-lora-24gb.toml fits 24 GB).
#
# Validation needs one first-frame image per validation prompt. VALIDATION_IMAGES
# is empty by default, and then the runs skip validation (the script says so);
# set it to paths (or URLs) joined by ::: in the order of VALIDATION_PROMPT:
#   VALIDATION_IMAGES="/path/to/goat.png:::/path/to/gramophone.png" ./train_image_to_video_lora.sh
#
# Every setting can be overridden from the environment, for example:
#   DRY_RUN=1 ./train_image_to_video_lora.sh         # print the commands only
#   LEARNING_RATES="1e-4" OPTIMIZERS="adamw" NOISED_IMAGE_DROPOUT=0.1 ...
#   VALIDATION_PROMPT="BW_STYLE ...:::BW_STYLE ..." VALIDATION_IMAGES="a.png:::b.png" ...
#   LOAD_TENSORS=1 ...     # needs EXTRA_ARGS=--save_image_latents ./prepare_dataset.sh first
# The settings shared by the train_*.sh scripts (their defaults, how lists,
# EXTRA_ARGS and relative paths work) are listed in scripts/sweep_lib.sh.

set -euo pipefail

# shellcheck source=scripts/sweep_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/sweep_lib.sh"
sweep_begin

: "${MODEL_PATH:=THUDM/CogVideoX-5b-I2V}"
sweep_data data/disney prompt.txt
: "${ID_TOKEN=BW_STYLE}"
: "${VALIDATION_PROMPT=BW_STYLE A black and white cartoon goat stands among floating musical notes, then a grinning mouse leans in and tugs at its beard.:::BW_STYLE A black and white cartoon cat cranks a gramophone and dances stiffly as the record spins faster and faster.}"
# Upstream's placeholder was "/path/to/image1.png:::/path/to/image2.png".
: "${VALIDATION_IMAGES=}"
# How often the first-frame condition is zeroed in training (per sample).
: "${NOISED_IMAGE_DROPOUT:=0.05}"
: "${RANK:=128}"
: "${LORA_ALPHA:=128}"
: "${LEARNING_RATES:=1e-4 1e-3}"
: "${OPTIMIZERS:=adamw adam}"
: "${MAX_TRAIN_STEPS:=3000}"

sweep_run training/cogvideox_image_to_video_lora.py cogvideox-i2v-lora \
  --rank "$RANK" --lora_alpha "$LORA_ALPHA" --noised_image_dropout "$NOISED_IMAGE_DROPOUT"
