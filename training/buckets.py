"""Which bucket (frames, height, width) each sample trains in, and each bucket's batch size.

Two plans, chosen once per run by `bucket_plan(buckets, transformer_config, batch_size, seed)`:

- `GridBuckets`: the original's flags. Every --frame_buckets x --height_buckets x --width_buckets combination is a
  bucket; a clip takes the largest frame count it can fill and the nearest resolution; one batch size for all.
- `ConfiguredBuckets`: `--bucket_config bucket.yaml` (the Open-Sora / Ascend-port format)::

      bucket_config:
        # "resolution": { num_frames: [keep_prob, batch_size] }
        "480p": { 1: [1.0, 16], 49: [0.5, 2], 85: [1.0, 1] }
        "768x1360": { 49: [1.0, 1] }

  A resolution is a name from `RESOLUTIONS` (a set of aspect-ratio shapes of about that area, every side a multiple
  of 16) or an explicit "HxW". Frame count 1 holds still images. Open-Sora's rule: a sample tries the resolutions
  it fills from the largest down; at each it takes the most frames it has and stays with probability keep_prob,
  else it goes on to the next resolution (`[0.0, 0]` sends longer clips to smaller resolutions); passed on by all,
  it sits out the epoch. The draws are made again every epoch. Within a resolution it takes the shape of the
  nearest aspect ratio. Each bucket trains with its own batch size.

Still images train as the shortest clip the model takes: 1 frame for CogVideoX 1.0, 5 (the image held) for 1.5,
whose transformer groups latent frames in pairs.
"""

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

from .args import UsageError, frame_rule_problem, size_limit_problem


# Named resolutions: the area of one reference frame (CogVideoX 1.0 trains at 480x720, 1.5 at 768x1360).
RESOLUTIONS = {
    "144p": (144, 256),
    "240p": (240, 426),
    "360p": (360, 640),
    "480p": (480, 720),
    "720p": (720, 1280),
    "768p": (768, 1360),
    "1080p": (1080, 1920),
    # The Ascend port's (Open-Sora 1.2's) square and larger names, by their area.
    "256": (256, 256),
    "512": (512, 512),
    "1024": (1024, 1024),
    "2k": (1440, 2560),
    "2048": (2048, 2048),
    "2880": (2880, 2880),
    "4k": (2160, 3840),
}
# Aspect ratios (width:height, as video sizes are named) a named resolution offers, landscape to portrait.
ASPECT_RATIOS = ("16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16")
# A sample "fills" a resolution when its pixel area is at least this share of the resolution's area, so a 854x480
# clip counts as 480p and a 1280x704 one as 720p.
FILL_SHARE = 0.8


def _multiple_of_16(value):
    return max(16, int(round(value / 16)) * 16)


def shapes_of_area(area):
    """One (height, width) of about `area` pixels per aspect ratio of ASPECT_RATIOS, sides multiples of 16."""
    shapes = []
    for ratio in ASPECT_RATIOS:
        w, h = (int(x) for x in ratio.split(":"))
        shape = (_multiple_of_16(math.sqrt(area * h / w)), _multiple_of_16(math.sqrt(area * w / h)))
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def shapes_of(resolution):
    """The (height, width) shapes of a named resolution or of an explicit "HxW"; UsageError if neither."""
    name = str(resolution).strip().lower()
    if name in RESOLUTIONS:
        height, width = RESOLUTIONS[name]
        return shapes_of_area(height * width)
    parts = name.split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        height, width = int(parts[0]), int(parts[1])
        if height > 0 and width > 0 and height % 16 == 0 and width % 16 == 0:
            return [(height, width)]
        raise UsageError(f'--bucket_config: resolution "{resolution}": height and width must be positive multiples of 16')
    raise UsageError(f'--bucket_config: unknown resolution "{resolution}": use one of {", ".join(RESOLUTIONS)} or '
                     '"HxW" (e.g. "480x720")')


def nominal_area(resolution, shapes):
    """The area a clip must fill (FILL_SHARE of it) to reach a resolution: its reference frame's (RESOLUTIONS), or an
    explicit "HxW"'s."""
    name = str(resolution).strip().lower()
    height, width = RESOLUTIONS[name] if name in RESOLUTIONS else shapes[0]
    return height * width


def still_frames(transformer_config):
    """Frames a still image is held for: the shortest clip the model takes (1 for CogVideoX 1.0, 5 for 1.5)."""
    return 4 * ((transformer_config.get("patch_size_t") or 1) - 1) + 1


def nearest_shape(height, width, shapes):
    """The shape whose aspect ratio is closest (in log ratio) to height x width; ties go to the larger area."""
    return min(shapes, key=lambda s: (abs(math.log((s[0] / s[1]) / (height / width))), -s[0] * s[1]))


def frame_indices(total_frames, bucket_frames, skip_start=0, skip_end=0):
    """`bucket_frames` indices spread with a uniform stride over the usable part of the clip."""
    usable = total_frames - skip_start - skip_end
    stride = max(usable // bucket_frames, 1)
    return [skip_start + i * stride for i in range(bucket_frames)]


def choose_frame_bucket(available_frames, frame_buckets, max_num_frames):
    """The largest bucket not above min(available, max_num_frames): the nearest one the clip can fill.

    None when the clip is shorter than every bucket (the original crashed on such clips).
    """
    target = min(available_frames, max_num_frames)
    fitting = [b for b in frame_buckets if b <= target]
    return max(fitting) if fitting else None


def choose_resolution_bucket(height, width, resolutions):
    """Nearest (h, w) by |h - H| + |w - W| (the original's rule); ties go to the first listed."""
    return min(resolutions, key=lambda hw: abs(hw[0] - height) + abs(hw[1] - width))


class SpreadFrames:
    """Frames spread evenly over the usable part of a clip (the original's sampling)."""

    @staticmethod
    def frame_indices(total_frames, count, skip_start=0, skip_end=0):
        return frame_indices(total_frames, count, skip_start, skip_end)


class GridBuckets(SpreadFrames):
    """The original's buckets: every listed frame count x height x width, one batch size."""

    def __init__(self, frame_buckets, height_buckets, width_buckets, max_num_frames, batch_size, stills):
        self.frame_buckets = sorted(set(frame_buckets))
        self.resolutions = [(h, w) for h in height_buckets for w in width_buckets]
        self.max_num_frames = max_num_frames
        self.default_batch_size = batch_size
        self.stills = stills

    def choose(self, frames, height, width, is_image, key):
        """(frames, height, width), or a string saying why the sample fits no bucket."""
        count = self.stills if is_image else choose_frame_bucket(frames, self.frame_buckets, self.max_num_frames)
        if count is None:
            return f"fewer than the smallest frame bucket {min(self.frame_buckets)}"
        return (count, *choose_resolution_bucket(height, width, self.resolutions))

    def batch_size(self, bucket):
        return self.default_batch_size

    def describe(self):
        return None


# Keeps the keep_prob draws apart from the other draws made from the same (seed, epoch, key).
_BUCKET_STREAM = 0x4255434B
_MASK = 2**64 - 1


def uniform(*numbers):
    """A number in [0, 1) that is a function of `numbers` (ints, or tuples of them) alone: the same in every process
    and every run (hash() of ints is not salted), about 1 us (a seeded random.Random takes 7). The hash goes through
    splitmix64's finalizer, so nearby inputs give unrelated numbers."""
    z = (hash((*numbers, _BUCKET_STREAM)) + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return ((z ^ (z >> 31)) >> 11) / 2**53


class ConfiguredBuckets(SpreadFrames):
    """Buckets from a bucket config: resolution groups, each with frame counts, keep probabilities and batch sizes.

    The rule of Open-Sora's `Bucket.get_bucket_id` (and of the Ascend port's copy): the resolutions are tried from the
    largest area down, those the clip fills (its area at least FILL_SHARE of theirs). At each, the clip takes the
    largest frame count it has (a still image: the entry 1), and a draw keeps it there with that entry's keep_prob;
    if the draw fails the clip goes on to the next resolution, not to a shorter frame count of this one (`[0.0, 0]`
    sends every clip that reaches it to smaller resolutions). A keep_prob written [keep, p] (Open-Sora 1.2-1.3, the
    Ascend port) first draws whether that frame count is tried at all (with probability p; if not, the next shorter
    one is). Passed on by every resolution, the clip sits out the epoch. The draws come from (seed, epoch, the
    sample's key), one per (resolution, frame count): made again every epoch, the same in every process and
    after a resume.
    """

    redraws = True  # the scan keeps each clip's `route`; the training set calls `draw` again every epoch

    def __init__(self, groups, stills, seed, source="--bucket_config"):
        # groups: [(name, [(h, w), ...], {frames: (keep_prob or (keep_prob, p), batch_size or "auto")})].
        self.groups = sorted(groups, key=lambda g: -nominal_area(g[0], g[1]))  # largest area first
        self.stills = stills
        self.seed = seed
        self.source = source
        self.batch_sizes = {}
        for _, shapes, frames in self.groups:
            for count, (_, batch) in frames.items():
                for h, w in shapes:
                    bucket = (self.stills if count == 1 else count, h, w)
                    if batch == "auto" or self.batch_sizes.get(bucket) == "auto":
                        self.batch_sizes[bucket] = "auto"  # --max_memory_gb decides (training/batch_size.py)
                    elif batch > 0:
                        self.batch_sizes[bucket] = max(batch, self.batch_sizes.get(bucket, 0))

    def route(self, frames, height, width, is_image):
        """The entries a clip can meet, in order, as (group number, frame count, probability the entry is tried, keep
        probability, bucket): the resolutions it fills from the largest down; within one, the frame counts it has,
        largest first (a still image: the entry 1). A batch size of 0 keeps no clip."""
        route = []
        for number, (name, shapes, counts) in enumerate(self.groups):
            if height * width < FILL_SHARE * nominal_area(name, shapes):
                continue
            shape = nearest_shape(height, width, shapes)
            for count in sorted(counts, reverse=True):
                if count == 1 if is_image else 1 < count <= frames:
                    keep, batch = counts[count]
                    keep, tried = keep if isinstance(keep, tuple) else (keep, 1.0)
                    bucket = (self.stills if count == 1 else count, *shape)
                    route.append((number, count, tried, 0.0 if batch == 0 else keep, bucket))
        return tuple(route)

    @staticmethod
    def landings(route):
        """{bucket: probability} of every bucket the draws can give a clip of this `route` (what is left of 1: the
        chance that it sits out an epoch); empty when no draw can keep it."""
        shares, left, group, untried = {}, 1.0, None, 0.0
        for number, _, tried, keep, bucket in route:
            if number != group:  # what every larger resolution passed on reaches this one's first frame count
                group, untried = number, left
            kept = untried * tried * keep
            if kept > 0:
                shares[bucket] = shares.get(bucket, 0.0) + kept
            left -= kept
            untried *= 1 - tried  # not tried: on to the next frame count; tried and not kept: the next resolution
        return shares

    def draw(self, route, key, epoch):
        """The bucket of a clip of this `route` in `epoch`, or None when every draw passes it on (it sits out)."""
        passed = None
        for number, count, tried, keep, bucket in route:
            if number == passed:
                continue  # this resolution tried the clip and passed it on
            if tried < 1 and uniform(self.seed, epoch, key, number, count, 0) >= tried:
                continue  # this frame count is not tried: the next shorter one is
            if keep >= 1 or uniform(self.seed, epoch, key, number, count, 1) < keep:
                return bucket
            passed = number
        return None

    def choose(self, frames, height, width, is_image, key, epoch=0):
        """The clip's bucket (frames, height, width) in `epoch`; None when every draw passes it on (it sits out the
        epoch); a string when no draw can keep it (it fits no bucket)."""
        route = self.route(frames, height, width, is_image)
        if not self.landings(route):
            return f"fits no bucket of {self.source} (too small or too short, or kept by no keep_prob where it fits)"
        return self.draw(route, key, epoch)

    def batch_size(self, bucket):
        return self.batch_sizes[tuple(bucket)]

    def describe(self):
        return {name: {str(count): list(value) for count, value in sorted(counts.items())}
                for name, _, counts in self.groups}


# CogVideoX-Fun's constants: its VAE's temporal compression (sample_n_frames_bucket_interval: frame counts are 4k+1),
# the part of a clip its ImageVideoDataset samples from (video_length_drop_start/end as its trainers build it: the
# whole clip; releases before CogVideoX-Fun V1.5 used 0.1-0.9), and the share of its "keep the full size" draw.
FUN_FRAME_INTERVAL = 4
FUN_WINDOW = (0.0, 1.0)
FUN_FULL_SIZE_SHARE = 0.75
# Separate draws from the same (seed, epoch, batch) or (seed, epoch, clip).
_FUN_SIDE, _FUN_CROP, _FUN_WINDOW = 1, 2, 3


def fun_downsample_ratios(sample_size, image_ratio=()):
    """Fun's `get_random_downsample_ratio`: ([ratios], [probabilities]); the side trains at sample_size / ratio.
    Ratio 1 (the full size) has probability 0.75, the others share the rest."""
    if sample_size >= 1536:
        ratios = [1, 1.25, 1.5, 2, 2.5, 3, *image_ratio]
    elif sample_size >= 1024:
        ratios = [1, 1.25, 1.5, 2, *image_ratio]
    elif sample_size >= 768:
        ratios = [1, 1.25, 1.5, *image_ratio]
    elif sample_size >= 512:
        ratios = [1, *image_ratio]
    else:
        ratios = [1]
    if len(ratios) == 1:
        return ratios, [1.0]
    return ratios, [FUN_FULL_SIZE_SHARE] + [(1 - FUN_FULL_SIZE_SHARE) / (len(ratios) - 1)] * (len(ratios) - 1)


def fun_side_frames(options):
    """Fun's `get_length_to_frame_num`: {side: frames} for --training_with_video_token_length. Sides from
    --video_sample_size to --image_sample_size in steps of 128 (and --image_sample_size itself); each takes the frames
    that fill the token budget --video_sample_n_frames x --token_sample_size^2, at most --video_sample_n_frames,
    rounded down to 4k then plus 1."""
    o = options
    if o.image_sample_size > o.video_sample_size:
        sides = list(range(o.video_sample_size, o.image_sample_size + 1, 128))
        if sides[-1] != o.image_sample_size:
            sides.append(o.image_sample_size)
    else:
        sides = [o.image_sample_size]
    budget = o.video_sample_n_frames * o.token_sample_size * o.token_sample_size
    return {side: int(min(budget / side / side, o.video_sample_n_frames) // FUN_FRAME_INTERVAL * FUN_FRAME_INTERVAL + 1)
            for side in sides}


def fun_resized_mean_side(height, width, short_side):
    """The mean of height and width after Fun's `resize_frame` (the short side brought down to `short_side`, never
    up): what its token-length draw compares the sides with."""
    if min(height, width) <= short_side:
        return (height + width) / 2
    if height < width:
        return (short_side + int(short_side * width / height)) / 2
    return (int(short_side * height / width) + short_side) / 2


def fun_shape(group, side):
    """(height, width) of a sample side in a group ("square", or an aspect ratio "w:h" of ASPECT_RATIOS: the shape of
    that ratio and area side^2), every side rounded down to a multiple of 16 as Fun does."""
    if group == "square":
        return (max(16, int(side / 16) * 16),) * 2
    w, h = (int(x) for x in group.split(":"))
    return tuple(max(16, int(math.sqrt(side * side * a / b) / 16) * 16) for a, b in ((h, w), (w, h)))


def _pick(values, probabilities, u):
    """The value the uniform number u picks with these probabilities (numpy's rng.choice(values, p=...) as a CDF)."""
    total = 0.0
    for value, probability in zip(values, probabilities):
        total += probability
        if u < total:
            return value
    return values[-1]


@dataclass(frozen=True)
class FunClip:
    """What Fun's per-batch draw looks at in a clip."""

    image: bool
    group: str  # batches hold one group: the aspect ratio nearest the clip's (--enable_bucket), else "square"
    mean_side: float  # mean of height and width after Fun's resize (`fun_resized_mean_side`)
    loaded: int  # frames Fun loads from it: min(--video_sample_n_frames, usable frames // --video_sample_stride)
    first: int  # the first usable frame (--skip_frames_start)
    usable: int  # usable frames
    buckets: tuple  # every bucket a batch can give it


class FunBuckets:
    """CogVideoX-Fun's sampling options, with the rules of its training scripts (scripts/cogvideox_fun/train_lora.py,
    videox_fun/data/dataset_image_video.py):

    - a video trains at --video_sample_size, an image at --image_sample_size: a square of that side (centre crop), or
      with --enable_bucket the shape of that area with the aspect ratio (ASPECT_RATIOS) nearest its own;
    - --random_hw_adapt: a side drawn per batch (Fun's `get_random_downsample_ratio`): the full size with probability
      0.75, else one of its smaller sizes (videos: --video_sample_size / 1.25, 1.5, ...; images also
      --video_sample_size);
    - with --training_with_video_token_length as well, a video batch's side is drawn evenly from `fun_side_frames`
      (--video_sample_size to --image_sample_size in steps of 128, those below 1.25 x the batch's smallest clip) and
      takes the frames of the token budget there (512, 49: 256x256x49, 768x768x21, 1024x1024x13);
    - a clip gives --video_sample_n_frames frames every --video_sample_stride frames from a random start (drawn again
      each epoch); a batch takes the frames its shortest clip has, rounded down to the model's rule (4k+1 or 8k-3);
    - --random_frame_crop: a batch keeps its full frame count with probability 0.9, else a shorter 4k+1.
    Sizes are drawn per batch from (--seed, epoch, the batch's number in the epoch): the same in every process and
    after a resume. One batch size (--train_batch_size) for all buckets.
    """

    per_batch = True  # the training set's batches draw their sizes (training/dataset.py FunBatches)

    def __init__(self, options, batch_size, stills, valid_frames, size_problem, seed):
        self.options = options  # Fun's flags as attributes, defaults filled in (`fun_options`)
        self.default_batch_size = batch_size
        self.stills = stills
        self.valid_frames = valid_frames  # frame count -> bool, the model's frame rule
        self.size_problem = size_problem  # (height, width) -> None or why the model cannot take it
        self.seed = seed
        o = options
        self.side_frames = fun_side_frames(o)
        self.tokens = o.random_hw_adapt and o.training_with_video_token_length
        self.video_ratios = fun_downsample_ratios(o.video_sample_size) if o.random_hw_adapt else ([1], [1.0])
        self.image_ratios = (fun_downsample_ratios(o.image_sample_size, [o.image_sample_size / o.video_sample_size])
                             if o.random_hw_adapt else ([1], [1.0]))
        # Frame counts of --random_frame_crop (5, 9, ... up to --video_sample_n_frames; 1 if none): the last with
        # probability 0.9.
        crops = list(range(FUN_FRAME_INTERVAL + 1, o.video_sample_n_frames + FUN_FRAME_INTERVAL,
                           FUN_FRAME_INTERVAL)) or [1]
        self.crops = (crops, [0.1 / (len(crops) - 1)] * (len(crops) - 1) + [0.9] if len(crops) > 1 else [1.0])
        # The frame counts the model takes, up to the most a batch can have.
        self.counts = [count for count in range(1, o.video_sample_n_frames + FUN_FRAME_INTERVAL + 1)
                       if valid_frames(count)]
        self._landings = {}  # (image, group, frame counts of the batch mates) -> landings

    def __getstate__(self):
        # Loader workers draw and take windows; the scan (in this process) alone needs the model's rules.
        return {name: value for name, value in self.__dict__.items() if name not in ("valid_frames", "size_problem")}

    def _sides(self, image):
        o = self.options
        if image:
            return [o.image_sample_size / r for r in self.image_ratios[0]]
        if self.tokens:
            return list(self.side_frames)
        return [o.video_sample_size / r for r in self.video_ratios[0]]

    def _frames(self, limit):
        """The largest frame count the model takes not above `limit` (Fun: 4k+1, for CogVideoX 1.5 fewer latent
        frames to an even count); the shortest clip the model takes if none is."""
        fitting = bisect.bisect_right(self.counts, limit)
        return self.counts[fitting - 1] if fitting else self.stills

    def clip(self, frames, height, width, is_image, first=0):
        """The clip as the draws see it (FunClip), or a string saying why it cannot be used."""
        o = self.options
        group = "square"
        if o.enable_bucket:
            group = min(ASPECT_RATIOS, key=lambda r: abs(math.log((height / width) * int(r.split(":")[0])
                                                                  / int(r.split(":")[1]))))
        start, end = FUN_WINDOW
        loaded = 1 if is_image else min(o.video_sample_n_frames, int(frames * (end - start) // o.video_sample_stride))
        if not is_image and not (self.counts and self.counts[0] <= loaded):
            return (f"too short for the model at --video_sample_stride {o.video_sample_stride} (at most {loaded} "
                    "frames)")
        for side in self._sides(is_image):
            shape = fun_shape(group, side)
            problem = self.size_problem(*shape)
            if problem:
                return f"its sample shape {shape[0]}x{shape[1]}: {problem}"
        mean = fun_resized_mean_side(height, width, max(o.image_sample_size, o.video_sample_size))
        clip = FunClip(is_image, group, mean, loaded, first, frames, ())
        buckets = tuple(sorted(self.landings(clip, range(1, loaded + 1))))
        return FunClip(is_image, group, mean, loaded, first, frames, buckets)

    def landings(self, clip, mates_loaded):
        """Every bucket a batch can give `clip` when its batch mates load the frame counts `mates_loaded`."""
        # A batch takes the frames of its shortest clip: only the counts the model takes matter.
        loads = frozenset(self._frames(n) for n in mates_loaded if n < clip.loaded) | {self._frames(clip.loaded)}
        key = (clip.image, clip.group, loads)
        if key not in self._landings:
            self._landings[key] = self._landings_of(clip.image, clip.group, loads)
        return self._landings[key]

    def _landings_of(self, image, group, loads):
        if image:
            return {(self.stills, *fun_shape(group, side)) for side in self._sides(True)}
        cap = self.options.video_sample_n_frames + FUN_FRAME_INTERVAL
        buckets = set()
        for side in self._sides(False):
            for loaded in loads:
                count = self._frames(min(self.side_frames[side] if self.tokens else cap, loaded))
                counts = {count} | ({min(self._frames(c), count) for c in self.crops[0]}
                                    if self.options.random_frame_crop else set())
                buckets |= {(c, *fun_shape(group, side)) for c in counts}
        return buckets

    def draw(self, clips, epoch, batch):
        """The bucket (frames, height, width) of a batch of these clips (one group) in `epoch`; `batch`: its number
        in the epoch (ints, or tuples of them)."""
        first = clips[0]
        u = uniform(self.seed, epoch, batch, _FUN_SIDE)
        if first.image:
            side = self.options.image_sample_size / _pick(*self.image_ratios, u)
            return (self.stills, *fun_shape(first.group, side))
        if self.tokens:
            smallest = min(clip.mean_side for clip in clips)
            # The clips are resized to a lower resolution than their own (Fun: sides below 1.25 x the smallest).
            choices = [side for side in self.side_frames if side < smallest * 1.25] or list(self.side_frames)
            side = choices[int(u * len(choices))]
            limit = self.side_frames[side]
        else:
            side = self.options.video_sample_size / _pick(*self.video_ratios, u)
            limit = self.options.video_sample_n_frames + FUN_FRAME_INTERVAL
        count = self._frames(min(limit, min(clip.loaded for clip in clips)))
        if self.options.random_frame_crop:
            count = min(count, self._frames(_pick(*self.crops, uniform(self.seed, epoch, batch, _FUN_CROP))))
        return (count, *fun_shape(first.group, side))

    def window(self, clip, count, epoch, key):
        """The frame indices a clip trains with in `epoch` (Fun's ImageVideoDataset.get_batch): --video_sample_n_frames
        frames --video_sample_stride apart from a random start within FUN_WINDOW of its usable frames, drawn from
        (--seed, epoch, the clip's key); the batch keeps the first `count`."""
        import numpy as np

        start, end = FUN_WINDOW
        length = int(end * clip.usable)
        span = min(length, (clip.loaded - 1) * self.options.video_sample_stride + 1)
        low, high = int(start * length), length - span
        first = low + int(uniform(self.seed, epoch, key, _FUN_WINDOW) * (high - low + 1)) if length != span else 0
        indices = np.linspace(first, first + span - 1, clip.loaded, dtype=int)[:count]
        return [clip.first + int(i) for i in indices]

    def choose(self, frames, height, width, is_image, key):
        """The bucket of the clip alone in a batch of epoch 0 (held-out clips, prepare_dataset.py), or why it cannot
        be used."""
        clip = self.clip(frames, height, width, is_image)
        return clip if isinstance(clip, str) else self.draw([clip], 0, (key,))

    def batch_size(self, bucket):
        return self.default_batch_size

    def describe(self):
        return None


# Fun's flags and the defaults of its training scripts; giving any of them selects FunBuckets.
FUN_OPTIONS = {"enable_bucket": False, "video_sample_size": 512, "image_sample_size": 512, "token_sample_size": 512,
               "video_sample_n_frames": 17, "video_sample_stride": 4, "random_hw_adapt": False,
               "training_with_video_token_length": False, "random_frame_crop": False}


def fun_options(buckets):
    """Fun's sampling flags (of `buckets`: the [buckets] section, or prepare's) as attributes, with its defaults
    filled in; None when none was given."""
    from types import SimpleNamespace

    given = {name: getattr(buckets, name) for name in FUN_OPTIONS}
    if not any(value not in (None, False) for value in given.values()):
        return None
    return SimpleNamespace(**{name: FUN_OPTIONS[name] if value is None else value for name, value in given.items()})


def reshape_mode(video_reshape_mode, buckets):
    """How clips are fitted to their bucket: --video_reshape_mode, else centre crops under Fun's options (as Fun does),
    else stretching (the original's default). `buckets`: the [buckets] section, or prepare's."""
    if video_reshape_mode is not None or fun_options(buckets) is None:
        return video_reshape_mode
    return "center"


def read_bucket_config(path):
    """{resolution: {frames: (keep_prob, batch_size)}} from a YAML file; UsageError naming what is wrong."""
    import yaml

    try:
        content = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"--bucket_config {path}: cannot read it ({error.strerror})") from error
    except yaml.YAMLError as error:
        raise UsageError(f"--bucket_config {path}: not valid YAML ({str(error).splitlines()[0]})") from error
    table = content.get("bucket_config") if isinstance(content, dict) else None
    if not isinstance(table, dict) or not table:
        raise UsageError(f'--bucket_config {path}: expected a mapping "bucket_config:" of resolutions, e.g. '
                         '"480p": {49: [1.0, 2]}')
    config = {}
    for resolution, frames in table.items():
        if not isinstance(frames, dict) or not frames:
            raise UsageError(f'--bucket_config {path}: "{resolution}" must map frame counts to [keep_prob, batch_size]')
        entries = {}
        for count, value in frames.items():
            where = f'--bucket_config {path}: "{resolution}" {count}'
            if not isinstance(count, int) or count < 1:
                raise UsageError(f"{where}: the frame count must be a positive whole number")
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise UsageError(f"{where}: give [keep_prob, batch_size], e.g. [1.0, 2]")
            keep, batch = value
            # [keep, p] (Open-Sora 1.2-1.3, the Ascend port): the frame count is tried with probability p.
            pair = isinstance(keep, (list, tuple)) and len(keep) == 2
            if not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in (keep if pair else [keep])):
                raise UsageError(f"{where}: keep_prob {keep!r} must be a number from 0 to 1 (or [keep_prob, "
                                 "probability to try this frame count])")
            if batch != "auto" and (not isinstance(batch, int) or batch < 0):
                raise UsageError(f"{where}: batch_size {batch!r} must be a whole number (0 or more) or auto")
            entries[count] = (tuple(float(x) for x in keep) if pair else float(keep), batch)
        config[str(resolution)] = entries
    return config


def config_problems(config, transformer_config, path):
    """The model's rules on a bucket config, one line each: frame counts, and explicit shapes beyond its grid."""
    problems = []
    for resolution, frames in config.items():
        for count in frames:
            problem = frame_rule_problem(count, transformer_config) if count != 1 else None
            if problem:
                problems.append(f'--bucket_config {path}: "{resolution}" {count}: {problem} (1 means still images)')
        try:
            shapes = shapes_of(resolution)
        except UsageError as error:
            problems.extend(f"{problem} ({path})" for problem in error.problems)
            continue
        if len(shapes) == 1:
            problem = size_limit_problem(*shapes[0], transformer_config)
            if problem:
                problems.append(f'--bucket_config {path}: "{resolution}": {problem}')
    if not any(batch != 0 for frames in config.values() for _, batch in frames.values()):
        problems.append(f"--bucket_config {path}: every batch size is 0: no sample could train")
    return problems


def check_buckets(buckets, transformer_config, problems, *, skip_frames_start, skip_frames_end):
    """The bucket flags (`buckets`: the [buckets] section, or prepare's; or the --bucket_config, or Fun's options)
    and --skip_frames_start/--skip_frames_end against the model's rules, one problem per line."""
    options = fun_options(buckets)
    if options is not None:
        if buckets.bucket_config:
            problems.append("--bucket_config and CogVideoX-Fun's sampling options (--enable_bucket, --video_sample_size, "
                            "...) both choose the buckets: use one of them")
        for name in ("video_sample_size", "image_sample_size", "token_sample_size", "video_sample_n_frames",
                     "video_sample_stride"):
            if getattr(options, name) < 1:
                problems.append(f"--{name} must be at least 1 (got {getattr(options, name)})")
        return
    if buckets.bucket_config:
        try:
            problems.extend(config_problems(read_bucket_config(buckets.bucket_config), transformer_config,
                                            buckets.bucket_config))
        except UsageError as error:
            problems.extend(error.problems)
        return
    for name in ("height_buckets", "width_buckets"):
        for value in getattr(buckets, name):
            if value <= 0 or value % 16 != 0:
                problems.append(f"--{name} {value}: every value must be a positive multiple of 16")
    for frames in buckets.frame_buckets:
        problem = frame_rule_problem(frames, transformer_config) if frames > 0 else f"{frames} is not a frame count"
        if problem:
            problems.append(f"--frame_buckets: {problem}")
    if buckets.max_num_frames < min(buckets.frame_buckets):
        problems.append(
            f"--max_num_frames {buckets.max_num_frames} is below the smallest --frame_buckets value "
            f"{min(buckets.frame_buckets)}: no clip could be used"
        )
    if skip_frames_start < 0 or skip_frames_end < 0:
        problems.append("--skip_frames_start/--skip_frames_end must be 0 or more")


def validation_frames(validation, buckets):
    """Frames of validation videos (and the final test): --validation_num_frames ([validation]), or the largest frame
    bucket ([buckets]: of --bucket_config when given; still-image entries aside)."""
    if validation.validation_num_frames:
        return validation.validation_num_frames
    if buckets.bucket_config:
        try:
            counts = [count for frames in read_bucket_config(buckets.bucket_config).values() for count in frames]
        except UsageError:
            counts = []  # check_buckets reports what is wrong with the file
        if any(count > 1 for count in counts):
            return max(counts)
    return max(buckets.frame_buckets)


def bucket_plan(buckets, transformer_config, batch_size, seed):
    """The run's plan: FunBuckets under Fun's options, ConfiguredBuckets with --bucket_config, else GridBuckets from
    the original's flags. `buckets`: the [buckets] section, or prepare's; `seed`: --seed (None: 0), for the random
    draws of keep probabilities and Fun's options.

    Named resolutions keep only the shapes the model can take (CogVideoX 1.5's position grid bounds them)."""
    stills = still_frames(transformer_config)
    path = buckets.bucket_config
    options = fun_options(buckets)
    if options is not None:
        return FunBuckets(options, batch_size, stills,
                          lambda count: frame_rule_problem(count, transformer_config) is None,
                          lambda h, w: size_limit_problem(h, w, transformer_config), seed or 0)
    if not path:
        return GridBuckets(buckets.frame_buckets, buckets.height_buckets, buckets.width_buckets, buckets.max_num_frames,
                           batch_size, stills)
    config = read_bucket_config(path)
    problems = config_problems(config, transformer_config, path)
    if problems:
        raise UsageError(problems)
    groups = []
    for resolution, frames in config.items():
        shapes = [s for s in shapes_of(resolution) if size_limit_problem(*s, transformer_config) is None]
        if shapes:
            groups.append((resolution, shapes, frames))
    return ConfiguredBuckets(groups, stills, seed or 0, source=f"--bucket_config {path}")
