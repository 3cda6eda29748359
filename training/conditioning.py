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

    def check_args(self, model, buckets, training, validation, transformer_config, data_source):
        """Problems (one line each) that make this conditioning unusable with these flags/model/data."""
        problems = []
        if transformer_config["in_channels"] != transformer_config["out_channels"]:
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

    def check_args(self, model, buckets, training, validation, transformer_config, data_source):
        problems = []
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
