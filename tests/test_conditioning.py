"""Training must condition the model exactly as inference does."""

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from training.conditioning import ImageToVideo, image_condition_latents
from training.models import sample_latents


@pytest.mark.parametrize("variant", ["5b-i2v", "1.5-i2v"])
def test_image_condition_equals_the_pipeline(tiny_models, variant):
    """The tensor the trainer concatenates for an image (no noise augmentation) is the pipeline's, value for value."""
    from diffusers import CogVideoXImageToVideoPipeline

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(tiny_models(variant))
    height, width, num_frames = 48, 64, 13 if variant.startswith("1.5") else 9
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)

    # The pipeline's conditioning: preprocess the PIL image, encode, scale, pad.
    image = pipe.video_processor.preprocess(Image.fromarray(pixels), height=height, width=width)
    channels = pipe.transformer.config.in_channels // 2
    _, theirs = pipe.prepare_latents(
        image, 1, channels, num_frames, height, width, torch.float32, "cpu", torch.Generator().manual_seed(5)
    )

    # The trainer's: the clip's first frame as the dataset produces it ([-1, 1], [B, 1, C, H, W]).
    frame = torch.from_numpy(pixels).permute(2, 0, 1)[None, None].float() / 127.5 - 1.0
    latent_frames = (num_frames - 1) // 4 + 1
    ours = image_condition_latents(
        pipe.vae, frame, latent_frames, pipe.vae.config.scaling_factor, pipe.vae.config.invert_scale_latents,
        generator=torch.Generator().manual_seed(5),
    )
    assert ours.shape == theirs.shape == (1, latent_frames, channels, height // 8, width // 8)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(ours[:, 1:]) == 0  # zero padding after the first latent frame


def _context(vae, dropout, ofs_embed_dim=None):
    return SimpleNamespace(
        device=torch.device("cpu"),
        vae=vae,
        vae_scaling_factor=vae.config.scaling_factor,
        vae_invert_scale_latents=vae.config.invert_scale_latents,
        training=SimpleNamespace(noised_image_dropout=dropout),
        transformer_config={"ofs_embed_dim": ofs_embed_dim},
    )


def test_image_dropout_is_decided_per_sample(tiny_models):
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX.from_pretrained(tiny_models("5b-i2v"), subfolder="vae")
    batch = {"image": torch.rand(16, 1, 3, 32, 32) * 2 - 1}
    noisy = torch.randn(16, 3, 4, 4, 4)
    torch.manual_seed(0)
    inputs = ImageToVideo().model_input(noisy, batch, _context(vae, dropout=0.5))
    assert inputs.shape == (16, 3, 8, 4, 4)
    assert torch.equal(inputs[:, :, :4], noisy)
    dropped = [bool(torch.count_nonzero(inputs[i, :, 4:]) == 0) for i in range(16)]
    assert 0 < sum(dropped) < 16  # some samples lose the image, others keep it
    kept = ImageToVideo().model_input(noisy, batch, _context(vae, dropout=0.0))
    assert all(torch.count_nonzero(kept[i, 0, 4:]) > 0 for i in range(16))


def test_image_noise_augmentation_draws_one_log_normal_sigma_per_sample(tiny_models):
    """sigma = exp(N(-3, 0.5^2)) for each sample of a batch (CogVideoX's recipe); one sigma for the whole batch (the
    original's bug) would give every sample the same noise level."""
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX.from_pretrained(tiny_models("5b-i2v"), subfolder="vae")
    vae.encode = lambda x: SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator=None: x))  # identity
    image = torch.zeros(64, 1, 3, 32, 32)
    torch.manual_seed(1)
    latents = ImageToVideo().model_input(torch.zeros(64, 1, 3, 32, 32), {"image": image}, _context(vae, dropout=0.0))
    # each sample's sigma, measured on its 3 x 32 x 32 noise values (about 1 % error)
    sigmas = latents[:, 0, 3:].reshape(64, -1).std(dim=1) / vae.config.scaling_factor
    log_sigmas = sigmas.log()
    assert abs(log_sigmas.mean().item() - (-3.0)) < 0.2  # 64 draws: standard error 0.06
    assert 0.35 < log_sigmas.std().item() < 0.65  # per sample; one sigma per batch gives about 0.01


def test_ofs_is_passed_only_to_models_with_an_ofs_embedding():
    noisy = torch.zeros(2, 2, 4, 4, 4)
    context = SimpleNamespace(transformer_config={"ofs_embed_dim": 512})
    kwargs = ImageToVideo().transformer_kwargs(noisy, context)
    assert torch.equal(kwargs["ofs"], torch.tensor([2.0]))
    assert ImageToVideo().transformer_kwargs(noisy, SimpleNamespace(transformer_config={"ofs_embed_dim": None})) == {}


def test_latent_sampling_layout():
    moments = torch.cat([torch.full((1, 4, 3, 2, 2), 1.0), torch.full((1, 4, 3, 2, 2), -30.0)], dim=1)
    latents = sample_latents(moments, scaling_factor=2.0)
    assert latents.shape == (1, 3, 4, 2, 2)  # [B, F, C, H, W]
    torch.testing.assert_close(latents, torch.full_like(latents, 2.0), atol=1e-5, rtol=0)


def test_loss_is_the_x0_weighted_form_of_v_prediction_mse():
    """The original's x0-space loss with 1/(1 - alpha_bar) weights equals plain MSE on v."""
    from diffusers import CogVideoXDPMScheduler

    from tools.build_tiny_model import SCHEDULER_CONFIG
    from training.conditioning import TextToVideo
    from training.data_source import PreparedEntries
    from training.sections import TrainingFlags
    from training.step import compute_loss

    scheduler = CogVideoXDPMScheduler(**SCHEDULER_CONFIG)
    mean = torch.randn(2, 4, 3, 4, 4)
    moments = torch.cat([mean, torch.full_like(mean, -60.0)], dim=1)  # logvar -60: the sample is the mean
    seen = {}

    def transformer(hidden_states, timestep, **kwargs):
        seen.update(noisy=hidden_states, t=timestep)
        seen["prediction"] = torch.randn_like(hidden_states)
        return (seen["prediction"],)

    context = SimpleNamespace(
        device=torch.device("cpu"), data_source=PreparedEntries(), weight_dtype=torch.float32, scheduler=scheduler,
        vae_scaling_factor=0.7, transformer_config={"use_rotary_positional_embeddings": False},
        saved_tensors=contextlib.nullcontext, training=TrainingFlags(),  # the default recipe: uniform, cogvideox
    )
    batch = {"video_latent_dist": moments, "prompt_embeds": torch.zeros(2, 16, 32)}
    loss = compute_loss(transformer, batch, context, TextToVideo())

    z = mean.permute(0, 2, 1, 3, 4) * 0.7
    alpha = scheduler.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1, 1)
    noise = (seen["noisy"] - alpha.sqrt() * z) / (1 - alpha).sqrt()
    v = alpha.sqrt() * noise - (1 - alpha).sqrt() * z
    torch.testing.assert_close(loss, ((seen["prediction"] - v) ** 2).mean().float(), rtol=1e-4, atol=1e-5)
