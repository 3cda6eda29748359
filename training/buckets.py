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
  of 16) or an explicit "HxW". Frame count 1 holds still images. A sample tries the (resolution, frames) pairs from
  the largest resolution down and, within one, from the most frames down; it stays at the first pair it can fill
  with probability keep_prob, else it tries the next (`[0.0, 0]` forces it down). Within a resolution it takes the
  shape of the nearest aspect ratio. Each bucket trains with its own batch size.

Still images train as the shortest clip the model takes: 1 frame for CogVideoX 1.0, 5 (the image held) for 1.5,
whose transformer groups latent frames in pairs.
"""

import math
import random
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


class ConfiguredBuckets(SpreadFrames):
    """Buckets from a bucket config: resolution groups, each with frame counts, keep probabilities and batch sizes."""

    def __init__(self, groups, stills, seed, source="--bucket_config"):
        # groups: [(name, [(h, w), ...], {frames: (keep_prob, batch_size or "auto")})], largest area first.
        self.groups = sorted(groups, key=lambda g: -max(h * w for h, w in g[1]))
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

    def choose(self, frames, height, width, is_image, key):
        area = height * width
        for name, shapes, counts in self.groups:
            if area < FILL_SHARE * max(h * w for h, w in shapes):
                continue
            for count in sorted(counts, reverse=True):
                keep, batch = counts[count]
                if batch == 0 or keep <= 0 or (count == 1) != is_image or (not is_image and frames < count):
                    continue
                # One draw per (sample, resolution, frames), the same in every process and every resumed run.
                if keep >= 1 or random.Random(f"{self.seed}/{key}/{name}/{count}").random() < keep:
                    h, w = nearest_shape(height, width, shapes)
                    return (self.stills if count == 1 else count, h, w)
        return f"fits no bucket of {self.source} (too small or too short, or passed on by every keep_prob)"

    def batch_size(self, bucket):
        return self.batch_sizes[tuple(bucket)]

    def describe(self):
        return {name: {str(count): list(value) for count, value in sorted(counts.items())}
                for name, _, counts in self.groups}


class FunBuckets:
    """CogVideoX-Fun's sampling options, same names and meaning as its training scripts:

    - a video trains at --video_sample_size, an image at --image_sample_size: a square of that side (centre crop), or
      with --enable_bucket the shape of that area nearest its own aspect ratio (ASPECT_RATIOS);
    - --random_hw_adapt: a side drawn per sample, for videos from min(--video_sample_size, 512) to
      --video_sample_size, for images from --video_sample_size to --image_sample_size (steps of 64 pixels);
    - --video_sample_n_frames frames taken every --video_sample_stride frames (fewer from a short clip);
    - --training_with_video_token_length: at most the frames that keep height x width x frames within the token budget
      --token_sample_size^2 x --video_sample_n_frames (512 and 49: 768x768 gets 21 frames, 1024x1024 gets 9);
    - --random_frame_crop: a frame count drawn per sample, up to that maximum.
    Frame counts are the largest the model takes (4k+1 or 8k-3) not above the limit. The draws are made once per run
    from (--seed, the sample), as with bucket configs. One batch size (--train_batch_size) for all buckets.
    """

    def __init__(self, options, batch_size, stills, valid_frames, size_problem, seed):
        self.options = options  # Fun's flags as attributes, defaults filled in (`fun_options`)
        self.default_batch_size = batch_size
        self.stills = stills
        self.valid_frames = valid_frames  # frame count -> bool, the model's frame rule
        self.size_problem = size_problem  # (height, width) -> None or why the model cannot take it
        self.seed = seed

    def _side(self, is_image, key):
        o = self.options
        low, high = (o.video_sample_size, o.image_sample_size) if is_image else (min(o.video_sample_size, 512),
                                                                                o.video_sample_size)
        if not o.random_hw_adapt or high <= low:
            return high if is_image else o.video_sample_size
        sides = list(range(low, high, 64)) + [high]
        return random.Random(f"{self.seed}/{key}/side").choice(sides)

    def _shape(self, height, width, side):
        if not self.options.enable_bucket:
            return (_multiple_of_16(side), _multiple_of_16(side))
        return nearest_shape(height, width, shapes_of_area(side * side))

    def choose(self, frames, height, width, is_image, key):
        o = self.options
        shape = self._shape(height, width, self._side(is_image, key))
        problem = self.size_problem(*shape)
        if problem:
            return f"its sample shape {shape[0]}x{shape[1]}: {problem}"
        if is_image:
            return (self.stills, *shape)
        most = min(o.video_sample_n_frames, (frames - 1) // o.video_sample_stride + 1)
        if o.training_with_video_token_length:
            most = min(most, o.token_sample_size**2 * o.video_sample_n_frames // (shape[0] * shape[1]))
        counts = [count for count in range(1, most + 1) if self.valid_frames(count)]
        if not counts:
            return (f"too short for the model at --video_sample_stride {o.video_sample_stride} (at most {most} "
                    "frames)")
        count = random.Random(f"{self.seed}/{key}/frames").choice(counts) if o.random_frame_crop else counts[-1]
        return (count, *shape)

    def frame_indices(self, total_frames, count, skip_start=0, skip_end=0):
        return [skip_start + i * self.options.video_sample_stride for i in range(count)]

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
            if not isinstance(keep, (int, float)) or not 0 <= keep <= 1:
                raise UsageError(f"{where}: keep_prob {keep!r} must be a number from 0 to 1")
            if batch != "auto" and (not isinstance(batch, int) or batch < 0):
                raise UsageError(f"{where}: batch_size {batch!r} must be a whole number (0 or more) or auto")
            entries[count] = (float(keep), batch)
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
