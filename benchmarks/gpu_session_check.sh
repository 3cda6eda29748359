#!/usr/bin/env bash
# The short GPU check for a session with a lent GPU (meant to fit 15 minutes of device time; not run on a GPU yet):
# CogVideoX-5b LoRA rank 64 with gradient checkpointing at its training size, measured (benchmark_training.py: real training code, random weights)
# beside the estimate --dry_run would print (estimate_memory.py), for the plain LoRA, 20 swapped blocks and DoRA.
# Rows go to benchmarks/results/<gpu>-session.jsonl (measured) and <gpu>-session-estimates.txt (estimated).
#
#   bash benchmarks/gpu_session_check.sh            # all three
#   ONLY=swap bash benchmarks/gpu_session_check.sh  # one of: lora swap dora
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
echo "measured: $MEASURED"
echo "estimated: $ESTIMATED"
