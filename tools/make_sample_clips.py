"""Write the small synthetic clips bundled in assets/tests (and usable anywhere else).

Each clip is a few frames of simple moving shapes, in several sizes and aspect ratios,
so the demo and the tests exercise frame and resolution bucketing. Widths avoid the
ones decord cannot decode (16, 24, 48, 72); the reader falls back to PyAV anyway.

    python tools/make_sample_clips.py --output_dir assets/tests
"""

import argparse
import csv
import os

import numpy as np


# (file name, width, height, frames, caption)
CLIPS = [
    ("square.mp4", 64, 48, 13, "a blue square moves across a black background"),
    ("waves.mp4", 96, 64, 17, "waves crash on the beach under a cloudy sky"),
    ("ball.mp4", 64, 64, 11, "a red ball bounces in the park"),
    ("tall.mp4", 32, 64, 12, "a person rides a bicycle through the forest"),
    ("wide.mp4", 128, 48, 9, "the camera pans slowly over a city at night"),
    ("sunset.mp4", 80, 56, 15, "birds fly above the mountains at sunset"),
]


def render_clip(name, width, height, num_frames, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    background = rng.integers(0, 60, size=3)
    color = rng.integers(120, 255, size=3)
    frames = []
    for t in range(num_frames):
        frame = np.empty((height, width, 3), dtype=np.uint8)
        frame[:] = background
        # A gradient that drifts over time, plus a moving shape.
        frame[..., 1] = (frame[..., 1] + (xx + 3 * t) % 64).clip(0, 255)
        cx = int((t / max(num_frames - 1, 1)) * (width - 1))
        cy = height // 2 + int((height // 4) * np.sin(t / 2.0))
        size = max(min(width, height) // 5, 3)
        mask = (np.abs(xx - cx) <= size) & (np.abs(yy - cy) <= size)
        frame[mask] = color
        frames.append(frame)
    return frames


def write_clips(output_dir):
    import imageio

    video_dir = os.path.join(output_dir, "videos")
    os.makedirs(video_dir, exist_ok=True)
    for index, (name, width, height, num_frames, _) in enumerate(CLIPS):
        frames = render_clip(name, width, height, num_frames, seed=index)
        # macro_block_size=1: keep odd-looking sizes exactly as given.
        with imageio.get_writer(
            os.path.join(video_dir, name), fps=8, codec="libx264", quality=6, macro_block_size=1,
            ffmpeg_log_level="error", output_params=["-pix_fmt", "yuv420p"],
        ) as writer:
            for frame in frames:
                writer.append_data(frame)
    with open(os.path.join(output_dir, "prompts.txt"), "w", encoding="utf-8") as f:
        f.writelines(caption + "\n" for *_, caption in CLIPS)
    with open(os.path.join(output_dir, "videos.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"videos/{name}\n" for name, *_ in CLIPS)
    with open(os.path.join(output_dir, "metadata.csv"), "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption"])
        for name, *_, caption in CLIPS:
            writer.writerow([f"videos/{name}", caption])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="assets/tests")
    args = parser.parse_args(argv)
    write_clips(args.output_dir)
    print(f"{len(CLIPS)} clips written to {args.output_dir}")


if __name__ == "__main__":
    main()
