"""Training data: the user's caption/video lists, bucket choice, datasets and the bucket sampler.

Flow: `load_samples` reads the lists (txt files or a CSV) -> `assign_buckets` probes each
video's header (no decoding, in parallel) and picks its frame and resolution bucket, or
reports why the clip cannot be used -> `VideoDataset` decodes and resizes one clip per
`__getitem__` (in DataLoader workers) -> `BucketBatchSampler` groups indices so every batch
has one shape (under CogVideoX-Fun's options `FunBatches` makes the batches and draws each one's size).
`PrecomputedDataset` reads what prepare_dataset.py wrote instead.
"""

import json
import math
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from .args import TrainingError, UsageError
from .buckets import GridBuckets, choose_frame_bucket, choose_resolution_bucket, frame_indices  # noqa: F401 (API)
from .video_io import VideoReadError, is_image, probe_video, read_frames


# ----------------------------------------------------------------------------------------------
# The user's list of samples
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    index: int  # position in the user's list, kept through skipping and bucketing
    caption: str  # with the id token already prepended
    video_path: Path  # a video, or a still image (training/video_io.py IMAGE_SUFFIXES)
    repeats: int = 1  # times it trains per epoch (--dataset_config num_repeats)
    caption_file: Path = None  # where the caption was read, in a folder of media with captions beside them
    id_token: str = None  # the trigger word prepended to `caption` (kept in front by --caption_shuffle)
    control_path: Path = None  # CogVideoX-Fun Control: the clip's control video (pose, depth, edges), frame for frame


@dataclass(frozen=True)
class SkippedSample:
    index: int
    video_path: str
    reason: str


def _paired_lines(caption_list, video_list):
    """(captions, videos) of the two lists, line n of one with line n of the other. Lines blank in both are spacing
    (dropped); a line blank in one list only is an error naming it (the lists are of one length, or of one length
    without their blank lines: blank lines as spacing in one list are kept working). Blank lines at the end do not
    count."""
    raw = [_raw_lines(caption_list, "--caption_column"), _raw_lines(video_list, "--video_column")]
    if len(raw[0]) == len(raw[1]):
        problems = []
        for number, (caption, video) in enumerate(zip(*raw), 1):
            if not caption and video:
                problems.append(f"--caption_column {caption_list.name}: line {number} is blank, but line {number} of "
                                f"{video_list.name} is a video ({video}): write its caption there, or remove the line "
                                "from both lists")
            elif caption and not video:
                problems.append(f"--video_column {video_list.name}: line {number} is blank, but line {number} of "
                                f"{caption_list.name} is a caption: give its video there, or remove the line from both "
                                "lists")
        if problems:
            raise UsageError(problems[:10] + ([f"... and {len(problems) - 10} more blank lines"]
                                              if len(problems) > 10 else []))
    return [line for line in raw[0] if line], [line for line in raw[1] if line]


def _raw_lines(path, flag):
    """The stripped lines of a list, blank ones kept but those at the end."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{flag} {path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from error
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def with_id_token(caption, id_token):
    return f"{id_token.strip()} {caption}" if id_token else caption


def load_samples(data_root, dataset_file, caption_column, video_column, id_token=None, check_files=True,
                 control_column=None):
    """Captions and video paths (and with `control_column`, control video paths: --control_column) from txt lists in
    data_root, or from a CSV. Raises UsageError."""
    controls = None
    if dataset_file is None:
        root = Path(data_root)
        captions, videos = _paired_lines(root / caption_column, root / video_column)
        if control_column is not None:
            controls = [line for line in _raw_lines(root / control_column, "--control_column") if line]
    else:
        import pandas as pd

        root = Path(data_root) if data_root is not None else Path(dataset_file).parent
        frame = pd.read_csv(dataset_file, dtype=str, keep_default_na=False)
        captions = [str(c).strip() for c in frame[caption_column]]
        videos = [str(v).strip() for v in frame[video_column]]
        if control_column is not None:
            controls = [str(c).strip() for c in frame[control_column]]
    if len(captions) != len(videos):
        raise UsageError(
            f"{len(captions)} captions but {len(videos)} videos: the caption and video lists must have one "
            f"entry per sample, in the same order"
        )
    if controls is not None and (len(controls) != len(videos) or not all(controls)):
        raise UsageError(f"--control_column {control_column}: {sum(map(bool, controls))} control videos for "
                         f"{len(videos)} videos: give one control video per video, in the same order")
    samples = [
        # An empty caption stays empty (not just the id token) so the scan reports it.
        Sample(index=i, caption=with_id_token(caption, id_token) if caption else "", video_path=(root / video),
               id_token=id_token, control_path=root / controls[i] if controls is not None else None)
        for i, (caption, video) in enumerate(zip(captions, videos))
    ]
    if not samples:
        raise UsageError("the data set is empty: no caption/video pairs found")
    if check_files:
        check_files_exist(samples)
    return samples


def check_files_exist(samples):
    """UsageError naming the missing files (the first 10, then a count)."""
    missing = [(what, path, s.index) for s in samples
               for what, path in (("video", s.video_path), ("control video", s.control_path))
               if path is not None and not path.is_file()]
    if missing:
        lines = [f"{what} file not found: {path} (entry {index + 1})" for what, path, index in missing[:10]]
        if len(missing) > 10:
            lines.append(f"... and {len(missing) - 10} more missing files")
        raise UsageError(lines)


# ----------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketedSample:
    sample: Sample
    bucket: tuple  # (frames, height, width); with `landings`, the bucket of the first epoch whose draw keeps it
    frame_indices: tuple
    source_size: tuple = (0, 0)  # (height, width) of the file
    content_hash: str = None  # sha256 of the video file, when the scan was asked to hash
    # With a bucket config whose draws can differ (keep_prob below 1), the bucket is drawn again every epoch:
    # `landings` ((bucket, frame indices), ...) holds every bucket the draws can give, `route` what the plan draws on
    # (ConfiguredBuckets.draw). Empty: the sample always trains in `bucket`.
    landings: tuple = ()
    route: tuple = ()
    # Under CogVideoX-Fun's sampling options, what its per-batch draws look at (buckets.FunClip): the training set's
    # batches draw their size, and each clip its frame window, every epoch. None: `bucket` and `frame_indices` hold.
    fun: object = None

    @property
    def buckets(self):
        """Every bucket the sample can train in."""
        return [bucket for bucket, _ in self.landings] or (list(self.fun.buckets) if self.fun else [self.bucket])


def first_landing(plan, route, key):
    """The bucket of the first epoch (0, 1, ...) whose draw keeps a sample of this route (some draw can)."""
    epoch = 0
    while (bucket := plan.draw(route, key, epoch)) is None:
        epoch += 1
    return bucket


def assign_buckets(samples, plan, skip_frames_start=0, skip_frames_end=0, num_threads=8, check_streams=True,
                   hashes=None):
    """Scan every clip in parallel and pick its bucket with `plan` (training/buckets.py). Returns (usable, skipped).

    The scan reads each header and, with `check_streams`, checks the packets up to the last frame the clip will
    give (demux and parse, no decoding: about 1.7 ms on a 1 MiB 720p clip, benchmarks/scan_cost.py), so a file cut
    short or corrupt behind a good header is reported here rather than stopping training in a loader worker. With `hashes` (a
    `precomputed.ContentHashes`), each file's content hash is taken in the same pass (the file is read once).
    A still image is decoded whole (a few ms) and held for the bucket's frame count.
    """

    def choose(info, sample):
        """(frame indices, bucket, landings, route), or (None, why not, (), ()). Frame indices: the bucket's, or
        with landings (a bucket drawn again every epoch) those of the landing that reads furthest into the clip."""
        image = is_image(sample.video_path)
        available = 1 if image else info.num_frames - skip_frames_start - skip_frames_end

        def indices(bucket):
            return tuple([0] * bucket[0] if image else plan.frame_indices(info.num_frames, bucket[0],
                                                                           skip_frames_start, skip_frames_end))

        if getattr(plan, "per_batch", False):  # Fun's options: sizes drawn per batch, frame windows per epoch
            clip = plan.clip(available, info.height, info.width, image, skip_frames_start)
            if isinstance(clip, str):
                return None, clip, (), ()
            bucket = plan.draw([clip], 0, (sample.index,))  # alone in a batch of epoch 0 (held out, prepared)
            return tuple([0] * bucket[0] if image else plan.window(clip, bucket[0], 0, sample.index)), bucket, (), clip
        route = plan.route(available, info.height, info.width, image) if getattr(plan, "redraws", False) else ()
        shares = plan.landings(route) if route else {}
        if len(shares) > 1 or shares and sum(shares.values()) < 1 - 1e-9:  # the draws can differ between epochs
            landings = tuple((bucket, indices(bucket)) for bucket in shares)
            bucket = first_landing(plan, route, sample.index)
            return max((i for _, i in landings), key=lambda i: i[-1]), bucket, landings, route
        bucket = plan.choose(available, info.height, info.width, image, sample.index)
        if not isinstance(bucket, tuple):  # why not; None: passed on by the one draw there is
            return None, bucket or f"passed on by every keep_prob draw of {plan.source}", (), ()
        return indices(bucket), bucket, (), ()

    def scan(sample):
        path = sample.video_path
        if not sample.caption.strip():
            where = f" ({sample.caption_file.name} beside it is missing or empty)" if sample.caption_file else ""
            return SkippedSample(sample.index, str(path), "empty caption" + where)
        digest = None
        try:
            if hashes is not None:  # first: reading the whole file also warms the cache for the probe
                digest = hashes.digest(path)
            # The stream is checked up to the last frame the clip gives (none if it fits no bucket).
            info = probe_video(path, (lambda info: last_frame(*choose(info, sample))) if check_streams else None)
        except VideoReadError as error:
            return SkippedSample(sample.index, str(path), str(error))
        except OSError as error:
            return SkippedSample(sample.index, str(path), f"cannot read the file ({error})")
        indices, bucket, landings, route = choose(info, sample)
        if indices is None:
            available = info.num_frames - skip_frames_start - skip_frames_end
            what = f"still image {info.height}x{info.width}" if is_image(path) else (
                f"{available} usable frames (of {info.num_frames}, after skipping {skip_frames_start}+"
                f"{skip_frames_end}) at {info.height}x{info.width}")
            return SkippedSample(sample.index, str(path), f"{what}: {bucket}")
        if sample.control_path is not None:
            problem = control_problem(sample.control_path, info, last_frame(indices, bucket, landings, route),
                                      check_streams)
            if problem:
                return SkippedSample(sample.index, str(path), problem)
        if landings:
            indices = dict(landings)[bucket]
        if getattr(plan, "per_batch", False):
            return BucketedSample(sample, bucket, tuple(indices), (info.height, info.width), digest, fun=route)
        return BucketedSample(sample, bucket, tuple(indices), (info.height, info.width), digest, landings, route)

    from tqdm.auto import tqdm

    # A bar where the scan takes a while: hashing reads every byte, and large sets take long anyway.
    show = hashes is not None or len(samples) >= 2000
    what = "scanning videos" + (" (headers, streams, sha256)" if hashes is not None else "")
    with ThreadPoolExecutor(max_workers=num_threads) as pool, tqdm(total=len(samples), desc=what, disable=not show) as bar:
        def scan_and_count(sample):
            result = scan(sample)
            bar.update(1)
            return result

        results = list(pool.map(scan_and_count, samples))
    usable = [r for r in results if isinstance(r, BucketedSample)]
    skipped = [r for r in results if isinstance(r, SkippedSample)]
    return usable, skipped


def control_problem(control_path, info, last, check_streams=True):
    """Why a clip's control video cannot go with it (None: it can). It is read frame for frame with the clip (the same
    frame indices, resize, crop and flip), so it needs the clip's size and at least the frames the clip gives."""
    try:
        control = probe_video(control_path, (lambda _: last) if check_streams else None)
    except VideoReadError as error:
        return f"control video {control_path}: {error}"
    except OSError as error:
        return f"control video {control_path}: cannot read the file ({error})"
    if (control.height, control.width) != (info.height, info.width):
        return (f"control video {control_path} is {control.height}x{control.width}, the clip "
                f"{info.height}x{info.width}: make the control video the clip's size")
    if control.num_frames <= last:
        return (f"control video {control_path} has {control.num_frames} frames, the clip trains frame {last + 1}: "
                "give it as many frames as the clip")
    return None


def last_frame(indices, bucket, landings, route):
    """The last frame a clip can give (of `assign_buckets`' choice): its indices', or under Fun's options the end of
    its usable frames (the window moves every epoch); None when it fits no bucket."""
    if indices is None:
        return None
    if getattr(route, "usable", None) is not None and not route.image:
        return route.first + route.usable - 1
    return indices[-1]


def data_notes(usable, video_reshape_mode=None):
    """Usable samples that still deserve a look: duplicates, upscaled clips, strongly stretched clips.

    Returns SkippedSample-shaped records (nothing is skipped: they train)."""
    notes, seen = [], {}
    for item in usable:
        sample = item.sample
        key = (item.content_hash or str(Path(sample.video_path).resolve()), sample.caption)
        if key in seen:
            notes.append(SkippedSample(sample.index, str(sample.video_path), f"duplicate of entry {seen[key] + 1}"))
        seen.setdefault(key, sample.index)
        (src_h, src_w), (_, height, width) = item.source_size, item.bucket
        if src_h < height and src_w < width:
            notes.append(SkippedSample(sample.index, str(sample.video_path),
                                       f"upscaled from {src_h}x{src_w} to its bucket {height}x{width} (blurrier)"))
        if video_reshape_mode is None and src_h and src_w:
            stretch = (src_w / src_h) / (width / height)
            if not 2 / 3 <= stretch <= 3 / 2:
                notes.append(SkippedSample(
                    sample.index, str(sample.video_path),
                    f"aspect ratio {src_w / src_h:.2f} stretched to {width / height:.2f} for bucket {height}x{width}; "
                    "add a closer bucket or use --video_reshape_mode center",
                ))
    return notes


def bad_sample_error(skipped, report_path, what="training"):
    """UsageError listing every unusable sample (the first 20 in full) and how to go on."""
    from .args import UsageError

    lines = [f"entry {s.index + 1} ({s.video_path}): {s.reason}" for s in skipped[:20]]
    if len(skipped) > 20:
        lines.append(f"... and {len(skipped) - 20} more")
    lines.append(
        f"{len(skipped)} sample(s) cannot be used (all listed in {report_path}); fix or remove them, or pass "
        f"--skip_bad_samples to go on with the rest ({what} has not started)"
    )
    return UsageError(lines)


def split_for_eval(items, fraction, seed):
    """(train, held_out): a fixed random `fraction` of the items (at least one when fraction > 0)."""
    if fraction <= 0:
        return list(items), []
    import random

    count = max(1, round(len(items) * fraction))
    held = set(random.Random(seed).sample(range(len(items)), count))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def write_skip_report(skipped, path):
    """One JSON line per sample (skipped, or noted), so nothing the user gave disappears without a trace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for entry in skipped:
            f.write(json.dumps({"entry": entry.index + 1, "video": entry.video_path, "reason": entry.reason}) + "\n")


# ----------------------------------------------------------------------------------------------
# Caption dropout and shuffle
# ----------------------------------------------------------------------------------------------

_CAPTION_STREAM = 0x43415054  # keeps caption draws apart from the flip and crop draws of the same sample


@dataclass(frozen=True)
class CaptionDraws:
    """How a training sample's caption changes from epoch to epoch (nothing, by default).

    --caption_dropout_rate P: with probability P the sample trains with the empty prompt (the caption "", trigger word
    included), as classifier-free guidance's negative prompt is encoded. --caption_shuffle: the comma-separated tags
    after the first --keep_tokens are shuffled; the trigger word (--id_token) stays in front and is not counted.
    Every draw comes from (seed, epoch, the sample's random key), apart from the flip and crop draws: the same in
    every worker and process, and again after a resume.
    """

    dropout_rate: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0
    seed: int = 0

    @classmethod
    def of(cls, data, training):
        """From the [data] section's caption flags and --seed ([training])."""
        return cls(data.caption_dropout_rate, data.caption_shuffle, data.keep_tokens, training.seed or 0)

    def _random(self, epoch, key):
        # hash() of a tuple of ints (a key may be a tuple of ints) is the same in every process.
        return random.Random(hash((self.seed, epoch, key, _CAPTION_STREAM)))

    def dropped(self, epoch, key):
        """True when the sample with this random key trains with the empty prompt in this epoch."""
        return self.dropout_rate > 0 and self._random(epoch, key).random() < self.dropout_rate

    def caption(self, caption, epoch, key, id_token=None):
        """The caption the sample trains with in this epoch ("" when dropped)."""
        if not self.dropout_rate and not self.shuffle:
            return caption
        draws = self._random(epoch, key)
        if self.dropout_rate > 0 and draws.random() < self.dropout_rate:  # the same first draw as `dropped`
            return ""
        return shuffle_tags(caption, self.keep_tokens, draws, id_token) if self.shuffle else caption


def shuffle_tags(caption, keep_tokens, draws, id_token=None):
    """The caption's comma-separated tags, the first `keep_tokens` in place and the rest in an order from `draws` (a
    random.Random). A caption that starts with the trigger word `id_token` keeps it in front, outside the count."""
    token = (id_token or "").strip()
    head = ""
    if token and caption.startswith(token + " "):
        head, caption = token + " ", caption[len(token) + 1 :]
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    draws.shuffle(rest)
    return head + ", ".join(kept + rest)


# ----------------------------------------------------------------------------------------------
# Frames -> tensors
# ----------------------------------------------------------------------------------------------


def fit_to_bucket(frames, height, width, reshape_mode=None, generator=None):
    """uint8 [F, H, W, C] -> float [F, C, height, width] in [-1, 1].

    reshape_mode None stretches to the bucket (the original's default); "center"/"random"/"none"
    resize keeping the aspect ratio so the frame covers the bucket, then crop. One crop offset
    serves all frames of the clip.
    """
    video = frames.permute(0, 3, 1, 2).float()
    if reshape_mode is None:
        video = F.interpolate(video, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    else:
        src_h, src_w = video.shape[-2:]
        scale = max(height / src_h, width / src_w)
        new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
        video = F.interpolate(video, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        dh, dw = new_h - height, new_w - width
        if reshape_mode == "center":
            top, left = dh // 2, dw // 2
        else:
            top = int(torch.randint(0, dh + 1, (1,), generator=generator))
            left = int(torch.randint(0, dw + 1, (1,), generator=generator))
        video = video[..., top : top + height, left : left + width]
    return (video / 127.5 - 1.0).clamp(-1.0, 1.0)


class ClipDecodeError(TrainingError):
    """A clip that passed the scan but fails to decode in training: one `error:` line naming it (exit status 1).

    Raised in a DataLoader worker, it comes back to the main process re-built from the worker's formatted
    traceback; the constructor keeps just the message, so the user sees one line, not a worker traceback."""

    def __init__(self, message):
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:  # torch's ExceptionWrapper re-raise
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class VideoDataset(Dataset):
    """Decodes one clip per item at its bucket's shape. Runs inside DataLoader workers.

    Random choices (flip, crop offset, and the `captions` draws) come from generators seeded by (seed, epoch, the
    item's random key: its sample's index in the list, or the `random_keys` given), so they do not depend on which
    worker or process loads the item, and a resumed run repeats them. With `plan` (a bucket config whose keep_prob
    draws can differ: the training set), so does each item's bucket: drawn again every epoch from (the plan's seed,
    epoch, random key); an item every draw passes on sits out that epoch (its bucket key is None).
    """

    def __init__(self, bucketed_samples, video_reshape_mode=None, random_flip=None, image_to_video=False, seed=0,
                 random_keys=None, captions=CaptionDraws(), plan=None):
        self.items = list(bucketed_samples)
        self.random_keys = list(random_keys) if random_keys is not None else [i.sample.index for i in self.items]
        self.video_reshape_mode = video_reshape_mode
        self.random_flip = random_flip
        self.image_to_video = image_to_video
        self.seed = seed
        self.captions = captions
        self.plan = plan if any(item.landings for item in self.items) else None
        # Fun's options (training set): sizes drawn per batch (`FunBatches`, its batch size set by the loader).
        self.fun = (FunBatches(plan, [item.fun for item in self.items], seed)
                    if getattr(plan, "per_batch", False) and all(item.fun for item in self.items) else None)
        self.epoch = 0
        self._drawn = None  # (epoch, its bucket keys)

    def set_epoch(self, epoch):
        self.epoch = epoch  # workers are not persistent: each epoch's workers get a fresh copy

    def __len__(self):
        return len(self.items)

    @property
    def redraws(self):
        """True when the items' buckets are drawn again every epoch."""
        return self.plan is not None

    def bucket_keys_at(self, epoch):
        """Each item's bucket in `epoch` (None: it sits out that epoch)."""
        if self.fun is not None:
            return self.fun.keys(epoch)
        if self.plan is None:
            return [item.bucket for item in self.items]
        if self._drawn is None or self._drawn[0] != epoch:
            self._drawn = (epoch, [self.plan.draw(item.route, key, epoch) if item.landings else item.bucket
                                   for item, key in zip(self.items, self.random_keys)])
        return self._drawn[1]

    @property
    def bucket_keys(self):
        """Each item's bucket in the current epoch (None: it sits out)."""
        return self.bucket_keys_at(self.epoch)

    def landing_counts(self):
        """{bucket: items that can train in it} over every epoch (the most a batch of it can hold)."""
        if self.fun is not None:
            return self.fun.landing_counts()
        counts = {}
        for item in self.items:
            for bucket in (item.buckets if self.plan is not None else [item.bucket]):
                counts[bucket] = counts.get(bucket, 0) + 1
        return counts

    def __getitem__(self, position):
        item = self.items[position]
        # hash() of a tuple of ints is the same in every process (only str hashing is salted).
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.random_keys[position])) % (2**63))
        bucket, indices = item.bucket, item.frame_indices
        if self.plan is not None and item.landings:
            bucket = self.bucket_keys_at(self.epoch)[position]
            indices = dict(item.landings)[bucket]
        if self.fun is not None:  # the batch's size, the clip's frame window of this epoch
            bucket = self.fun.keys(self.epoch)[position]
            indices = ([0] * bucket[0] if item.fun.image
                       else self.fun.plan.window(item.fun, bucket[0], self.epoch, self.random_keys[position]))
        frames, height, width = bucket
        control = None
        if item.sample.control_path is not None:  # the same frames, crop and flip as the clip: the draws replayed
            replay = torch.Generator().set_state(generator.get_state())
            control = fit_to_bucket(self._read(item, item.sample.control_path, indices), height, width,
                                    self.video_reshape_mode, generator=replay)
        video = fit_to_bucket(self._read(item, item.sample.video_path, indices), height, width,
                              self.video_reshape_mode, generator=generator)
        if self.random_flip and torch.rand((), generator=generator) < self.random_flip:
            video = video.flip(-1)  # one decision for the whole clip, not per frame
            control = control.flip(-1) if control is not None else None
        key = self.random_keys[position]
        return {
            "index": item.sample.index,
            "prompt": self.captions.caption(item.sample.caption, self.epoch, key, item.sample.id_token),
            "video": video,
            "image": video[:1].clone() if self.image_to_video else None,
            "control": control,
        }

    @staticmethod
    def _read(item, path, indices):
        try:
            return read_frames(path, indices)
        except VideoReadError as error:
            raise ClipDecodeError(
                f"entry {item.sample.index + 1}: {error}. The scan found its header and stream intact, but it does "
                "not decode: remove this clip from the data list (or re-encode it) and run again (training: "
                "--resume_from_checkpoint latest goes on from the last checkpoint; prepare_dataset.py keeps what it "
                "finished)"
            ) from None


class PrecomputedDataset(Dataset):
    """Items written by prepare_dataset.py: latent distributions and prompt embeddings.

    With caption dropout (`captions`), a dropped item's prompt embeddings are the empty prompt's, `empty_prompt` (the
    file prepare_dataset.py stored), drawn like VideoDataset's from (seed, epoch, the entry's random key)."""

    def __init__(self, data_root, entries, random_keys=None, captions=CaptionDraws(), empty_prompt=None):
        self.data_root = Path(data_root)
        self.entries = list(entries)
        self.random_keys = list(random_keys) if random_keys is not None else [entry["index"] for entry in self.entries]
        self.captions = captions
        self.empty_prompt = None
        if captions.dropout_rate > 0:
            from safetensors.torch import load_file

            self.empty_prompt = load_file(self.data_root / empty_prompt)["prompt_embeds"]
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.entries)

    @property
    def bucket_keys(self):
        return [tuple(entry["bucket"]) for entry in self.entries]

    def landing_counts(self):
        """{bucket: entries}: each prepared entry keeps the one bucket prepare_dataset.py drew for it."""
        counts = {}
        for key in self.bucket_keys:
            counts[key] = counts.get(key, 0) + 1
        return counts

    def __getitem__(self, position):
        from safetensors.torch import load_file

        entry = self.entries[position]
        tensors = load_file(self.data_root / entry["file"])
        dropped = self.captions.dropped(self.epoch, self.random_keys[position])
        return {
            "index": entry["index"],
            "prompt": "" if dropped else entry["caption"],
            "prompt_embeds": self.empty_prompt if dropped else tensors["prompt_embeds"],
            "video_latent_dist": tensors["video_latent_dist"],
            "image": tensors.get("first_frame"),  # [1, C, H, W] in [-1, 1]: I2V noise-augments and encodes it
        }


def collate(items):
    batch = {"index": [item["index"] for item in items], "prompt": [item["prompt"] for item in items]}
    for key in ("video", "image", "control", "prompt_embeds", "video_latent_dist"):
        values = [item.get(key) for item in items]
        batch[key] = torch.stack(values) if values and values[0] is not None else None
    return batch


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------


class BucketBatchSampler(Sampler):
    """Batches of dataset positions that share one bucket (so one tensor shape per batch).

    Every epoch: positions are shuffled within each bucket with a generator seeded by
    (seed, epoch), cut into batches of the bucket's batch size (`batch_size`: one for all, or
    {bucket: size}; a bucket's leftover partial batch is kept unless drop_last), and the batches
    are shuffled. With several processes, each takes every num_replicas-th batch; the list is
    first padded with repeats of whole batches so all ranks run the same number of steps.
    `start_batch` skips batches already trained (resume). `bucket_keys`: each position's bucket, or a function of the
    epoch giving them (buckets drawn again every epoch: `VideoDataset.bucket_keys_at`), where None leaves the
    position out of that epoch (it sits out); `batch_size` then names every bucket a position can land in.
    """

    def __init__(self, bucket_keys, batch_size, shuffle=True, drop_last=False, seed=0, num_replicas=1, rank=0,
                 batches_at=None):
        self.batches_at = batches_at  # epoch -> the epoch's batches, where they are made elsewhere (FunBatches)
        if callable(bucket_keys):
            self.keys_at = bucket_keys
        else:
            fixed = [tuple(key) for key in bucket_keys]
            self.keys_at = lambda epoch: fixed
        self.batch_sizes = (dict(batch_size) if isinstance(batch_size, dict)
                            else dict.fromkeys({key for key in self.keys_at(0) if key is not None}, batch_size))
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch = epoch
        self.start_batch = start_batch

    @property
    def bucket_keys(self):
        """Each position's bucket in the current epoch (None: it sits out)."""
        return self.keys_at(self.epoch)

    def _all_batches(self, epoch=None):
        epoch = self.epoch if epoch is None else epoch
        if self.batches_at is not None:
            return self._padded(list(self.batches_at(epoch)))
        buckets = {}
        for position, key in enumerate(self.keys_at(epoch)):
            if key is not None:
                buckets.setdefault(tuple(key), []).append(position)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for key in sorted(buckets):
            positions, size = buckets[key], self.batch_sizes[key]
            if self.shuffle:
                positions = [positions[i] for i in torch.randperm(len(positions), generator=generator)]
            for start in range(0, len(positions), size):
                batch = positions[start : start + size]
                if len(batch) == size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        return self._padded(batches)

    def _padded(self, batches):
        if self.num_replicas > 1 and batches:
            padding = (-len(batches)) % self.num_replicas  # may exceed len(batches): cycle through them
            batches = batches + [batches[i % len(batches)] for i in range(padding)]
        return batches

    def __iter__(self):
        batches = self._all_batches()[self.rank :: self.num_replicas]
        yield from batches[self.start_batch :]

    def __len__(self):
        """Batches this rank yields in the whole current epoch."""
        return self.batches_in(self.epoch)

    def batches_in(self, epoch):
        """Batches this rank yields in the whole of `epoch`."""
        if self.batches_at is not None:
            return math.ceil(len(self.batches_at(epoch)) / self.num_replicas)
        counts = {}
        for key in self.keys_at(epoch):
            if key is not None:
                counts[tuple(key)] = counts.get(tuple(key), 0) + 1
        rounding = math.floor if self.drop_last else math.ceil
        total = sum(rounding(n / self.batch_sizes[key]) for key, n in counts.items())
        return math.ceil(total / self.num_replicas) if total else 0

    def sitting_out(self, epoch):
        """Positions that sit out `epoch` (every bucket draw passed them on)."""
        return sum(key is None for key in self.keys_at(epoch))

    def samples_trained(self, epoch, batches_per_rank):
        """{bucket: samples} in the first `batches_per_rank` batches of every rank in `epoch` (padding included)."""
        counts, keys = {}, self.keys_at(epoch)
        for batch in self._all_batches(epoch)[: batches_per_rank * self.num_replicas]:
            key = tuple(keys[batch[0]])
            counts[key] = counts.get(key, 0) + len(batch)
        return counts


class FunBatches:
    """CogVideoX-Fun's batches (`buckets.FunBuckets`): every epoch the clips are shuffled within their group (still
    images or videos, and with --enable_bucket the aspect ratio), cut into batches of `batch_size` and the batches
    shuffled, from (seed, epoch); then each batch draws its size from (seed, epoch, its number in the epoch). Every
    process makes the same batches and draws, and a resumed run makes them again."""

    def __init__(self, plan, clips, seed, batch_size=1):
        self.plan = plan
        self.clips = list(clips)
        self.seed = seed
        self.batch_size = batch_size
        self._made = None  # (epoch, batch size, batches, keys)

    def _make(self, epoch):
        if self._made is None or self._made[:2] != (epoch, self.batch_size):
            groups = {}
            for position, clip in enumerate(self.clips):
                groups.setdefault((clip.image, clip.group), []).append(position)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches = []
            for group in sorted(groups):
                positions = [groups[group][i] for i in torch.randperm(len(groups[group]), generator=generator)]
                batches += [positions[start : start + self.batch_size]
                            for start in range(0, len(positions), self.batch_size)]
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
            keys = [None] * len(self.clips)
            for number, batch in enumerate(batches):
                bucket = self.plan.draw([self.clips[p] for p in batch], epoch, number)
                for position in batch:
                    keys[position] = bucket
            self._made = (epoch, self.batch_size, batches, keys)
        return self._made

    def batches(self, epoch):
        """The epoch's batches (lists of positions), all processes'."""
        return self._make(epoch)[2]

    def keys(self, epoch):
        """Each position's bucket in `epoch`: its batch's."""
        return self._make(epoch)[3]

    def landing_counts(self):
        """{bucket: clips that can train in it}: what a batch can give each clip with the clips of its group."""
        loaded = {}
        for clip in self.clips:
            loaded.setdefault((clip.image, clip.group), set()).add(clip.loaded)
        counts = {}
        for clip in self.clips:
            for bucket in self.plan.landings(clip, loaded[clip.image, clip.group]):
                counts[bucket] = counts.get(bucket, 0) + 1
        return counts
