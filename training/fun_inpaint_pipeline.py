"""Sampling from a CogVideoX-Fun InP model with a start image (and optionally an end image), as Fun samples.

diffusers has no pipeline for Fun's InP models; this is diffusers' CogVideoXPipeline with Fun's inpaint latents added
to every transformer input. It follows aigc-apps/VideoX-Fun at commit 804a425: videox_fun/utils/utils.py
(get_image_to_video_latent: the start image held over every frame, the end image on the last, a mask of 255 on the
frames to generate) and videox_fun/pipeline/pipeline_cogvideox_fun_inpaint.py (the binarised mask, the masked video
at -1, Fun's reference noise of strength `noise_aug_strength` where the model's config has
add_noise_in_inpaint_model, the VAE's mode times its scaling factor, `1 - mask` resized to the latent grid and scaled,
mask then masked-video latents on the channel axis, after the noisy latents). Its denoising loop is CogVideoXPipeline's
(Fun's differs only in layout), with the scheduler given; Fun samples with diffusers' DDIMScheduler. With strength 1
(Fun's default) the first latents are pure noise, as here. tests/test_fun_inpaint_pipeline.py compares the inputs with
a transcription of Fun's code.

Imported only when a Fun InP run validates or saves: it imports diffusers' pipelines.
"""

import numpy as np
import torch
from diffusers import CogVideoXPipeline

from .inpaint import add_noise_to_reference_video, masked_video, resize_mask


# Fun's pipeline default: the strength of the noise on the kept pixels of the masked video.
NOISE_AUG_STRENGTH = 0.0563


def start_end_video(image, end_image, num_frames, height, width):
    """get_image_to_video_latent for one start image (PIL) and an optional end image: ([1, F, 3, H, W] pixels in
    [-1, 1], [1, F, 1, H, W] mask with 1 on the frames to generate). The start image is held over every frame (the
    mask hides all but the first), the end image put on the last; both are resized to (width, height) as PIL does."""
    def pixels(picture):
        array = np.array(picture.convert("RGB").resize((width, height)))
        return torch.from_numpy(array).permute(2, 0, 1).float() / 255 * 2 - 1  # [3, H, W]

    video = pixels(image)[None].repeat(num_frames, 1, 1, 1)
    mask = torch.ones(num_frames, 1, height, width)
    mask[0] = 0
    if end_image is not None:
        video[-1] = pixels(end_image)
        mask[-1] = 0
    return video[None], mask[None]


class CogVideoXFunInpaintPipeline(CogVideoXPipeline):
    """Text-and-image-to-video with a CogVideoX-Fun InP transformer (2C + 1 input channels): `image` the first frame,
    `end_image` (optional) the last. Loads and takes LoRAs as CogVideoXPipeline."""

    def prepare_latents(self, batch_size, num_channels_latents, *args, **kwargs):
        # CogVideoXPipeline sizes the noise by the transformer's input channels; a Fun InP transformer's hold the
        # inpaint latents too.
        return super().prepare_latents(batch_size, self.vae.config.latent_channels, *args, **kwargs)

    def inpaint_latents(self, image, end_image, num_frames, height, width, generator=None,
                        noise_aug_strength=NOISE_AUG_STRENGTH):
        """[1, f, 1 + C, h, w]: the mask and the masked video's latents, as Fun's pipeline builds them. The reference
        noise is drawn from a generator seeded from `generator`'s seed (Fun draws it from torch's global generator),
        so a seeded call repeats and the noise of the latents is the same draw as without it."""
        device = self._execution_device
        video, mask = start_end_video(image, end_image, num_frames, height, width)
        masked = masked_video(video, mask).permute(0, 2, 1, 3, 4)  # [1, 3, F, H, W]
        if self.transformer.config.get("add_noise_in_inpaint_model"):
            noise_generator = torch.Generator().manual_seed(generator.initial_seed()) if generator is not None else None
            masked = add_noise_to_reference_video(masked, generator=noise_generator, strength=noise_aug_strength)
        latents = self.vae.encode(masked.to(device, self.vae.dtype)).latent_dist.mode() * self.vae.config.scaling_factor
        kept = resize_mask(1 - mask.permute(0, 2, 1, 3, 4), latents.shape).to(latents) * self.vae.config.scaling_factor
        return torch.cat([kept, latents], dim=1).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, end_image=None, height=None, width=None, num_frames=None,
                 generator=None, noise_aug_strength=NOISE_AUG_STRENGTH, **kwargs):
        if image is None:
            raise ValueError("CogVideoXFunInpaintPipeline needs `image`, the first frame")
        height = height or self.transformer.config.sample_height * self.vae_scale_factor_spatial
        width = width or self.transformer.config.sample_width * self.vae_scale_factor_spatial
        num_frames = num_frames or self.transformer.config.sample_frames
        inpaint = self.inpaint_latents(image, end_image, num_frames, height, width, generator, noise_aug_strength)

        def with_inpaint_latents(module, args, call_kwargs):
            hidden_states = call_kwargs["hidden_states"]
            if hidden_states.shape[1] != inpaint.shape[1]:
                raise ValueError(f"{num_frames} frames give {inpaint.shape[1]} latent frames, but the model was given "
                                 f"{hidden_states.shape[1]}: choose a frame count whose latent frames the model's "
                                 "temporal patch divides")
            condition = inpaint.to(hidden_states).expand(hidden_states.shape[0], -1, -1, -1, -1)
            return args, {**call_kwargs, "hidden_states": torch.cat([hidden_states, condition], dim=2)}

        hook = self.transformer.register_forward_pre_hook(with_inpaint_latents, with_kwargs=True)
        try:
            return super().__call__(prompt=prompt, height=height, width=width, num_frames=num_frames,
                                    generator=generator, **kwargs)
        finally:
            hook.remove()
