#!/usr/bin/env bash
# Image-to-video generation on one or several GPUs: as run_infer_text_to_video.sh, plus the first frames.
#   MODEL_NAME_OR_PATH=THUDM/CogVideoX-5b-I2V PROMPTS_FILE=prompts.txt IMAGES_FILE=images.txt NUM_GPUS=4 \
#     bash run_infer_image_to_video.sh
#   IMAGE / IMAGES_FILE  one image for every prompt, or a file with one image path per prompt (same order)
# Every other setting as in run_infer_text_to_video.sh (MODEL_NAME_OR_PATH default THUDM/CogVideoX-5b-I2V).
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")"
MODEL_NAME_OR_PATH=${MODEL_NAME_OR_PATH:-THUDM/CogVideoX-5b-I2V}
[[ -n "${IMAGE:-}${IMAGES_FILE:-}" ]] || { echo "error: set IMAGE or IMAGES_FILE (the first frames)" >&2; exit 1; }
source scripts/infer_lib.sh
infer_main
