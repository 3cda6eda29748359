"""CogVideoX-Fun's inpaint latents (training/inpaint.py) against a reference transcribed from Fun's own code.

The reference below is aigc-apps/VideoX-Fun at commit 804a425, copied as it is written there except where noted:
- `get_random_mask`: videox_fun/data/utils.py. Its numbers come from numpy's, torch's and Python's generators; here
  they are reached through `fun_np`, `fun_torch` and `fun_random` (the real modules unless a test scripts them).
- the masked clip: scripts/cogvideox_fun/train_lora.py, collate_fn (`mask_pixel_values = ... * (1 - mask) +
  torch.ones_like(...) * -1 * mask`).
- `resize_mask`: scripts/cogvideox_fun/train_lora.py.
- `add_noise_to_reference_video`: videox_fun/pipeline/pipeline_cogvideox_fun_inpaint.py.
- the training loop's t2v_flag and inpaint latents: scripts/cogvideox_fun/train_lora.py (`if args.train_mode !=
  "normal":` blocks), with `rearrange` written as permute.
- the transformer's input: videox_fun/models/cogvideox_transformer3d.py, forward (`hidden_states =
  torch.concat([hidden_states, inpaint_latents], 2)`).
"""

import random
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training import inpaint


# ----------------------------------------------------------------------------------------------
# The reference (Fun's code)
# ----------------------------------------------------------------------------------------------

fun_np, fun_torch, fun_random = np, torch, random


def get_random_mask(shape, image_start_only=False):
    f, c, h, w = shape
    mask = fun_torch.zeros((f, 1, h, w), dtype=fun_torch.uint8)

    if not image_start_only:
        if f != 1:
            mask_index = fun_np.random.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], p=[0.05, 0.2, 0.2, 0.2, 0.05, 0.05, 0.05, 0.1, 0.05, 0.05])
        else:
            mask_index = fun_np.random.choice([0, 1, 7, 8], p = [0.2, 0.7, 0.05, 0.05])
        if mask_index == 0:
            center_x = fun_torch.randint(0, w, (1,)).item()
            center_y = fun_torch.randint(0, h, (1,)).item()
            block_size_x = fun_torch.randint(w // 4, w // 4 * 3, (1,)).item()  # Width range of the block
            block_size_y = fun_torch.randint(h // 4, h // 4 * 3, (1,)).item()  # Height range of the block

            start_x = max(center_x - block_size_x // 2, 0)
            end_x = min(center_x + block_size_x // 2, w)
            start_y = max(center_y - block_size_y // 2, 0)
            end_y = min(center_y + block_size_y // 2, h)
            mask[:, :, start_y:end_y, start_x:end_x] = 1
        elif mask_index == 1:
            mask[:, :, :, :] = 1
        elif mask_index == 2:
            mask_frame_index = fun_np.random.randint(1, 5)
            mask[mask_frame_index:, :, :, :] = 1
        elif mask_index == 3:
            mask_frame_index = fun_np.random.randint(1, 5)
            mask[mask_frame_index:-mask_frame_index, :, :, :] = 1
        elif mask_index == 4:
            center_x = fun_torch.randint(0, w, (1,)).item()
            center_y = fun_torch.randint(0, h, (1,)).item()
            block_size_x = fun_torch.randint(w // 4, w // 4 * 3, (1,)).item()  # Width range of the block
            block_size_y = fun_torch.randint(h // 4, h // 4 * 3, (1,)).item()  # Height range of the block

            start_x = max(center_x - block_size_x // 2, 0)
            end_x = min(center_x + block_size_x // 2, w)
            start_y = max(center_y - block_size_y // 2, 0)
            end_y = min(center_y + block_size_y // 2, h)

            mask_frame_before = fun_np.random.randint(0, f // 2)
            mask_frame_after = fun_np.random.randint(f // 2, f)
            mask[mask_frame_before:mask_frame_after, :, start_y:end_y, start_x:end_x] = 1
        elif mask_index == 5:
            mask = fun_torch.randint(0, 2, (f, 1, h, w), dtype=fun_torch.uint8)
        elif mask_index == 6:
            num_frames_to_mask = fun_random.randint(1, max(f // 2, 1))
            frames_to_mask = fun_random.sample(range(f), num_frames_to_mask)

            for i in frames_to_mask:
                block_height = fun_random.randint(1, h // 4)
                block_width = fun_random.randint(1, w // 4)
                top_left_y = fun_random.randint(0, h - block_height)
                top_left_x = fun_random.randint(0, w - block_width)
                mask[i, 0, top_left_y:top_left_y + block_height, top_left_x:top_left_x + block_width] = 1
        elif mask_index == 7:
            center_x = fun_torch.randint(0, w, (1,)).item()
            center_y = fun_torch.randint(0, h, (1,)).item()
            a = fun_torch.randint(min(w, h) // 8, min(w, h) // 4, (1,)).item()  # Semi-major axis
            b = fun_torch.randint(min(h, w) // 8, min(h, w) // 4, (1,)).item()  # Semi-minor axis

            # Vectorized ellipse mask using meshgrid
            y_grid, x_grid = fun_torch.meshgrid(fun_torch.arange(h, dtype=fun_torch.float32), fun_torch.arange(w, dtype=fun_torch.float32), indexing='ij')
            mask[0, 0, :, :] = (((y_grid - center_y) ** 2) / (b ** 2) + ((x_grid - center_x) ** 2) / (a ** 2) < 1).to(fun_torch.uint8)
        elif mask_index == 8:
            center_x = fun_torch.randint(0, w, (1,)).item()
            center_y = fun_torch.randint(0, h, (1,)).item()
            radius = fun_torch.randint(min(h, w) // 8, min(h, w) // 4, (1,)).item()
            # Vectorized circle mask using meshgrid
            y_grid, x_grid = fun_torch.meshgrid(fun_torch.arange(h, dtype=fun_torch.float32), fun_torch.arange(w, dtype=fun_torch.float32), indexing='ij')
            mask[0, 0, :, :] = ((y_grid - center_y) ** 2 + (x_grid - center_x) ** 2 < radius ** 2).to(fun_torch.uint8)
        elif mask_index == 9:
            for idx in range(f):
                if fun_np.random.rand() > 0.5:
                    mask[idx, :, :, :] = 1
        else:
            raise ValueError(f"The mask_index {mask_index} is not defined")
    else:
        if f != 1:
            mask[1:, :, :, :] = 1
        else:
            mask[:, :, :, :] = 1
    return mask


def fun_masked_pixels(pixel_values, mask):  # collate_fn, per example
    return pixel_values * (1 - mask) + torch.ones_like(pixel_values) * -1 * mask


def resize_mask(mask, latent, process_first_frame_only=True):
    latent_size = latent.size()
    batch_size, channels, num_frames, height, width = mask.shape

    if process_first_frame_only:
        target_size = list(latent_size[2:])
        target_size[0] = 1
        first_frame_resized = F.interpolate(
            mask[:, :, 0:1, :, :],
            size=target_size,
            mode='trilinear',
            align_corners=False
        )

        target_size = list(latent_size[2:])
        target_size[0] = target_size[0] - 1
        if target_size[0] != 0:
            remaining_frames_resized = F.interpolate(
                mask[:, :, 1:, :, :],
                size=target_size,
                mode='trilinear',
                align_corners=False
            )
            resized_mask = torch.cat([first_frame_resized, remaining_frames_resized], dim=2)
        else:
            resized_mask = first_frame_resized
    else:
        target_size = list(latent_size[2:])
        resized_mask = F.interpolate(
            mask,
            size=target_size,
            mode='trilinear',
            align_corners=False
        )
    return resized_mask


def add_noise_to_reference_video(image, ratio=None):
    if ratio is None:
        sigma = torch.normal(mean=-3.0, std=0.5, size=(image.shape[0],)).to(image.device)
        sigma = torch.exp(sigma).to(image.dtype)
    else:
        sigma = torch.ones((image.shape[0],)).to(image.device, image.dtype) * ratio

    image_noise = torch.randn_like(image) * sigma[:, None, None, None, None]
    image_noise = torch.where(image==-1, torch.zeros_like(image), image_noise)
    image = image + image_noise
    return image


def fun_t2v_flag(mask):  # the training loop's "Make the inpaint latents to be zeros."
    t2v_flag = [(_mask == 1).all() for _mask in mask]
    new_t2v_flag = []
    for _mask in t2v_flag:
        if _mask and fun_np.random.rand() < 0.90:
            new_t2v_flag.append(0)
        else:
            new_t2v_flag.append(1)
    return torch.from_numpy(np.array(new_t2v_flag)).to(dtype=torch.float32)


def fun_inpaint_latents(vae, mask_pixel_values, mask, latents, add_noise_in_inpaint_model, t2v_flag):
    """The training loop from `mask = rearrange(mask, ...)` to the inpaint latents; `latents`: the clip's [b c f h w]."""
    def _batch_encode_vae(pixel_values):
        pixel_values = pixel_values.permute(0, 2, 1, 3, 4)  # rearrange(pixel_values, "b f c h w -> b c f h w")
        bs = 32  # args.vae_mini_batch: Fun's default (the whole batch here)
        new_pixel_values = []
        for i in range(0, pixel_values.shape[0], bs):
            pixel_values_bs = pixel_values[i : i + bs]
            pixel_values_bs = vae.encode(pixel_values_bs)[0]
            pixel_values_bs = pixel_values_bs.sample()
            new_pixel_values.append(pixel_values_bs)
        return torch.cat(new_pixel_values, dim = 0)

    mask = mask.permute(0, 2, 1, 3, 4)  # rearrange(mask, "b f c h w -> b c f h w")
    mask = 1 - mask
    mask = resize_mask(mask, latents)

    if add_noise_in_inpaint_model:
        mask_pixel_values = add_noise_to_reference_video(mask_pixel_values)
    # Encode inpaint latents.
    mask_latents = _batch_encode_vae(mask_pixel_values)

    inpaint_latents = torch.concat([mask, mask_latents], dim=1)
    inpaint_latents = t2v_flag[:, None, None, None, None] * inpaint_latents
    inpaint_latents = inpaint_latents * vae.config.scaling_factor
    return inpaint_latents.permute(0, 2, 1, 3, 4)  # rearrange(inpaint_latents, "b c f h w -> b f c h w")


def fun_transformer_input(hidden_states, inpaint_latents):  # CogVideoXTransformer3DModel.forward, "2. Patch embedding"
    if inpaint_latents is not None:
        hidden_states = torch.concat([hidden_states, inpaint_latents], 2)
    return hidden_states


# ----------------------------------------------------------------------------------------------
# Scripted draws: Fun's code and ours asked for the same numbers get the same ones
# ----------------------------------------------------------------------------------------------


class Script:
    """Draws from its own seeded generator, recording what was asked: (kind, low, high exclusive) for whole
    numbers, the options and probabilities of a choice. Given to our code as its `rng`; Fun's code reaches it
    through fake numpy, torch and random modules (`fun_modules`)."""

    def __init__(self, seed, kind=None):
        self.state = np.random.RandomState(seed)
        self.asked = []
        self.kind = kind  # the mask kind the choice gives (its options and probabilities are still recorded)

    def randint(self, low, high):
        self.asked.append(("randint", int(low), int(high)))
        return int(self.state.randint(low, high))

    def choice(self, options, p):
        self.asked.append(("choice", [int(o) for o in options], [float(x) for x in p]))
        return int(self.state.choice(options, p=p)) if self.kind is None else self.kind

    def rand(self):
        self.asked.append(("rand",))
        return float(self.state.rand())

    def permutation(self, n):
        self.asked.append(("permutation", n))
        return self.state.permutation(n)


def fun_modules(script):
    """numpy, torch and random as Fun's get_random_mask uses them, its numbers taken from `script` (torch.randint of
    one number and both of random's; a bigger torch.randint, kind 5's pixels, is torch's own)."""
    def torch_randint(low, high, size, **kwargs):
        if tuple(size) == (1,):
            return torch.tensor([script.randint(low, high)])
        return torch.randint(low, high, size, **kwargs)

    fake_np = types.SimpleNamespace(random=types.SimpleNamespace(
        choice=script.choice, randint=script.randint, rand=script.rand))
    fake_torch = types.SimpleNamespace(**{name: getattr(torch, name) for name in (
        "zeros", "uint8", "meshgrid", "arange", "float32")}, randint=torch_randint)
    fake_random = types.SimpleNamespace(
        randint=lambda low, high: script.randint(low, high + 1),  # both ends included
        sample=lambda population, k: [population[i] for i in script.permutation(len(population))[:k]])
    return fake_np, fake_torch, fake_random


MASK_CASES = [(frames, height, width, kind, seed) for frames, height, width in ((13, 32, 48), (49, 60, 90))
              for kind in range(10) for seed in range(3)]
MASK_CASES += [(1, 40, 24, kind, seed) for kind in (0, 1, 7, 8) for seed in range(3)]  # stills: their four kinds
MASK_CASES += [(13, 32, 48, None, seed) for seed in range(4)]  # the kind drawn too


@pytest.mark.parametrize("frames, height, width, kind, seed", MASK_CASES)
def test_random_masks_are_funs_draw_for_draw(frames, height, width, kind, seed):
    """Asked the same numbers (the same kinds with the same probabilities, the same ranges), ours and Fun's
    get_random_mask make the same mask: each kind, its probabilities, frame spans and boxes."""
    ours_script, funs_script = Script(seed, kind), Script(seed, kind)
    torch.manual_seed(seed)
    ours = inpaint.random_mask(frames, height, width, rng=ours_script)
    fake_np, fake_torch, fake_random = fun_modules(funs_script)
    globals().update(fun_np=fake_np, fun_torch=fake_torch, fun_random=fake_random)
    try:
        torch.manual_seed(seed)
        funs = get_random_mask((frames, 3, height, width))
    finally:
        globals().update(fun_np=np, fun_torch=torch, fun_random=random)
    assert ours_script.asked == funs_script.asked
    assert ours.dtype == funs.dtype == torch.uint8 and torch.equal(ours, funs)


def test_every_mask_kind_is_drawn_at_funs_rate():
    """Over many clips (and stills), each kind comes up about as often as Fun's probabilities say; the first frame
    kept (kind 2) and the first and last kept (kind 3) are among them, and a still is never a span."""
    rng = np.random.RandomState(0)
    # get_random_mask's own np.random.choice arguments (transcribed above), not this module's constants
    for frames, kinds, probabilities in ((9, range(10), [0.05, 0.2, 0.2, 0.2, 0.05, 0.05, 0.05, 0.1, 0.05, 0.05]),
                                         (1, [0, 1, 7, 8], [0.2, 0.7, 0.05, 0.05])):
        draws = [inpaint.draw_mask_kind(frames, rng) for _ in range(20000)]
        for kind, probability in zip(kinds, probabilities):
            assert abs(draws.count(kind) / len(draws) - probability) < 0.012, (frames, kind)
    mask = inpaint.random_mask(9, 16, 16, kind=2, rng=np.random.RandomState(1))
    kept = int((mask.flatten(1).amax(1) == 0).sum())
    assert 1 <= kept <= 4 and mask[:kept].sum() == 0 and bool((mask[kept:] == 1).all())
    mask = inpaint.random_mask(9, 16, 16, kind=3, rng=np.random.RandomState(1))
    kept = int((mask.flatten(1).amax(1) == 0).sum()) // 2
    assert mask[:kept].sum() == mask[-kept:].sum() == 0 and bool((mask[kept:-kept] == 1).all())


@pytest.mark.parametrize("frames", [9, 1])
def test_image_start_only_keeps_the_first_frame(frames):
    ours = inpaint.random_mask(frames, 8, 8, image_start_only=True)
    assert torch.equal(ours, get_random_mask((frames, 3, 8, 8), image_start_only=True))


@pytest.mark.parametrize("frames, latent_shape", [(9, (2, 4, 3, 4, 6)), (13, (2, 4, 4, 5, 3)), (1, (2, 4, 1, 4, 6))])
def test_the_kept_area_is_resized_to_the_latents_as_fun_does(frames, latent_shape):
    """1 - mask, [B, 1, F, H, W] at the pixels' size, to the latent grid: the first frame alone, trilinear."""
    torch.manual_seed(0)
    mask = torch.stack([inpaint.random_mask(frames, 32, 48, rng=np.random.RandomState(s)) for s in range(2)]).float()
    kept = 1 - mask.permute(0, 2, 1, 3, 4)
    ours = inpaint.resize_mask(kept, latent_shape)
    assert ours.shape == (2, 1, *latent_shape[2:])
    assert torch.equal(ours, resize_mask(kept, torch.zeros(latent_shape)))


def test_masked_pixels_and_their_noise_are_funs():
    torch.manual_seed(0)
    video = torch.rand(2, 9, 3, 16, 16) * 2 - 1
    mask = torch.stack([inpaint.random_mask(9, 16, 16, kind=k) for k in (0, 3)])
    masked = inpaint.masked_video(video, mask)
    assert torch.equal(masked, torch.stack([fun_masked_pixels(v, m) for v, m in zip(video, mask)]))
    torch.manual_seed(5)
    ours = inpaint.add_noise_to_reference_video(masked)
    torch.manual_seed(5)
    assert torch.equal(ours, add_noise_to_reference_video(masked))
    assert torch.equal(ours[masked == -1], masked[masked == -1])  # masked pixels stay -1


class Draws:
    """numpy's rand as a list of numbers: ours asks one per sample, Fun's one per sample with a full mask."""

    def __init__(self, values):
        self.values = list(values)

    def rand(self, count=None):
        if count is None:
            return self.values.pop(0)
        taken, self.values = self.values[:count], self.values[count:]
        return np.array(taken)


def test_a_full_mask_keeps_zero_inpaint_latents_at_funs_rate():
    """t2v_flag: a sample whose mask covers everything trains with zero inpaint latents when its draw is under 0.9;
    any other sample keeps them."""
    full, partial = torch.ones(9, 1, 8, 8), torch.ones(9, 1, 8, 8)
    partial[0] = 0
    masks = torch.stack([full, partial, full, full])
    draws = [0.5, 0.01, 0.95, 0.899]
    ours = inpaint.full_mask_keep(masks, rng=Draws(draws))
    globals()["fun_np"] = types.SimpleNamespace(random=Draws([d for d, m in zip(draws, masks) if bool((m == 1).all())]))
    try:
        funs = fun_t2v_flag(masks)
    finally:
        globals()["fun_np"] = np
    assert ours.tolist() == funs.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert inpaint.FULL_MASK_ZERO_PROBABILITY == 0.90


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4, scaling_factor=0.7).eval()


@pytest.mark.parametrize("add_noise", [True, False])
def test_inpaint_latents_and_the_transformer_input_are_funs(tiny_vae, add_noise):
    """Mask channel first, then the masked clip's latents, both zeroed by the full-mask rule and scaled by the VAE's
    factor; after the noisy latents on the channel axis: C + 1 + C channels (33 for CogVideoX's 16)."""
    torch.manual_seed(0)
    video = torch.rand(3, 9, 3, 32, 32) * 2 - 1
    mask = torch.stack([inpaint.random_mask(9, 32, 32, kind=k, rng=np.random.RandomState(k)) for k in (3, 0, 1)])
    keep = torch.tensor([1.0, 1.0, 0.0])  # the third: a full mask whose draw zeroed it
    noisy = torch.randn(3, 3, 4, 4, 4)
    torch.manual_seed(7)
    ours = inpaint.inpaint_latents(tiny_vae, video, mask, 0.7, add_noise, keep)
    torch.manual_seed(7)
    funs = fun_inpaint_latents(tiny_vae, inpaint.masked_video(video, mask), mask.float(), torch.zeros(3, 4, 3, 4, 4),
                               add_noise, keep)
    assert ours.shape == (3, 3, 1 + 4, 4, 4)
    torch.testing.assert_close(ours, funs, rtol=1e-5, atol=1e-6)
    model_input = inpaint.with_inpaint_latents(noisy, ours)
    assert torch.equal(model_input, fun_transformer_input(noisy, funs.to(noisy.dtype)))
    assert model_input.shape[2] == inpaint.inpaint_channels(4) == 9 and inpaint.inpaint_channels(16) == 33
    assert torch.equal(model_input[:, :, 4], resize_mask(1 - mask.float().permute(0, 2, 1, 3, 4),
                                                         torch.zeros(3, 4, 3, 4, 4))[:, 0] * keep.view(3, 1, 1, 1) * 0.7)
    assert model_input[2, :, 4:].abs().sum() == 0  # zero inpaint latents: the full-mask rule
