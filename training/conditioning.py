"""What the transformer is conditioned on: one small class per task.

The training core asks its conditioning for: the model input built from the noisy latents
(`model_input`), extra transformer keyword arguments (`transformer_kwargs`), the pipeline
class used for validation, and the validation cases. Text-to-video needs nothing beyond the
prompt embeddings; image-to-video concatenates first-frame latents on the channel axis,
exactly as `CogVideoXImageToVideoPipeline` does at inference (tests/test_conditioning.py pins it).
"""

from pathlib import Path

import torch

from .buckets import validation_frames
from .inpaint import MASK_FILL, full_mask_keep, inpaint_channels, inpaint_latents, random_mask, with_inpaint_latents


# Every CogVideoX VAE downsamples 8x spatially; used only to state learned-position sizes in pixels.
SPATIAL_SCALE = 8


def _split(text, separator):
    return [part.strip() for part in text.split(separator) if part.strip()]


def _prompts(validation):
    return (_split(validation.validation_prompt, validation.validation_prompt_separator)
            if validation.validation_prompt else [])


def _images(validation):
    return (_split(validation.validation_images, validation.validation_prompt_separator)
            if validation.validation_images else [])


class TextToVideo:
    name = "text-to-video"
    image_to_video = False  # the dataset need not keep the first frame
    needs_vae = False  # the conditioning itself encodes nothing (raw clips need the VAE: see data_source.py)

    @property
    def pipeline_class(self):
        from diffusers import CogVideoXPipeline

        return CogVideoXPipeline

    def for_flags(self, training):
        """The conditioning [training] asks of this trainer: CogVideoX-Fun's inpaint latents for --train_mode inpaint
        or i2v, else this one."""
        return FunInpaint() if training.train_mode != "normal" else self

    def check_args(self, model, buckets, training, validation, transformer_config, data_source):
        """Problems (one line each) that make this conditioning unusable with these flags/model/data."""
        problems = []
        if transformer_config["in_channels"] == inpaint_channels(transformer_config["out_channels"]):
            problems.append(
                f"--pretrained_model_name_or_path {model.pretrained_model_name_or_path} is a CogVideoX-Fun InP model "
                f"({transformer_config['in_channels']} input channels: noisy latents, mask, masked-video latents): "
                "pass --train_mode inpaint (CogVideoX-Fun's normal mode gives it no inpaint latents)"
            )
        elif transformer_config["in_channels"] != transformer_config["out_channels"]:
            problems.append(
                f"--pretrained_model_name_or_path {model.pretrained_model_name_or_path} is an image-to-video model "
                f"({transformer_config['in_channels']} input channels); use training/cogvideox_image_to_video_lora.py "
                "or training/cogvideox_image_to_video_sft.py"
            )
        for flag, value in (("validation_images", validation.validation_images),
                            ("ignore_learned_positional_embeddings", training.ignore_learned_positional_embeddings)):
            if value:
                problems.append(f"--{flag} is only for the image-to-video trainers")
        return problems

    def adapt_transformer(self, transformer, training):
        return transformer

    def shape_problems(self, shapes, training, transformer_config):
        return []

    def model_input(self, noisy_latents, batch, context):
        return noisy_latents

    def transformer_kwargs(self, noisy_latents, context):
        return {}

    def validation_cases(self, validation):
        """One dict of pipeline keyword arguments per validation prompt."""
        return [{"prompt": prompt} for prompt in _prompts(validation)]


class ImageToVideo(TextToVideo):
    name = "image-to-video"
    image_to_video = True
    needs_vae = True  # the first frame is noise-augmented and encoded every step, also from precomputed data

    @property
    def pipeline_class(self):
        from diffusers import CogVideoXImageToVideoPipeline

        return CogVideoXImageToVideoPipeline

    def for_flags(self, training):
        return self  # --train_mode is refused below: CogVideoX-Fun's modes are the text-to-video trainers'

    def check_args(self, model, buckets, training, validation, transformer_config, data_source):
        problems = []
        if training.train_mode != "normal":
            problems.append(f"--train_mode {training.train_mode} is CogVideoX-Fun's, for its InP models: use "
                            "training/cogvideox_text_to_video_lora.py or training/cogvideox_text_to_video_sft.py")
        if transformer_config["in_channels"] != 2 * transformer_config["out_channels"]:
            problems.append(
                f"--pretrained_model_name_or_path {model.pretrained_model_name_or_path} is a text-to-video model; "
                "use training/cogvideox_text_to_video_lora.py or training/cogvideox_text_to_video_sft.py"
            )
        if not 0.0 <= training.noised_image_dropout <= 1.0:
            problems.append(f"--noised_image_dropout must be between 0 and 1 (got {training.noised_image_dropout})")
        prompts = _prompts(validation)
        images = _images(validation)
        if prompts and not images:
            problems.append("--validation_prompt needs --validation_images (one image per prompt, same separator)")
        elif len(prompts) != len(images):
            problems.append(f"{len(prompts)} validation prompts but {len(images)} validation images: give one image per prompt")
        for image in images:
            if "://" not in image and not Path(image).is_file():
                problems.append(f"--validation_images: no such file {image}")
        learned = _learned_shape(transformer_config, training)
        if learned is not None:
            frames, height, width = learned
            sizes = {(validation.height, validation.width)} | data_source.training_resolutions(buckets)
            if sizes != {(height, width)} or (prompts and validation_frames(validation, buckets) != frames):
                problems.append(_learned_positions_problem(learned))
        return problems

    def shape_problems(self, shapes, training, transformer_config):
        """Problems of the (frames, height, width) shapes the data trains at: CogVideoX-5b-I2V's learned positions
        exist for one shape only; at any other, diffusers silently swaps in a sin-cos table the model never saw."""
        learned = _learned_shape(transformer_config, training)
        if learned is None or set(shapes) <= {learned}:
            return []
        others = ", ".join("x".join(map(str, shape)) for shape in sorted(set(shapes) - {learned}))
        return [f"{_learned_positions_problem(learned)}; the data has buckets {others}"]

    def adapt_transformer(self, transformer, training):
        if training.ignore_learned_positional_embeddings:
            drop_learned_positional_embeddings(transformer)
        return transformer

    def model_input(self, noisy_latents, batch, context):
        """Noisy video latents with the (noise-augmented, maybe dropped) first-frame latents on the channel axis."""
        # [B, 1, C, H, W] in [-1, 1]: copied as it is (from pinned memory without blocking), converted on the device
        images = batch["image"].to(context.device, non_blocking=True).to(dtype=context.vae.dtype)
        batch_size = images.shape[0]
        sigmas = torch.exp(torch.randn(batch_size, device=images.device) * 0.5 - 3.0)  # log-normal(-3, 0.5) per sample
        images = images + torch.randn_like(images) * sigmas.view(-1, 1, 1, 1, 1).to(images.dtype)
        with torch.no_grad():
            latents = image_condition_latents(
                context.vae, images, noisy_latents.shape[1], context.vae_scaling_factor, context.vae_invert_scale_latents
            )
        dropout = context.training.noised_image_dropout
        keep = (torch.rand(batch_size, device=latents.device) >= dropout).to(latents.dtype)
        latents = latents * keep.view(-1, 1, 1, 1, 1)  # dropout decided per sample, not once per batch
        return torch.cat([noisy_latents, latents.to(noisy_latents.dtype)], dim=2)

    def transformer_kwargs(self, noisy_latents, context):
        if context.transformer_config.get("ofs_embed_dim") is None:
            return {}
        return {"ofs": noisy_latents.new_full((1,), 2.0)}  # the value the 1.5 I2V pipeline uses

    def validation_cases(self, validation):
        from diffusers.utils import load_image

        return [{"prompt": prompt, "image": load_image(image)}
                for prompt, image in zip(_prompts(validation), _images(validation))]


class FunInpaint(TextToVideo):
    """CogVideoX-Fun's InP models (--train_mode inpaint or i2v, the text-to-video trainers): the noisy latents, then
    the inpaint latents (mask, masked-clip latents) on the channel axis, built each step as Fun's training builds
    them (training/inpaint.py). Raw clips draw Fun's random masks; prepared data (--load_tensors) holds the first
    frame only, so its masks keep the first frame and generate the rest (Fun's image_start_only kind)."""

    name = "text-to-video"  # the text-to-video trainers' flags
    image_to_video = True  # the first frame: prepared data's masked clip is made from it
    needs_vae = True  # the masked clip is encoded every step, also from prepared data

    def check_args(self, model, buckets, training, validation, transformer_config, data_source):
        problems = []
        channels = inpaint_channels(transformer_config["out_channels"])
        if transformer_config["in_channels"] != channels:
            problems.append(
                f"--train_mode {training.train_mode} trains a CogVideoX-Fun InP model ({channels} input channels: "
                f"noisy latents, mask, masked-video latents); --pretrained_model_name_or_path "
                f"{model.pretrained_model_name_or_path} takes {transformer_config['in_channels']}"
            )
        if validation.validation_prompt:
            problems.append(f"--validation_prompt with --train_mode {training.train_mode}: validation videos of "
                            "CogVideoX-Fun InP models (its inpaint pipeline) are not made yet; leave it out")
        for flag, value in (("validation_images", validation.validation_images),
                            ("ignore_learned_positional_embeddings", training.ignore_learned_positional_embeddings)):
            if value:
                problems.append(f"--{flag} is only for the image-to-video trainers")
        return problems

    def model_input(self, noisy_latents, batch, context):
        """Noisy latents [B, f, C, h, w], then the mask and the masked clip's latents (Fun's channel order)."""
        video = batch.get("video")
        if video is not None:  # raw clips: Fun's random masks
            video = video.to(context.device, non_blocking=True).to(context.vae.dtype)
            frames, _, height, width = video.shape[1:]
            masks = [random_mask(frames, height, width) for _ in range(video.shape[0])]
        else:  # prepared data: the first frame, then as many masked frames as the latents stand for
            first = batch["image"].to(context.device, non_blocking=True).to(context.vae.dtype)  # [B, 1, C, H, W]
            frames = (noisy_latents.shape[1] - 1) * context.transformer_config.get("temporal_compression_ratio", 4) + 1
            video = torch.cat([first, first.new_full((first.shape[0], frames - 1, *first.shape[2:]), MASK_FILL)], 1)
            masks = [random_mask(frames, *first.shape[3:], image_start_only=True) for _ in range(first.shape[0])]
        mask = torch.stack(masks).to(video.device)  # [B, F, 1, H, W], 1 = generate
        latents = inpaint_latents(context.vae, video, mask, context.vae_scaling_factor,
                                  bool(context.transformer_config.get("add_noise_in_inpaint_model")),
                                  full_mask_keep(mask))
        return with_inpaint_latents(noisy_latents, latents)


def _learned_shape(transformer_config, training):
    """(frames, height, width) of the model's learned positional embeddings, or None (none, or ignored: [training]'s
    --ignore_learned_positional_embeddings)."""
    if (not transformer_config.get("use_learned_positional_embeddings")
            or training.ignore_learned_positional_embeddings):
        return None
    return (transformer_config["sample_frames"], transformer_config["sample_height"] * SPATIAL_SCALE,
            transformer_config["sample_width"] * SPATIAL_SCALE)


def _learned_positions_problem(learned):
    frames, height, width = learned
    return (
        f"this model has learned positional embeddings for {height}x{width} only, at {frames} frames; train and "
        f"validate at --height_buckets {height} --width_buckets {width} --height {height} --width {width} with "
        f"{frames}-frame clips (--frame_buckets {frames}), or pass --ignore_learned_positional_embeddings for other "
        "shapes (docs/image-to-video.md: the same change is needed at inference)"
    )


def image_condition_latents(vae, images, num_latent_frames, scaling_factor, invert_scale_latents, generator=None):
    """[B, 1, C, H, W] images -> [B, F, C, h, w] latents: the first frame's latent, then zeros.

    The scaling follows the pipeline, including CogVideoX 1.5's inverted scale.
    """
    encoded = vae.encode(images.permute(0, 2, 1, 3, 4)).latent_dist.sample(generator=generator)
    encoded = encoded.permute(0, 2, 1, 3, 4)  # [B, 1, C, h, w]
    encoded = encoded / scaling_factor if invert_scale_latents else encoded * scaling_factor
    padding = encoded.new_zeros((encoded.shape[0], num_latent_frames - 1, *encoded.shape[2:]))
    return torch.cat([encoded, padding], dim=1)


def drop_learned_positional_embeddings(transformer):
    """Multi-resolution I2V: CogVideoX-5b-I2V's learned positions exist for one size only (and are ~0)."""
    patch_embed = transformer.patch_embed
    if getattr(patch_embed, "pos_embedding", None) is not None:
        del patch_embed.pos_embedding
    patch_embed.use_learned_positional_embeddings = False
    transformer.register_to_config(use_learned_positional_embeddings=False)


CONDITIONINGS = {"text-to-video": TextToVideo, "image-to-video": ImageToVideo}
