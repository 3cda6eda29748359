#!/usr/bin/env bash
# The README's memory/speed tables, measured on this machine's GPU: every configuration of `--sweep readme`
# (2b, 5b, 1.5-5b; LoRA ranks 16/64/256 and full fine-tuning with five optimizer set-ups; batch 1 and 4), each in
# its own process, then every speed lever of `--sweep levers`, appended to benchmarks/results/<gpu>.jsonl, then
# rendered to benchmarks/results/<gpu>.md.
#
#   bash benchmarks/run_gpu_benchmarks.sh                      # everything (hours on one GPU)
#   bash benchmarks/run_gpu_benchmarks.sh --model 5b           # one model's rows
#   bash benchmarks/run_gpu_benchmarks.sh -- --allow_tf32      # extra trainer flags for every row
#
# Interrupted? Run it again: configurations that already have a row are skipped. To measure again, delete the
# .jsonl file. PYTHON picks the interpreter (default: .venv/bin/python if present, else python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
GPU=$("$PYTHON" benchmarks/benchmark_training.py --gpu_slug)  # the GPU's name as a file name; stops without one
mkdir -p benchmarks/results
RESULTS="benchmarks/results/$GPU.jsonl"
"$PYTHON" benchmarks/benchmark_training.py --sweep readme --output "$RESULTS" "$@"
# A row per speed lever (attention kernel, regional compile, FP8, selective checkpointing) for each model.
"$PYTHON" benchmarks/benchmark_training.py --sweep levers --output "$RESULTS" "$@"
"$PYTHON" benchmarks/benchmark_training.py --markdown "$RESULTS" > "benchmarks/results/$GPU.md"
echo "rows: $RESULTS"
echo "tables: benchmarks/results/$GPU.md"
