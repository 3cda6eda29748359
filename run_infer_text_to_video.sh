#!/usr/bin/env bash
# Text-to-video generation on one or several GPUs: the prompts are shared out over the processes; one mp4 per
# prompt (named after it) and sheet.png in OUTPUT_DIR. Settings (environment), e.g.
#   MODEL_NAME_OR_PATH=THUDM/CogVideoX-5b LORA_PATH=outputs/my-lora PROMPTS_FILE=prompts.txt NUM_GPUS=4 \
#     bash run_infer_text_to_video.sh
#   MODEL_NAME_OR_PATH   pipeline (Hub id or folder)                       default THUDM/CogVideoX-5b
#   LORA_PATH            a LoRA run folder or file, or
#   TRANSFORMER_PATH     a full fine-tune's transformer folder (one of them, or neither: the base model)
#   PROMPT / PROMPTS_FILE  one prompt, or a file with one per line
#   H, W, F              height, width, frames (default: the model's own)
#   STEPS                denoising steps (default 50)
#   NUM_GPUS             processes (default 1)
#   SP_SIZE              processes per video (sequence parallelism; default 1): groups of SP_SIZE GPUs generate
#                        each video together, the groups share out the prompts
#   OUTPUT_DIR           default inference-output
#   ACCELERATE_BIN       the launcher (default accelerate)
#   DRY_RUN=1            print the command instead of running it
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")"
source scripts/infer_lib.sh
infer_main
