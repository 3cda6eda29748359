"""Clips per second of `training/prepare_dataset.py`, end to end (process start to exit), optionally side by side
with the original cogvideox-factory's `prepare_dataset.py`, on the same clips, model and flags.

    python benchmarks/benchmark_prepare.py                                  # ours only: 96 clips, medium model
    python benchmarks/benchmark_prepare.py --original /path/to/cogvideox-factory/training/prepare_dataset.py \\
        --original_pythonpath /tmp/origdeps                                 # both, alternating, twice each
    python benchmarks/benchmark_prepare.py --model my-pipeline --num_clips 200 --repeats 3 -- --batch_size 2

Needs no download. It writes `--num_clips` synthetic H.264 clips (moving gradients, shapes and noise; five sizes,
20 to 60 frames; captions drawn from a pool, so some repeat) and, unless `--model` names a pipeline folder, a
"medium" random CogVideoX pipeline: a VAE with block_out_channels (32, 32, 64, 64) and 16 latent channels, a 4-layer
T5 of width 256 over 226 tokens (the tests' tiny model is ~20x smaller), so encoding costs weigh against decoding
as on a real model. Both scripts get the command line of `prepare_dataset.sh` (batch size 1, fp32, no loader
workers, `--save_latents_and_embeddings`), plus anything after `--`; each run writes into a fresh folder.

The original is run as it is, except for two lines that name CUDA (it calls `torch.cuda.set_device` and puts its
models on `cuda:{rank}`): `run_original_on_cpu` replaces them with the CPU before running its source. It needs
torchvision and decord, which this toolkit does not install: `pip install --target /tmp/origdeps --no-deps
torchvision==<the version matching torch>` and pass `--original_pythonpath /tmp/origdeps`.

Runs alternate (ours, original, original, ours, ...) so that drift on a shared machine touches both alike; the table
gives each run and the median clips/s, and `--output` writes every run as a JSON line.
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent

# (width, height, frames, fps) of the synthetic clips, taken in turn.
CLIP_SHAPES = [(160, 112, 40, 24), (192, 128, 60, 30), (224, 128, 48, 24), (128, 128, 20, 24), (256, 144, 36, 25)]
SUBJECTS = ["a red fox", "an old fisherman", "a paper boat", "two cyclists", "a grey heron", "a steam train",
            "a child with a kite", "a tabby cat", "a lighthouse keeper", "a flock of starlings", "a hot-air balloon",
            "a street musician", "a golden retriever", "a sailing dinghy", "a snow plough", "a hummingbird"]
ACTIONS = ["crosses a wooden bridge", "moves slowly along the shore", "turns towards the camera", "drifts past",
           "waits under a streetlamp", "climbs a grassy hill"]
SETTINGS = ["at dawn, mist over the water, soft warm light", "in heavy rain, reflections on the cobblestones",
            "on a bright winter afternoon, long shadows on the snow", "at dusk, the sky fading from orange to violet"]
# Flags of prepare_dataset.sh (both scripts accept them); the buckets suit the synthetic clips.
DATA_FLAGS = ["--caption_column", "prompts.txt", "--video_column", "videos.txt", "--height_buckets", "64", "96",
              "--width_buckets", "96", "128", "--frame_buckets", "17", "--max_num_frames", "17",
              "--max_sequence_length", "226", "--target_fps", "8", "--batch_size", "1", "--dtype", "fp32",
              "--save_latents_and_embeddings"]


def captions(num_clips, seed=0):
    """One caption per clip from a pool of len(SUBJECTS) * 6 * 4; about one clip in four repeats an earlier one's."""
    import random

    rng = random.Random(seed)
    pool = [f"{s} {a} {t}." for s in SUBJECTS for a in ACTIONS for t in SETTINGS]
    chosen = []
    for index in range(num_clips):
        chosen.append(rng.choice(chosen) if chosen and index % 4 == 3 else rng.choice(pool))
    return chosen


def write_clip(path, width, height, frames, fps, seed):
    import imageio
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    tint = rng.integers(0, 256, size=3)
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=16,
                            ffmpeg_log_level="error", output_params=["-pix_fmt", "yuv420p"]) as writer:
        for t in range(frames):
            base = (xx * (1 + seed % 3) + 4 * t + yy // 2) % 256
            frame = np.stack([(base + tint[c]) % 256 for c in range(3)], axis=-1)
            cx, cy = (t * 5 + seed * 17) % width, height // 2 + int(height / 4 * np.sin(t / 3 + seed))
            frame[(abs(xx - cx) < width // 8) & (abs(yy - cy) < height // 8)] = 255 - tint
            frame = frame + rng.integers(0, 12, frame.shape)
            writer.append_data(np.clip(frame, 0, 255).astype(np.uint8))


def make_clips(folder, num_clips, seed=0):
    """`num_clips` clips in folder/videos, with prompts.txt and videos.txt beside them."""
    folder = Path(folder)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(num_clips):
        width, height, frames, fps = CLIP_SHAPES[index % len(CLIP_SHAPES)]
        name = f"clip{index:04d}.mp4"
        write_clip(folder / "videos" / name, width, height, frames + index % 7, fps, seed * 100_003 + index)
        names.append(name)
    (folder / "prompts.txt").write_text("".join(c + "\n" for c in captions(num_clips, seed)), encoding="utf-8")
    (folder / "videos.txt").write_text("".join(f"videos/{n}\n" for n in names), encoding="utf-8")
    return folder


def build_medium_model(output_dir, seed=0):
    """A random CogVideoX pipeline, larger than the tests' tiny one where prepare spends its time (VAE and T5)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    from tools.build_tiny_model import SCHEDULER_CONFIG, build_tokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="medium-tokenizer-") as scratch:
        tokenizer = build_tokenizer(scratch)
        text_encoder = T5EncoderModel(T5Config(d_model=256, num_layers=4, num_heads=4, d_kv=64, d_ff=1024,
                                               vocab_size=1000, feed_forward_proj="gated-gelu"))
        vae = AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(32, 32, 64, 64), latent_channels=16,
            layers_per_block=1, norm_num_groups=8, temporal_compression_ratio=4,
        )
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16, time_embed_dim=4,
            text_embed_dim=256, num_layers=1, sample_width=20, sample_height=16, sample_frames=17, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=False,
        )
        pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                 scheduler=CogVideoXDDIMScheduler(**SCHEDULER_CONFIG))
        pipe.save_pretrained(output_dir)
    return Path(output_dir)


# The original's CUDA-only lines and their CPU replacements (each must be found exactly once).
CPU_PATCHES = [
    ("        torch.cuda.set_device(rank)\n", "        pass  # benchmark_prepare: CPU\n"),
    ('    device = f"cuda:{rank}"\n', '    device = "cpu"  # benchmark_prepare: CPU\n'),
]

RUNNER = '''import runpy, sys
sys.path.insert(0, {folder!r})
source = open({path!r}, encoding="utf-8").read()
for old, new in {patches!r}:
    assert source.count(old) == 1, old
    source = source.replace(old, new)
sys.argv = [{path!r}] + sys.argv[1:]
code = compile(source, {path!r}, "exec")
exec(code, {{"__name__": "__main__", "__file__": {path!r}}})
'''


def original_command(original, flags):
    """`python -c <runner>` that runs the original's source with CPU_PATCHES applied."""
    runner = RUNNER.format(folder=str(Path(original).resolve().parent), path=str(Path(original).resolve()),
                           patches=CPU_PATCHES)
    return [sys.executable, "-c", runner, *flags]


def count_outputs(kind, output):
    if kind.startswith("ours"):
        return len(json.loads((output / "manifest.json").read_text())["entries"])
    return len(list((output / "video_latents").glob("*.pt")))


def run_once(kind, command, output, env, log):
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    with open(log, "w") as stream:
        result = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{kind} failed (exit {result.returncode}); its output is in {log}:\n"
                         + Path(log).read_text()[-3000:])
    clips = count_outputs(kind, output)
    return {"implementation": kind, "clips": clips, "seconds": round(seconds, 2), "clips_per_s": clips / seconds}


def work_folder(work_dir, num_clips, model, prefix):
    """(work folder, clips folder, model folder, environment) for --work_dir, --num_clips and --model: the clips and
    the medium model are made on first use and reused after (benchmark_startup.py shares them)."""
    work = Path(work_dir or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"clips-{num_clips}"
    if not (data / "videos.txt").is_file():
        print(f"writing {num_clips} clips to {data}", flush=True)
        make_clips(data, num_clips)
    folder = Path(model) if model else work / "medium-model"
    if not model and not (folder / "model_index.json").is_file():
        print(f"building the medium model in {folder}", flush=True)
        build_medium_model(folder)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    return work, data, folder, env


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_clips", type=int, default=96)
    parser.add_argument("--model", default=None, help="A CogVideoX pipeline folder (default: build the medium one).")
    parser.add_argument("--original", default=None, help="The original's training/prepare_dataset.py.")
    parser.add_argument("--original_pythonpath", default=None, help="Extra PYTHONPATH for the original (torchvision).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each implementation (alternating).")
    parser.add_argument("--work_dir", default=None, help="Where clips, model and outputs go (default: a temp dir).")
    parser.add_argument("--ours_flags", default="", help="Also run ours with these extra flags (one string).")
    parser.add_argument("--output", default=None, help="Append every run as a JSON line to this file.")
    parser.add_argument("extra", nargs="*", help="After --: extra flags for both scripts.")
    args = parser.parse_args(argv)

    work, data, model, env = work_folder(args.work_dir, args.num_clips, args.model, "benchmark-prepare-")
    flags = ["--model_id", str(model), "--data_root", str(data), *DATA_FLAGS, *args.extra]
    ours = [sys.executable, str(ROOT / "training" / "prepare_dataset.py"), *flags]
    commands, envs = {"ours": ours}, {"ours": env}
    if args.ours_flags:  # a second variant of ours, e.g. --save_videos
        commands[f"ours {args.ours_flags}"], envs[f"ours {args.ours_flags}"] = [*ours, *shlex.split(args.ours_flags)], env
    if args.original:
        commands["original"] = original_command(args.original, flags)
        envs["original"] = dict(env, PYTHONPATH=os.pathsep.join(
            p for p in (args.original_pythonpath, env.get("PYTHONPATH")) if p))
    kinds = list(commands)
    rows = []
    for repeat in range(args.repeats):
        for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
            output = work / f"out-{kind.split()[0]}"
            row = run_once(kind, [*commands[kind], "--output_dir", str(output)], output, envs[kind],
                           work / f"{'-'.join(kind.split())}-{repeat}.log")
            row.update(repeat=repeat, num_clips=args.num_clips)
            rows.append(row)
            print(f"  {kind:8s} run {repeat + 1}: {row['clips']} clips in {row['seconds']:.1f} s = "
                  f"{row['clips_per_s']:.3f} clips/s", flush=True)
            if args.output:
                with open(args.output, "a") as f:
                    f.write(json.dumps({**row, "command": commands[kind]}) + "\n")

    median = {k: statistics.median(r["clips_per_s"] for r in rows if r["implementation"] == k) for k in kinds}
    original = median.get("original")
    print("\n| implementation | clips | runs (s, process start to exit) | median clips/s | / original |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        runs = [r for r in rows if r["implementation"] == kind]
        ratio = f"{median[kind] / original:.2f}x" if original else "-"
        print(f"| {kind} | {runs[0]['clips']} | {', '.join(format(r['seconds'], '.1f') for r in runs)} | "
              f"{median[kind]:.3f} | {ratio} |")
    print("\ncommands (plus --output_dir):")
    for kind in kinds:
        shown = commands[kind] if kind != "original" else [*commands[kind][:2], "<runner>", *commands[kind][3:]]
        print(f"  {kind}: {shlex.join(shown)}")
    return rows


if __name__ == "__main__":
    main()
