"""Where training samples come from, chosen once per run (`choose_data_source`), and the loaders built on them.

- `RawClips`: the user's caption/video lists (txt files or a CSV). Clips are decoded and fitted to their bucket in
  the loader's workers; the VAE and T5 encode every batch during training.
- `PreparedEntries` (--load_tensors): what prepare_dataset.py wrote (latent distributions and prompt embeddings,
  checked against the model through its manifest); neither the VAE nor T5 is loaded for it (image-to-video still
  loads the VAE: its conditioning encodes the noise-augmented first frame at every step).

Each knows which flags apply to it, which encoders it needs, how it builds its datasets, how a batch becomes
latents and prompt embeddings (`encode`), and what a batch of it looks like (`example_batch`, for the memory
estimate and the benchmark). Each method takes the flag sections it reads (training/sections.py).
"""

import dataclasses
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .args import UsageError, size_limit_problem
from .buckets import bucket_plan, check_buckets, reshape_mode
from .dataset import (
    BucketBatchSampler,
    CaptionDraws,
    PrecomputedDataset,
    VideoDataset,
    assign_buckets,
    bad_sample_error,
    collate,
    data_notes,
    load_samples,
    split_for_eval,
    write_skip_report,
)
from .layouts import check_data_source, expand_repeats, read_samples
from .models import Pretrained, encode_prompts, encode_video_distribution, latent_grid, vae_scale_factor_spatial


logger = logging.getLogger("cogvideox_factory")

SKIP_REPORT = "skipped_samples.jsonl"
NOTES_REPORT = "data_notes.jsonl"

# Flags that shape raw clips ([data] and [buckets]); with prepared entries prepare_dataset.py has already applied them.
RAW_DATA_FLAGS = ("height_buckets", "width_buckets", "max_num_frames", "skip_frames_start", "skip_frames_end",
                  "video_reshape_mode", "random_flip", "dataset_file", "dataset_config", "train_data_meta",
                  "caption_extension", "enable_bucket", "video_sample_size", "image_sample_size", "token_sample_size",
                  "video_sample_n_frames", "video_sample_stride", "random_hw_adapt", "training_with_video_token_length",
                  "random_frame_crop", "video_repeat")


def choose_data_source(data):
    """PreparedEntries with --load_tensors ([data]), else RawClips."""
    return PreparedEntries() if data.load_tensors else RawClips()


class RawClips:
    name = "raw clips"
    needs_text_encoder = True  # T5 embeds each batch's captions
    needs_vae = True  # the VAE encodes each batch's clips

    def check_args(self, data, problems):
        check_data_source(data, problems)

    def check_model_args(self, data, buckets, transformer_config, problems):
        check_buckets(buckets, transformer_config, problems, skip_frames_start=data.skip_frames_start,
                      skip_frames_end=data.skip_frames_end)

    def training_resolutions(self, buckets):
        """(height, width) pairs a clip may be trained at."""
        return {(h, w) for h in buckets.height_buckets for w in buckets.width_buckets}

    def samples(self, model, data, buckets, training, validation, conditioning, transformer_config):
        """(training items, items of a separate held-out list, unusable samples, notes). Reads headers only."""
        self.plan = bucket_plan(buckets, transformer_config, training.train_batch_size, training.seed)
        samples = read_samples(data, buckets.video_repeat)
        with_control = sum(sample.control_path is not None for sample in samples)
        if with_control and not conditioning.control:  # e.g. control_file_path in a --dataset_config meta table
            raise UsageError(f"{with_control} samples have control videos, which a {conditioning.name} run does not "
                             "read: train a CogVideoX-Fun Control model from --control_column or --train_data_meta, "
                             "or leave the control videos out")
        if conditioning.control and with_control < len(samples):
            raise UsageError(f"{len(samples) - with_control} of {len(samples)} samples have no control video: a "
                             "Control run needs one for every clip")
        items, skipped = self._bucketed(data, samples)
        if not items:
            reasons = [f"entry {s.index + 1} ({s.video_path}): {s.reason}" for s in skipped[:10]]
            raise UsageError(["no usable sample: every clip was skipped"] + reasons)
        listed = []
        if validation.eval_video_column or validation.eval_dataset_file:
            listed, eval_skipped = self._bucketed(data, load_samples(
                data.data_root, validation.eval_dataset_file, validation.eval_caption_column or data.caption_column,
                validation.eval_video_column or data.video_column, data.id_token))
            skipped = skipped + [replace(s, reason=f"held-out list: {s.reason}") for s in eval_skipped]
        return items, listed, skipped, data_notes(items, reshape_mode(data.video_reshape_mode, buckets))

    def _bucketed(self, data, samples):
        return assign_buckets(samples, self.plan, data.skip_frames_start, data.skip_frames_end)

    def batch_sizes(self, buckets, training, transformer_config, keys):
        """{bucket: batch size} of the bucket `keys` (the plan `samples` made)."""
        return {bucket: self.plan.batch_size(bucket) for bucket in keys}

    def dataset(self, data, buckets, training, conditioning, items, for_training=False):
        """The items' dataset; the training set (`for_training`) has each sample `repeats` times (--dataset_config
        num_repeats) and its captions dropped or shuffled (--caption_dropout_rate, --caption_shuffle)."""
        items, keys = expand_repeats(items) if for_training else (items, None)
        # The training set's buckets are drawn again every epoch (a bucket config's keep_prob); held-out items keep
        # the first draw that keeps them.
        return VideoDataset(items, reshape_mode(data.video_reshape_mode, buckets), data.random_flip,
                            conditioning.image_to_video, seed=training.seed or 0, random_keys=keys,
                            captions=CaptionDraws.of(data, training) if for_training else CaptionDraws(),
                            plan=self.plan if for_training else None)

    def encode(self, batch, context):
        """(latent distribution [B, 2C, f, h, w], prompt embeddings [B, S, D]) of a batch, on the device."""
        distribution = encode_video_distribution(context.vae, batch["video"], context.device)
        prompt_embeds = encode_prompts(context.tokenizer, context.text_encoder, batch["prompt"],
                                       context.transformer_config["max_text_seq_length"], context.device,
                                       context.weight_dtype)
        return distribution, prompt_embeds

    def example_batch(self, batch_size, bucket, transformer_config, vae_config, image_to_video, fill=torch.zeros,
                      control=False):
        """A batch as the loader delivers it: pixels as float in [-1, 1], captions; with `control`, control videos."""
        frames, height, width = bucket
        return {"video": fill(batch_size, frames, 3, height, width), "prompt": ["x"] * batch_size,
                "image": fill(batch_size, 1, 3, height, width) if image_to_video else None,
                "control": fill(batch_size, frames, 3, height, width) if control else None}


class PreparedEntries:
    name = "prepared entries"
    needs_text_encoder = False
    needs_vae = False

    def check_args(self, data, problems):
        if data.data_root is None:
            problems.append("--load_tensors needs --data_root: the --output_dir of training/prepare_dataset.py")
        elif not (Path(data.data_root) / "manifest.json").is_file():
            from .precomputed import original_folder_hint

            problems.append(original_folder_hint(data.data_root) or (
                f"--load_tensors: {data.data_root} has no manifest.json; run training/prepare_dataset.py "
                f"--save_latents_and_embeddings --output_dir {data.data_root} first (see prepare_dataset.sh)"
            ))
        if data.caption_shuffle:
            problems.append("--caption_shuffle needs raw clips: prepared data holds captions already embedded by T5, "
                            "whose tags can no longer be reordered; train without --load_tensors, or drop "
                            "--caption_shuffle")

    def check_model_args(self, data, buckets, transformer_config, problems):
        pass  # each entry keeps the bucket prepare_dataset.py gave it; the manifest is checked in `samples`

    def training_resolutions(self, buckets):
        return set()

    def samples(self, model, data, buckets, training, validation, conditioning, transformer_config):
        from .precomputed import load_manifest, manifest_problems

        manifest = load_manifest(data.data_root)
        _warn_ignored_flags(data, buckets, manifest)
        pretrained = Pretrained(model.pretrained_model_name_or_path, model.revision, model.variant, model.cache_dir)
        problems = manifest_problems(manifest, transformer_config, conditioning, pretrained, data)
        if problems:
            raise UsageError(problems)
        items = _select_entries(data, manifest["entries"])
        listed = (_select_entries(data, manifest["entries"], validation.eval_video_column)
                  if validation.eval_video_column else [])
        self.stored_batch_sizes = manifest.get("batch_sizes", {})
        self.empty_prompt = manifest.get("empty_prompt")  # the empty prompt's embedding, for caption dropout
        return items, listed, [], []

    def batch_sizes(self, buckets, training, transformer_config, keys):
        """Each bucket's batch size (of the bucket `keys`): from --bucket_config when given, else the one
        prepare_dataset.py stored from its --bucket_config, else --train_batch_size."""
        if buckets.bucket_config:
            plan = bucket_plan(buckets, transformer_config, training.train_batch_size, training.seed)
            missing = sorted(b for b in keys if b not in plan.batch_sizes)
            if missing:
                raise UsageError([f"--bucket_config {buckets.bucket_config}: the prepared bucket "
                                  f"{'x'.join(map(str, b))} has no batch size there (add it, or prepare again with this "
                                  "config)" for b in missing])
            return {bucket: plan.batch_size(bucket) for bucket in keys}
        stored = self.stored_batch_sizes
        return {bucket: stored.get("x".join(map(str, bucket)), training.train_batch_size) for bucket in keys}

    def dataset(self, data, buckets, training, conditioning, entries, for_training=False):
        """The entries' dataset; the training set (`for_training`) has each entry as many times as its source's
        num_repeats (stored by prepare_dataset.py), random keys as RawClips gives them, and --caption_dropout_rate's
        draws."""
        keys = None
        if for_training:
            keys = [entry["index"] if repeat == 0 else (entry["index"], repeat)
                    for entry in entries for repeat in range(entry.get("repeats", 1))]
            entries = [entry for entry in entries for _ in range(entry.get("repeats", 1))]
        return PrecomputedDataset(data.data_root, entries, random_keys=keys,
                                  captions=CaptionDraws.of(data, training) if for_training else CaptionDraws(),
                                  empty_prompt=self.empty_prompt)

    def encode(self, batch, context):
        distribution = batch["video_latent_dist"].to(context.device, non_blocking=True)
        prompt_embeds = batch["prompt_embeds"].to(context.device, dtype=context.weight_dtype, non_blocking=True)
        return distribution, prompt_embeds

    def example_batch(self, batch_size, bucket, transformer_config, vae_config, image_to_video, fill=torch.zeros,
                      control=False):
        """A batch as the loader delivers it: latent distributions and prompt embeddings as prepare_dataset.py stores
        them by default (fp32), and for image-to-video the first frame in pixels (never control videos: Control runs
        read the clips)."""
        dtype = torch.float32
        frames, height, width = bucket
        latent_frames, latent_height, latent_width = latent_grid(frames, height, width, transformer_config,
                                                                 vae_scale_factor_spatial(vae_config))
        channels = transformer_config["out_channels"]
        return {
            "prompt": [""] * batch_size,
            "video_latent_dist": fill(batch_size, 2 * channels, latent_frames, latent_height, latent_width, dtype=dtype),
            "prompt_embeds": fill(batch_size, transformer_config["max_text_seq_length"],
                                  transformer_config["text_embed_dim"], dtype=dtype),
            "image": fill(batch_size, 1, 3, height, width) if image_to_video else None,
        }


def _warn_ignored_flags(data, buckets, manifest):
    """Raw-clip flags ([data], [buckets]) given with --load_tensors that would have changed the data: prepare_dataset.py
    already applied its own. A flag is given when it differs from its section's default. Flags that agree with the
    prepared data (a sweep script passing the buckets it prepared with) are not worth a warning."""
    values, defaults = {}, {}
    for section in (data, buckets):
        for field in dataclasses.fields(section):
            if field.name in RAW_DATA_FLAGS:
                values[field.name], defaults[field.name] = getattr(section, field.name), field.default
    prepared = [tuple(entry["bucket"]) for entry in manifest["entries"]]
    settings = manifest["settings"]
    agrees = {
        "height_buckets": lambda value: all(h in value for _, h, _ in prepared),
        "width_buckets": lambda value: all(w in value for _, _, w in prepared),
        "max_num_frames": lambda value: all(f <= value for f, _, _ in prepared),
        "video_reshape_mode": lambda value: value == settings.get("video_reshape_mode"),
        "random_flip": lambda value: value == settings.get("random_flip"),
    }
    changed = [f"--{name}" for name in RAW_DATA_FLAGS
               if values[name] != defaults[name] and not agrees.get(name, lambda value: False)(values[name])]
    if changed:
        logger.warning(
            "%s ignored with --load_tensors: clips were sampled, resized and captioned by prepare_dataset.py "
            "(pass these to it instead)", ", ".join(changed)
        )


def _select_entries(data, entries, column=None):
    """With --video_column naming a list in the prepared folder, train on those entries, in that order."""
    listing = Path(data.data_root) / (column or data.video_column)
    if not listing.is_file():
        return entries
    by_stem = {Path(entry["file"]).stem: entry for entry in entries}
    lines = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = [line for line in lines if Path(line).stem not in by_stem]
    if missing:
        raise UsageError(
            [f"--load_tensors: {line} (in {listing}) has no prepared entry; re-run prepare_dataset.py" for line in missing[:10]]
        )
    return [by_stem[Path(line).stem] for line in lines]


# ----------------------------------------------------------------------------------------------
# Datasets and loaders for a run
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    source: object  # RawClips or PreparedEntries
    dataset: object
    sampler: BucketBatchSampler
    loader: object
    skipped: list  # unusable samples (a dry run lists them; a run stops on them unless --skip_bad_samples)
    eval_dataset: object = None
    eval_loader: object = None
    simulated_peaks: dict = None  # {(bucket, batch): bytes} of the memory simulations that chose batch sizes of auto

    @property
    def batch_sizes(self):
        """{bucket: batch size} of the training buckets."""
        return self.sampler.batch_sizes

    def mean_batch_size(self):
        """The batch a training sample is part of, on average (the one batch size when every bucket has it; with
        buckets drawn every epoch, those of the first epoch)."""
        keys = [key for key in self.sampler.keys_at(0) if key is not None]
        return sum(self.sampler.batch_sizes[key] for key in keys) / len(keys) if keys else 0

    def describe_batch_size(self):
        sizes = sorted(set(self.sampler.batch_sizes.values()))
        return str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]} per bucket (mean {self.mean_batch_size():.2f})"


def build_training_data(model, data, buckets, training, validation, memory, parallelism, source, conditioning,
                        transformer_config, backend, choose_sizes=None):
    """Datasets and loaders, cheap (no model is loaded): bad samples stop the run here, before any weights load.

    Reads the [model] (prepared entries' encoders), [data], [buckets], [training], [validation] (held-out lists,
    --eval_split), [memory] (--pin_memory) and [parallelism] (sequence shards) sections.
    `choose_sizes(counts, sizes)` -> (sizes, simulated peaks) replaces batch sizes of "auto" (training/batch_size.py)."""
    items, listed, skipped, notes = source.samples(model, data, buckets, training, validation, conditioning,
                                                   transformer_config)
    problems = shape_problems(items + listed, training, conditioning, transformer_config)
    problems += sequence_parallel_problems(items + listed, parallelism, transformer_config, backend)
    if problems:
        raise UsageError(problems)
    if notes:
        _write_and_warn(notes, Path(training.output_dir) / NOTES_REPORT, backend, "note(s) about the data")
    train, held_out = split_for_eval(items, validation.eval_split, training.seed or 0)
    held_out = held_out or listed
    if validation.eval_split and not train:
        raise UsageError(f"--eval_split {validation.eval_split} leaves no sample to train on ({len(items)} usable)")
    if not training.dry_run:  # a dry run lists them in its plan instead of stopping
        report_skipped(skipped, training.output_dir, data.skip_bad_samples, backend)
    dataset = source.dataset(data, buckets, training, conditioning, train, for_training=True)
    counts = dataset.landing_counts()  # every bucket a sample can train in (drawn again every epoch)
    batch_sizes, simulated = source.batch_sizes(buckets, training, transformer_config, set(counts)), {}
    if "auto" in batch_sizes.values():
        batch_sizes, simulated = choose_sizes(counts, batch_sizes)
    loading = dict(seed=training.seed, num_workers=data.dataloader_num_workers, pin_memory=memory.pin_memory)
    loader, sampler = build_dataloader(dataset, backend, batch_sizes, **loading)
    result = TrainingData(source, dataset, sampler, loader, skipped, simulated_peaks=simulated)
    if held_out:
        result.eval_dataset = source.dataset(data, buckets, training, conditioning, held_out)
        # Held-out batches take their bucket's training batch size (one per bucket when it has none).
        sizes = {bucket: batch_sizes.get(bucket, 1) for bucket in bucket_counts(result.eval_dataset.bucket_keys)}
        result.eval_loader = build_dataloader(result.eval_dataset, backend, sizes, **loading, shuffle=False)[0]
    return result


def bucket_counts(bucket_keys):
    counts = {}
    for key in bucket_keys:
        counts[tuple(key)] = counts.get(tuple(key), 0) + 1
    return counts


def shape_problems(items, training, conditioning, transformer_config):
    """The model's limits on the shapes the data trains at (the buckets in use, raw or prepared), one line each;
    `training`: the [training] section (--ignore_learned_positional_embeddings, for the conditioning's rules)."""
    shapes = {}
    for item in items:
        for bucket in [tuple(item["bucket"])] if isinstance(item, dict) else item.buckets:
            shapes[bucket] = shapes.get(bucket, 0) + 1
    problems = []
    for (frames, height, width), count in sorted(shapes.items()):
        problem = size_limit_problem(height, width, transformer_config)
        if problem:
            problems.append(f"bucket {frames}x{height}x{width} ({count} clip(s)): {problem}; use smaller "
                            "--height_buckets/--width_buckets (prepared data: re-run prepare_dataset.py with them)")
    return problems + conditioning.shape_problems(shapes, training, transformer_config)


def sequence_parallel_problems(items, parallelism, transformer_config, backend):
    """--enable_sequence_parallelism's rules (attention heads, every bucket's video tokens divisible by the shards),
    one line each, with the shard count the run has (a one-process --dry_run: --sequence_parallel_shards)."""
    if not parallelism.enable_sequence_parallelism:
        return []
    from .attention import shard_problems

    shards = backend.sequence_shards.size if backend.sequence_shards else parallelism.sequence_parallel_shards
    if shards is None:
        return ["--dry_run on one process estimates one process of a shard group: give --sequence_parallel_shards"]
    buckets = {bucket for item in items for bucket in ([tuple(item["bucket"])] if isinstance(item, dict)
                                                       else item.buckets)}
    return shard_problems(buckets, transformer_config, shards)


def build_dataloader(dataset, backend, batch_sizes, seed, num_workers, pin_memory, shuffle=True):
    """(loader, sampler) of `dataset`; `seed`: --seed (None: 0), `num_workers`: --dataloader_num_workers,
    `pin_memory`: --pin_memory (where CUDA is)."""
    fun = getattr(dataset, "fun", None)  # Fun's options: batches that draw their size (dataset.FunBatches)
    if fun is not None:
        fun.batch_size = min(batch_sizes.values())  # one for all buckets (Fun's); the smallest where auto chose
    sampler = BucketBatchSampler(
        dataset.bucket_keys_at if getattr(dataset, "redraws", False) or fun is not None else dataset.bucket_keys,
        batch_size=batch_sizes,
        shuffle=shuffle,
        drop_last=False,
        seed=seed or 0,
        num_replicas=backend.data_parallel_size,
        rank=backend.data_parallel_rank,
        batches_at=fun.batches if fun is not None else None,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        # Its own generator: making an iterator must not draw from the global RNG, or a resumed
        # run's noise would differ from an uninterrupted one.
        generator=torch.Generator().manual_seed(seed or 0),
    )
    return loader, sampler


def _write_and_warn(entries, path, backend, headline):
    if backend.is_main_process:
        write_skip_report(entries, path)
    logger.warning("%d %s, all listed in %s; the first:", len(entries), headline, path)
    for entry in entries[:5]:
        logger.warning("  entry %d (%s): %s", entry.index + 1, entry.video_path, entry.reason)


def report_skipped(skipped, output_dir, skip_bad_samples, backend):
    """Unusable samples stop the run before any model loads, unless --skip_bad_samples; listed in --output_dir either
    way."""
    if not skipped:
        return
    path = Path(output_dir) / SKIP_REPORT
    if not skip_bad_samples:
        if backend.is_main_process:
            write_skip_report(skipped, path)
        raise bad_sample_error(skipped, path)
    _write_and_warn(skipped, path, backend, "sample(s) skipped")
