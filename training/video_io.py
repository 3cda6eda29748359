"""Reading video files: cheap metadata probes and frame decoding.

decord is the fast reader; it fails on some output widths (16, 24, 48, 72 px, a known
bug in every decord build), so any decord error falls back to PyAV, which has no such
bug. Metadata comes from PyAV's container headers, which needs no decoding.
"""

from dataclasses import dataclass

import numpy as np
import torch


try:  # decord must be imported after torch (the other order can segfault).
    import decord

    decord.bridge.set_bridge("native")
except ImportError:  # pragma: no cover - decord has no wheel for some platforms
    decord = None


class VideoReadError(RuntimeError):
    """A file that cannot be opened or decoded as a video."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    height: int
    width: int
    fps: float


def probe_video(path) -> VideoInfo:
    """Frame count, size and frame rate from the container, without decoding pixels."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream in this file")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
            num_frames = stream.frames
            if not num_frames:  # some containers do not record it: count packets instead
                num_frames = sum(1 for packet in container.demux(stream) if packet.size)
    except VideoReadError:
        raise
    except Exception as error:  # av raises many error types for corrupt files
        raise VideoReadError(f"{path}: cannot read as a video ({type(error).__name__}: {error})") from error
    if not width or not height or not num_frames:
        raise VideoReadError(f"{path}: the video has no frames or no size")
    return VideoInfo(num_frames=int(num_frames), height=int(height), width=int(width), fps=fps)


def read_frames(path, indices) -> torch.Tensor:
    """Decode the frames at `indices` (sorted, unique or not) as uint8 [F, H, W, C] RGB."""
    indices = [int(i) for i in indices]
    if decord is not None:
        try:
            reader = decord.VideoReader(str(path), num_threads=1)
            frames = reader.get_batch(indices).asnumpy()
            return torch.from_numpy(np.ascontiguousarray(frames))
        except Exception:
            pass  # decord's width bug or an unusual codec: PyAV below decodes everything it can
    return _read_frames_pyav(path, indices)


def _read_frames_pyav(path, indices) -> torch.Tensor:
    import av

    wanted = set(indices)
    last = max(indices)
    decoded = {}
    try:
        with av.open(str(path)) as container:
            for position, frame in enumerate(container.decode(video=0)):
                if position in wanted:
                    decoded[position] = frame.to_ndarray(format="rgb24")
                if position >= last:
                    break
    except Exception as error:
        raise VideoReadError(f"{path}: decoding failed ({type(error).__name__}: {error})") from error
    missing = [i for i in indices if i not in decoded]
    if missing:
        raise VideoReadError(f"{path}: frames {missing[:5]} could not be decoded (file truncated?)")
    return torch.from_numpy(np.stack([decoded[i] for i in indices]))
