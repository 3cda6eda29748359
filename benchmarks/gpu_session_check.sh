#!/usr/bin/env bash
# The short GPU check for a session with a lent GPU (meant to fit 15 minutes of device time; not run on a GPU yet):
# CogVideoX-5b LoRA rank 64 with gradient checkpointing at its training size, measured (benchmark_training.py: real training code, random weights)
# beside the estimate --dry_run would print (estimate_memory.py), for the plain LoRA, 20 swapped blocks and DoRA.
# Then CogVideoX-2b full fine-tuning with --fp8_training at 49x480x480: 11,926 tokens per sample, not a multiple of
# 16, so each weight gradient runs torch._scaled_mm on a padded token side (CI checks its rules on fake tensors only).
# Rows go to benchmarks/results/<gpu>-session.jsonl (measured) and <gpu>-session-estimates.txt (estimated).
#
#   bash benchmarks/gpu_session_check.sh            # all four
#   ONLY=swap bash benchmarks/gpu_session_check.sh  # one of: lora swap dora fp8
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
GPU=$("$PYTHON" benchmarks/benchmark_training.py --gpu_slug)  # stops without a CUDA GPU
mkdir -p benchmarks/results
MEASURED="benchmarks/results/$GPU-session.jsonl"
ESTIMATED="benchmarks/results/$GPU-session-estimates.txt"
COMMON=(--rank 64 --lora_alpha 64 --gradient_checkpointing)
declare -A EXTRA=([lora]="" [swap]="--blocks_to_swap 20" [dora]="--lora_type dora")
for name in lora swap dora; do
  [[ -n "${ONLY:-}" && "$ONLY" != "$name" ]] && continue
  # shellcheck disable=SC2086  # EXTRA holds separate flags
  "$PYTHON" benchmarks/benchmark_training.py --model 5b --mode lora --steps 4 --warmup_steps 2 --output "$MEASURED" \
    -- "${COMMON[@]}" ${EXTRA[$name]}
  # shellcheck disable=SC2086
  { echo "== $name: ${COMMON[*]} ${EXTRA[$name]}"
    "$PYTHON" benchmarks/estimate_memory.py --model 5b --mode lora -- "${COMMON[@]}" ${EXTRA[$name]}; } >> "$ESTIMATED"
done
if [[ -z "${ONLY:-}" || "$ONLY" == fp8 ]]; then
  FP8=(--fp8_training --gradient_checkpointing --height_buckets 480 --width_buckets 480 --frame_buckets 49)
  "$PYTHON" benchmarks/benchmark_training.py --model 2b --mode sft --steps 2 --warmup_steps 1 --output "$MEASURED" \
    -- "${FP8[@]}"
fi
echo "measured: $MEASURED"
echo "estimated: $ESTIMATED"
