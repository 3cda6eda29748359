#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch --nodes 2 --gpus-per-node 8 scripts/slurm_multi_node.sh training/cogvideox_text_to_video_lora.py \
#     --pretrained_model_name_or_path THUDM/CogVideoX-5b --data_root /shared/data ... --output_dir /shared/out
#
# The arguments are what follows `accelerate launch` in the sweep scripts: the trainer and its flags. This script
# puts the launcher, with each node's rank, in front of them. Settings (environment):
#   CONFIG            accelerate config (default accelerate_configs/multi_node.yaml; deepspeed.yaml,
#                     deepspeed_zero3.yaml and fsdp.yaml work too: the machine settings come from here)
#   GPUS_PER_NODE     processes per node (default: SLURM_GPUS_ON_NODE, else 8)
#   MAIN_PORT         the main process's port (default 29500)
# Every node must see the same data, model and --output_dir paths (a shared file system); checkpoints and the
# artifact are written once, by the main process.
#SBATCH --job-name=cogvideox-factory
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}"

if [[ $# -eq 0 ]]; then
  echo "usage: sbatch --nodes N scripts/slurm_multi_node.sh training/cogvideox_text_to_video_lora.py --flags ..." >&2
  exit 2
fi
CONFIG=${CONFIG:-accelerate_configs/multi_node.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MAIN_PORT=${MAIN_PORT:-29500}
NODES=${SLURM_NNODES:?run this with sbatch (or set SLURM_NNODES, SLURM_NODEID and MAIN_ADDR by hand)}
MAIN_ADDR=${MAIN_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MAIN_ADDR MAIN_PORT NODES GPUS_PER_NODE CONFIG

# srun starts this block once per node; SLURM_NODEID is that node's rank.
srun --kill-on-bad-exit=1 bash -c '
  exec accelerate launch --config_file "$CONFIG" --num_machines "$NODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $((NODES * GPUS_PER_NODE)) --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \
    --rdzv_backend static --same_network "$@"
' launcher "$@"
