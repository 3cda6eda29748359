"""CogVideoX-Fun's inpaint latents (--train_mode inpaint, or i2v: the same in Fun's code), as its training builds them.

A Fun InP transformer takes 2C + 1 input channels (33 for CogVideoX-Fun's 16-channel VAE): the noisy latents (C), the
mask (1) and the masked clip's latents (C), in that order on the channel axis. Per clip:

    mask = random_mask(frames, height, width)     # [F, 1, H, W], 1 = to generate, 0 = kept (Fun's 10 kinds)
    masked = masked_video(video, mask)            # kept pixels as they are, the rest -1
    masked = add_noise_to_reference_video(masked) # where the model's config says add_noise_in_inpaint_model
    latents = cat([resize_mask(1 - mask), vae(masked)]) * keep * scaling_factor   # keep: the full-mask rule

Everything follows aigc-apps/VideoX-Fun at commit 804a425: videox_fun/data/utils.py (get_random_mask),
scripts/cogvideox_fun/train_lora.py (the collate function's masked video, resize_mask, the training loop's t2v_flag and
inpaint latents), videox_fun/pipeline/pipeline_cogvideox_fun_inpaint.py (add_noise_to_reference_video) and
videox_fun/models/cogvideox_transformer3d.py (the channel order). tests/test_inpaint.py pins them against a reference
transcribed from that code. The masks' numbers come from numpy's global generator (Fun mixes numpy's, torch's and
Python's), which checkpoints keep, so a run and its resume draw the same masks.
"""

import numpy as np
import torch
import torch.nn.functional as F


# get_random_mask's kinds and their probabilities, for clips (several frames) and for still images (one frame): 0 a
# box on every frame, 1 everything (text-to-video), 2 the first 1-4 frames kept, 3 the first and last 1-4 kept, 4 a
# box on a span of frames, 5 random pixels, 6 small boxes on random frames, 7 an ellipse and 8 a circle on the first
# frame, 9 random whole frames.
MASK_KINDS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
MASK_KIND_PROBABILITIES = (0.05, 0.2, 0.2, 0.2, 0.05, 0.05, 0.05, 0.1, 0.05, 0.05)
STILL_MASK_KINDS = (0, 1, 7, 8)
STILL_MASK_KIND_PROBABILITIES = (0.2, 0.7, 0.05, 0.05)
# The training loop's t2v_flag: a sample whose mask covers everything trains with zero inpaint latents this often.
FULL_MASK_ZERO_PROBABILITY = 0.9
# The masked pixels' value (Fun's collate: `torch.ones_like(...) * -1 * mask`).
MASK_FILL = -1.0


def _box(height, width, rng):
    """Kinds 0 and 4: a box of a random size (a quarter to three quarters of each side) around a random centre."""
    center_x, center_y = rng.randint(0, width), rng.randint(0, height)
    size_x = rng.randint(width // 4, max(width // 4 * 3, width // 4 + 1))
    size_y = rng.randint(height // 4, max(height // 4 * 3, height // 4 + 1))
    return (slice(max(center_y - size_y // 2, 0), min(center_y + size_y // 2, height)),
            slice(max(center_x - size_x // 2, 0), min(center_x + size_x // 2, width)))


def draw_mask_kind(frames, rng=np.random):
    """One of get_random_mask's kinds, with its probabilities (a still image has its own four)."""
    if frames != 1:
        return int(rng.choice(MASK_KINDS, p=MASK_KIND_PROBABILITIES))
    return int(rng.choice(STILL_MASK_KINDS, p=STILL_MASK_KIND_PROBABILITIES))


def random_mask(frames, height, width, kind=None, rng=np.random, image_start_only=False):
    """get_random_mask: a [F, 1, H, W] uint8 mask, 1 where the model generates, 0 where the clip is kept. `kind`: one
    of MASK_KINDS (default: drawn with Fun's probabilities); `image_start_only`: the first frame kept, the rest (of a
    still image: all) generated, as Fun's image_start_only. Numbers are drawn from `rng` (numpy's global generator,
    which checkpoints keep; Fun draws some of them from torch's and Python's), the random pixels of kind 5 from
    torch's, as Fun; only the mask is a tensor, so the memory estimate can run it on fake tensors."""
    mask = torch.zeros((frames, 1, height, width), dtype=torch.uint8)
    if image_start_only:
        mask[1 if frames != 1 else 0:] = 1
        return mask
    kind = draw_mask_kind(frames, rng) if kind is None else kind
    if kind == 0:
        rows, cols = _box(height, width, rng)
        mask[:, :, rows, cols] = 1
    elif kind == 1:
        mask[:] = 1
    elif kind == 2:
        kept = rng.randint(1, 5)
        mask[kept:] = 1
    elif kind == 3:
        kept = rng.randint(1, 5)
        mask[kept:-kept] = 1
    elif kind == 4:
        rows, cols = _box(height, width, rng)
        before, after = rng.randint(0, max(frames // 2, 1)), rng.randint(frames // 2, frames)
        mask[before:after, :, rows, cols] = 1
    elif kind == 5:
        mask = torch.randint(0, 2, (frames, 1, height, width), dtype=torch.uint8)
    elif kind == 6:
        count = rng.randint(1, max(frames // 2, 1) + 1)  # Python's random.randint: both ends included
        for frame in rng.permutation(frames)[:count].tolist():  # random.sample
            block_height, block_width = rng.randint(1, height // 4 + 1), rng.randint(1, width // 4 + 1)
            top, left = rng.randint(0, height - block_height + 1), rng.randint(0, width - block_width + 1)
            mask[frame, 0, top:top + block_height, left:left + block_width] = 1
    elif kind in (7, 8):
        center_x, center_y = rng.randint(0, width), rng.randint(0, height)
        short = min(height, width)
        y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                              indexing="ij")
        if kind == 7:  # an ellipse: semi-axes a (along x) and b (along y)
            a = rng.randint(short // 8, max(short // 4, short // 8 + 1))
            b = rng.randint(short // 8, max(short // 4, short // 8 + 1))
            mask[0, 0] = ((y - center_y) ** 2 / b ** 2 + (x - center_x) ** 2 / a ** 2 < 1).to(torch.uint8)
        else:
            radius = rng.randint(short // 8, max(short // 4, short // 8 + 1))
            mask[0, 0] = ((y - center_y) ** 2 + (x - center_x) ** 2 < radius ** 2).to(torch.uint8)
    elif kind == 9:
        for frame in range(frames):
            if rng.rand() > 0.5:
                mask[frame] = 1
    else:
        raise ValueError(f"no mask kind {kind} (CogVideoX-Fun's are 0 to 9)")
    return mask


def masked_video(video, mask):
    """Fun's collate: the clip's pixels where the mask keeps them, -1 where the model generates. `video`
    [..., F, C, H, W] in [-1, 1], `mask` [..., F, 1, H, W]."""
    mask = mask.to(video.dtype)
    return video * (1 - mask) + torch.full_like(video, MASK_FILL) * mask


def add_noise_to_reference_video(video, generator=None, strength=None):
    """Fun's add_noise_to_reference_video (models with add_noise_in_inpaint_model): Gaussian noise of one strength
    per clip, exp(N(-3, 0.5)) in training or `strength` (its `ratio`: sampling), on every pixel but the masked ones
    (-1). `video`: [B, ...]."""
    if strength is None:
        sigma = torch.exp(torch.normal(-3.0, 0.5, (video.shape[0],), generator=generator)).to(video.device, video.dtype)
    else:
        sigma = torch.full((video.shape[0],), strength, device=video.device, dtype=video.dtype)
    noise = (torch.randn_like(video) if generator is None
             else torch.randn(video.shape, generator=generator).to(video.device, video.dtype))
    noise = noise * sigma.view(-1, *[1] * (video.dim() - 1))
    return video + torch.where(video == MASK_FILL, torch.zeros_like(noise), noise)


def resize_mask(mask, latent_shape):
    """Fun's resize_mask (process_first_frame_only): [B, 1, F, H, W] -> [B, 1, f, h, w] for latents [B, C, f, h, w],
    trilinear; the first frame alone to the first latent frame, the other frames to the others."""
    frames, height, width = latent_shape[2:]
    first = F.interpolate(mask[:, :, :1], size=(1, height, width), mode="trilinear", align_corners=False)
    if frames == 1:
        return first
    rest = F.interpolate(mask[:, :, 1:], size=(frames - 1, height, width), mode="trilinear", align_corners=False)
    return torch.cat([first, rest], dim=2)


def full_mask_keep(mask, rng=np.random):
    """The training loop's t2v_flag: per sample 0 (its inpaint latents zeroed) where the mask covers every pixel of
    every frame and a draw falls under FULL_MASK_ZERO_PROBABILITY, else 1. `mask`: [B, F, 1, H, W], 1 = generate.
    Fun draws only for full masks; drawing for every sample changes nothing else, and needs no value of the mask
    (the memory estimate's is fake)."""
    full = (mask == 1).flatten(1).all(dim=1)
    draws = torch.as_tensor(rng.rand(mask.shape[0]), device=mask.device)
    return 1 - (full & (draws < FULL_MASK_ZERO_PROBABILITY)).float()


def encode_masked_video(vae, video):
    """[B, F, C, H, W] pixels -> a sample of the VAE's latent distribution [B, C, f, h, w] (unscaled), as Fun's
    _batch_encode_vae."""
    return vae.encode(video.permute(0, 2, 1, 3, 4).to(dtype=vae.dtype)).latent_dist.sample()


def inpaint_latents(vae, video, mask, scaling_factor, add_noise, keep):
    """The inpaint latents [B, f, 1 + C, h, w] of clips `video` [B, F, C, H, W] in [-1, 1] under masks `mask`
    [B, F, 1, H, W] (1 = generate): the kept area (1 - mask) resized to the latent grid, then the masked clip's
    latents, both multiplied by `keep` [B] (full_mask_keep) and the VAE's scaling factor, as Fun's training loop."""
    masked = masked_video(video, mask)
    if add_noise:
        masked = add_noise_to_reference_video(masked)
    with torch.no_grad():
        latents = encode_masked_video(vae, masked)  # [B, C, f, h, w]
    kept = 1 - mask.permute(0, 2, 1, 3, 4).to(latents.dtype)  # [B, 1, F, H, W]
    condition = torch.cat([resize_mask(kept, latents.shape), latents], dim=1)
    condition = condition * keep.to(condition.device, condition.dtype).view(-1, 1, 1, 1, 1) * scaling_factor
    return condition.permute(0, 2, 1, 3, 4)


def with_inpaint_latents(noisy_latents, latents):
    """The transformer's input: noisy latents [B, f, C, h, w], then the inpaint latents [B, f, 1 + C, h, w] on the
    channel axis (Fun's transformer: `torch.concat([hidden_states, inpaint_latents], 2)`)."""
    return torch.cat([noisy_latents, latents.to(noisy_latents.dtype)], dim=2)


def inpaint_channels(latent_channels):
    """Input channels of a Fun InP transformer for a VAE of `latent_channels`: 33 for CogVideoX's 16."""
    return 2 * latent_channels + 1
