"""Loading CogVideoX components and the encodings shared by precompute, training and validation.

Loaders are split by role (text encoder, VAE, transformer, scheduler) so each phase loads
only what it needs: training from precomputed data never loads the VAE or T5.
"""

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Where the loaders below read a CogVideoX pipeline's components from, and how: plain values, since the trainer,
    prepare_dataset.py and the tools name these flags differently (`--pretrained_model_name_or_path`, `--model_id`).

    The fields after `cache_dir` concern the trainer's transformer only (`load_transformer`): --quantize_base, and
    --transformer_config / --transformer_ckpt_path / --seed, which build a transformer instead of loading one."""

    path: str  # hub id or local pipeline folder
    revision: Optional[str] = None
    variant: Optional[str] = None
    cache_dir: Optional[str] = None
    quantize_base: str = "none"  # "nf4": the transformer's linear weights load as 4-bit NF4 (QLoRA)
    transformer_config: Optional[str] = None  # a config file: build a transformer of that size (build_transformer)
    transformer_ckpt_path: Optional[str] = None  # weights loaded over the built transformer where they fit
    seed: Optional[int] = None  # initialises a built transformer

    @classmethod
    def of(cls, model, memory=None, training=None):
        """The trainer's: its [model] section; for its transformer also --quantize_base ([memory]) and --seed
        ([training])."""
        return cls(model.pretrained_model_name_or_path, model.revision, model.variant, model.cache_dir,
                   quantize_base=memory.quantize_base if memory is not None else "none",
                   transformer_config=model.transformer_config, transformer_ckpt_path=model.transformer_ckpt_path,
                   seed=training.seed if training is not None else None)


def _pretrained_kwargs(pretrained):
    return dict(revision=pretrained.revision, variant=pretrained.variant, cache_dir=pretrained.cache_dir)



def load_tokenizer(pretrained):
    """T5Tokenizer, the class the CogVideoX pipelines declare (with transformers 4, AutoTokenizer gives the fast one,
    which a pipeline given it as a component refuses)."""
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(
        pretrained.path, subfolder="tokenizer", revision=pretrained.revision, cache_dir=pretrained.cache_dir
    )


def load_text_encoder(pretrained, dtype):
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(
        pretrained.path, subfolder="text_encoder", torch_dtype=dtype, **_pretrained_kwargs(pretrained)
    )


def load_vae(pretrained, dtype, slicing=False, tiling=False):
    """The VAE in `dtype`; `slicing`/`tiling`: VAE slicing and tiling (the trainer's --enable_slicing/--enable_tiling,
    prepare_dataset.py's --use_slicing/--use_tiling)."""
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX.from_pretrained(
        pretrained.path, subfolder="vae", torch_dtype=dtype, **_pretrained_kwargs(pretrained)
    )
    if slicing:
        vae.enable_slicing()
    if tiling:
        vae.enable_tiling()
    return vae


def offload_between_uses(encoders, device):
    """--low_vram (CogVideoX-Fun's): the VAE and text encoder of `encoders` wait in CPU memory and each moves to
    `device` only while it runs (the text encoder's forward, the VAE's encode and decode), its tensor inputs with it,
    and back afterwards, as Fun's training loop moves them around each encode (scripts/cogvideox_fun/train_lora.py)."""
    for name, methods in (("text_encoder", ("forward",)), ("vae", ("encode", "decode"))):
        module = encoders.get(name)
        if module is None:
            continue
        module.to("cpu")
        for method in methods:
            setattr(module, method, _on_device_while_running(module, getattr(module, method), device))


def _on_device_while_running(module, method, device):
    import functools

    def moved(value):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    @functools.wraps(method)
    def run(*args, **kwargs):
        module.to(device)
        try:
            return method(*[moved(a) for a in args], **{k: moved(v) for k, v in kwargs.items()})
        finally:
            module.to("cpu")
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()

    return run


def transformer_parameter_names(transformer_config):
    """The parameter names of a CogVideoX transformer of this config, from an empty (meta-device) copy."""
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    with init_empty_weights():
        transformer = CogVideoXTransformer3DModel.from_config(transformer_config)
    return [name for name, _ in transformer.named_parameters()]


# fp32 only: oneDNN's bf16 convolution needs CPU features (AVX512-BF16 or AVX-NE-CONVERT) many CPUs lack.
ONEDNN_DTYPES = (torch.float32,)


def convolve_on_cpu_with_onednn(module):
    """Route the CPU convolutions of `module`'s Conv3d layers to oneDNN (`aten::mkldnn_convolution`), where
    inference runs in fp32; everything else (CUDA, gradients, other dtypes or padding modes) goes the usual way.

    Why: for one sample, torch picks its native kernel whenever batch x channels x depth x height (width is not
    counted) is at most 20,480 (`use_mkldnn` in ATen's Convolution.cpp, a rule written for 2-D images). The VAE's
    deeper, downsampled layers fall under it for clips of a few hundred pixels, and that kernel is several times slower
    than oneDNN on a 3-D convolution: encoding a 17x96x128 clip on 2 cores took 0.9 s against 0.45 s through oneDNN,
    decoding it 2.5 s against 1.6 s (outputs within 6e-6; routing the 2-D layers too gained nothing). Large clips
    (480x720) already take oneDNN in every layer, so nothing changes for them."""
    import types

    if not torch.backends.mkldnn.is_available():
        return module

    def conv_forward(self, input, weight, bias):
        if (input.device.type == "cpu" and input.dtype in ONEDNN_DTYPES and weight.dtype == input.dtype
                and torch.backends.mkldnn.enabled and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and not (torch.is_grad_enabled() and (
                    input.requires_grad or weight.requires_grad))):
            return torch.ops.aten.mkldnn_convolution(input.contiguous(), weight, bias, self.padding, self.stride,
                                                     self.dilation, self.groups)
        return type(self)._conv_forward(self, input, weight, bias)

    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv3d):
            layer._conv_forward = types.MethodType(conv_forward, layer)
    return module


def load_transformer(pretrained, dtype):
    """The transformer of `pretrained` (a `Pretrained`) in `dtype`; with quantize_base nf4 its linear weights are
    loaded as 4-bit NF4 (QLoRA). With a transformer_config, one of that size (`build_transformer`)."""
    from diffusers import CogVideoXTransformer3DModel

    if pretrained.transformer_config:
        from .args import read_transformer_config

        return build_transformer(read_transformer_config(pretrained.transformer_config), dtype, pretrained.seed,
                                 pretrained.transformer_ckpt_path)
    kwargs = {}
    if pretrained.quantize_base == "nf4":
        from diffusers import BitsAndBytesConfig

        from .optional_libraries import use_bitsandbytes

        use_bitsandbytes()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    return CogVideoXTransformer3DModel.from_pretrained(
        pretrained.path, subfolder="transformer", torch_dtype=dtype, **_pretrained_kwargs(pretrained),
        **kwargs,
    )


def build_transformer(config, dtype, seed=None, ckpt_path=None):
    """A transformer of `config`'s size, initialised from `seed` (--seed: every process builds the same one), with the
    tensors of `ckpt_path` (--transformer_ckpt_path) that fit loaded over it. Logs what was initialised and what was
    not used."""
    import logging

    from diffusers import CogVideoXTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed or 0)
        transformer = CogVideoXTransformer3DModel.from_config(config)
    transformer.to(dtype)
    if not ckpt_path:
        logging.getLogger("cogvideox_factory").info("built a transformer from --transformer_config (random weights)")
        return transformer
    saved = read_transformer_weights(ckpt_path)
    own = transformer.state_dict()
    fitting = {name: tensor for name, tensor in saved.items() if name in own and own[name].shape == tensor.shape}
    transformer.load_state_dict(fitting, strict=False)
    initialised = sorted(set(own) - set(fitting))
    unused = sorted(set(saved) - set(fitting))
    log = logging.getLogger("cogvideox_factory")
    log.info("--transformer_ckpt_path: %d of %d tensors loaded", len(fitting), len(own))
    if initialised:
        log.warning("%d tensor(s) initialised at random (not in %s, or of another shape): %s%s", len(initialised),
                    ckpt_path, ", ".join(initialised[:8]), " ..." if len(initialised) > 8 else "")
    if unused:
        log.warning("%d tensor(s) of %s not used (no such weight, or another shape): %s%s", len(unused),
                    ckpt_path, ", ".join(unused[:8]), " ..." if len(unused) > 8 else "")
    return transformer


def read_transformer_weights(path):
    """{name: tensor} of a .safetensors file, or of every .safetensors file in a folder (a diffusers transformer
    folder, sharded or not)."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    weights = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def prepare_frozen_base(transformer, quantize_base, compute_dtype):
    """`quantize_base` (--quantize_base) fp8: store the frozen base weights in FP8 and cast each layer to
    `compute_dtype` only while it runs (diffusers layerwise casting). Norms, embeddings and LoRA layers keep their own
    precision, so this may run before or after adapters are added (training adds them after; the final test loads them
    before)."""
    if quantize_base == "fp8":
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        transformer.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn,
            compute_dtype=compute_dtype,
            skip_modules_pattern=(*DEFAULT_SKIP_MODULES_PATTERN, "lora_"),
        )
    return transformer


# CogVideoX 1.5 (the models with temporal patches) was trained at 768 x 1360 (THUDM's model card); its config's sample
# size, 300 x 300 latent pixels, is the cap of its rotary grid, which the pipelines' default turns into 2400 x 2400.
CogVideoX15_SIZE = (768, 1360)


def default_video_size(transformer_config, spatial_scale):
    """(height, width) to generate at when none is given: the size the model was trained at."""
    if transformer_config.get("patch_size_t"):
        return CogVideoX15_SIZE
    return transformer_config["sample_height"] * spatial_scale, transformer_config["sample_width"] * spatial_scale


def nf4_bytes_saved(transformer):
    """Bytes NF4 saves against 16-bit storage: bitsandbytes packs two weights per byte plus an fp32 scale per
    64 weights, in every linear layer (used by the memory estimate, which cannot run bitsandbytes kernels)."""
    linear = [m.weight for m in transformer.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    return int(sum(w.numel() * (2 - 0.5 - 4 / 64) for w in linear))


def load_training_scheduler(pretrained, class_name="CogVideoXDPMScheduler"):
    """The noise schedule training draws from: the pipeline's scheduler config read by diffusers' `class_name` (the
    conditioning's `training_scheduler`)."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    if class_name != "CogVideoXDPMScheduler":  # DDPMScheduler (Fun) warns that it ignores snr_shift_scale: on purpose
        diffusers_logging.set_verbosity_error()
    try:
        return getattr(diffusers, class_name).from_pretrained(
            pretrained.path, subfolder="scheduler", revision=pretrained.revision, cache_dir=pretrained.cache_dir
        )
    finally:
        diffusers_logging.set_verbosity(level)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, max_sequence_length, device, dtype):
    """T5 embeddings exactly as the CogVideoX pipelines compute them (padded, truncated, no mask)."""
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    embeds = text_encoder(tokens.input_ids.to(device))[0]
    return embeds.to(device=device, dtype=dtype)


@torch.no_grad()
def encode_video_distribution(vae, videos, device):
    """[B, F, C, H, W] in [-1, 1] -> latent distribution parameters (mean and logvar) [B, 2C, f, h, w], encoded on
    `device` (the accelerator).

    Stored instead of a sample so every training step draws a fresh latent.
    """
    # Copied as they are (from pinned memory with --pin_memory: without blocking), converted on the device. To
    # `device`, not the VAE's: with --low_vram the VAE waits in CPU memory and comes to `device` for the encode, and
    # a copy of clips already on the GPU back to the CPU without blocking could be read before it had arrived.
    videos = videos.to(device, non_blocking=True)
    return vae.encode(videos.permute(0, 2, 1, 3, 4).to(dtype=vae.dtype)).latent_dist.parameters


def sample_latents(distribution_parameters, scaling_factor):
    """Draw a latent from stored (mean, logvar), scale it, and lay it out as [B, F, C, H, W]. diffusers'
    DiagonalGaussianDistribution(...).sample() written out, draw for draw (tests/test_step.py compares them): importing
    it imports every diffusers autoencoder, a quarter of a second before the first step of a run that needs no VAE."""
    mean, logvar = torch.chunk(distribution_parameters, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    noise = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    return ((mean + std * noise) * scaling_factor).permute(0, 2, 1, 3, 4).contiguous()


def read_config(pretrained, subfolder):
    """A diffusers component's config.json (`subfolder` of the pipeline `pretrained` names), read as its model class
    reads it (Hub download, revision, cache) without importing the class: the first diffusers autoencoder imported
    imports all of them, which a run from prepared data need not wait for before its first step."""
    from diffusers.configuration_utils import ConfigMixin

    class ComponentConfig(ConfigMixin):
        config_name = "config.json"

    return ComponentConfig.load_config(pretrained.path, subfolder=subfolder, revision=pretrained.revision,
                                       cache_dir=pretrained.cache_dir)


def vae_scale_factor_spatial(vae_config):
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def latent_grid(num_frames, height, width, transformer_config, spatial_scale=8):
    """(latent frames, height, width) of a clip, as the pipelines size them: CogVideoX 1.5 pads the latent frames to
    a multiple of patch_size_t (frame counts the trainer accepts need no padding)."""
    latent_frames = (num_frames - 1) // transformer_config.get("temporal_compression_ratio", 4) + 1
    latent_frames += -latent_frames % (transformer_config.get("patch_size_t") or 1)
    return latent_frames, height // spatial_scale, width // spatial_scale


def rotary_embeddings(transformer_config, latent_frames, latent_height, latent_width, device):
    """(cos, sin) rotary tables for a latent grid, computed as the diffusers pipelines do.

    None for models with sincos positions (CogVideoX-2b). CogVideoX 1.0 fits the grid into the
    base grid keeping aspect ratio; 1.5 (patch_size_t set) uses the "slice" grid over
    ceil(F / patch_size_t) temporal positions.
    """
    if not transformer_config["use_rotary_positional_embeddings"]:
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    patch = transformer_config["patch_size"]
    patch_t = transformer_config.get("patch_size_t")
    grid_h, grid_w = latent_height // patch, latent_width // patch
    base_w = transformer_config["sample_width"] // patch
    base_h = transformer_config["sample_height"] // patch
    if patch_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(
            embed_dim=transformer_config["attention_head_dim"],
            crops_coords=crops,
            grid_size=(grid_h, grid_w),
            temporal_size=latent_frames,
            device=device,
        )
    return get_3d_rotary_pos_embed(
        embed_dim=transformer_config["attention_head_dim"],
        crops_coords=None,
        grid_size=(grid_h, grid_w),
        temporal_size=(latent_frames + patch_t - 1) // patch_t,
        grid_type="slice",
        max_size=(base_h, base_w),
        device=device,
    )
