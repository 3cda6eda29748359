"""Reading video files (and still images): cheap metadata probes and frame decoding.

decord is the fast reader; it fails on some output widths (16, 24, 48, 72 px, a known
bug in every decord build), so any decord error falls back to PyAV, which has no such
bug. Metadata comes from PyAV's container headers, which needs no decoding; the stream check
reads (demuxes and parses, without reconstructing pixels) the packets training will decode.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch


try:  # decord must be imported after torch (the other order can segfault).
    import decord

    decord.bridge.set_bridge("native")
except ImportError:  # pragma: no cover - decord has no wheel for some platforms
    decord = None


class VideoReadError(RuntimeError):
    """A file that cannot be opened or decoded as a video (or as an image)."""


# Still images train as short clips of one repeated frame (training/buckets.py).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def is_image(path):
    return str(path).lower().endswith(IMAGE_SUFFIXES)


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    height: int
    width: int
    fps: float


def probe_video(path, last_frame_for=None) -> VideoInfo:
    """Frame count, size and frame rate from the container, without decoding pixels.

    With `last_frame_for` (a function VideoInfo -> index of the last frame training will take, or None), the
    packets up to that frame are also checked in the same pass (see `_check_stream`): a clip whose header reads
    fine but whose data is cut short or corrupt raises VideoReadError here instead of in a DataLoader worker.
    A still image (`is_image`) is one frame; it is decoded whole here (cheap), so a broken one is caught too.
    """
    if is_image(path):
        height, width = _read_image(path).shape[:2]
        return VideoInfo(num_frames=1, height=height, width=width, fps=0.0)
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream in this file")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
            num_frames = stream.frames
            counted = not num_frames
            if counted:  # some containers do not record it: count packets instead
                num_frames = sum(1 for packet in container.demux(stream) if packet.size)
            if not width or not height or not num_frames:
                raise VideoReadError(f"{path}: the video has no frames or no size")
            info = VideoInfo(num_frames=int(num_frames), height=int(height), width=int(width), fps=fps)
            last_frame = last_frame_for(info) if last_frame_for is not None else None
            if last_frame is not None and not counted:
                _check_stream(path, container, stream, info.num_frames, last_frame)
        if last_frame is not None and counted:  # counting read every packet: parse them from the start
            with av.open(str(path)) as container:
                _check_stream(path, container, container.streams.video[0], info.num_frames, last_frame)
    except VideoReadError:
        raise
    except Exception as error:  # av raises many error types for corrupt files
        raise VideoReadError(f"{path}: cannot read as a video ({type(error).__name__}: {error})") from error
    return info


# Packets a decoder may need past a frame before it can output it (B-frame reordering; h264 allows up to 16).
REORDER_MARGIN = 16


def _check_stream(path, container, stream, num_frames, last_frame):
    """VideoReadError unless the packets up to frame `last_frame` (plus the reorder margin) are in the file and
    parse. Costs a demux and a bitstream parse (skip_frame=ALL: no pixels are reconstructed), not a decode.

    Catches what a header probe cannot: an mp4 with its index at the front (faststart) cut off in the frame data,
    and corrupt packet framing (h264/h265 NAL sizes), both of which stop decoding in a DataLoader worker.
    """
    needed = min(num_frames, last_frame + 1 + REORDER_MARGIN)
    size = os.path.getsize(path)
    # Containers with one index entry per packet (mp4/mov) say where each packet lies: no data needs reading.
    entries = getattr(stream, "index_entries", None)
    if entries is not None and len(entries) >= needed:
        for position in range(needed):
            entry = entries[position]
            if entry.pos + entry.size > size:
                raise VideoReadError(
                    f"{path}: truncated: frame {position + 1} of {num_frames} lies beyond the end of the file "
                    f"(byte {entry.pos + entry.size} of {size}); decoding would stop there"
                )
    codec = stream.codec_context
    codec.skip_frame = "ALL"  # the decoder splits and parses each packet but builds no picture
    codec.thread_count = 1
    count = 0
    for packet in container.demux(stream):
        if not packet.size:
            continue
        try:
            codec.decode(packet)
        except Exception as error:
            raise VideoReadError(
                f"{path}: corrupt video data at frame {count + 1} of {num_frames} (byte {packet.pos}; "
                f"{type(error).__name__}: {error}); the header reads fine, but decoding would stop here"
            ) from error
        count += 1
        if count >= needed:
            return
    if count > last_frame:  # the stream ended (the decoder flushes every frame): the ones training takes are there
        return
    raise VideoReadError(
        f"{path}: truncated: the video data ends after {count} of {num_frames} frames (training needs "
        f"{last_frame + 1})"
    )


def read_frames(path, indices) -> torch.Tensor:
    """Decode the frames at `indices` (sorted, unique or not) as uint8 [F, H, W, C] RGB. An image is frame 0."""
    indices = [int(i) for i in indices]
    if is_image(path):
        return torch.from_numpy(_read_image(path)).unsqueeze(0).expand(len(indices), -1, -1, -1).contiguous()
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


def _read_image(path):
    """uint8 [H, W, 3] RGB (EXIF rotation applied, as viewers show the picture)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB")).copy()
    except Exception as error:  # PIL raises many error types for broken files
        raise VideoReadError(f"{path}: cannot read as an image ({type(error).__name__}: {error})") from error
