#!/usr/bin/env bash
# Full fine-tuning (SFT) of CogVideoX text-to-video
# (training/cogvideox_text_to_video_sft.py): every transformer weight trains, and
# each run writes transformer/ in its output directory. Swept like the LoRA
# script, over LEARNING_RATES x LR_SCHEDULES x OPTIMIZERS x MAX_TRAIN_STEPS.
# Fits one 80 GB GPU with these defaults (the --dry_run estimate; tests/test_presets.py checks it).
#
# The default data is the Tom and Jerry dataset, downloaded with
#   hf download Wild-Heart/Tom-and-Jerry-VideoGeneration-Dataset --repo-type dataset \
#     --local-dir data/tom-and-jerry
#
# Every setting can be overridden from the environment, for example:
#   DATA_ROOT=/data/my-videos CAPTION_COLUMN=prompt.txt ./train_text_to_video_sft.sh
#   DRY_RUN=1 ./train_text_to_video_sft.sh           # print the commands only
#   MODEL_PATH=THUDM/CogVideoX-2b MAX_TRAIN_STEPS="5000 20000" ...
#   GPU_IDS=0,1 ACCELERATE_CONFIG_FILE=accelerate_configs/uncompiled_2.yaml MEMORY_ARGS= ...
#   LOAD_TENSORS=1 ...     # train on prepare_dataset.sh output (DATA_ROOT=data/tom-and-jerry-prepared)
# The settings shared by the train_*.sh scripts (their defaults, how lists,
# EXTRA_ARGS and relative paths work) are listed in scripts/sweep_lib.sh.

set -euo pipefail

# shellcheck source=scripts/sweep_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/sweep_lib.sh"
sweep_begin

: "${MODEL_PATH:=THUDM/CogVideoX-5b}"
sweep_data data/tom-and-jerry captions.txt
# No identifier token: the dataset's captions name the characters.
: "${ID_TOKEN=}"
: "${VALIDATION_PROMPT=Tom, the grey cartoon cat, tiptoes across a checkered kitchen floor towards a mouse hole, hiding a frying pan behind his back.:::Jerry, the little brown cartoon mouse, drags a wedge of cheese across a wooden table and dives into a teacup as a shadow falls over him.}"
: "${LEARNING_RATES:=1e-4}"
: "${OPTIMIZERS:=adamw}"
: "${MAX_TRAIN_STEPS:=20000}"
# Validate every epoch, checkpoint less often, accumulate 4 batches per step.
: "${VALIDATION_EPOCHS:=1}"
: "${CHECKPOINTING_STEPS:=2000}"
: "${GRADIENT_ACCUMULATION_STEPS:=4}"
: "${LR_WARMUP_STEPS:=800}"

# AdamW's states and its step live in CPU memory (torchao's CPUOffloadOptimizer; the master weights stay fp32):
# with the states on the GPU (upstream) a 5b full fine-tune from raw videos needs more than an 80 GB GPU has.
# It takes one process: with several GPUs set MEMORY_ARGS= (and a DeepSpeed config, or LOAD_TENSORS=1 with
# MEMORY_ARGS=--use_8bit: 56 GiB, as presets/5b-sft-80gb.toml).
: "${MEMORY_ARGS=--use_cpu_offload_optimizer}"
split_words "$MEMORY_ARGS" && memory_args=(${words[@]+"${words[@]}"})

sweep_run training/cogvideox_text_to_video_sft.py cogvideox-sft ${memory_args[@]+"${memory_args[@]}"}
