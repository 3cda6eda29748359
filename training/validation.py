"""Checks of the model while and after it trains: the held-out evaluation loss, validation videos, and the final
test, which loads the saved artifact into a fresh pipeline as a user would and compares its videos with the last
validation (the parity check).
"""

import contextlib
import dataclasses
import inspect
import logging
import re
import tempfile
from pathlib import Path

import torch

from . import block_swap, memory
from .models import Pretrained, load_transformer, prepare_frozen_base
from .report import picture_files
from .step import compute_loss


logger = logging.getLogger("cogvideox_factory")


@torch.no_grad()
def evaluate(transformer, loader, context, conditioning, backend, timesteps, seed):
    """Mean loss over the held-out samples and `timesteps` (--eval_timesteps), with noise fixed per (batch, timestep)
    by `seed` (--seed).

    Runs inside a forked RNG, so training's random stream (and exact resume) is untouched. The model runs as
    validation runs it (`backend.model_for_inference`: under FSDP1 the root wrapper, which gathers the weights)."""
    model = backend.model_for_inference(transformer)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=backend.device)
    count = 0
    devices = [backend.device] if backend.device.type == "cuda" else []
    for batch_index, batch in enumerate(loader):
        for timestep in timesteps:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed((seed or 0) * 1_000_003 + batch_index * 1009 + timestep)
                total += compute_loss(model, batch, context, conditioning, timestep=timestep).detach()
            count += 1
    model.train(was_training)
    return backend.reduce_mean(total / max(count, 1)).item()


class Validation:
    """Validation videos from the model in training, and the final test of the saved artifact.

    It reads the [validation] flags, [model] (the pipeline), [training] (--output_dir, --seed,
    --ignore_learned_positional_embeddings) and [memory] (--quantize_base). `num_frames` comes from the run's settings
    (--validation_num_frames, or the largest frame bucket; checked against the model's frame rule either way).
    `last_videos` keeps the last validation's frames for the parity check; `validated_at` the step it ran at."""

    def __init__(self, model, training, validation, memory, num_frames, conditioning, backend):
        self.model = model
        self.training = training
        self.validation = validation
        self.memory = memory
        self.num_frames = num_frames
        self.conditioning = conditioning
        self.backend = backend
        self.last_videos = []
        self.validated_at = None
        self.pictures = None  # (prompts, videos, sheet, gifs) of the latest validation or test, for the model card

    @property
    def has_cases(self):
        return bool(self.conditioning.validation_cases(self.validation))

    def run(self, context, transformer, step, tag="validation"):
        """Validation videos from the in-training model. Every rank calls this, at the same point.

        Whole weights on every rank (one process, DDP, ZeRO-1/2): the main process generates while the others wait
        in the backend's waiting room (a gloo group with a long timeout), not in the next NCCL collective, which a
        validation longer than --nccl_timeout would abort. Sharded weights (ZeRO-3, FSDP): each forward gathers its
        layers from every rank, so every rank runs the same pipeline calls in step (same prompts, same seed); only
        the main process keeps the videos."""
        validation, backend = self.validation, self.backend
        cases = self.conditioning.validation_cases(validation)
        self.validated_at = step
        if not cases:
            return
        sharded, main = backend.weights_sharded, backend.is_main_process
        if not sharded and not main:
            backend.wait_for_main()
            return
        logger.info("running validation at step %d: %d prompt(s)", step, len(cases))
        logger.info(memory.format_stats("before validation", memory.memory_stats(backend.device)))
        if sharded and validation.enable_model_cpu_offload:
            # Offload hooks would move a sharded transformer (and DeepSpeed's own parameter offload) around.
            logger.warning("--enable_model_cpu_offload is ignored for validation while the weights are sharded")
            validation = dataclasses.replace(validation, enable_model_cpu_offload=False)
        model = backend.model_for_inference(transformer)
        was_training = model.training
        model.eval()
        encoders = {}  # reuse what training already holds in memory
        if context.text_encoder is not None:
            encoders.update(text_encoder=context.text_encoder, tokenizer=context.tokenizer)
        if context.vae is not None:
            encoders.update(vae=context.vae)
        pipe = build_pipeline(self.model, validation, self.conditioning, context.weight_dtype, transformer=model,
                              **encoders)
        shared = kept_by_training(model, (context.vae, context.text_encoder), backend.device)
        # Whole sequences: under DDP only the main process generates (no shard group to exchange with).
        shards_paused = context.sequence_shards.paused() if context.sequence_shards else contextlib.nullcontext()
        with tempfile.TemporaryDirectory() as scratch, torch.no_grad(), shards_paused:
            output_dir = self.training.output_dir if main else scratch  # the other ranks' copies are thrown away
            videos = generate_videos(pipe, cases, validation, self.training.seed, self.num_frames, backend.device,
                                     output_dir, f"{tag}_step{step}")
        if validation.enable_model_cpu_offload:
            return_after_offload(pipe, shared)
        if main:
            self.last_videos = videos
            self._show(cases, videos, f"{tag}_step{step}", tag, step)
        del pipe
        memory.free_memory()
        model.train(was_training)
        logger.info(memory.format_stats("after validation", memory.memory_stats(backend.device)))
        if not sharded:
            backend.wait_for_main()

    def run_ema(self, context, transformer, step, ema):
        """`run` with the EMA weights (ema.EMA, --validate_ema) swapped in and back: videos validation_ema_step<N>_*.
        The parity check and the model card keep the trained weights' videos."""
        kept = self.last_videos, self.pictures
        with ema.swapped_in():
            self.run(context, transformer, step, tag="validation_ema")
        self.last_videos, self.pictures = kept

    def final_test(self, mode, weight_dtype, step):
        """Load the saved artifact into a fresh pipeline, as a user would, and generate (main process only).

        The videos must equal the last in-training validation (same prompts, same seed): a mismatch means the saved
        file does not reproduce what was trained, so we say so loudly. Returns the parity figures, or None."""
        training, conditioning = self.training, self.conditioning
        cases = conditioning.validation_cases(self.validation)
        if not cases:
            return None
        # Nothing reused from training: the pipeline is built from files.
        artifact = mode.inference_components(training.output_dir, weight_dtype)
        if self.memory.quantize_base == "nf4" and "transformer" not in artifact:  # quantized as in training
            artifact["transformer"] = load_transformer(Pretrained.of(self.model, self.memory, training), weight_dtype)
        pipe = build_pipeline(self.model, self.validation, conditioning, weight_dtype, **artifact)
        conditioning.adapt_transformer(pipe.transformer, training)
        mode.apply_to_pipeline(pipe, training.output_dir)
        prepare_frozen_base(pipe.transformer, self.memory.quantize_base, weight_dtype)  # FP8 storage as in training
        if self.memory.blocks_to_swap:  # as in training: the swapped blocks' weights stay on the host
            pipe.transformer.requires_grad_(False)
            block_swap.install(pipe.transformer, self.memory.blocks_to_swap, self.backend.device)
        with torch.no_grad():
            videos = generate_videos(pipe, cases, self.validation, training.seed, self.num_frames, self.backend.device,
                                     training.output_dir, "test")
        self._show(cases, videos, "test", "test", step)  # wandb drops entries logged at an earlier step
        del pipe
        memory.free_memory()
        return self._parity(videos, mode)

    def _show(self, cases, videos, name, tag, step):
        """Contact sheet and GIFs beside the mp4s, all of them to the trackers (main process)."""
        validation = self.validation
        prompts = [case["prompt"] for case in cases for _ in range(validation.num_validation_videos)]
        images = [case["image"] for case in cases for _ in range(validation.num_validation_videos) if "image" in case]
        sheet, gifs = picture_files(videos, prompts, self.training.output_dir, name, validation.fps, images or None)
        self.pictures = (prompts, videos, sheet, gifs)
        log_videos(self.backend, videos, tag, step, validation.fps, sheet=sheet, gifs=gifs)

    def _parity(self, videos, mode):
        if not self.last_videos:
            return None
        import numpy as np

        differences = [
            float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
            for (_, a), (_, b) in zip(self.last_videos, videos)
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
        return parity


def _slug(text, length=25):
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text[:length]).strip("_") or "prompt"


def kept_by_training(transformer, encoders, device):
    """(module, device) of each module validation shares with training, where training keeps it: the transformer on
    `device`, each encoder where it is now (--low_vram's: in CPU memory)."""
    return [(transformer, device)] + [(module, module.device) for module in encoders if module is not None]


def return_after_offload(pipe, shared):
    """After --enable_model_cpu_offload, which parks the pipeline's modules in CPU memory behind hooks: the hooks
    removed, each module shared with training back where training keeps it (`shared`: (module, device) pairs taken
    before validation). --low_vram's encoders wait in CPU memory and come to the GPU for their own calls: moving them
    to the GPU here would hold them there, next to the transformer, until their next call."""
    pipe.remove_all_hooks()
    for module, device in shared:
        module.to(device)


def generate_videos(pipe, cases, validation, seed, num_frames, device, output_dir, tag):
    """Generate every validation case with one generator seeded by `seed` (--seed; 42 when None), as the [validation]
    flags say; write mp4s; return (path, frames) pairs."""
    from diffusers.utils import export_to_video

    if validation.enable_model_cpu_offload and torch.device(device).type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    generator = torch.Generator(device="cpu").manual_seed(seed if seed is not None else 42)
    # CogVideoXFunControlPipeline takes its frame count from the control video (the case's), and no num_frames.
    frame_count = {"num_frames": num_frames} if "num_frames" in inspect.signature(pipe.__call__).parameters else {}
    results = []
    for case_index, case in enumerate(cases):
        for video_index in range(validation.num_validation_videos):
            frames = pipe(
                **case,
                height=validation.height,
                width=validation.width,
                **frame_count,
                num_inference_steps=validation.num_inference_steps,
                guidance_scale=validation.guidance_scale,
                use_dynamic_cfg=validation.use_dynamic_cfg,
                max_sequence_length=pipe.transformer.config.max_text_seq_length,
                generator=generator,
                output_type="np",
            ).frames[0]
            path = Path(output_dir) / f"{tag}_video_{case_index}_{video_index}_{_slug(case['prompt'])}.mp4"
            export_to_video(list(frames), str(path), fps=validation.fps)
            results.append((path, frames))
    return results


def build_pipeline(model, validation, conditioning, dtype, **components):
    """The validation/test pipeline from the base model ([model]), VAE slicing/tiling as [validation] says;
    `components` replace the ones on disk."""
    import diffusers

    pipe = conditioning.pipeline_class.from_pretrained(
        model.pretrained_model_name_or_path,
        revision=model.revision,
        variant=model.variant,
        cache_dir=model.cache_dir,
        torch_dtype=dtype,
        **components,
    )
    pipe.scheduler = getattr(diffusers, conditioning.validation_scheduler).from_config(pipe.scheduler.config)
    if validation.enable_slicing:
        pipe.vae.enable_slicing()
    if validation.enable_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def log_videos(backend, results, tag, step, fps, sheet, gifs):
    """wandb: the mp4s, the GIFs and the sheet. TensorBoard: the sheet, and each GIF as an image (TensorBoard shows
    an animated GIF animated; its own add_video needs moviepy)."""
    for tracker in backend.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Video(str(path), caption=path.stem, fps=fps) for path, _ in results],
                         f"{tag}_preview": [wandb.Video(str(gif), caption=gif.stem) for gif in gifs],
                         f"{tag}_sheet": wandb.Image(str(sheet))}, step=step)
        elif tracker.name == "tensorboard":
            _tensorboard_images(tracker.writer, [(f"{tag}/sheet", sheet)] +
                                [(f"{tag}/{gif.stem}", gif) for gif in gifs], step)


def _tensorboard_images(writer, named_files, step):
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = []
    for name, path in named_files:
        with Image.open(path) as image:
            width, height = image.size
        values.append(Summary.Value(tag=name, image=Summary.Image(
            height=height, width=width, colorspace=3, encoded_image_string=Path(path).read_bytes())))
    writer.file_writer.add_summary(Summary(value=values), step)
    writer.flush()
