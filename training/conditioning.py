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
from .layouts import has_control_clips
from .models import encode_video_distribution, sample_latents


# Every CogVideoX VAE downsamples 8x spatially; used only to state learned-position sizes in pixels.
SPATIAL_SCALE = 8


def _split(text, separator):
    return [part.strip() for part in text.split(separator) if part.strip()]


def _listed(validation, flag):
    """The entries of a [validation] flag that lists one item per prompt, joined by --validation_prompt_separator."""
    value = getattr(validation, flag)
    return _split(value, validation.validation_prompt_separator) if value else []


def _prompts(validation):
    return _listed(validation, "validation_prompt")


def _images(validation):
    return _listed(validation, "validation_images")


class TextToVideo:
    name = "text-to-video"
    image_to_video = False  # the dataset need not keep the first frame
    control = False  # batches carry no control videos
    inpaint = False  # the transformer takes no inpaint latents
    fun = False  # a CogVideoX-Fun model: its LoRA is also written in Fun's form
    # The model card: what the run trained, and how to generate with it (module, pipeline class, extra arguments).
    card_label = "text-to-video"
    card_tag = "text-to-video"  # the Hub's task tag
    card_pipeline = ("diffusers", "CogVideoXPipeline", "")
    validation_scheduler = "CogVideoXDPMScheduler"  # the diffusers scheduler validation videos are sampled with
    training_scheduler = "CogVideoXDPMScheduler"  # the one whose noise schedule training draws from
    needs_vae = False  # the conditioning itself encodes nothing (raw clips need the VAE: see data_source.py)

    @property
    def pipeline_class(self):
        from diffusers import CogVideoXPipeline

        return CogVideoXPipeline

    def for_flags(self, training, data):
        """The conditioning [training] and [data] ask of this trainer: CogVideoX-Fun's inpaint latents for --train_mode
        inpaint or i2v, its control latents for data with control videos, else this one."""
        if training.train_mode in ("inpaint", "i2v"):
            return FunInpaint()
        return FunControl() if has_control_clips(data) else self

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
                "or training/cogvideox_image_to_video_sft.py (a CogVideoX-Fun Control model takes as many: give its "
                "control videos, --control_column or control_file_path in --train_data_meta)"
            )
        if validation.validation_control_videos:
            problems.append("--validation_control_videos (or CogVideoX-Fun's --validation_paths without --train_mode "
                            "inpaint) is for CogVideoX-Fun Control runs: the data gives no control videos "
                            "(--control_column, or control_file_path in --train_data_meta)")
        for flag in ("validation_images", "validation_end_images"):
            if getattr(validation, flag):
                problems.append(f"--{flag} is for the image-to-video trainers and CogVideoX-Fun InP models "
                                "(--train_mode inpaint)")
        if training.ignore_learned_positional_embeddings:
            problems.append("--ignore_learned_positional_embeddings is only for the image-to-video trainers")
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
    card_label = card_tag = "image-to-video"
    card_pipeline = ("diffusers", "CogVideoXImageToVideoPipeline", ', image=load_image("first_frame.png")')
    needs_vae = True  # the first frame is noise-augmented and encoded every step, also from precomputed data

    @property
    def pipeline_class(self):
        from diffusers import CogVideoXImageToVideoPipeline

        return CogVideoXImageToVideoPipeline

    def for_flags(self, training, data):
        # --train_mode and control videos are refused below: CogVideoX-Fun's runs are the text-to-video trainers'
        self.control_data = has_control_clips(data)
        return self

    def check_args(self, model, buckets, training, validation, transformer_config, data_source):
        problems = []
        if training.train_mode != "normal":
            problems.append(f"--train_mode {training.train_mode} is CogVideoX-Fun's, for its InP models: use "
                            "training/cogvideox_text_to_video_lora.py or training/cogvideox_text_to_video_sft.py")
        if validation.validation_end_images:
            problems.append("--validation_end_images is for CogVideoX-Fun InP models (the text-to-video trainers with "
                            "--train_mode inpaint); CogVideoXImageToVideoPipeline takes a first frame only")
        if getattr(self, "control_data", False) or validation.validation_control_videos:
            problems.append("control videos (--control_column, control_file_path, --validation_control_videos) "
                            "train CogVideoX-Fun Control models: use training/cogvideox_text_to_video_lora.py or "
                            "training/cogvideox_text_to_video_sft.py")
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
    inpaint = True  # the transformer also takes a mask channel and the masked clip's latents
    fun = True
    card_label, card_tag = "CogVideoX-Fun InP (image-to-video)", "image-to-video"
    card_pipeline = ("training.fun_inpaint_pipeline", "CogVideoXFunInpaintPipeline",
                     ', image=load_image("first_frame.png")')
    needs_vae = True  # the masked clip is encoded every step, also from prepared data
    validation_scheduler = "DDIMScheduler"  # as Fun validates and predicts (its default sampler)
    # Fun trains with DDPMScheduler: no snr_shift_scale (3.0 in the 2b configs), unlike CogVideoX's own schedulers.
    training_scheduler = "DDPMScheduler"

    @property
    def pipeline_class(self):
        from .fun_inpaint_pipeline import CogVideoXFunInpaintPipeline

        return CogVideoXFunInpaintPipeline

    def check_args(self, model, buckets, training, validation, transformer_config, data_source):
        problems = []
        channels = inpaint_channels(transformer_config["out_channels"])
        if transformer_config["in_channels"] != channels:
            problems.append(
                f"--train_mode {training.train_mode} trains a CogVideoX-Fun InP model ({channels} input channels: "
                f"noisy latents, mask, masked-video latents); --pretrained_model_name_or_path "
                f"{model.pretrained_model_name_or_path} takes {transformer_config['in_channels']}"
            )
        if validation.validation_control_videos:
            problems.append(f"--validation_control_videos is for CogVideoX-Fun Control runs, not --train_mode "
                            f"{training.train_mode}")
        if training.ignore_learned_positional_embeddings:
            problems.append("--ignore_learned_positional_embeddings is only for the image-to-video trainers")
        prompts = _prompts(validation)
        for flag, images in (("validation_images", _images(validation)),
                             ("validation_end_images", _listed(validation, "validation_end_images"))):
            if prompts and len(images) != len(prompts) and (images or flag == "validation_images"):
                problems.append(f"{len(prompts)} validation prompts but {len(images)} --{flag}: an InP model "
                                "validates from a first frame (and optionally a last), one image per prompt")
            problems += [f"--{flag}: no such file {image}" for image in images
                         if "://" not in image and not Path(image).is_file()]
        return problems

    def validation_cases(self, validation):
        """The prompt, its first frame and, when given, its last (CogVideoXFunInpaintPipeline's `end_image`)."""
        from diffusers.utils import load_image

        ends = _listed(validation, "validation_end_images")
        return [{"prompt": prompt, "image": load_image(image), **({"end_image": load_image(ends[i])} if ends else {})}
                for i, (prompt, image) in enumerate(zip(_prompts(validation), _images(validation)))]

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


class FunControl(TextToVideo):
    """CogVideoX-Fun's Control models (the text-to-video trainers, data with control videos): the noisy latents, then
    the control video's latents on the channel axis, as Fun's train_control.py builds them (the VAE's sample, times
    its scaling factor) and diffusers' CogVideoXFunControlPipeline feeds them at inference."""

    control = True
    fun = True
    card_label, card_tag = "CogVideoX-Fun Control", "video-to-video"
    card_pipeline = ("diffusers", "CogVideoXFunControlPipeline", ', control_video=load_video("control.mp4")[:49]')
    needs_vae = True  # the control video is encoded every step
    # The control pipeline's step takes no DPM arguments; Fun validates (and predicts, by default) with DDIM.
    validation_scheduler = "DDIMScheduler"
    training_scheduler = "DDPMScheduler"  # as Fun's train_control.py (no snr_shift_scale)

    @property
    def pipeline_class(self):
        from diffusers import CogVideoXFunControlPipeline

        return CogVideoXFunControlPipeline

    def check_args(self, model, buckets, training, validation, transformer_config, data_source):
        problems = []
        expected = 2 * transformer_config["out_channels"]
        if transformer_config["in_channels"] != expected:
            problems.append(
                f"control videos train a CogVideoX-Fun Control model ({expected} input channels: noisy latents, "
                f"control latents); --pretrained_model_name_or_path {model.pretrained_model_name_or_path} takes "
                f"{transformer_config['in_channels']}: leave out --control_column (and control_file_path) for it"
            )
        if data_source.name != "raw clips":
            problems.append("--load_tensors with control videos: prepared data holds no control latents; train a "
                            "Control model from the clips (leave out --load_tensors)")
        problems += [f"--{flag} is for image-to-video and InP models, not a Control run (its frames come from the "
                     "control videos)" for flag in ("validation_images", "validation_end_images")
                     if getattr(validation, flag)]
        if training.ignore_learned_positional_embeddings:
            problems.append("--ignore_learned_positional_embeddings is only for the image-to-video trainers")
        prompts, controls = _prompts(validation), _listed(validation, "validation_control_videos")
        if prompts and len(prompts) != len(controls):
            problems.append(f"{len(prompts)} validation prompts but {len(controls)} --validation_control_videos: give "
                            "one control video per prompt, joined by --validation_prompt_separator")
        self.validation_num_frames = validation_frames(validation, buckets)
        for path in controls:
            problem = control_video_problem(path, self.validation_num_frames, "validation videos",
                                            "--validation_num_frames")
            if problem:
                problems.append(f"--validation_control_videos: {problem}")
        return problems

    def model_input(self, noisy_latents, batch, context):
        """Noisy latents [B, f, C, h, w], then the control video's latents (Fun's channel order)."""
        with torch.no_grad():
            control = sample_latents(encode_video_distribution(context.vae, batch["control"], context.device),
                                     context.vae_scaling_factor)
        return torch.cat([noisy_latents, control.to(noisy_latents.dtype)], dim=2)

    def validation_cases(self, validation):
        """The pipeline's keyword arguments per prompt: the prompt, and its control video's first frames (as many as
        validation videos have; the pipeline resizes them and takes its frame count from them)."""
        from PIL import Image

        from .video_io import read_frames

        return [{"prompt": prompt,
                 "control_video": [Image.fromarray(frame.numpy())
                                   for frame in read_frames(path, list(range(self.validation_num_frames)))]}
                for prompt, path in zip(_prompts(validation), _listed(validation, "validation_control_videos"))]


def control_video_problem(path, frames, videos, flag):
    """Why the control video `path` cannot give `frames` frames to the `videos` generated from it (their count set by
    `flag`), or None: the control pipeline takes its frame count from the control video. Reads the header only."""
    from .video_io import VideoReadError, probe_video

    try:
        info = probe_video(path)
    except (VideoReadError, OSError) as error:
        return f"{path}: {error}"
    if info.num_frames < frames:
        return (f"{path} has {info.num_frames} frames; {videos} have {frames} ({flag}): give a longer control video "
                "or fewer frames")
    return None


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
