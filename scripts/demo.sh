#!/usr/bin/env bash
# The whole workflow on a tiny random CogVideoX and the clips bundled in assets/tests,
# in about a minute on 2 CPU cores once .venv exists:
#   build model -> prepare_dataset.py -> train a LoRA -> load it in CogVideoXPipeline -> mp4
#
#   bash scripts/demo.sh            # results in demo-output/ (DEMO_DIR to change)
#
# The model has random weights, so the videos are coloured noise: the point is that every
# stage a real run goes through works, not the picture.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh

OUT=${DEMO_DIR:-demo-output}
PY=.venv/bin/python
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# Threads per process for the CPU run (without it, accelerate's CPU launcher picks a number and says so).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
BUCKETS=(--height_buckets 32 48 64 --width_buckets 32 64 96 --frame_buckets 5 9 --max_num_frames 9)
PROMPT="BW_STYLE a blue square moves across a black background"

echo "== 1/4 building a tiny random CogVideoX in $OUT/tiny-cogvideox"
[[ -f "$OUT/tiny-cogvideox/model_index.json" ]] || "$PY" tools/build_tiny_model.py --output_dir "$OUT/tiny-cogvideox"

echo "== 2/4 precomputing latents and prompt embeddings"
"$PY" training/prepare_dataset.py --model_id "$OUT/tiny-cogvideox" \
  --data_root assets/tests --caption_column prompts.txt --video_column videos.txt --id_token BW_STYLE \
  "${BUCKETS[@]}" --max_sequence_length 16 --save_latents_and_embeddings --batch_size 2 \
  --output_dir "$OUT/prepared"

echo "== 3/4 training a LoRA from the precomputed data"
.venv/bin/accelerate launch --config_file accelerate_configs/cpu.yaml training/cogvideox_text_to_video_lora.py \
  --pretrained_model_name_or_path "$OUT/tiny-cogvideox" \
  --data_root "$OUT/prepared" --caption_column prompts.txt --video_column videos.txt --load_tensors \
  --output_dir "$OUT/lora" --seed 42 --rank 8 --lora_alpha 8 \
  --train_batch_size 2 --max_train_steps 40 --learning_rate 5e-3 --lr_scheduler cosine --lr_warmup_steps 5 \
  --optimizer adamw --checkpointing_steps 20 --checkpoints_total_limit 1 \
  --validation_prompt "$PROMPT" --validation_steps 20 --num_inference_steps 4 \
  --height 64 --width 64 --validation_num_frames 9 --report_to tensorboard

echo "== 4/4 loading the LoRA into CogVideoXPipeline and writing a video"
"$PY" tests/test_lora_inference.py --prompt "$PROMPT" --model_path "$OUT/tiny-cogvideox" \
  --lora_path "$OUT/lora" --output_file "$OUT/demo.mp4" \
  --height 64 --width 64 --num_frames 9 --num_inference_steps 4 --dtype fp32

echo
echo "done: LoRA $OUT/lora/pytorch_lora_weights.safetensors, video $OUT/demo.mp4"
echo "      validation/test videos and summary.json (parity check) in $OUT/lora"
