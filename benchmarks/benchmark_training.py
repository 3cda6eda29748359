"""Training memory and speed of CogVideoX fine-tuning, measured on the trainer's own code.

The transformer is built from the published configs with random weights (nothing is downloaded), fed
synthetic precomputed inputs of the real shapes (what `prepare_dataset.py --save_latents_and_embeddings`
stores), and trained by the trainer's own code: `training.args.parse_args` and `training.settings.model_problems`
check the flags, `training.backend` starts accelerate (or DeepSpeed/FSDP), `training.step.build_trainer` prepares
the transformer and builds the optimizer and schedule, and `training.step.train_step` is the step, the one the
trainer runs. T5 and the VAE are not part of it (as with `--load_tensors`); only image-to-video builds the VAE
encoder, because its trainer encodes the first frame at every step.

    python benchmarks/benchmark_training.py --model 5b --mode lora -- --rank 64 --gradient_checkpointing
    python benchmarks/benchmark_training.py --model 2b --mode sft --scale tiny -- --optimizer adamw --use_8bit
    python benchmarks/benchmark_training.py --sweep readme --output benchmarks/results/h100.jsonl
    python benchmarks/benchmark_training.py --markdown benchmarks/results/h100.jsonl

Flags after `--` (and any flag this script does not know) go to the trainer's parser unchanged, so new
trainer options work here without changes. One JSON row per configuration goes to stdout and, with
`--output`, is appended to a JSONL file. See benchmarks/README.md for what each figure means.
"""

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `training` and `tools` importable
    sys.path.insert(0, str(ROOT))

from tools.build_tiny_model import SCHEDULER_CONFIG  # noqa: E402  the published CogVideoX scheduler_config.json
from training import memory  # noqa: E402
from training.args import UsageError, parse_args  # noqa: E402
from training.buckets import validation_frames  # noqa: E402
from training.models import latent_grid  # noqa: E402
from training.modes import count_parameters  # noqa: E402


SCRIPT = Path(__file__).resolve()

# ----------------------------------------------------------------------------------------------
# The models: published configs (transformer/config.json, scheduler/scheduler_config.json and
# vae/config.json of the THUDM repositories), spelled with the diffusers field names.
# ----------------------------------------------------------------------------------------------

# CogVideoX-2b's transformer/config.json; the other models change only the fields listed with them.
TRANSFORMER_2B = dict(
    activation_fn="gelu-approximate",
    attention_bias=True,
    attention_head_dim=64,
    dropout=0.0,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=16,
    max_text_seq_length=226,
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    num_attention_heads=30,
    num_layers=30,
    out_channels=16,
    patch_size=2,
    patch_size_t=None,
    patch_bias=True,
    sample_frames=49,
    sample_height=60,
    sample_width=90,
    spatial_interpolation_scale=1.875,
    temporal_compression_ratio=4,
    temporal_interpolation_scale=1.0,
    text_embed_dim=4096,
    time_embed_dim=512,
    timestep_activation_fn="silu",
    ofs_embed_dim=None,
    use_rotary_positional_embeddings=False,
    use_learned_positional_embeddings=False,
)
TRANSFORMER_5B = dict(TRANSFORMER_2B, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)

# CogVideoX-2b's vae/config.json (5b and 1.5 change the scaling; 1.5 also inverts it for image latents).
VAE_2B = dict(
    act_fn="silu",
    block_out_channels=(128, 256, 256, 512),
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    force_upcast=True,
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    layers_per_block=3,
    norm_eps=1e-6,
    norm_num_groups=32,
    sample_height=480,
    sample_width=720,
    scaling_factor=1.15258426,
    temporal_compression_ratio=4,
    use_quant_conv=False,
    use_post_quant_conv=False,
    invert_scale_latents=False,
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One published model: its configs and the clip sizes it trains and generates at (frames, height, width)."""

    model_id: str
    transformer: dict
    snr_shift_scale: float  # the one scheduler field that differs: 3.0 for 2b, 1.0 for the 5b models
    vae: dict
    conditioning: str
    train_video: tuple  # also the validation size: the trainer validates at the largest frame bucket

    @property
    def scheduler(self):
        return dict(SCHEDULER_CONFIG, snr_shift_scale=self.snr_shift_scale)


MODELS = {
    "2b": ModelSpec("THUDM/CogVideoX-2b", TRANSFORMER_2B, 3.0, VAE_2B, "text-to-video", (49, 480, 720)),
    "5b": ModelSpec("THUDM/CogVideoX-5b", TRANSFORMER_5B, 1.0, dict(VAE_2B, scaling_factor=0.7), "text-to-video",
                    (49, 480, 720)),
    "5b-i2v": ModelSpec(
        "THUDM/CogVideoX-5b-I2V", dict(TRANSFORMER_5B, in_channels=32, use_learned_positional_embeddings=True), 1.0,
        dict(VAE_2B, scaling_factor=0.7), "image-to-video", (49, 480, 720),
    ),
    # 1.5 generates 81 frames at 768x1360 (its pipeline pads 21 latent frames to 22); the trainer needs the latent
    # frame count to be a multiple of patch_size_t (its 8k-3 rule), so it trains and validates at 77 (20 latent).
    "1.5-5b": ModelSpec(
        "THUDM/CogVideoX1.5-5B",
        dict(TRANSFORMER_5B, patch_size_t=2, patch_bias=False, sample_height=96, sample_width=170, sample_frames=81),
        1.0, dict(VAE_2B, scaling_factor=0.7, invert_scale_latents=True), "text-to-video", (77, 768, 1360),
    ),
}

# --scale tiny: the same architectures, narrow and shallow, on clips small enough for a CPU.
TINY_TRANSFORMER = dict(
    num_layers=2, num_attention_heads=2, attention_head_dim=16, text_embed_dim=32, time_embed_dim=16,
    max_text_seq_length=16,
)
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=2)
TINY_SIZE = 64  # pixels: an 8x8 latent
TINY_FRAMES = {None: 9, 2: 13}  # by patch_size_t: 3 latent frames, or 4 (a multiple of 2) for 1.5


def tiny(spec):
    """The spec with every width shrunk and everything else (channels, patching, positions) kept."""
    frames = TINY_FRAMES[spec.transformer["patch_size_t"]]
    latent = TINY_SIZE // 8
    transformer = dict(spec.transformer, **TINY_TRANSFORMER, sample_height=latent, sample_width=latent, sample_frames=frames)
    if transformer["ofs_embed_dim"]:
        transformer["ofs_embed_dim"] = TINY_TRANSFORMER["time_embed_dim"]
    return dataclasses.replace(
        spec,
        transformer=transformer,
        vae=dict(spec.vae, **TINY_VAE, sample_height=TINY_SIZE, sample_width=TINY_SIZE),
        train_video=(frames, TINY_SIZE, TINY_SIZE),
    )


def model_spec(name, scale, trainer_flags=()):
    """The published model `name`; with --transformer_config among the trainer flags, its transformer replaced by
    that one (a size no published model has: what would it need?)."""
    spec = MODELS[name]
    flags = [str(flag) for flag in trainer_flags]
    if "--transformer_config" in flags:
        from training.args import read_transformer_config

        custom = read_transformer_config(flags[flags.index("--transformer_config") + 1])
        spec = dataclasses.replace(spec, transformer={k: v for k, v in custom.items() if not k.startswith("_")})
    return tiny(spec) if scale == "tiny" else spec


# ----------------------------------------------------------------------------------------------
# Building the models
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random(model_class, config, dtype, device):
    """A model with random weights, created directly on `device` in `dtype` (no fp32 copy, no CPU detour): what
    `from_pretrained(..., torch_dtype=dtype)` gives the trainer, minus the download and the copy."""
    with torch.device(device), default_dtype(dtype):
        model = model_class(**config)
    # Position tables are computed in float64; from_pretrained(torch_dtype=...) casts them like every weight.
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    return model


def load_transformer_like_trainer(spec, pretrained, weight_dtype, device, scratch, through_loader):
    """The transformer as the trainer loads it (`training.models.load_transformer` of `pretrained`, a
    `training.models.Pretrained`), with random weights.

    By default random weights are built in place (seconds, even for 5b on a GPU). With `through_loader` they are
    written to `scratch` and read back by the trainer's own `training.models.load_transformer`, so whatever that
    does while loading (--quantize_base nf4 quantises there; later options may too) happens exactly as in training.
    """
    from diffusers import CogVideoXTransformer3DModel

    from training.models import load_transformer

    transformer = build_random(CogVideoXTransformer3DModel, spec.transformer, weight_dtype, device)
    if not through_loader:
        return transformer
    transformer.save_pretrained(Path(scratch) / "transformer")
    transformer = None
    memory.free_memory()
    return load_transformer(dataclasses.replace(pretrained, path=scratch), weight_dtype)


# ----------------------------------------------------------------------------------------------
# Measuring: saved activations, FLOPs, time
# ----------------------------------------------------------------------------------------------


class SavedTensorBytes(NamedTuple):
    activations: int  # bytes of the distinct storages saved for backward, weights and weight copies excluded
    weight_copies: int  # bytes of saved casts of weights (autocast's bf16 copies of fp32 weights, fp8 layers in bf16)
    result: object  # what `fn` returned


def saved_activation_bytes(fn, weights=()):
    """Run `fn()` (a forward pass) and measure the memory autograd keeps for backward.

    Every tensor saved for backward is seen through `torch.autograd.graph.saved_tensors_hooks` and counted once per
    storage (by data_ptr: views and tensors saved by several ops share it), so the figure is independent of the
    device and of allocator caching. Storages of `weights` (parameters, buffers) are not counted: they exist anyway.
    Casts of weights (autocast's bf16 copies of fp32 weights; FP8-stored layers cast to bf16 while they run) are
    counted apart in `weight_copies`: real memory held until backward, but proportional to the parameters rather than
    to the activations. With gradient checkpointing the block
    inputs that checkpoint keeps are seen too; what the blocks recompute in backward is not held, so not counted.
    """
    excluded = {tensor.untyped_storage().data_ptr() for tensor in weights}
    activations, weight_copies = {}, {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer and pointer not in excluded:
            target = weight_copies if _is_weight_copy(tensor) else activations
            target[pointer] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return SavedTensorBytes(sum(activations.values()), sum(weight_copies.values()), result)


def _is_weight_copy(tensor):
    """A weight in another dtype than it is stored in, or a view of one (matmuls save W.t()): a parameter whose data
    was cast for this layer only (diffusers layerwise casting, --quantize_base fp8), or autocast's cast of a trained
    fp32 weight."""
    base = tensor._base if tensor._base is not None else tensor
    if isinstance(base, torch.nn.Parameter):
        return True
    grad_fn = base.grad_fn
    return (
        grad_fn is not None
        and grad_fn.name() == "ToCopyBackward0"
        and any(type(node).__name__ == "AccumulateGrad" for node, _ in grad_fn.next_functions if node is not None)
    )


def transformer_forward_flops(config, batch_size, latent_frames, latent_height, latent_width, text_tokens=None):
    """Matmul FLOPs of one CogVideoXTransformer3DModel forward, from the config and the latent grid.

    A matmul of [m, k] by [k, n] is 2*m*k*n FLOPs; element-wise work (norms, activations, rotary) is not counted,
    matching `torch.utils.flop_counter.FlopCounterMode`. Per block, over the joint text+video sequence of S tokens
    with width D: q, k, v and out projections 4*D*D and the feed-forward 2*D*4D weights (2 FLOPs per weight and
    token), and attention 4*S^2*D (Q@K^T and P@V). Outside the blocks: the patch embedding (video tokens), the text
    projection (text tokens), the output projection (video tokens) and the per-sample time/adaLN projections.
    Returns {"linear", "attention", "embedding", "total"}: "embedding" (patch and text projections, part of
    "linear") is kept apart because its input needs no gradient.
    """
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    width = heads * head_dim
    patch, patch_t = config["patch_size"], config.get("patch_size_t") or 1
    video_tokens = (latent_frames // patch_t) * (latent_height // patch) * (latent_width // patch)
    text_tokens = config["max_text_seq_length"] if text_tokens is None else text_tokens
    sequence = text_tokens + video_tokens
    time_dim, ofs_dim = config["time_embed_dim"], config.get("ofs_embed_dim") or 0
    layers = config["num_layers"]

    block_weights_per_token = 4 * width * width + 2 * width * 4 * width
    block_weights_per_sample = 2 * time_dim * 6 * width  # norm1 and norm2 modulation (CogVideoXLayerNormZero)
    embedding = (
        video_tokens * config["in_channels"] * patch * patch * patch_t * width
        + text_tokens * config["text_embed_dim"] * width
    )
    output = video_tokens * width * patch * patch * patch_t * config["out_channels"]
    per_sample = (
        width * time_dim + time_dim * time_dim  # time embedding MLP
        + 2 * ofs_dim * ofs_dim  # ofs embedding MLP (1.5 image-to-video)
        + time_dim * 2 * width  # norm_out modulation
        + layers * block_weights_per_sample
    )
    linear = 2 * batch_size * (layers * sequence * block_weights_per_token + embedding + output + per_sample)
    attention = batch_size * layers * 4 * sequence * sequence * width
    return {
        "linear": linear,
        "attention": attention,
        "embedding": 2 * batch_size * embedding,
        "total": linear + attention,
    }


def training_step_flops(forward, base_weights_train):
    """Model FLOPs of forward + backward from `transformer_forward_flops` (gradient-checkpoint recompute excluded).

    Backward costs twice the forward where both input and weight gradients are computed, and once (input gradients
    only) for frozen weights, as in LoRA, whose small adapter matmuls are not counted. Attention is 3x either way.
    The embedding's input needs no gradient, so with trained weights it costs 2x, and nothing in backward when frozen.
    """
    linear_without_embedding = forward["linear"] - forward["embedding"]
    if base_weights_train:
        return 3 * forward["attention"] + 3 * linear_without_embedding + 2 * forward["embedding"]
    return 3 * forward["attention"] + 2 * linear_without_embedding + forward["embedding"]


# Dense bf16 tensor-core peaks (datasheets), matched against torch.cuda.get_device_name; specific names first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0))


def peak_tflops(device_name):
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


class Clock:
    """Timestamps on the device's timeline: CUDA events (no synchronisation inside the step) or perf_counter."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end):
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start


class TransformerTimer:
    """Forward and backward intervals of the transformer within a step.

    Forward: its forward pre-hook to its forward hook. Backward: from the moment the gradient of its output exists
    (the loss's share of backward is done) to the end of the backward call (nothing before the transformer needs a
    gradient, so its backward, checkpoint recomputation included, is the last work done).
    """

    def __init__(self, module, clock):
        self.clock = clock
        self.forward, self.backward = [], []
        self._backward_start = None
        self.handles = [
            module.register_forward_pre_hook(lambda module, args: self.forward.append([clock.mark(), None])),
            module.register_forward_hook(self._forward_end),
        ]

    def _forward_end(self, module, args, output):
        self.forward[-1][1] = self.clock.mark()
        prediction = output[0] if isinstance(output, tuple) else output.sample
        if prediction.requires_grad:
            prediction.register_hook(self._output_gradient)

    def _output_gradient(self, gradient):
        self._backward_start = self.clock.mark()

    def backward_finished(self):
        self.backward.append([self._backward_start, self.clock.mark()])

    def take(self):
        """(forward seconds, backward seconds) since the last call."""
        forward = sum(self.clock.seconds(start, end) for start, end in self.forward)
        backward = sum(self.clock.seconds(start, end) for start, end in self.backward)
        self.forward, self.backward = [], []
        return forward, backward

    def remove(self):
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------
# The validation-style pass (training is training.step.train_step itself)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def denoise(model, context, conditioning, validation, buckets):
    """The transformer's share of validation: `--num_inference_steps` denoising steps with classifier-free guidance
    (batch 2) at the validation size, as CogVideoXPipeline runs them with the DPM scheduler. No T5, no VAE decode.
    `validation`, `buckets`: the [validation] and [buckets] sections (size, frames, steps, guidance)."""
    from diffusers import CogVideoXDPMScheduler

    from training.models import rotary_embeddings

    dtype, device, config = context.weight_dtype, context.device, context.transformer_config
    was_training = model.training
    model.eval()
    latent_frames, latent_height, latent_width = latent_grid(validation_frames(validation, buckets), validation.height,
                                                             validation.width, config)
    shape = (1, latent_frames, config["out_channels"], latent_height, latent_width)
    scheduler = CogVideoXDPMScheduler.from_config(context.scheduler.config)
    scheduler.set_timesteps(validation.num_inference_steps, device=device)
    latents = torch.randn(shape, device=device, dtype=dtype) * scheduler.init_noise_sigma
    prompt_embeds = torch.randn(2, config["max_text_seq_length"], config["text_embed_dim"], device=device, dtype=dtype)
    # The image-to-video pipeline concatenates the encoded image's latents; their values do not matter here.
    image_latents = torch.zeros((2, *shape[1:]), device=device, dtype=dtype)
    with_image = config["in_channels"] == 2 * config["out_channels"]
    rotary = rotary_embeddings(config, latent_frames, latent_height, latent_width, device)
    previous_x0 = None
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = torch.cat([latents] * 2)
        if with_image:
            model_input = torch.cat([model_input, image_latents], dim=2)
        prediction = model(
            hidden_states=model_input,
            encoder_hidden_states=prompt_embeds,
            timestep=timestep.expand(2),
            image_rotary_emb=rotary,
            return_dict=False,
            **conditioning.transformer_kwargs(latents, context),
        )[0].float()
        unconditional, conditional = prediction.chunk(2)
        guided = unconditional + validation.guidance_scale * (conditional - unconditional)
        previous = scheduler.timesteps[index - 1] if index > 0 else None
        latents, previous_x0 = scheduler.step(guided, previous_x0, timestep, previous, latents, return_dict=False)
        latents = latents.to(dtype)
    model.train(was_training)


# ----------------------------------------------------------------------------------------------
# One configuration
# ----------------------------------------------------------------------------------------------


def base_trainer_argv(spec, output_dir):
    """Trainer flags describing the benchmark's data and defaults; user flags come after them and win."""
    frames, height, width = spec.train_video
    argv = [
        "--pretrained_model_name_or_path", spec.model_id,  # recorded only: the weights are random
        "--output_dir", output_dir,
        "--load_tensors",
        "--frame_buckets", frames, "--height_buckets", height, "--width_buckets", width, "--max_num_frames", frames,
        "--height", height, "--width", width,
        "--mixed_precision", "bf16",
        "--train_batch_size", 1,
        "--num_inference_steps", 2,
        "--lr_warmup_steps", 0,
        "--seed", 0,
    ]
    return [str(value) for value in argv]


def parse_trainer_flags(spec, scratch, trainer_flags, conditioning, mode, data_source):
    """(the trainer's flags for this configuration as sections (sections.RunFlags), the problems the trainer's own
    checks find that concern the model, the clip sizes and the optimizer: its data checks do not apply, there is no
    data)."""
    from training.sections import run_flags
    from training.settings import model_problems

    args = parse_args(base_trainer_argv(spec, scratch) + trainer_flags)  # --output_dir: nothing is written there
    flags = run_flags(args)
    return flags, model_problems(flags, spec.transformer, conditioning, mode, data_source)


def describe_optimizer(training, optimizer, memory):
    """The optimizer of the [optimizer] flags, with [memory]'s offloading and [training]'s master weights."""
    text = optimizer.optimizer
    if optimizer.use_torchao and (optimizer.use_8bit or optimizer.use_4bit):
        text += f" {'8' if optimizer.use_8bit else '4'}-bit (torchao)"
    elif optimizer.use_8bit:
        text += " 8-bit (bitsandbytes)"
    if memory.use_cpu_offload_optimizer:
        text += ", CPU offload" + (" + gradients" if memory.offload_gradients else "")
    if training.master_weight_dtype != "fp32":
        text += f", {training.master_weight_dtype} master weights"
    return text


def configuration_name(options, training, optimizer, lora, memory):
    """E.g. 5b-lora-r64-b1-gc, 2b-sft-adamw-8-bit-bitsandbytes-b4-gc."""
    parts = [options.model, options.mode]
    described = re.sub(r"[^a-z0-9]+", "-", describe_optimizer(training, optimizer, memory).lower()).strip("-")
    parts.append(f"r{lora.rank}" if options.mode == "lora" else described)
    if memory.quantize_base != "none":
        parts.append(memory.quantize_base)
    parts.append(f"b{training.train_batch_size}")
    if memory.gradient_checkpointing:
        parts.append("gc")
    if options.scale != "full":
        parts.append(options.scale)
    return "-".join(parts)


def device_name(device=None):
    """The GPU's name, or the CPU's; without `device`, the one accelerate will pick (for rows that fail before)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def memory_phase(device):
    """Start a phase: drop cached blocks and reset the peak, so that each phase reports its own peak. CUDA only: a
    CPU process's peak RSS cannot be reset, and collecting garbage there would only cost time."""
    if device.type == "cuda":
        memory.free_memory()
        memory.reset_peak(device)


def describe(options, buckets, training, optimizer, lora, validation, memory, spec):
    """The row's description of a configuration, from the trainer's flag sections."""
    frames, height, width = buckets.frame_buckets[0], buckets.height_buckets[0], buckets.width_buckets[0]
    is_lora = options.mode == "lora"
    return dict(
        name=configuration_name(options, training, optimizer, lora, memory),
        model_id=spec.model_id,
        rank=lora.rank if is_lora else None,
        lora_alpha=lora.lora_alpha if is_lora else None,
        batch=training.train_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        gradient_checkpointing=memory.gradient_checkpointing,
        optimizer=describe_optimizer(training, optimizer, memory),
        quantize_base=memory.quantize_base,
        mixed_precision=training.mixed_precision,
        master_weight_dtype=training.master_weight_dtype,
        frames=frames,
        resolution=f"{height}x{width}",
        latent_grid=list(latent_grid(frames, height, width, spec.transformer)),
        validation=dict(frames=validation_frames(validation, buckets),
                        resolution=f"{validation.height}x{validation.width}",
                        denoising_steps=validation.num_inference_steps, guidance_batch=2),
    )


def run_configuration(options, trainer_flags, row):
    """Build, train, validate and test one configuration, filling `row` as each phase completes."""
    with tempfile.TemporaryDirectory(prefix="benchmark-", dir=options.scratch_dir) as scratch:
        _run_configuration(options, trainer_flags, row, scratch)


def _run_configuration(options, trainer_flags, row, scratch):
    spec = model_spec(options.model, options.scale, trainer_flags)
    backend, trainer, batch, flags = build_like_trainer(options, trainer_flags, row, spec, scratch)
    device, model = backend.device, backend.unwrap(trainer.transformer)
    row["parameters"] = dict(total=count_parameters(model.parameters()), trainable=count_parameters(trainer.parameters))
    memory_phase(device)
    row["memory_before_training"] = memory.memory_stats(device)

    row["phase"] = "training"
    steps, loss, saved = measure_training_steps(trainer, batch, options)
    row["memory_before_validation"] = memory.memory_stats(device)
    row.update(saved, final_loss=loss)
    row.update(speed_figures(steps, spec.transformer, trainer.context.training, row["latent_grid"], options.mode,
                             device, options.peak_tflops))

    # Validation with the optimizer state still held, as during training.
    row["phase"] = "validation"
    memory_phase(device)
    context, conditioning = trainer.context, trainer.conditioning
    denoise(model, context, conditioning, flags.validation, flags.buckets)
    row["memory_after_validation"] = memory.memory_stats(device)

    # The final test: optimizer and gradients gone, the trained weights in the compute dtype as the saved artifact
    # loads them (the frozen base keeps its storage, FP8 or NF4 included), then the same denoising pass.
    row["phase"] = "testing"
    trained = trainer.parameters
    trainer = batch = None
    backend.release()
    for parameter in trained:
        parameter.requires_grad_(False)
        parameter.data = parameter.data.to(context.weight_dtype)
    trained = None
    memory_phase(device)
    denoise(model, context, conditioning, flags.validation, flags.buckets)
    row["memory_after_testing"] = memory.memory_stats(device)
    del row["phase"]  # kept only when a phase fails: where it failed
    backend.end()


def build_like_trainer(options, trainer_flags, row, spec, scratch):
    """(backend, step.Trainer, a batch, the trainer's flag sections): the trainer's flags, checks, backend and Trainer,
    on random weights."""
    import accelerate
    import diffusers
    import peft
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler

    from training.backend import build_backend
    from training.conditioning import CONDITIONINGS
    from training.data_source import PreparedEntries
    from training.models import Pretrained
    from training.modes import MODES
    from training.optim import offload_runtime_problems
    from training.step import build_context, build_trainer

    conditioning, mode, source = CONDITIONINGS[spec.conditioning](), MODES[options.mode](), PreparedEntries()
    flags, problems = parse_trainer_flags(spec, scratch, trainer_flags, conditioning, mode, source)
    row.update(describe(options, flags.buckets, flags.training, flags.optimizer, flags.lora, flags.validation,
                        flags.memory, spec))
    if problems:
        raise UsageError(problems)
    backend = build_backend(flags.training, flags.optimizer, flags.parallelism, flags.logging)
    if offload_runtime_problems(flags.memory, backend):
        raise UsageError(offload_runtime_problems(flags.memory, backend))
    device, weight_dtype = backend.device, backend.weight_dtype
    set_seed(flags.training.seed)
    row.update(
        device=device_name(device),
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__, accelerate=accelerate.__version__,
                      peft=peft.__version__),
        memory_unit="GiB",
        memory_note=(
            "peak within each phase (max_memory_allocated/reserved, reset at the phase's start)" if device.type == "cuda"
            else "CPU: process peak RSS, which cannot be reset, so each phase shows the peak so far; not comparable "
            "to GPU figures"
        ),
    )
    row["phase"] = "build"
    # --quantize_base nf4 quantises inside from_pretrained: only the trainer's loader can do that.
    through_loader = options.through_trainer_loader or flags.memory.quantize_base == "nf4"
    transformer = load_transformer_like_trainer(spec, Pretrained.of(flags.model, flags.memory, flags.training),
                                                mode.load_dtype(flags.training, weight_dtype), device, scratch,
                                                through_loader)
    encoders = {}
    if conditioning.needs_vae:
        encoders["vae"] = build_random(AutoencoderKLCogVideoX, spec.vae, weight_dtype, device).requires_grad_(False).eval()
    context = build_context(flags.training, flags.optimizer, flags.lora, flags.memory, flags.parallelism,
                            spec.transformer, spec.vae, CogVideoXDPMScheduler(**spec.scheduler), device, weight_dtype,
                            source, encoders)
    trainer = build_trainer(transformer, context, conditioning, mode, backend, options.warmup_steps + options.steps)
    buckets = flags.buckets
    bucket = (buckets.frame_buckets[0], buckets.height_buckets[0], buckets.width_buckets[0])
    batch = source.example_batch(flags.training.train_batch_size, bucket, spec.transformer, spec.vae,
                                 conditioning.image_to_video, fill=torch.randn, control=conditioning.control)
    return backend, trainer, batch, flags


def measure_training_steps(trainer, batch, options):
    """Warm-up and timed optimizer steps (training.step.train_step, each micro-batch the same batch); the first
    warm-up step also measures what its forward saves for backward. Returns (timed steps, last loss, saved bytes)."""
    from training.step import compute_loss, train_step

    model = trainer.backend.unwrap(trainer.transformer)
    clock = Clock(trainer.backend.device)
    timer = TransformerTimer(model, clock)
    saved = {}

    def measured_loss(*loss_args):
        weights = [*model.parameters(), *model.buffers()]
        measurement = saved_activation_bytes(lambda: compute_loss(*loss_args), weights=weights)
        saved.update(activation_bytes=measurement.activations, weight_copy_bytes=measurement.weight_copies)
        return measurement.result

    trainer.transformer.train()
    group_size = trainer.context.training.gradient_accumulation_steps
    steps = []
    for step in range(options.warmup_steps + options.steps):
        started = clock.mark()
        outcome = train_step(trainer, itertools.repeat(batch, group_size), group_size,
                             loss_fn=measured_loss if step == 0 else compute_loss,
                             after_backward=timer.backward_finished)
        loss = outcome.loss.item()  # the host sync the trainer makes every step
        finished = clock.mark()
        forward, backward = timer.take()
        if step >= options.warmup_steps:
            steps.append(dict(step=clock.seconds(started, finished), forward=forward, backward=backward))
    timer.remove()
    return steps, loss, saved


def speed_figures(steps, transformer_config, training, latent, mode_name, device, peak_override):
    """Median step time, the share spent outside the transformer's forward+backward, and MFU (batch and accumulation
    of the [training] section)."""
    step_seconds = statistics.median(s["step"] for s in steps)
    outside = statistics.median(1.0 - (s["forward"] + s["backward"]) / s["step"] for s in steps)
    forward = transformer_forward_flops(transformer_config, training.train_batch_size, *latent)
    flops = training.gradient_accumulation_steps * training_step_flops(forward, base_weights_train=mode_name == "sft")
    peak = peak_override or (peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    return dict(
        s_per_step=step_seconds,
        step_seconds=[s["step"] for s in steps],
        transformer_forward_s=statistics.median(s["forward"] for s in steps),
        transformer_backward_s=statistics.median(s["backward"] for s in steps),
        outside_transformer_share=outside,
        model_flops_per_step=flops,
        achieved_tflops=flops / step_seconds / 1e12,
        peak_tflops=peak,
        mfu=flops / step_seconds / (peak * 1e12) if peak else None,
    )


def benchmark(options, trainer_flags):
    """One row; failures are rows too (status OOM, unsupported or error) so a sweep goes on."""
    row = dict(
        status="ok",
        model=options.model,
        mode=options.mode,
        scale=options.scale,
        flags=trainer_flags,
        device=device_name(),
        command=command_line(own_flags(options, options.model, options.mode), trainer_flags),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    try:
        run_configuration(options, trainer_flags, row)
    except torch.OutOfMemoryError as error:
        row.update(status="OOM", error=str(error).splitlines()[0])
    except UsageError as error:  # the trainer refuses these flags: recorded, not measured
        row.update(status="unsupported", error="; ".join(error.problems))
    except Exception as error:  # a sweep must survive any single configuration
        row.update(status="error", error=f"{type(error).__name__}: {error}")
    return row


def own_flags(options, model, mode):
    """This script's flags for one configuration (what a row's command and a sweep's subprocess pass)."""
    flags = ["--model", model, "--mode", mode, "--scale", options.scale,
             "--steps", str(options.steps), "--warmup_steps", str(options.warmup_steps)]
    if options.peak_tflops:
        flags += ["--peak_tflops", str(options.peak_tflops)]
    if options.through_trainer_loader:
        flags.append("--through_trainer_loader")
    return flags


def command_line(own, trainer_flags):
    """The command that reproduces a row (printed to stdout; add --output to append it to a file)."""
    return shlex.join(["python", "benchmarks/benchmark_training.py", *own, "--", *trainer_flags])


# ----------------------------------------------------------------------------------------------
# Sweeps: every configuration in a fresh process
# ----------------------------------------------------------------------------------------------


FULL_FINETUNE_OPTIMIZERS = (
    ["--optimizer", "adamw"],
    ["--optimizer", "adamw", "--master_weight_dtype", "bf16"],
    ["--optimizer", "adamw", "--use_8bit"],
    ["--optimizer", "adamw", "--use_torchao", "--use_8bit"],
    ["--optimizer", "adamw", "--use_cpu_offload_optimizer", "--offload_gradients"],
)


def readme_sweep(models):
    """The issue's matrix: LoRA ranks 16/64/256 and full fine-tuning with each optimizer, batch 1 and 4, with
    gradient checkpointing. Returns (model, mode, trainer flags) triples."""
    rows = []
    for model in models:
        for rank in (16, 64, 256):
            for batch in (1, 4):
                flags = ["--rank", rank, "--lora_alpha", rank, "--train_batch_size", batch, "--gradient_checkpointing"]
                rows.append((model, "lora", flags))
        for optimizer in FULL_FINETUNE_OPTIMIZERS:
            for batch in (1, 4):
                rows.append((model, "sft", [*optimizer, "--train_batch_size", batch, "--gradient_checkpointing"]))
    return [(model, mode, [str(flag) for flag in flags]) for model, mode, flags in rows]


# The speed levers (issue 14), each alone on top of the base (gradient checkpointing), then all that combine.
LEVERS = {
    "base": [],
    "checkpoint half the blocks": ["--gradient_checkpointing_ratio", "0.5"],
    "flash attention 2": ["--attention_backend", "flash"],
    "flash attention 3": ["--attention_backend", "_flash_3"],
    "regional compile": ["--regional_compile"],
    "fp8 matmuls": ["--fp8_training"],
    "compile + fp8 + flash 3": ["--regional_compile", "--fp8_training", "--attention_backend", "_flash_3"],
}


def levers_sweep():
    """A row per lever for 2b and 5b LoRA and 5b full fine-tuning at 49x480x720 and 1.5 LoRA at 77x768x1360 (each
    model's training size): s/step, MFU and peak memory, so the README can say which combination is fastest within a
    memory budget. A lever whose kernel is not installed gives a row with its one-line error."""
    rows = []
    for model, mode, flags in (("2b", "lora", ["--rank", "64", "--lora_alpha", "64"]),
                               ("5b", "lora", ["--rank", "64", "--lora_alpha", "64"]),
                               ("5b", "sft", ["--optimizer", "adamw", "--use_8bit"]),
                               ("1.5-5b", "lora", ["--rank", "64", "--lora_alpha", "64"])):
        for lever in LEVERS.values():
            rows.append((model, mode, [*flags, "--train_batch_size", "1", "--gradient_checkpointing", *lever]))
    return rows


SWEEPS = {"readme": lambda: readme_sweep(("2b", "5b", "1.5-5b")), "levers": levers_sweep}


def run_sweep(options, extra_flags):
    """Run every configuration in its own process, so that one's peak memory (or OOM, or crash) does not reach the
    next; a process that dies without writing its row gets one written here. Configurations whose command already
    has a row in --output are skipped, so an interrupted sweep continues where it stopped."""
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    configurations = SWEEPS[options.sweep]()
    if options.model:
        configurations = [c for c in configurations if c[0] == options.model]
    done = {row.get("command") for row in read_rows(output)} if output.is_file() else set()
    for index, (model, mode, flags) in enumerate(configurations, 1):
        own, flags = own_flags(options, model, mode), flags + extra_flags
        if command_line(own, flags) in done:
            continue
        rows_before = count_rows(output)
        print(f"[{index}/{len(configurations)}] {command_line(own, flags)}", file=sys.stderr, flush=True)
        process = subprocess.run([sys.executable, str(SCRIPT), *own, "--output", str(output), "--", *flags],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if count_rows(output) == rows_before:
            append_row(output, dict(
                status="crashed", model=model, mode=mode, scale=options.scale, flags=flags, device=device_name(),
                error=f"exit status {process.returncode}: {process.stderr.strip()[-2000:]}",
                command=command_line(own, flags),
            ))


def count_rows(path):
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def append_row(path, row):
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------
# Markdown tables in the original README's layout
# ----------------------------------------------------------------------------------------------


PHASES = ("memory_before_training", "memory_before_validation", "memory_after_validation", "memory_after_testing")


def _memory_cell(row, phase):
    stats = row.get(phase)
    if not stats:
        return row["status"] if row["status"] != "ok" else ""
    value = stats.get("max_memory_allocated", stats.get("peak_rss"))
    return f"{value:.3f}"


def render_markdown(rows):
    """One table per (device, mode, scale), rows in file order, each with the command that reproduces it."""
    groups = {}
    for row in rows:
        groups.setdefault((row["device"], row["mode"], row["scale"]), []).append(row)
    lines = []
    for (device, mode, scale), group in groups.items():
        unit = ("the process's peak RSS so far in GiB (it cannot be reset per phase; not comparable to GPU figures)"
                if device.startswith("cpu") else "max_memory_allocated in GiB, the peak within each phase")
        title = "LoRA" if mode == "lora" else "Full fine-tuning"
        lines += [f"### {title} on {device}" + (f" ({scale} scale)" if scale != "full" else ""), "",
                  f"Memory: {unit}.", ""]
        second = "lora rank" if mode == "lora" else "optimizer"
        header = ["model", second, "batch", "gradient_checkpointing", *PHASES, "s/step", "MFU", "command"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in group:
            cells = [
                row["model"],
                str(row.get("rank")) if mode == "lora" else row.get("optimizer", " ".join(row.get("flags", []))),
                str(row.get("batch", "")),
                str(row.get("gradient_checkpointing", "")),
                *(_memory_cell(row, phase) for phase in PHASES),
                f"{row['s_per_step']:.3f}" if row.get("s_per_step") is not None else row["status"],
                f"{row['mfu']:.1%}" if row.get("mfu") is not None else "n/a",
                "`" + row["command"].replace("|", "\\|") + "`",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model", choices=sorted(MODELS), help="Which published architecture (required unless --sweep "
                        "or --markdown; with --sweep, only this model's rows).")
    parser.add_argument("--mode", choices=("lora", "sft"), default="lora", help="LoRA or full fine-tuning (sft).")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full",
                        help="full: the real sizes. tiny: 2 layers, 2 heads of 16, 64x64 clips (CPU, CI).")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps (median reported).")
    parser.add_argument("--warmup_steps", type=int, default=2, help="Untimed steps first (allocations, autotuning).")
    parser.add_argument("--peak_tflops", type=float, default=None, help="Peak dense bf16 TFLOPS for MFU (default: "
                        "from the GPU name; unknown GPUs and CPUs get no MFU).")
    parser.add_argument("--through_trainer_loader", action="store_true",
                        help="Write the random weights to --scratch_dir and load them with the trainer's "
                        "load_transformer (automatic with --quantize_base nf4). Slower; exact for load-time options.")
    parser.add_argument("--scratch_dir", default=None, help="Where temporary files go (default: the system temp).")
    parser.add_argument("--output", help="Append each row to this JSONL file.")
    parser.add_argument("--sweep", choices=sorted(SWEEPS), help="Run a preset matrix, one process per row, into --output.")
    parser.add_argument("--markdown", metavar="JSONL", help="Print the rows of a JSONL file as Markdown tables and exit.")
    parser.add_argument("--gpu_slug", action="store_true", help="Print this machine's GPU name as a file name (what "
                        "run_gpu_benchmarks.sh names its results after) and exit; an error without a CUDA GPU.")
    return parser


def parse_options(argv):
    """(benchmark options, trainer flags): everything after `--` or unknown here goes to the trainer's parser."""
    argv = [str(a) for a in argv]
    own, after = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = build_parser()
    options, unknown = parser.parse_known_args(own)
    if options.gpu_slug:
        return options, unknown + after
    if not (options.sweep or options.markdown or options.model):
        parser.error("--model is required (or --sweep, or --markdown)")
    if options.sweep and not options.output:
        parser.error("--sweep needs --output")
    if options.steps < 1 or options.warmup_steps < 1:
        parser.error("--steps and --warmup_steps must be at least 1 (the first warm-up step measures activations)")
    return options, unknown + after


def main(argv=None):
    options, trainer_flags = parse_options(sys.argv[1:] if argv is None else argv)
    if options.gpu_slug:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU here: these tables are GPU measurements (see benchmarks/README.md for --scale tiny "
                     "on a CPU)")
        print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-"))
        return 0
    if options.markdown:
        print(render_markdown(read_rows(options.markdown)))
        return 0
    if options.sweep:
        run_sweep(options, trainer_flags)
        return 0
    row = benchmark(options, trainer_flags)
    print(json.dumps(row))
    if options.output:
        append_row(Path(options.output), row)
    return {"ok": 0, "OOM": 3, "unsupported": 2}.get(row["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
