"""Peak accelerator memory per phase, estimated before anything is loaded (used by --dry_run).

Instead of a formula, the estimate *runs* the real code on fake tensors: the model is built from
its config on the meta device, its weights become `FakeTensor`s (shapes and dtypes, no storage),
and the training core's own `compute_loss`, backward, clipping and optimizer step run under an
`AllocationTracker` that counts the bytes of every live tensor storage after each operator.
Nothing is allocated, so full-size CogVideoX-5b at 49x480x720 is simulated on a laptop CPU in
seconds, with the same ops, dtypes (autocast), gradient checkpointing and LoRA layers as training.

What the estimate counts: every tensor torch allocates (weights, master copies, gradients,
optimizer states, activations, recomputation, temporaries), rounded up to 512 bytes as the CUDA
caching allocator does. What it cannot see: allocator fragmentation and cache (reserved minus
allocated), CUDA context and kernel workspaces (cuBLAS, flash attention), and memory inside
bitsandbytes/torchao kernels -- optimizer states of those are counted from their documented
layouts instead. docs/memory.md states how close it comes to measurements. The EMA's fp32 copy of
the trained weights (--ema_decay, unless --ema_on_cpu) is added as a count too.
"""

import contextlib
import dataclasses
from types import MethodType, SimpleNamespace

import torch

from . import block_swap
from .buckets import validation_frames
from .data_source import choose_data_source
from .ema import ema_bytes
from .memory import ALLOCATION_GRANULARITY, AllocationTracker
from .models import latent_grid, nf4_bytes_saved, rotary_embeddings, vae_scale_factor_spatial
from .optim import build_lr_scheduler
from .step import Trainer, build_context, prepare_transformer, train_step


# ----------------------------------------------------------------------------------------------
# Fake models: built on meta from configs, then given fake (storage-less) CPU tensors
# ----------------------------------------------------------------------------------------------


def _make_fake(module, fake_mode):
    """Replace every meta parameter/buffer with a fake CPU tensor of the same shape, dtype and requires_grad.

    Module._apply cannot swap meta for fake tensors, so the dictionaries are edited directly."""
    for submodule in module.modules():
        for name, parameter in list(submodule._parameters.items()):
            if parameter is not None:
                with fake_mode:
                    data = torch.empty(parameter.shape, dtype=parameter.dtype, device="cpu")
                submodule._parameters[name] = torch.nn.Parameter(data, requires_grad=parameter.requires_grad)
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None:
                with fake_mode:
                    submodule._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device="cpu")
    return module


def _on_meta(build):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return build()


def _cast(module, dtype):
    for parameter in module.parameters():
        parameter.data = parameter.data.to(dtype)
    return module


def fake_vae(vae_config, dtype, fake_mode, slicing=False, tiling=False):
    """The VAE, fake; `slicing`/`tiling`: VAE slicing and tiling (--enable_slicing/--enable_tiling)."""
    from diffusers import AutoencoderKLCogVideoX

    vae = _on_meta(lambda: AutoencoderKLCogVideoX.from_config(vae_config))
    vae = _make_fake(_cast(vae, dtype), fake_mode).requires_grad_(False).eval()
    if slicing:
        vae.enable_slicing()
    if tiling:
        vae.enable_tiling()
    return vae


def fake_text_encoder(text_encoder_config, dtype, fake_mode):
    from transformers import T5EncoderModel

    encoder = _on_meta(lambda: T5EncoderModel(text_encoder_config))
    return _make_fake(_cast(encoder, dtype), fake_mode).requires_grad_(False).eval()


def simulated_shards(parallelism):
    """With --enable_sequence_parallelism: one process of a shard group, its exchanges simulated (attention.py)."""
    if not parallelism.enable_sequence_parallelism:
        return None
    import os

    from .attention import SimulatedShards

    return SimulatedShards(parallelism.sequence_parallel_shards or int(os.environ.get("WORLD_SIZE", "1")))


def fake_training_transformer(transformer_config, training, lora, memory, parallelism, conditioning, mode,
                              weight_dtype, fake_mode, shards=None):
    """The transformer exactly as training prepares it (step.prepare_transformer, from the same sections), with fake
    weights."""
    from diffusers import CogVideoXTransformer3DModel

    transformer = _on_meta(lambda: CogVideoXTransformer3DModel.from_config(transformer_config))
    _cast(transformer, weight_dtype)
    with _module_conversion_assigns():  # the hooks bind their methods when registered
        prepare_transformer(transformer, training, lora, memory, parallelism, conditioning, mode, weight_dtype, shards)
    for module in transformer.modules():
        # peft's LoHa/LoKr layers draw torch.rand(1) in every training forward (module dropout), a branch on a value
        # fake tensors do not have; in eval mode they compute the same (module dropout is 0 here).
        if type(module).__module__.startswith(("peft.tuners.loha", "peft.tuners.lokr")):
            module.eval()
    transformer = _make_fake(transformer, fake_mode)
    swap = block_swap.of(transformer)
    if swap is not None:  # --blocks_to_swap: the fake weights are the host copies now
        swap.take_homes()
    return transformer


def fake_encoders(validation, data_source, conditioning, vae_config, text_encoder_config, weight_dtype, fake_mode):
    """The encoders training loads for this data source and conditioning, fake (the VAE sliced and tiled as
    [validation] says); a stand-in tokenizer for T5."""
    encoders = {}
    if data_source.needs_text_encoder:
        encoders.update(tokenizer=_token_ids, text_encoder=fake_text_encoder(text_encoder_config, weight_dtype, fake_mode))
    if data_source.needs_vae or conditioning.needs_vae:
        encoders["vae"] = fake_vae(vae_config, weight_dtype, fake_mode, validation.enable_slicing,
                                   validation.enable_tiling)
    return encoders


def _token_ids(prompts, max_length, **kwargs):
    """What the T5 tokenizer gives `models.encode_prompts` (padded to max_length), with made-up ids."""
    return SimpleNamespace(input_ids=torch.zeros(len(prompts), max_length, dtype=torch.long))


def machine_autocast():
    """The autocast whose rules the estimate follows by default: CUDA's where there is a GPU, else the CPU's."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def cuda_autocast_rules():
    """CUDA autocast's rules on fake CPU tensors, which run under CPU autocast (autograd cannot run on fake CUDA
    tensors in a CPU build of torch). The two differ, for CogVideoX, in the norms: CUDA autocast computes layer_norm
    and group_norm in fp32 (their output, and the input LayerNorm saves for backward, in fp32), CPU autocast in the
    lower dtype. tests/test_memory_estimate.py holds the dtypes this gives against CUDA autocast itself."""
    import torch.nn.functional as F

    layer_norm, group_norm = F.layer_norm, F.group_norm

    def in_fp32(norm):
        def fp32_norm(input, *args, **kwargs):
            if not torch.is_autocast_enabled("cpu"):
                return norm(input, *args, **kwargs)  # CUDA's fp32 policy casts every floating input, weights too
            as_fp32 = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return norm(input.float(), *as_fp32, **kwargs)
        return fp32_norm

    F.layer_norm, F.group_norm = in_fp32(layer_norm), in_fp32(group_norm)
    try:
        yield
    finally:
        F.layer_norm, F.group_norm = layer_norm, group_norm


class SimulatedBackend:
    """What the training backend does within a step, for one process and fake tensors: autocast around the
    transformer's forward (as accelerate's mixed precision wraps it), plain backward and clipping, no reduction.
    `autocast`: whose autocast rules ("cuda" or "cpu"; default: this machine's, where training would run)."""

    device = torch.device("cpu")

    def __init__(self, weight_dtype, autocast=None):
        self.weight_dtype = weight_dtype
        self.autocast = autocast or machine_autocast()

    def prepare(self, transformer):
        """The forward wrapped as accelerate's prepare wraps it under mixed precision (outputs back in fp32)."""
        from accelerate.utils import convert_outputs_to_fp32

        if self.weight_dtype != torch.float32:
            forward = torch.autocast("cpu", dtype=self.weight_dtype)(type(transformer).forward)
            transformer.forward = MethodType(convert_outputs_to_fp32(forward), transformer)
        return transformer

    def autocast_rules(self):
        """Around everything the simulation runs (gradient checkpointing recomputes forwards in the backward)."""
        return cuda_autocast_rules() if self.autocast == "cuda" else contextlib.nullcontext()

    def accumulating(self, model, sync):
        return contextlib.nullcontext()

    def backward(self, loss, sync):
        loss.backward()

    def clip_gradients(self, optimizer, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def reduce_mean(self, tensor):
        return tensor


# ----------------------------------------------------------------------------------------------
# Optimizer states: simulated as AdamW, then corrected to the chosen optimizer's documented layout
# ----------------------------------------------------------------------------------------------


def optimizer_state_bytes(optimizer, memory, parameters):
    """Accelerator bytes of optimizer state for `parameters` under the [optimizer] flags (and [memory]'s
    --use_cpu_offload_optimizer)."""
    total = 0
    for parameter in parameters:
        count, size = parameter.numel(), parameter.element_size()
        offloaded = memory.use_cpu_offload_optimizer and count >= 4096  # torchao keeps small tensors on the GPU
        if offloaded:
            continue
        big = count >= 4096  # bitsandbytes and torchao quantize only tensors at least this large
        if optimizer.use_8bit and big:
            block = 256 if optimizer.use_torchao else 128  # torchao and bitsandbytes block sizes
            total += count * 2 * (1 + 4 / block)  # two uint8 moments, one fp32 scale per block
        elif optimizer.use_4bit and big:
            total += count * 2 * (0.5 + 4 / 128)  # two 4-bit moments, one fp32 scale per 128-block
        elif optimizer.optimizer == "prodigy":
            total += count * size * 4  # exp_avg, exp_avg_sq, s, p0
        elif optimizer.optimizer == "came":
            rows = parameter.shape[0] if parameter.dim() >= 2 else count
            cols = count // rows if parameter.dim() >= 2 else 0
            total += count * size + 2 * (rows + cols) * 4  # exp_avg plus factored second moments and residuals
        else:
            total += count * size * 2  # exp_avg, exp_avg_sq
    return int(total)


def _simulated_optimizer(parameters, learning_rate):
    # Plain AdamW (foreach off: one state pair per tensor, like the fused/8-bit kernels) stands in
    # for every optimizer; its state bytes are swapped for optimizer_state_bytes() afterwards.
    return torch.optim.AdamW(parameters, lr=learning_rate, foreach=False)


def _adamw_state_bytes(parameters):
    return sum(p.numel() * p.element_size() * 2 for p in parameters)


# ----------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------


def _cast_parameters(module, dtype):
    for name, parameter in list(module._parameters.items()):
        if parameter is not None and parameter.dtype != dtype:
            module._parameters[name] = torch.nn.Parameter(parameter.to(dtype), requires_grad=parameter.requires_grad)


@contextlib.contextmanager
def _module_conversion_assigns():
    """Module.to() cannot swap fake parameters in place, and diffusers' layerwise casting (--quantize_base fp8)
    calls it around every layer. Hooks registered inside this context assign cast copies instead: the same
    storages are allocated and freed, which is all the tracker needs."""
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

    original = LayerwiseCastingHook.pre_forward, LayerwiseCastingHook.post_forward

    def pre_forward(self, module, *args, **kwargs):
        _cast_parameters(module, self.compute_dtype)
        return args, kwargs

    def post_forward(self, module, output):
        _cast_parameters(module, self.storage_dtype)
        return output

    LayerwiseCastingHook.pre_forward, LayerwiseCastingHook.post_forward = pre_forward, post_forward
    try:
        yield
    finally:
        LayerwiseCastingHook.pre_forward, LayerwiseCastingHook.post_forward = original


def _fake_save_on_cpu():
    """torch.autograd.graph.save_on_cpu as the tracker should see it: a packed tensor leaves the accelerator
    (only its shape is kept) and comes back as a new allocation when backward unpacks it."""

    def pack(tensor):
        return tensor.shape, tensor.dtype, tensor.requires_grad

    def unpack(packed):
        shape, dtype, requires_grad = packed
        return torch.empty(shape, dtype=dtype).requires_grad_(requires_grad)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _import_before_counting():
    """Import what the step imports lazily: a module's import-time tensors (diffusers' autoencoders package makes
    some) are no run's memory, and counted only by the first estimate in a process they would make it differ."""
    import diffusers.models.autoencoders  # noqa: F401


def _training_scheduler():
    """The CogVideoX training noise schedule (its values do not change memory)."""
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)


def estimate_training(data, training, optimizer, lora, validation, memory, parallelism, transformer_config, vae_config,
                      text_encoder_config, conditioning, mode, weight_dtype, bucket, autocast=None):
    """Bytes: {"static": weights + optimizer states (+ the EMA copy), "training_peak": the high-water mark over two
    optimizer steps, "encoders": the VAE's and T5's weights}. Runs step.train_step on fake tensors, with these flag
    sections ([data]: the data source; [validation]: VAE slicing and tiling)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _import_before_counting()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    source = choose_data_source(data)
    backend = SimulatedBackend(weight_dtype, autocast)
    shards = simulated_shards(parallelism)
    transformer = fake_training_transformer(transformer_config, training, lora, memory, parallelism, conditioning,
                                            mode, weight_dtype, fake_mode, shards)
    parameters = mode.trainable_parameters(transformer)
    encoders = fake_encoders(validation, source, conditioning, vae_config, text_encoder_config, weight_dtype,
                             fake_mode)
    context = build_context(training, optimizer, lora, memory, parallelism, transformer_config, vae_config,
                            _training_scheduler(), backend.device, weight_dtype, source, encoders,
                            save_on_cpu=_fake_save_on_cpu, sequence_shards=shards)
    correction = (optimizer_state_bytes(optimizer, memory, parameters) - _adamw_state_bytes(parameters)
                  - _nf4_saving(memory.quantize_base, transformer) + ema_bytes(training, parameters))
    modules = [transformer, *(m for m in (context.vae, context.text_encoder) if m is not None)]

    tracker = AllocationTracker()
    resident = modules[:1] if memory.low_vram else modules  # --low_vram: the encoders wait in CPU memory
    tracker.track([block_swap.device_tensors(m) for m in resident])  # swapped blocks' weights: host memory
    if memory.low_vram:
        _on_device_while_running(tracker, context.text_encoder, ("forward",))
        _on_device_while_running(tracker, context.vae, ("encode", "decode"))
    with fake_mode, tracker, _module_conversion_assigns(), backend.autocast_rules():
        simulated = _simulated_optimizer(parameters, training.learning_rate)
        trainer = Trainer(backend.prepare(transformer), simulated, build_lr_scheduler(training, simulated, 2),
                          parameters, context, conditioning, mode, backend)
        group_size = min(training.gradient_accumulation_steps, 2)  # a third micro-batch holds no more than the second
        for _ in range(2):  # the second step has the optimizer states of the first
            batch = source.example_batch(training.train_batch_size, bucket, transformer_config, vae_config,
                                         conditioning.image_to_video, control=conditioning.control)
            train_step(trainer, [batch] * group_size, group_size)
            del batch
    return {
        "static": tracker.current + correction,
        "training_peak": tracker.peak + correction,
        "encoders": sum(_module_bytes(m) for m in modules[1:]),
    }


def _on_device_while_running(tracker, module, methods):
    """--low_vram as the trainer does it (models.offload_between_uses), counted: the module's weights are on the
    accelerator only while one of `methods` runs."""
    if module is None:
        return
    weights = block_swap.device_tensors(module)
    for method in methods:
        def run(*args, _method=getattr(module, method), **kwargs):
            tracker.track(weights)
            try:
                return _method(*args, **kwargs)
            finally:
                tracker.untrack(weights)

        setattr(module, method, run)


def _nf4_saving(quantize_base, transformer):
    """The NF4 base is simulated in 16-bit (bitsandbytes kernels cannot run on fake tensors): bytes to take off."""
    if quantize_base != "nf4":
        return 0
    return nf4_bytes_saved(transformer)


def _module_bytes(module):
    """Accelerator bytes of the module's weights (--blocks_to_swap: the swapped ones on the host are not)."""
    return sum(-(-t.untyped_storage().nbytes() // ALLOCATION_GRANULARITY) * ALLOCATION_GRANULARITY
               for t in block_swap.device_tensors(module))


def estimate_inference(buckets, validation, transformer, vae, text_encoder, transformer_config, vae_config,
                       conditioning, weight_dtype, fake_mode, tracker, offload):
    """Peak bytes of generating one validation video as [validation] (and the frame buckets) size it: T5 on prompt and
    negative prompt, the transformer at guidance batch 2, then the VAE decode (respecting
    --enable_slicing/--enable_tiling).

    With `offload` (--enable_model_cpu_offload) only the module at work sits on the accelerator."""
    latent_frames, latent_h, latent_w = latent_grid(validation_frames(validation, buckets), validation.height,
                                                    validation.width, transformer_config,
                                                    vae_scale_factor_spatial(vae_config))
    channels = transformer_config["out_channels"]
    guidance = 2 if validation.guidance_scale > 1 else 1
    peaks = []
    with fake_mode, tracker, torch.no_grad(), _module_conversion_assigns():
        ids = torch.zeros(guidance, transformer_config["max_text_seq_length"], dtype=torch.long)
        tracker.reset_peak()
        embeds = text_encoder(ids)[0].to(weight_dtype)
        peaks.append((tracker.peak, text_encoder))
        latents = torch.zeros(guidance, latent_frames, channels, latent_h, latent_w, dtype=weight_dtype)
        if conditioning.inpaint:  # the masked video (first frame, the rest -1), every frame, encoded once
            video = torch.zeros(1, 3, validation_frames(validation, buckets), validation.height, validation.width,
                                dtype=weight_dtype)
            tracker.reset_peak()
            encoded = vae.encode(video).latent_dist.mode().permute(0, 2, 1, 3, 4)
            condition = torch.cat([encoded[:, :, :1], encoded], dim=2)  # the mask channel, then the latents
            latents = torch.cat([latents, condition.expand(guidance, -1, -1, -1, -1)], dim=2)
            peaks.append((tracker.peak, vae))
        elif conditioning.image_to_video:
            image = torch.zeros(1, 3, 1, validation.height, validation.width, dtype=weight_dtype)
            tracker.reset_peak()
            encoded = vae.encode(image).latent_dist.mode().permute(0, 2, 1, 3, 4)
            condition = torch.cat([encoded, encoded.new_zeros(1, latent_frames - 1, channels, latent_h, latent_w)], 1)
            latents = torch.cat([latents, condition.expand(guidance, -1, -1, -1, -1)], dim=2)
            peaks.append((tracker.peak, vae))
        elif conditioning.control:  # the control video, every frame, encoded once
            video = torch.zeros(1, 3, validation_frames(validation, buckets), validation.height, validation.width,
                                dtype=weight_dtype)
            tracker.reset_peak()
            encoded = vae.encode(video).latent_dist.mode().permute(0, 2, 1, 3, 4)
            latents = torch.cat([latents, encoded.expand(guidance, -1, -1, -1, -1)], dim=2)
            peaks.append((tracker.peak, vae))
        rotary = rotary_embeddings(transformer_config, latent_frames, latent_h, latent_w, torch.device("cpu"))
        timestep = torch.zeros(guidance, dtype=torch.long)
        kwargs = {"ofs": latents.new_full((1,), 2.0)} if transformer_config.get("ofs_embed_dim") else {}
        tracker.reset_peak()
        transformer(hidden_states=latents, encoder_hidden_states=embeds, timestep=timestep, image_rotary_emb=rotary,
                    return_dict=False, **kwargs)
        peaks.append((tracker.peak, transformer))
        del latents, embeds
        decoded = torch.zeros(1, channels, latent_frames, latent_h, latent_w, dtype=weight_dtype)
        tracker.reset_peak()
        vae.decode(decoded)
        peaks.append((tracker.peak, vae))
    if not offload:
        return max(peak for peak, _ in peaks)
    # Offloaded: the other modules' weights are on the CPU while one works.
    on_device = {id(m): _module_bytes(m) for m in (transformer, vae, text_encoder)}
    everything = sum(on_device.values())
    return max(peak - (everything - on_device[id(module)]) for peak, module in peaks)


def estimate_phases(data, buckets, training, optimizer, lora, validation, memory, parallelism, transformer_config,
                    vae_config, text_encoder_config, conditioning, mode, weight_dtype, bucket_counts, batch_sizes=None,
                    each_bucket=False, known_peaks=None, autocast=None):
    """Peak bytes per phase for the heaviest batch: {"training": ..., "validation": ..., "final_test": ...}, with
    these flag sections (`buckets`: the [buckets] section, for the validation videos' frames).
    `bucket_counts`: {(frames, height, width): number of samples} (or a list, assuming full batches); `batch_sizes`:
    {bucket: batch size} where buckets differ (else --train_batch_size). With `each_bucket`, also
    "training_per_bucket": {bucket: training peak of a full batch of it} (one simulation per bucket, unless
    `known_peaks` {(bucket, batch): bytes} has it already).

    validation: the training state stays (weights, master copies, optimizer states; gradients are
    freed) while the pipeline generates; final_test: training state freed, the saved artifact
    loaded into a fresh pipeline."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # The heaviest batch: a bucket's batches hold at most as many clips as the bucket has.
    def batch_size(bucket):
        size = (batch_sizes or {}).get(bucket, training.train_batch_size)
        return min(size, bucket_counts[bucket]) if isinstance(bucket_counts, dict) else size

    def training_peak(bucket):
        if (bucket, batch_size(bucket)) in (known_peaks or {}):
            return known_peaks[bucket, batch_size(bucket)]
        bucket_training = dataclasses.replace(training, train_batch_size=batch_size(bucket))
        return estimate_training(data, bucket_training, optimizer, lora, validation, memory, parallelism,
                                 transformer_config, vae_config, text_encoder_config, conditioning, mode, weight_dtype,
                                 bucket, autocast)["training_peak"]

    largest = max(bucket_counts, key=lambda b: b[0] * b[1] * b[2] * batch_size(b))
    phases = {"bucket": "x".join(map(str, largest)), "batch_size": batch_size(largest)}
    if each_bucket:
        per_bucket = {bucket: training_peak(bucket) for bucket in bucket_counts}
        phases["training"] = max(per_bucket.values())
        phases["training_per_bucket"] = {"x".join(map(str, b)): peak for b, peak in sorted(per_bucket.items())}
    else:
        phases["training"] = training_peak(largest)
    if not validation.validation_prompt:
        return phases

    offload = bool(validation.enable_model_cpu_offload)
    slicing, tiling = validation.enable_slicing, validation.enable_tiling
    _import_before_counting()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    # Validation: the training transformer (in eval, its forward still wrapped for mixed precision) plus encoders
    # the training did not hold.
    transformer = fake_training_transformer(transformer_config, training, lora, memory, parallelism, conditioning,
                                            mode, weight_dtype, fake_mode)
    backend = SimulatedBackend(weight_dtype, autocast)
    transformer = backend.prepare(transformer)
    vae = fake_vae(vae_config, weight_dtype, fake_mode, slicing, tiling)
    text_encoder = fake_text_encoder(text_encoder_config, weight_dtype, fake_mode)
    tracker = AllocationTracker()
    tracker.track([block_swap.device_tensors(m) for m in (transformer, vae, text_encoder)])
    optimizer_states = (optimizer_state_bytes(optimizer, memory, mode.trainable_parameters(transformer))
                        + ema_bytes(training, mode.trainable_parameters(transformer)))  # the EMA stays too
    with backend.autocast_rules():
        peak = estimate_inference(buckets, validation, transformer, vae, text_encoder, transformer_config, vae_config,
                                  conditioning, weight_dtype, fake_mode, tracker, offload)
    phases["validation"] = peak + optimizer_states - _nf4_saving(memory.quantize_base, transformer)

    # Final test: a fresh pipeline in the compute dtype with the artifact applied; nothing from training.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    test_training = dataclasses.replace(
        training, master_weight_dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}.get(weight_dtype, "fp32"))
    transformer = fake_training_transformer(transformer_config, test_training, lora, memory, parallelism, conditioning,
                                            mode, weight_dtype, fake_mode)
    transformer.requires_grad_(False)
    vae = fake_vae(vae_config, weight_dtype, fake_mode, slicing, tiling)
    text_encoder = fake_text_encoder(text_encoder_config, weight_dtype, fake_mode)
    tracker = AllocationTracker()
    tracker.track([block_swap.device_tensors(m) for m in (transformer, vae, text_encoder)])
    phases["final_test"] = estimate_inference(buckets, validation, transformer, vae, text_encoder, transformer_config,
                                              vae_config, conditioning, weight_dtype, fake_mode, tracker,
                                              offload) - _nf4_saving(memory.quantize_base, transformer)
    return phases
