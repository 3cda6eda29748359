#!/usr/bin/env bash
# Precompute VAE latents and T5 prompt embeddings for a video dataset, so that
# training can run with --load_tensors (the default of train_text_to_video_lora.sh) and
# never loads the VAE or the text encoder.
#
# Every setting below can be overridden from the environment, for example:
#   DATA_ROOT=/data/my-videos OUTPUT_DIR=/data/my-videos-prepared ./prepare_dataset.sh
#   NUM_GPUS=4 ./prepare_dataset.sh                  # torchrun, one process per GPU
#   DRY_RUN=1 ./prepare_dataset.sh                   # print the command only
#   EXTRA_ARGS="--save_image_latents" ./prepare_dataset.sh   # for image-to-video
#
# The bucket lists are space-separated strings. EXTRA_ARGS is split on
# whitespace (no quoting, no globbing) and appended to the command; a flag
# given there overrides the same flag set earlier in the command.
# Train with the same height/width/frame buckets, DATA_ROOT=$OUTPUT_DIR,
# CAPTION_COLUMN=prompts.txt and VIDEO_COLUMN=videos.txt (the training
# script's defaults for LOAD_TENSORS=1).
#
# MODEL_ID only supplies the VAE and the T5 encoder, and they must be those of
# the model family you train. CogVideoX 2b and 5b share the VAE and T5
# encoder, and the CogVideoX1.5 models share them too, so one prepared dataset
# serves all of them. The frame buckets still have to suit the model you train
# (4k+1 frames such as 49 for CogVideoX; 8k-3 frames such as 53 or 77 for 1.5).
#
# Relative paths given in the environment are taken from the directory you
# run the script from (inputs only when they exist there); the defaults are
# relative to this repository, which the script changes into.
# The script is plain bash 3.2+ (it also runs with macOS's /bin/bash).

set -euo pipefail

CALLER_DIR=$PWD

# shellcheck source=scripts/sweep_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/sweep_lib.sh"

resolve_from_caller MODEL_ID existing
resolve_from_caller DATA_ROOT existing
resolve_from_caller OUTPUT_DIR

cd "$(dirname "${BASH_SOURCE[0]}")"

# ------------------------------------------------------------------- settings
: "${NUM_GPUS:=1}"
: "${PYTHON:=python}"
: "${TORCHRUN:=torchrun}"
: "${MODEL_ID:=THUDM/CogVideoX-2b}"
# Input dataset: DATA_ROOT holds the caption file, the video list and the videos
# (paths in the video list are relative to DATA_ROOT).
: "${DATA_ROOT:=data/disney}"
: "${CAPTION_COLUMN:=prompt.txt}"
: "${VIDEO_COLUMN:=videos.txt}"
# Output: the prepared dataset (latents, embeddings, prompts.txt, videos.txt, manifest.json).
: "${OUTPUT_DIR:=data/disney-prepared}"
: "${HEIGHT_BUCKETS:=480 720}"
: "${WIDTH_BUCKETS:=720 960}"
: "${FRAME_BUCKETS:=49}"
: "${MAX_NUM_FRAMES:=49}"
: "${MAX_SEQUENCE_LENGTH:=226}"
: "${TARGET_FPS:=8}"
: "${BATCH_SIZE:=1}"
: "${DTYPE:=fp32}"
: "${ID_TOKEN=BW_STYLE}"  # baked into the prompt embeddings; "" for none (must match training's --id_token)
: "${EXTRA_ARGS:=}"
: "${DRY_RUN:=0}"
case $DRY_RUN in
  0 | 1) ;;
  *) die "DRY_RUN must be 0 or 1, got '$DRY_RUN'" ;;
esac
[[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, got '$NUM_GPUS'"

split_list HEIGHT_BUCKETS && height_buckets=("${words[@]}")
split_list WIDTH_BUCKETS && width_buckets=("${words[@]}")
split_list FRAME_BUCKETS && frame_buckets=("${words[@]}")
# ${a[@]+"${a[@]}"} expands an empty array safely under set -u in bash < 4.4.
split_words "$EXTRA_ARGS" && extra_args=(${words[@]+"${words[@]}"})

# ------------------------------------------------------------------- command
# One GPU: a plain python process. Several: torchrun, which splits the videos
# across one process per GPU (select the GPUs with CUDA_VISIBLE_DEVICES).
if [[ "$NUM_GPUS" == 1 ]]; then
  cmd=("$PYTHON")
else
  cmd=("$TORCHRUN" --nproc_per_node="$NUM_GPUS")
fi
cmd+=(
  training/prepare_dataset.py
  --model_id "$MODEL_ID"
  --data_root "$DATA_ROOT"
  --caption_column "$CAPTION_COLUMN"
  --video_column "$VIDEO_COLUMN"
  --output_dir "$OUTPUT_DIR"
  --height_buckets "${height_buckets[@]}"
  --width_buckets "${width_buckets[@]}"
  --frame_buckets "${frame_buckets[@]}"
  --max_num_frames "$MAX_NUM_FRAMES"
  --max_sequence_length "$MAX_SEQUENCE_LENGTH"
  --target_fps "$TARGET_FPS"
  --batch_size "$BATCH_SIZE"
  --dtype "$DTYPE"
  --save_latents_and_embeddings
)
if [[ -n "$ID_TOKEN" ]]; then
  cmd+=(--id_token "$ID_TOKEN")
fi
cmd+=(
  ${extra_args[@]+"${extra_args[@]}"}
)

if [[ "$DRY_RUN" == 0 ]] && ! command -v "${cmd[0]}" >/dev/null 2>&1; then
  die "'${cmd[0]}' not found: activate the environment with the toolkit's requirements installed, or set PYTHON / TORCHRUN"
fi

printf '%q ' "${cmd[@]}"
printf '\n'
if [[ "$DRY_RUN" == 0 ]]; then
  "${cmd[@]}"
fi
