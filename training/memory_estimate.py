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
layouts instead. docs/memory.md states how close it comes to measurements.
"""

import contextlib
import copy
import weakref
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


GIB = 2**30
# The CUDA caching allocator hands out blocks in multiples of 512 bytes.
ALLOCATION_GRANULARITY = 512


class AllocationTracker(TorchDispatchMode):
    """Bytes of live tensor storages, updated at every operator; `peak` is the high-water mark.

    Works on real, meta and fake tensors alike. A storage is counted once however many views
    share it, and uncounted when it is freed (a weak reference to the storage tells us).
    """

    def __init__(self, granularity=ALLOCATION_GRANULARITY):
        super().__init__()
        self.granularity = granularity
        self.live = {}
        self.current = 0
        self.peak = 0

    def track(self, *tensors):
        for tensor in tree_flatten(tensors)[0]:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor.untyped_storage())

    def _add(self, storage):
        key = id(storage)
        if key in self.live:
            return
        size = -(-storage.nbytes() // self.granularity) * self.granularity

        def freed(_, key=key):
            entry = self.live.pop(key, None)
            if entry is not None:
                self.current -= entry[1]

        self.live[key] = (weakref.ref(storage, freed), size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def reset_peak(self):
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out


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


def fake_vae(vae_config, dtype, fake_mode, args=None):
    from diffusers import AutoencoderKLCogVideoX

    vae = _on_meta(lambda: AutoencoderKLCogVideoX.from_config(vae_config))
    vae = _make_fake(_cast(vae, dtype), fake_mode).requires_grad_(False).eval()
    if args is not None and (getattr(args, "enable_slicing", False) or getattr(args, "use_slicing", False)):
        vae.enable_slicing()
    if args is not None and (getattr(args, "enable_tiling", False) or getattr(args, "use_tiling", False)):
        vae.enable_tiling()
    return vae


def fake_text_encoder(text_encoder_config, dtype, fake_mode):
    from transformers import T5EncoderModel

    encoder = _on_meta(lambda: T5EncoderModel(text_encoder_config))
    return _make_fake(_cast(encoder, dtype), fake_mode).requires_grad_(False).eval()


def fake_training_transformer(transformer_config, args, conditioning, mode, weight_dtype, fake_mode):
    """The transformer exactly as core.run prepares it: adapted, mode-prepared, frozen part cast, checkpointed."""
    from diffusers import CogVideoXTransformer3DModel

    from .models import prepare_frozen_base
    from .modes import cast_frozen

    transformer = _on_meta(lambda: CogVideoXTransformer3DModel.from_config(transformer_config))
    _cast(transformer, weight_dtype)
    conditioning.adapt_transformer(transformer, args)
    with _module_conversion_assigns():  # the hooks bind their methods when registered
        prepare_frozen_base(transformer, args, weight_dtype)
    mode.prepare(transformer, args)
    cast_frozen(transformer, weight_dtype)
    transformer = _make_fake(transformer, fake_mode)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


# ----------------------------------------------------------------------------------------------
# Optimizer states: simulated as AdamW, then corrected to the chosen optimizer's documented layout
# ----------------------------------------------------------------------------------------------


def optimizer_state_bytes(args, parameters):
    """Accelerator bytes of optimizer state for `parameters` under the chosen optimizer flags."""
    total = 0
    for parameter in parameters:
        count, size = parameter.numel(), parameter.element_size()
        offloaded = args.use_cpu_offload_optimizer and count >= 4096  # torchao keeps small tensors on the GPU
        if offloaded:
            continue
        big = count >= 4096  # bitsandbytes and torchao quantize only tensors at least this large
        if args.use_8bit and big:
            block = 256 if args.use_torchao else 128  # torchao and bitsandbytes block sizes
            total += count * 2 * (1 + 4 / block)  # two uint8 moments, one fp32 scale per block
        elif args.use_4bit and big:
            total += count * 2 * (0.5 + 4 / 128)  # two 4-bit moments, one fp32 scale per 128-block
        elif args.optimizer == "prodigy":
            total += count * size * 4  # exp_avg, exp_avg_sq, s, p0
        elif args.optimizer == "came":
            rows = parameter.shape[0] if parameter.dim() >= 2 else count
            cols = count // rows if parameter.dim() >= 2 else 0
            total += count * size + 2 * (rows + cols) * 4  # exp_avg plus factored second moments and residuals
        else:
            total += count * size * 2  # exp_avg, exp_avg_sq
    return int(total)


def _simulated_optimizer(parameters, args):
    # Plain AdamW (foreach off: one state pair per tensor, like the fused/8-bit kernels) stands in
    # for every optimizer; its state bytes are swapped for optimizer_state_bytes() afterwards.
    return torch.optim.AdamW(parameters, lr=args.learning_rate, foreach=False)


def _adamw_state_bytes(parameters):
    return sum(p.numel() * p.element_size() * 2 for p in parameters)


# ----------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------


def latent_shape(num_frames, height, width, transformer_config, vae_config):
    """[F, C, h, w] latents for a clip, as the pipelines size them (1.5 pads F to a multiple of patch_size_t)."""
    temporal = vae_config.get("temporal_compression_ratio", 4)
    spatial = 2 ** (len(vae_config["block_out_channels"]) - 1)
    frames = (num_frames - 1) // temporal + 1
    patch_t = transformer_config.get("patch_size_t")
    if patch_t and frames % patch_t:
        frames += patch_t - frames % patch_t
    return frames, transformer_config["out_channels"], height // spatial, width // spatial


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


def _autocast(weight_dtype):
    if weight_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=weight_dtype)


def _context(args, transformer_config, vae_config, weight_dtype, vae=None, text_encoder=None):
    from diffusers import CogVideoXDPMScheduler

    from .core import Context

    return Context(
        args=args,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
        weight_dtype=weight_dtype,
        transformer_config=dict(transformer_config),
        vae_scaling_factor=vae_config["scaling_factor"],
        vae_invert_scale_latents=bool(vae_config.get("invert_scale_latents", False)),
        vae_spatial_scale=2 ** (len(vae_config["block_out_channels"]) - 1),
        scheduler=CogVideoXDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True),
        vae=vae,
        text_encoder=text_encoder,
    )


def _training_batch(args, bucket, transformer_config, vae_config, conditioning, context):
    """A batch as the data loader delivers it, at the bucket's shape, already on the accelerator."""
    frames, height, width = bucket
    size = args.train_batch_size
    latent_frames, channels, latent_h, latent_w = latent_shape(frames, height, width, transformer_config, vae_config)
    image = torch.zeros(size, 1, 3, height, width) if conditioning.image_to_video else None
    if context.text_encoder is None:  # --load_tensors: what prepare_dataset.py stored
        distribution = torch.zeros(size, 2 * channels, latent_frames, latent_h, latent_w, dtype=context.weight_dtype)
        embeds = torch.zeros(size, transformer_config["max_text_seq_length"], transformer_config["text_embed_dim"],
                             dtype=context.weight_dtype)
        return {"video_latent_dist": distribution, "prompt_embeds": embeds, "image": image}
    # Raw videos: the VAE and T5 encode every step; the pixels arrive as float in [-1, 1].
    return {"video_latent_dist": None, "video": torch.zeros(size, frames, 3, height, width), "image": image,
            "prompt": ["x"] * size}


def _encode_raw_batch(batch, context):
    """What compute_loss does with raw data, but with token ids made up (no tokenizer is loaded)."""
    from .models import encode_video_distribution

    if batch["video_latent_dist"] is not None:
        return batch
    distribution = encode_video_distribution(context.vae, batch["video"])
    ids = torch.zeros(len(batch["prompt"]), context.transformer_config["max_text_seq_length"], dtype=torch.long)
    with torch.no_grad():
        embeds = context.text_encoder(ids)[0].to(context.weight_dtype)
    return {**batch, "video_latent_dist": distribution, "prompt_embeds": embeds}


def estimate_training(args, transformer_config, vae_config, text_encoder_config, conditioning, mode, weight_dtype,
                      bucket):
    """Bytes: {"static": weights + optimizer states, "training_peak": the high-water mark over two steps,
    "resident_after_step": what stays between steps}. Runs the core's compute_loss on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .core import compute_loss

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    sim_args = copy.copy(args)
    transformer = fake_training_transformer(transformer_config, sim_args, conditioning, mode, weight_dtype, fake_mode)
    parameters = mode.trainable_parameters(transformer)
    needs_vae = conditioning.needs_vae or not args.load_tensors
    vae = fake_vae(vae_config, weight_dtype, fake_mode, args) if needs_vae else None
    text_encoder = None if args.load_tensors else fake_text_encoder(text_encoder_config, weight_dtype, fake_mode)
    context = _context(args, transformer_config, vae_config, weight_dtype, vae=vae, text_encoder=text_encoder)
    if args.offload_activations:
        context.saved_tensors = _fake_save_on_cpu
    correction = optimizer_state_bytes(args, parameters) - _adamw_state_bytes(parameters) - _nf4_saving(args, transformer)

    tracker = AllocationTracker()
    tracker.track([list(m.parameters()) + list(m.buffers()) for m in (transformer, vae, text_encoder) if m is not None])
    with fake_mode, tracker, _module_conversion_assigns():
        optimizer = _simulated_optimizer(parameters, args)
        for _ in range(2):  # the second step has the optimizer states of the first
            batch = _encode_raw_batch(_training_batch(args, bucket, transformer_config, vae_config, conditioning,
                                                      context), context)
            for _ in range(args.gradient_accumulation_steps if args.gradient_accumulation_steps <= 2 else 2):
                with _autocast(weight_dtype):
                    loss = compute_loss(transformer, batch, context, conditioning)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del batch, loss
    resident = tracker.current + correction
    return {
        "static": resident,
        "training_peak": tracker.peak + correction,
        "encoders": sum(_module_bytes(m) for m in (vae, text_encoder) if m is not None),
    }


def _nf4_saving(args, transformer):
    """The NF4 base is simulated in 16-bit (bitsandbytes kernels cannot run on fake tensors): bytes to take off."""
    if args.quantize_base != "nf4":
        return 0
    from .models import nf4_bytes_saved

    return nf4_bytes_saved(transformer)


def _module_bytes(module):
    return sum(-(-t.untyped_storage().nbytes() // ALLOCATION_GRANULARITY) * ALLOCATION_GRANULARITY
               for t in list(module.parameters()) + list(module.buffers()))


def estimate_inference(args, transformer, vae, text_encoder, transformer_config, vae_config, conditioning,
                       weight_dtype, fake_mode, tracker, offload, autocast=False):
    """Peak bytes of generating one validation video: T5 on prompt and negative prompt, the
    transformer at guidance batch 2, then the VAE decode (respecting --enable_slicing/--enable_tiling).

    With `offload` (--enable_model_cpu_offload) only the module at work sits on the accelerator. `autocast`: the
    training transformer (validation) keeps accelerate's autocast wrapper around its forward."""
    frames = args.validation_num_frames or max(args.frame_buckets)
    latent_frames, channels, latent_h, latent_w = latent_shape(frames, args.height, args.width, transformer_config,
                                                               vae_config)
    guidance = 2 if args.guidance_scale > 1 else 1
    peaks = []
    with fake_mode, tracker, torch.no_grad(), _module_conversion_assigns():
        ids = torch.zeros(guidance, transformer_config["max_text_seq_length"], dtype=torch.long)
        tracker.reset_peak()
        embeds = text_encoder(ids)[0].to(weight_dtype)
        peaks.append((tracker.peak, text_encoder))
        latents = torch.zeros(guidance, latent_frames, channels, latent_h, latent_w, dtype=weight_dtype)
        if conditioning.image_to_video:
            image = torch.zeros(1, 3, 1, args.height, args.width, dtype=weight_dtype)
            tracker.reset_peak()
            encoded = vae.encode(image).latent_dist.mode().permute(0, 2, 1, 3, 4)
            condition = torch.cat([encoded, encoded.new_zeros(1, latent_frames - 1, channels, latent_h, latent_w)], 1)
            latents = torch.cat([latents, condition.expand(guidance, -1, -1, -1, -1)], dim=2)
            peaks.append((tracker.peak, vae))
        from .models import rotary_embeddings

        rotary = rotary_embeddings(transformer_config, latent_frames, latent_h, latent_w, torch.device("cpu"))
        timestep = torch.zeros(guidance, dtype=torch.long)
        kwargs = {"ofs": latents.new_full((1,), 2.0)} if transformer_config.get("ofs_embed_dim") else {}
        tracker.reset_peak()
        with _autocast(weight_dtype) if autocast else contextlib.nullcontext():
            transformer(hidden_states=latents, encoder_hidden_states=embeds, timestep=timestep,
                        image_rotary_emb=rotary, return_dict=False, **kwargs)
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


def estimate_phases(args, transformer_config, vae_config, text_encoder_config, conditioning, mode, weight_dtype,
                    buckets):
    """Peak bytes per phase for the heaviest batch: {"training": ..., "validation": ..., "final_test": ...}.
    `buckets`: {(frames, height, width): number of samples} (or a list, assuming full batches).

    validation: the training state stays (weights, master copies, optimizer states; gradients are
    freed) while the pipeline generates; final_test: training state freed, the saved artifact
    loaded into a fresh pipeline."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # The heaviest batch: a bucket's batches hold at most as many clips as the bucket has.
    def batch_size(bucket):
        return min(args.train_batch_size, buckets[bucket]) if isinstance(buckets, dict) else args.train_batch_size

    largest = max(buckets, key=lambda b: b[0] * b[1] * b[2] * batch_size(b))
    training_args = copy.copy(args)
    training_args.train_batch_size = batch_size(largest)
    training = estimate_training(training_args, transformer_config, vae_config, text_encoder_config, conditioning,
                                 mode, weight_dtype, largest)
    phases = {"bucket": "x".join(map(str, largest)), "batch_size": training_args.train_batch_size,
              "training": training["training_peak"]}
    if not args.validation_prompt:
        return phases

    offload = bool(args.enable_model_cpu_offload)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    sim_args = copy.copy(args)
    # Validation: the training transformer (in eval) plus encoders the training did not hold.
    transformer = fake_training_transformer(transformer_config, sim_args, conditioning, mode, weight_dtype, fake_mode)
    vae = fake_vae(vae_config, weight_dtype, fake_mode, args)
    text_encoder = fake_text_encoder(text_encoder_config, weight_dtype, fake_mode)
    tracker = AllocationTracker()
    tracker.track([list(m.parameters()) + list(m.buffers()) for m in (transformer, vae, text_encoder)])
    optimizer_states = optimizer_state_bytes(args, mode.trainable_parameters(transformer))
    peak = estimate_inference(args, transformer, vae, text_encoder, transformer_config, vae_config, conditioning,
                              weight_dtype, fake_mode, tracker, offload, autocast=True)
    phases["validation"] = peak + optimizer_states - _nf4_saving(args, transformer)

    # Final test: a fresh pipeline in the compute dtype with the artifact applied; nothing from training.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    test_args = copy.copy(args)
    test_args.master_weight_dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(weight_dtype, "fp32")
    transformer = fake_training_transformer(transformer_config, test_args, conditioning, mode, weight_dtype, fake_mode)
    transformer.requires_grad_(False)
    vae = fake_vae(vae_config, weight_dtype, fake_mode, args)
    text_encoder = fake_text_encoder(text_encoder_config, weight_dtype, fake_mode)
    tracker = AllocationTracker()
    tracker.track([list(m.parameters()) + list(m.buffers()) for m in (transformer, vae, text_encoder)])
    phases["final_test"] = estimate_inference(args, transformer, vae, text_encoder, transformer_config, vae_config,
                                              conditioning, weight_dtype, fake_mode, tracker, offload) - _nf4_saving(
                                                  args, transformer)
    return phases
