"""What the up-front scan of the data costs per clip: the header probe alone, with the stream check (every packet up
to the last frame training takes, demuxed and parsed, not decoded), and with `--hash_videos`' sha256 on top.

    python benchmarks/scan_cost.py                      # a bundled clip and a synthetic 1280x720, 132-frame clip
    python benchmarks/scan_cost.py --clips my/*.mp4     # your own clips

Each clip is copied `--copies` times into a temporary folder (so the page cache holds them: warm-cache figures) and
scanned `--repeats` times with one thread; the table gives the median milliseconds per clip. docs/bad-inputs.md
quotes its output.
"""

import argparse
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `training` importable
    sys.path.insert(0, str(ROOT))

from training.precomputed import sha256_of_file  # noqa: E402
from training.video_io import probe_video  # noqa: E402


def synthetic_720p_clip(path, frames=132, fps=24):
    """A 1280x720 H.264 clip of moving gradients with light noise, about 1 MiB (no download needed)."""
    import imageio
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:720, 0:1280]
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=16) as writer:
        for index in range(frames):
            base = ((xx + 8 * index) % 256 + (yy // 3)) % 256
            frame = np.stack([base, (base + 85) % 256, (base + 170) % 256], axis=-1).astype(np.uint8)
            writer.append_data(np.clip(frame + rng.integers(0, 6, frame.shape), 0, 255).astype(np.uint8))
    return path


def per_clip_ms(paths, scans, repeats):
    """Median ms per clip of each scan; the scans take turns within every repeat, so drift (clock, cache, other
    load) touches them alike."""
    times = [[] for _ in scans]
    for _ in range(repeats):
        for index, scan in enumerate(scans):
            started = time.perf_counter()
            for path in paths:
                scan(path)
            times[index].append((time.perf_counter() - started) / len(paths) * 1000)
    return [statistics.median(t) for t in times]


def measure(clip, copies, repeats, folder):
    paths = []
    for index in range(copies):
        target = Path(folder) / f"{index}_{Path(clip).name}"
        shutil.copyfile(clip, target)
        paths.append(target)
    last = lambda info: info.num_frames - 1  # noqa: E731  the stream is checked up to the clip's last frame
    info = probe_video(paths[0])
    header, checked, hashed = per_clip_ms(
        paths, [probe_video, lambda p: probe_video(p, last), lambda p: (sha256_of_file(p), probe_video(p, last))], repeats
    )
    size = Path(clip).stat().st_size
    name = f"{Path(clip).name} {info.width}x{info.height}, {info.num_frames} frames, {size / 2**20:.1f} MiB"
    return name, header, checked, hashed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", nargs="+", help="Clips to measure (default: a bundled clip and a synthetic 720p one).")
    parser.add_argument("--copies", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=9)
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        clips = options.clips or [ROOT / "assets" / "tests" / "videos" / "waves.mp4",
                                  synthetic_720p_clip(str(Path(folder) / "synthetic_720p.mp4"))]
        rows = [measure(clip, options.copies, options.repeats, tempfile.mkdtemp(dir=folder)) for clip in clips]
    command = shlex.join(["python", "benchmarks/scan_cost.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"Median ms per clip, one thread, warm page cache (`{command}`):\n")
    print("| clip | header only | header + stream check | + sha256 (--hash_videos) |\n|---|---|---|---|")
    for name, header, checked, hashed in rows:
        print(f"| {name} | {header:.2f} | {checked:.2f} | {hashed:.2f} |")


if __name__ == "__main__":
    main()
