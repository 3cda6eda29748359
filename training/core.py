"""The one training core behind every trainer.

`run(argv, conditioning, mode)` reads top to bottom: validate flags -> data -> models ->
optimizer -> resume -> train loop -> save artifact -> final test. What differs between the
trainers is passed in: `conditioning` (what the model sees: text-to-video or image-to-video)
and `mode` (what trains and how it is saved: LoRA or full). Nothing here asks which one it got.
"""

import contextlib
import json
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import memory
from .args import TrainingError, UsageError, exit_on_usage_error, parse_args, validate_training_args
from .conditioning import CONDITIONINGS
from .dataset import (
    BucketBatchSampler,
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
from .models import (
    encode_prompts,
    encode_video_distribution,
    load_text_encoder,
    load_tokenizer,
    load_training_scheduler,
    load_transformer,
    load_vae,
    prepare_frozen_base,
    rotary_embeddings,
    sample_latents,
    vae_scale_factor_spatial,
)
from .modes import MODES, cast_frozen, count_parameters
from .optim import build_lr_scheduler, build_optimizer, clip_gradients, offload_runtime_problems, offloaded_optimizer
from .precomputed import load_manifest, manifest_problems


logger = logging.getLogger("cogvideox_factory")
# diffusers 0.42 renamed torch_dtype to dtype; the old name keeps older diffusers working.
warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated", category=FutureWarning)

SKIP_REPORT = "skipped_samples.jsonl"


@dataclass
class Context:
    """Run-wide values derived from the args and the loaded models (not user flags)."""

    args: object
    accelerator: object
    weight_dtype: torch.dtype
    transformer_config: dict
    vae_scaling_factor: float
    vae_invert_scale_latents: bool
    vae_spatial_scale: int
    scheduler: object
    tokenizer: object = None
    text_encoder: object = None
    vae: object = None
    last_validation: list = field(default_factory=list)
    # Where tensors saved for backward live during the transformer's forward (--offload_activations: CPU).
    saved_tensors: object = contextlib.nullcontext


# ----------------------------------------------------------------------------------------------
# Setup pieces, in the order run() calls them
# ----------------------------------------------------------------------------------------------


def _configure_deepspeed(accelerator, args):
    """DeepSpeed takes batch size, accumulation and clipping from its own config: fill them from the flags, which win
    over the accelerate config (where 1 or auto means "not set"; any other accumulation value that disagrees is an
    error rather than silently one or the other).

    The loop still decides where an accumulation group ends and scales the loss itself (`backward`): DeepSpeed is
    told the boundary, so it reduces the gradients and steps there, clipping to --max_grad_norm."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("gradient_accumulation_steps") not in (None, "auto", 1, args.gradient_accumulation_steps):
        raise UsageError(
            f"the DeepSpeed config sets gradient_accumulation_steps to {config['gradient_accumulation_steps']} and "
            f"--gradient_accumulation_steps is {args.gradient_accumulation_steps}: set it to auto (or 1) in the "
            "config and use the flag"
        )
    config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    config["gradient_clipping"] = args.max_grad_norm
    config["train_batch_size"] = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    # So accelerate's prepare() finds no mismatch to warn about; its backward() does not scale under DeepSpeed.
    accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps
    # accelerate registers the config with transformers, which then builds every transformers model it loads under
    # ZeRO-3's zero.Init, partitioned: the frozen T5 would be split across ranks and unusable. Only the transformer
    # handed to prepare() belongs to DeepSpeed (zero3_init_flag is therefore not supported).
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def backward(accelerator, loss, sync):
    """`accelerator.backward(loss)`; under DeepSpeed the engine is also told whether this micro-batch ends the
    accumulation group (`sync`): it reduces the gradients and steps the optimizer (clipping first) there. The loss
    arrives already divided by the group size, so the engine must not divide it again by its configured steps (the
    last group of an epoch may be shorter)."""
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if engine is None:
        accelerator.backward(loss)
    else:
        engine.backward(loss, sync_gradients=sync, scale_wrt_gas=False)


# Ranks waiting for the main process to finish validation wait on a gloo group with this timeout rather than in the
# next NCCL collective, which --nccl_timeout (10 minutes by default) would abort during a long validation.
VALIDATION_WAIT = timedelta(hours=24)
_waiting_room = {}


def _open_waiting_room(accelerator):
    """Create the gloo group used by `_wait_for_main` (a collective: every rank, at the same point)."""
    import torch.distributed as dist

    _waiting_room.clear()
    if accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
        _waiting_room["group"] = dist.new_group(backend="gloo", timeout=VALIDATION_WAIT)


def _wait_for_main(accelerator):
    """Every rank meets here; the others may wait up to VALIDATION_WAIT while the main process validates. A crash on
    the main process still ends the run at once: the launcher (torchrun / accelerate) stops every rank."""
    group = _waiting_room.get("group")
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group)


def build_accelerator(args):
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / args.logging_dir))
    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=project,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.nccl_timeout)),
        ],
    )
    _configure_deepspeed(accelerator, args)
    _open_waiting_room(accelerator)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def unwrap(accelerator, model):
    """The plain transformer: no DDP/DeepSpeed wrapper and no torch.compile wrapper (whose `_orig_mod.`
    prefix would otherwise end up in every saved key)."""
    try:
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    except TypeError:  # accelerate < 1.2 always strips the compile wrapper
        return accelerator.unwrap_model(model)


def save_artifact(accelerator, mode, transformer, directory, pipeline_class, dtype=None):
    """The mode's artifact (LoRA file or transformer/), written once, by the main process. Under ZeRO-3 / FSDP the
    weights are gathered first, so every rank must call this."""
    state = ckpt.gather_state_dict(accelerator, transformer, trainable_only=not mode.saves_frozen_weights)
    if accelerator.is_main_process:
        mode.save(unwrap(accelerator, transformer), directory, pipeline_class, dtype=dtype, state_dict=state)


def weight_dtype_of(accelerator):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def build_datasets(args, conditioning, transformer_config, accelerator):
    """(train dataset, held-out dataset or None, unusable samples). Cheap: no model is loaded yet."""
    if args.load_tensors:
        _warn_ignored_with_load_tensors(args)
        manifest = load_manifest(args.data_root)
        problems = manifest_problems(manifest, transformer_config, conditioning, args)
        if problems:
            raise UsageError(problems)
        items, skipped = _select_entries(args, manifest["entries"]), []
        listed = _select_entries(args, manifest["entries"], args.eval_video_column) if args.eval_video_column else []

        def make(entries):
            return PrecomputedDataset(args.data_root, entries)

    else:
        samples = load_samples(args.data_root, args.dataset_file, args.caption_column, args.video_column, args.id_token)
        items, skipped = assign_buckets(
            samples,
            args.frame_buckets,
            args.height_buckets,
            args.width_buckets,
            args.max_num_frames,
            args.skip_frames_start,
            args.skip_frames_end,
        )
        if not items:
            reasons = [f"entry {s.index + 1} ({s.video_path}): {s.reason}" for s in skipped[:10]]
            raise UsageError(["no usable sample: every clip was skipped"] + reasons)
        report_notes(data_notes(items, args.video_reshape_mode), args, accelerator)
        listed = []
        if args.eval_video_column or args.eval_dataset_file:
            eval_samples = load_samples(
                args.data_root,
                args.eval_dataset_file,
                args.eval_caption_column or args.caption_column,
                args.eval_video_column or args.video_column,
                args.id_token,
            )
            listed, eval_skipped = assign_buckets(
                eval_samples, args.frame_buckets, args.height_buckets, args.width_buckets, args.max_num_frames,
                args.skip_frames_start, args.skip_frames_end,
            )
            skipped = skipped + [replace(s, reason=f"held-out list: {s.reason}") for s in eval_skipped]

        def make(bucketed):
            return VideoDataset(
                bucketed, args.video_reshape_mode, args.random_flip, conditioning.image_to_video, seed=args.seed or 0
            )

    train, held_out = split_for_eval(items, args.eval_split, args.seed or 0)
    held_out = held_out or listed
    if args.eval_split and not train:
        raise UsageError(f"--eval_split {args.eval_split} leaves no sample to train on ({len(items)} usable)")
    return make(train), (make(held_out) if held_out else None), skipped


RAW_DATA_FLAGS = ("height_buckets", "width_buckets", "max_num_frames", "skip_frames_start", "skip_frames_end",
                  "video_reshape_mode", "random_flip", "dataset_file")


def _warn_ignored_with_load_tensors(args):
    defaults = vars(parse_args(["--pretrained_model_name_or_path", "-"]))
    changed = [f"--{name}" for name in RAW_DATA_FLAGS if getattr(args, name) != defaults[name]]
    if changed:
        logger.warning(
            "%s ignored with --load_tensors: clips were sampled, resized and captioned by prepare_dataset.py "
            "(pass these to it instead)", ", ".join(changed)
        )


def _select_entries(args, entries, column=None):
    """With --video_column naming a list in the prepared folder, train on those entries, in that order."""
    listing = Path(args.data_root) / (column or args.video_column)
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


NOTES_REPORT = "data_notes.jsonl"


def _write_and_warn(entries, path, accelerator, headline):
    if accelerator.is_main_process:
        write_skip_report(entries, path)
    logger.warning("%d %s, all listed in %s; the first:", len(entries), headline, path)
    for entry in entries[:5]:
        logger.warning("  entry %d (%s): %s", entry.index + 1, entry.video_path, entry.reason)


def report_notes(notes, args, accelerator):
    """Samples that train but deserve a look (duplicates, upscaling, stretching): warned and listed."""
    if notes:
        _write_and_warn(notes, Path(args.output_dir) / NOTES_REPORT, accelerator, "note(s) about the data")


def report_skipped(skipped, args, accelerator):
    """Unusable samples stop the run before any model loads, unless --skip_bad_samples; listed either way."""
    if not skipped:
        return
    path = Path(args.output_dir) / SKIP_REPORT
    if not args.skip_bad_samples:
        if accelerator.is_main_process:
            write_skip_report(skipped, path)
        raise bad_sample_error(skipped, path)
    _write_and_warn(skipped, path, accelerator, "sample(s) skipped")


def build_dataloader(args, dataset, accelerator, shuffle=True):
    sampler = BucketBatchSampler(
        dataset.bucket_keys,
        batch_size=args.train_batch_size,
        shuffle=shuffle,
        drop_last=False,
        seed=args.seed or 0,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.pin_memory and torch.cuda.is_available(),
        # Its own generator: making an iterator must not draw from the global RNG, or a resumed
        # run's noise would differ from an uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed or 0),
    )
    return loader, sampler


def load_models(args, accelerator, weight_dtype, transformer_config, conditioning):
    """Transformer and scheduler always; T5 only to encode raw captions; the VAE for raw videos or I2V images."""
    from diffusers import AutoencoderKLCogVideoX

    device = accelerator.device
    transformer = conditioning.adapt_transformer(load_transformer(args, weight_dtype), args)
    vae_config = AutoencoderKLCogVideoX.load_config(
        args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision, cache_dir=args.cache_dir
    )
    context = Context(
        args=args,
        accelerator=accelerator,
        weight_dtype=weight_dtype,
        transformer_config=dict(transformer_config),
        vae_scaling_factor=vae_config["scaling_factor"],
        vae_invert_scale_latents=bool(vae_config.get("invert_scale_latents", False)),
        vae_spatial_scale=vae_scale_factor_spatial(vae_config),
        scheduler=load_training_scheduler(args),
    )
    if args.offload_activations:
        pin = accelerator.device.type == "cuda"
        context.saved_tensors = lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin)
    if not args.load_tensors:
        context.tokenizer = load_tokenizer(args)
        context.text_encoder = load_text_encoder(args, weight_dtype).to(device).requires_grad_(False).eval()
    if not args.load_tensors or conditioning.needs_vae:
        context.vae = load_vae(args, weight_dtype).to(device).requires_grad_(False).eval()
    return transformer, context


# ----------------------------------------------------------------------------------------------
# One optimizer step's worth of work
# ----------------------------------------------------------------------------------------------


def compute_loss(transformer, batch, context, conditioning, timestep=None):
    """Diffusion loss of one micro-batch: v-prediction, scored in x0 space with 1/(1 - alpha_bar) weights.

    Timesteps are drawn uniformly, or all equal to `timestep` (held-out evaluation)."""
    device, dtype = context.accelerator.device, context.weight_dtype
    scheduler = context.scheduler
    if batch["video_latent_dist"] is not None:
        distribution = batch["video_latent_dist"].to(device, non_blocking=True)
        prompt_embeds = batch["prompt_embeds"].to(device, dtype=dtype, non_blocking=True)
    else:
        distribution = encode_video_distribution(context.vae, batch["video"].to(device, non_blocking=True))
        prompt_embeds = encode_prompts(
            context.tokenizer,
            context.text_encoder,
            batch["prompt"],
            context.transformer_config["max_text_seq_length"],
            device,
            dtype,
        )
    latents = sample_latents(distribution.float(), context.vae_scaling_factor)  # fp32 [B, F, C, H, W]
    batch_size, latent_frames, _, latent_height, latent_width = latents.shape

    # Noise is mixed in fp32: in bf16, alpha_bar near 1 rounds to exactly 1 (no noise at the smallest t).
    noise = torch.randn_like(latents)
    if timestep is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device).long()
    else:
        timesteps = torch.full((batch_size,), timestep, device=device, dtype=torch.long)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    model_input = conditioning.model_input(noisy.to(dtype), batch, context)
    rotary = rotary_embeddings(context.transformer_config, latent_frames, latent_height, latent_width, device)

    with context.saved_tensors():
        prediction = transformer(
            hidden_states=model_input,
            encoder_hidden_states=prompt_embeds,
            timestep=timesteps,
            image_rotary_emb=rotary,
            return_dict=False,
            **conditioning.transformer_kwargs(noisy, context),
        )[0]
    predicted_x0 = scheduler.get_velocity(prediction.float(), noisy, timesteps)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)[timesteps]
    weights = (1.0 / (1.0 - alphas_cumprod)).view(-1, 1, 1, 1, 1)
    per_sample = (weights * (predicted_x0 - latents) ** 2).reshape(batch_size, -1).mean(dim=1)
    return per_sample.mean()


# ----------------------------------------------------------------------------------------------
# Validation and the final test
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(transformer, loader, context, conditioning, args):
    """Mean loss over the held-out samples and --eval_timesteps, with noise fixed per (batch, timestep).

    Runs inside a forked RNG, so training's random stream (and exact resume) is untouched."""
    accelerator = context.accelerator
    model = unwrap(accelerator, transformer)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=accelerator.device)
    count = 0
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    for batch_index, batch in enumerate(loader):
        for timestep in args.eval_timesteps:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed((args.seed or 0) * 1_000_003 + batch_index * 1009 + timestep)
                total += compute_loss(model, batch, context, conditioning, timestep=timestep).detach()
            count += 1
    model.train(was_training)
    return accelerator.reduce(total / max(count, 1), reduction="mean").item()


def _slug(text, length=25):
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text[:length]).strip("_") or "prompt"


def generate_videos(pipe, cases, args, device, output_dir, tag):
    """Generate every validation case with one seeded generator; write mp4s; return (path, frames) pairs."""
    from diffusers.utils import export_to_video

    if args.enable_model_cpu_offload and torch.device(device).type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed if args.seed is not None else 42)
    num_frames = args.validation_num_frames or max(args.frame_buckets)
    results = []
    for case_index, case in enumerate(cases):
        for video_index in range(args.num_validation_videos):
            frames = pipe(
                **case,
                height=args.height,
                width=args.width,
                num_frames=num_frames,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                use_dynamic_cfg=args.use_dynamic_cfg,
                max_sequence_length=pipe.transformer.config.max_text_seq_length,
                generator=generator,
                output_type="np",
            ).frames[0]
            path = Path(output_dir) / f"{tag}_video_{case_index}_{video_index}_{_slug(case['prompt'])}.mp4"
            export_to_video(list(frames), str(path), fps=args.fps)
            results.append((path, frames))
    return results


def build_pipeline(args, conditioning, dtype, **components):
    """The validation/test pipeline from the base model; `components` replace the ones on disk."""
    from diffusers import CogVideoXDPMScheduler

    pipe = conditioning.pipeline_class.from_pretrained(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        torch_dtype=dtype,
        **components,
    )
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    if args.enable_slicing:
        pipe.vae.enable_slicing()
    if args.enable_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def log_videos(accelerator, results, tag, step):
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Video(str(path), caption=path.stem, fps=8) for path, _ in results]}, step=step)


def run_validation(args, conditioning, context, transformer, step, tag="validation"):
    """Validation videos from the in-training model. Every rank calls this, at the same point.

    Whole weights on every rank (one process, DDP, ZeRO-1/2): the main process generates while the others wait in
    `_wait_for_main` (a gloo group with a long timeout), not in the next NCCL collective, which a validation longer
    than --nccl_timeout would abort. Sharded weights (ZeRO-3, FSDP): each forward gathers its layers from every rank,
    so every rank runs the same pipeline calls in step (same prompts, same seed); only the main process keeps them."""
    import copy
    import tempfile

    accelerator = context.accelerator
    cases = conditioning.validation_cases(args)
    if not cases:
        return
    sharded = ckpt.weights_sharded(accelerator)
    main = accelerator.is_main_process
    if not sharded and not main:
        _wait_for_main(accelerator)
        return
    logger.info("running validation at step %d: %d prompt(s)", step, len(cases))
    logger.info(memory.format_stats("before validation", memory.memory_stats(accelerator.device)))
    if sharded and args.enable_model_cpu_offload:
        # Offload hooks would move a sharded transformer (and DeepSpeed's own parameter offload) around.
        logger.warning("--enable_model_cpu_offload is ignored for validation while the weights are sharded")
        args = copy.copy(args)
        args.enable_model_cpu_offload = False
    # FSDP1 gathers the top-level weights in its root wrapper; ZeRO-3 and FSDP2 hook the module itself.
    fsdp1 = ckpt.engine_kind(accelerator) == "fsdp" and not accelerator.is_fsdp2
    model = transformer if fsdp1 else unwrap(accelerator, transformer)
    was_training = model.training
    model.eval()
    encoders = {}  # reuse what training already holds in memory
    if context.text_encoder is not None:
        encoders.update(text_encoder=context.text_encoder, tokenizer=context.tokenizer)
    if context.vae is not None:
        encoders.update(vae=context.vae)
    pipe = build_pipeline(args, conditioning, context.weight_dtype, transformer=model, **encoders)
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        output_dir = args.output_dir if main else scratch  # the other ranks' copies are thrown away
        results = generate_videos(pipe, cases, args, accelerator.device, output_dir, f"{tag}_step{step}")
    if args.enable_model_cpu_offload:
        # Offloading parked the modules shared with training on the CPU, behind hooks: bring them back.
        pipe.remove_all_hooks()
        for module in (model, context.vae, context.text_encoder):
            if module is not None:
                module.to(accelerator.device)
    if main:
        context.last_validation = results
        log_videos(accelerator, results, tag, step)
    del pipe
    memory.free_memory()
    model.train(was_training)
    logger.info(memory.format_stats("after validation", memory.memory_stats(accelerator.device)))
    if not sharded:
        _wait_for_main(accelerator)


def final_test(args, conditioning, mode, context):
    """Load the saved artifact into a fresh pipeline, as a user would, and generate.

    The videos must equal the last in-training validation (same prompts, same seed): a
    mismatch means the saved file does not reproduce what was trained, so we say so loudly.
    """
    cases = conditioning.validation_cases(args)
    if not cases:
        return None
    accelerator = context.accelerator
    # Nothing reused from training: the pipeline is built from files, as a user would.
    artifact = mode.inference_components(args.output_dir, context.weight_dtype)
    if args.quantize_base == "nf4" and "transformer" not in artifact:
        artifact["transformer"] = load_transformer(args, context.weight_dtype)  # quantized as in training
    pipe = build_pipeline(args, conditioning, context.weight_dtype, **artifact)
    conditioning.adapt_transformer(pipe.transformer, args)
    mode.apply_to_pipeline(pipe, args.output_dir)
    prepare_frozen_base(pipe.transformer, args, context.weight_dtype)  # FP8 storage as in training, if chosen
    with torch.no_grad():
        results = generate_videos(pipe, cases, args, accelerator.device, args.output_dir, "test")
    log_videos(accelerator, results, "test", 0)
    parity = None
    if context.last_validation:
        import numpy as np

        differences = [
            float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
            for (_, a), (_, b) in zip(context.last_validation, results)
        ]
        parity = {"max_abs_difference": max(differences), "exact": all(d == 0.0 for d in differences)}
        if parity["exact"]:
            logger.info("parity: the saved %s reproduces the last validation videos exactly", mode.name)
        else:
            logger.warning(
                "parity check: saved weights give videos differing from the last validation by up to %.3g "
                "(expected 0 in fp32; small differences are rounding in reduced precision)",
                parity["max_abs_difference"],
            )
    del pipe
    memory.free_memory()
    return parity


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def dry_run_plan(args, dataset, eval_dataset, skipped, sampler, steps_per_epoch, max_train_steps, num_epochs,
                 transformer_config, conditioning, mode, weight_dtype, accelerator):
    """What the run would do, printed and returned; nothing is loaded but configs."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import AutoConfig

    from .memory_estimate import estimate_phases

    with init_empty_weights():
        transformer = CogVideoXTransformer3DModel.from_config(transformer_config)
    mode.prepare(transformer, args)
    buckets = {}
    for key in dataset.bucket_keys:
        buckets[key] = buckets.get(key, 0) + 1
    where = dict(revision=args.revision, cache_dir=args.cache_dir)
    vae_config = AutoencoderKLCogVideoX.load_config(args.pretrained_model_name_or_path, subfolder="vae", **where)
    text_encoder_config = AutoConfig.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder",
                                                     **where)
    phases = estimate_phases(args, transformer_config, vae_config, text_encoder_config, conditioning, mode,
                             weight_dtype, buckets)
    plan = {
        "samples_for_training": len(dataset),
        "samples_held_out": len(eval_dataset) if eval_dataset else 0,
        "samples_unusable": [f"entry {s.index + 1} ({s.video_path}): {s.reason}" for s in skipped],
        "buckets": {f"{f}x{h}x{w}": n for (f, h, w), n in sorted(buckets.items())},
        "batches_per_epoch_per_process": len(sampler),
        "optimizer_steps_per_epoch": steps_per_epoch,
        "optimizer_steps": max_train_steps,
        "epochs": num_epochs,
        "processes": accelerator.num_processes,
        "transformer_parameters": count_parameters(transformer.parameters()),
        "trainable_parameters": count_parameters(mode.trainable_parameters(transformer)),
        "peak_memory_gib": {k: (round(v / 2**30, 3) if k in ("training", "validation", "final_test") else v)
                            for k, v in phases.items()},
        "peak_memory_bytes": phases,
    }
    if accelerator.is_main_process:
        print("dry run: nothing will be trained")
        for key, value in plan.items():
            if key == "peak_memory_bytes":
                continue
            if key == "samples_unusable":
                print(f"  {key}: {len(value)}" + ("" if args.skip_bad_samples or not value else " (the run would stop: "
                                                    "fix them or pass --skip_bad_samples)"))
                for line in value:
                    print(f"    {line}")
            else:
                print(f"  {key}: {value}")
        print("  peak_memory_gib: per process, for the largest bucket, simulated with the real training code on "
              "fake tensors; CUDA context, kernel workspaces and allocator cache come on top (docs/memory.md)")
    return plan


def _tracker_config(args):
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in vars(args).items()}


def run(argv, conditioning, mode):
    """Parse, validate, train, save, test. Returns a summary dict (also written as summary.json)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    args = parse_args(argv)
    # 1. Every check that needs no weights, before anything expensive.
    transformer_config = validate_training_args(args, conditioning, mode)

    accelerator = build_accelerator(args)
    if offload_runtime_problems(args, accelerator):
        raise UsageError(offload_runtime_problems(args, accelerator))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    if args.seed is not None:
        set_seed(args.seed, device_specific=True)  # each rank its own noise; rank 0 as a single process
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    weight_dtype = weight_dtype_of(accelerator)

    # 2. Data (cheap: headers only), so bad data fails before models load.
    dataset, eval_dataset, skipped = build_datasets(args, conditioning, transformer_config, accelerator)
    if not args.dry_run:  # a dry run lists them in its plan instead of stopping
        report_skipped(skipped, args, accelerator)
    dataloader, sampler = build_dataloader(args, dataset, accelerator)
    eval_loader = build_dataloader(args, eval_dataset, accelerator, shuffle=False)[0] if eval_dataset else None
    eval_every = args.eval_steps or args.checkpointing_steps
    eval_losses = {}
    steps_per_epoch = math.ceil(len(sampler) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    if args.dry_run:
        plan = dry_run_plan(args, dataset, eval_dataset, skipped, sampler, steps_per_epoch, max_train_steps, num_epochs,
                            transformer_config, conditioning, mode, weight_dtype, accelerator)
        accelerator.end_training()
        return {"dry_run": plan}

    # 3. Models. The trainable part is decided by the mode.
    transformer, context = load_models(args, accelerator, weight_dtype, transformer_config, conditioning)
    prepare_frozen_base(transformer, args, weight_dtype)  # before LoRA layers exist: they keep their precision
    mode.prepare(transformer, args)
    cast_frozen(transformer, weight_dtype)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.to(accelerator.device)
    parameters = mode.trainable_parameters(transformer)

    # 4. Optimizer and schedule. One step = one optimizer step.
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = build_optimizer(args, parameters)
    lr_scheduler = build_lr_scheduler(args, optimizer, max_train_steps)
    # The LR schedule is not passed to prepare(): accelerate would step it once per process (checkpoint.py saves it).
    # An offloaded optimizer keeps its states on the CPU: accelerate must not move them to the device.
    # (Only then: accelerate refuses any device_placement under DeepSpeed.)
    placement = None if offloaded_optimizer(optimizer) is None else [True, False]
    transformer, optimizer = accelerator.prepare(transformer, optimizer, device_placement=placement)
    parameters = mode.trainable_parameters(transformer)
    _register_checkpoint_hooks(accelerator, mode, conditioning)

    # 5. Resume.
    global_step, first_epoch, skip_batches = 0, 0, 0
    resume_path = ckpt.resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume_path is None:
        logger.info("no checkpoint in %s: starting a new run", args.output_dir)
    if resume_path is not None:
        ckpt.load_checkpoint(
            accelerator, resume_path, transformer, optimizer, lr_scheduler,
            lambda folder: mode.load(unwrap(accelerator, transformer), folder, conditioning.pipeline_class),
            read_model=lambda folder: mode.read(unwrap(accelerator, transformer), folder, conditioning.pipeline_class),
        )
        state = ckpt.read_state(resume_path)
        global_step, first_epoch, skip_batches = state["global_step"], state["epoch"], state["batches_in_epoch"]
        logger.info("resumed from %s at step %d", resume_path, global_step)

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_name or f"cogvideox-{mode.name}", config=_tracker_config(args))
    logger.info(
        "training %s %s: %d samples, %d batches per epoch, %d steps, %d trainable parameters, total batch %d",
        conditioning.name,
        mode.name,
        len(dataset),
        len(sampler),
        max_train_steps,
        count_parameters(parameters),
        args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
    )
    memory.reset_peak(accelerator.device)
    tracker = memory.start_allocation_tracking(transformer, optimizer, context)  # None unless asked for
    logger.info(memory.format_stats("before training", memory.memory_stats(accelerator.device)))

    # 6. The loop.
    progress = tqdm(
        total=max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    validated_at = None
    last_loss = None
    step_started = time.perf_counter()
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:  # e.g. resumed from the final checkpoint
            break
        transformer.train()
        start = skip_batches if epoch == first_epoch else 0
        sampler.set_epoch(epoch, start_batch=start)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        batches_in_epoch = start
        batches_this_epoch = len(sampler)
        accumulated = torch.zeros((), device=accelerator.device)
        micro = 0
        for batch in dataloader:
            if micro == 0:  # a new accumulation group; the epoch's last one may be shorter
                group_size = min(args.gradient_accumulation_steps, batches_this_epoch - batches_in_epoch)
            batches_in_epoch += 1
            micro += 1
            sync = micro == group_size
            with accelerator.no_sync(transformer) if not sync else contextlib.nullcontext():
                loss = compute_loss(transformer, batch, context, conditioning)
                backward(accelerator, loss / group_size, sync)
            accumulated += loss.detach()
            if not sync:
                continue
            grad_norm = clip_gradients(accelerator, optimizer, parameters, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            # Mean over ranks: every rank sees the same loss, so a NaN stops all of them together.
            mean_loss = accelerator.reduce(accumulated / micro, reduction="mean").item()  # one host sync per step
            accumulated.zero_()
            micro = 0
            ckpt.simulate_crash("step", global_step)
            if not math.isfinite(mean_loss):
                progress.close()  # end the bar's line so the error stands on its own
                last = ckpt.complete_checkpoints(args.output_dir)
                where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
                raise TrainingError(
                    f"loss became {mean_loss} at step {global_step}; stopping ({where}). "
                    "Try a lower --learning_rate, bf16 instead of fp16, or --max_grad_norm."
                )
            seconds = time.perf_counter() - step_started
            step_started = time.perf_counter()
            logs = {
                "loss": mean_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "s_per_step": seconds,
            }
            last_loss = mean_loss
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}", s_step=f"{seconds:.2f}")
            accelerator.log({k: v for k, v in logs.items() if v is not None}, step=global_step)

            if global_step % args.checkpointing_steps == 0:
                state = {"global_step": global_step, "epoch": epoch, "batches_in_epoch": batches_in_epoch}
                if batches_in_epoch == batches_this_epoch:  # epoch finished: resume at the next one
                    state.update(epoch=epoch + 1, batches_in_epoch=0)
                path = ckpt.save_checkpoint(
                    accelerator, args.output_dir, global_step, state, lr_scheduler, args.checkpoints_total_limit,
                    model=transformer, optimizer=optimizer,
                    save_model=lambda folder: save_artifact(accelerator, mode, transformer, folder,
                                                            conditioning.pipeline_class),
                )
                logger.info("saved checkpoint %s", path)
            if eval_loader is not None and (global_step % eval_every == 0 or global_step == max_train_steps):
                eval_losses[global_step] = evaluate(transformer, eval_loader, context, conditioning, args)
                accelerator.log({"eval_loss": eval_losses[global_step]}, step=global_step)
                logger.info("step %d: eval_loss %.5f (%d held-out samples)", global_step, eval_losses[global_step],
                            len(eval_dataset))
            if args.validation_steps and global_step % args.validation_steps == 0:
                run_validation(args, conditioning, context, transformer, global_step)
                validated_at = global_step
            if global_step >= max_train_steps:
                break
        if args.validation_epochs and (epoch + 1) % args.validation_epochs == 0 and validated_at != global_step:
            run_validation(args, conditioning, context, transformer, global_step)
            validated_at = global_step
        if global_step >= max_train_steps:
            break
    progress.close()
    accelerator.wait_for_everyone()

    # 7. The artifact first (nothing lost if what follows runs out of memory), then a last validation
    #    with the in-memory model, then a final test that loads the artifact back from disk.
    summary = {"global_step": global_step, "final_loss": last_loss, "skipped_samples": len(skipped),
               "eval_loss": eval_losses}
    if tracker is not None:
        tracker.__exit__(None, None, None)
        summary["tracked_training_peak_bytes"] = tracker.peak
    save_artifact(accelerator, mode, transformer, args.output_dir, conditioning.pipeline_class, dtype=weight_dtype)
    logger.info("saved %s", ", ".join(str(p) for p in mode.artifact_paths(args.output_dir)))
    final_validation = conditioning.validation_cases(args) and validated_at != global_step
    if final_validation and ckpt.weights_sharded(accelerator):
        # Sharded weights are only usable while the engine / FSDP is alive: validate before releasing anything.
        run_validation(args, conditioning, context, transformer, global_step)
        final_validation = False
    model = unwrap(accelerator, transformer)
    optimizer = lr_scheduler = None
    accelerator.free_memory()  # drops the prepared model and optimizer references held by accelerate
    memory.free_memory()
    if final_validation:  # every rank: the others wait for the main process
        run_validation(args, conditioning, context, model, global_step)
    # Free everything training held (encoders included) before the final test loads a fresh pipeline.
    model = transformer = None
    context.text_encoder = context.vae = context.tokenizer = None
    memory.free_memory()
    if accelerator.is_main_process:
        summary["parity"] = final_test(args, conditioning, mode, context)
        summary["memory_after_testing"] = memory.memory_stats(accelerator.device)
        logger.info(memory.format_stats("after testing", summary["memory_after_testing"]))
        if args.push_to_hub:
            _push_to_hub(args)
        (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return summary


def _register_checkpoint_hooks(accelerator, mode, conditioning):
    """accelerate saves optimizer/scheduler/RNG; the mode saves the model its own way (LoRA only, not the base).
    Plain and DDP runs only: under DeepSpeed and FSDP checkpoint.save_checkpoint writes the state itself."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                mode.save(unwrap(accelerator, model), output_dir, conditioning.pipeline_class)
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            mode.load(unwrap(accelerator, model), input_dir, conditioning.pipeline_class)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _push_to_hub(args):
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or Path(args.output_dir).name
    repo_id = create_repo(repo_id, exist_ok=True, token=args.hub_token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        token=args.hub_token,
        ignore_patterns=["checkpoint-*", ".checkpoint-*", "logs/*"],
        commit_message="CogVideoX fine-tune",
    )


def trainer_main(conditioning, mode):
    """The `main(argv)` of an entry point: e.g. trainer_main("image-to-video", "sft")."""

    @exit_on_usage_error
    def main(argv=None):
        return run(argv, conditioning=CONDITIONINGS[conditioning](), mode=MODES[mode]())

    main.__doc__ = f"CogVideoX {conditioning} {mode} training."
    return main
