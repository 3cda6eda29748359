"""Validation videos of CogVideoX-Fun InP models: training/fun_inpaint_pipeline.py against Fun's sampling.

The reference is a transcription of aigc-apps/VideoX-Fun at commit 804a425: get_image_to_video_latent
(videox_fun/utils/utils.py) makes the input video and mask from a start (and end) image; the __call__ of
CogVideoXFunInpaintPipeline (videox_fun/pipeline/pipeline_cogvideox_fun_inpaint.py) binarises the mask, builds the
masked video, encodes it (prepare_mask_latents: the VAE's mode times its scaling factor), resizes `1 - mask`
(resize_mask, first frame alone) and concatenates mask and masked-video latents; its prepare_latents draws the noise
with `randn_tensor(shape, generator)` times the scheduler's init_noise_sigma; its transformer puts the inpaint latents
after the noisy latents.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ASSETS, TINY_VALIDATION_FLAGS, run_trainer, stopped_run_stderr, tiny_pipeline, trainer_main
from PIL import Image


def fun_resize_mask(mask, latent):
    """resize_mask(mask, latent, process_first_frame_only=True), transcribed."""
    latent_size = latent.size()
    target_size = list(latent_size[2:])
    target_size[0] = 1
    first_frame_resized = F.interpolate(mask[:, :, 0:1, :, :], size=target_size, mode="trilinear",
                                        align_corners=False)
    target_size = list(latent_size[2:])
    target_size[0] = target_size[0] - 1
    if target_size[0] != 0:
        remaining_frames_resized = F.interpolate(mask[:, :, 1:, :, :], size=target_size, mode="trilinear",
                                                 align_corners=False)
        return torch.cat([first_frame_resized, remaining_frames_resized], dim=2)
    return first_frame_resized


def fun_inpaint_latents(vae, start, end, video_length, height, width):
    """get_image_to_video_latent, then the pipeline's mask and masked-video latents (no reference noise: the model
    has no add_noise_in_inpaint_model), transcribed; einops' rearrange as reshape/permute."""
    from diffusers.image_processor import VaeImageProcessor

    image_start = start.convert("RGB").resize([width, height])
    input_video = torch.tile(torch.from_numpy(np.array(image_start)).permute(2, 0, 1).unsqueeze(1).unsqueeze(0),
                             [1, 1, video_length, 1, 1])
    input_video_mask = torch.zeros_like(input_video[:, :1])
    input_video_mask[:, :, 1:] = 255
    if end is not None:
        image_end = end.convert("RGB").resize([width, height]).resize(image_start.size)
        input_video[:, :, -1:] = torch.from_numpy(np.array(image_end)).permute(2, 0, 1).unsqueeze(1).unsqueeze(0)
        input_video_mask[:, :, -1:] = 0
    input_video = input_video / 255

    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    image_processor = VaeImageProcessor(vae_scale_factor=scale)
    mask_processor = VaeImageProcessor(vae_scale_factor=scale, do_normalize=False, do_binarize=True,
                                       do_convert_grayscale=True)

    def frames(video):  # "b c f h w -> (b f) c h w"
        return video.permute(0, 2, 1, 3, 4).reshape(-1, *video.shape[1:2], *video.shape[3:])

    def clip(images):  # "(b f) c h w -> b c f h w", f=video_length
        return images.reshape(1, video_length, *images.shape[1:]).permute(0, 2, 1, 3, 4)

    init_video = clip(image_processor.preprocess(frames(input_video), height=height, width=width).to(torch.float32))
    mask_condition = clip(mask_processor.preprocess(frames(input_video_mask), height=height, width=width)
                          .to(torch.float32))
    mask_condition_tile = torch.tile(mask_condition, [1, 3, 1, 1, 1])
    masked_video = init_video * (mask_condition_tile < 0.5) + torch.ones_like(init_video) * (mask_condition_tile > 0.5) * -1
    masked_video_latents = vae.encode(masked_video)[0].mode() * vae.config.scaling_factor
    mask_latents = fun_resize_mask(1 - mask_condition, masked_video_latents) * vae.config.scaling_factor
    mask_input = mask_latents.permute(0, 2, 1, 3, 4)
    masked_video_latents_input = masked_video_latents.permute(0, 2, 1, 3, 4)
    return torch.cat([mask_input, masked_video_latents_input], dim=2)


@pytest.fixture(scope="module")
def tiny_fun_inp_without_noise(tiny_fun_inp, tmp_path_factory):
    """The tiny InP model without add_noise_in_inpaint_model (Fun's V1 InP models): no reference noise."""
    path = tmp_path_factory.mktemp("CogVideoX-Fun-2b-InP-no-noise")
    shutil.copytree(tiny_fun_inp, path, dirs_exist_ok=True)
    config_file = path / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "add_noise_in_inpaint_model": False}))
    return path


def pipeline(model):
    from diffusers import DDIMScheduler

    from training.fun_inpaint_pipeline import CogVideoXFunInpaintPipeline

    pipe = CogVideoXFunInpaintPipeline.from_pretrained(model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def frames_of(clip, *indices):
    from training.video_io import read_frames

    return [Image.fromarray(frame.numpy()) for frame in read_frames(ASSETS / "videos" / clip, list(indices))]


def first_transformer_input(pipe, **kwargs):
    seen = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, call_kwargs, output: seen.append(call_kwargs["hidden_states"].clone()), with_kwargs=True)
    try:
        video = pipe(prompt="waves", height=32, width=48, num_frames=9, num_inference_steps=2, max_sequence_length=16,
                     output_type="np", **kwargs).frames[0]
    finally:
        hook.remove()
    return seen[0], video


@pytest.mark.parametrize("with_end", [False, True], ids=["start-image", "start-and-end-images"])
def test_the_pipeline_feeds_funs_inpaint_latents(tiny_fun_inp_without_noise, with_end):
    """Noisy latents as Fun's prepare_latents draws them from the generator, then the mask and the masked video's
    latents as Fun's pipeline builds them from get_image_to_video_latent's video (classifier-free guidance: both
    halves of the batch get them)."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe = pipeline(tiny_fun_inp_without_noise)
    start, end = frames_of("waves.mp4", 0, 16)
    model_input, video = first_transformer_input(pipe, image=start, end_image=end if with_end else None,
                                                 generator=torch.Generator().manual_seed(3), guidance_scale=6.0)
    channels = pipe.vae.config.latent_channels
    noise = randn_tensor((1, 3, channels, 4, 6), generator=torch.Generator().manual_seed(3)) * \
        pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        reference = fun_inpaint_latents(pipe.vae, start, end if with_end else None, 9, 32, 48)
    assert model_input.shape == (2, 3, 2 * channels + 1, 4, 6) and video.shape == (9, 32, 48, 3)
    assert torch.equal(model_input[:, :, :channels], torch.cat([noise] * 2))
    assert torch.equal(model_input[:, :, channels:], torch.cat([reference] * 2))


def test_the_reference_noise_is_funs_and_repeats_with_the_seed(tiny_fun_inp):
    """A model with add_noise_in_inpaint_model gets Fun's reference noise (strength 0.0563 on the kept pixels, none on
    the masked ones), drawn so that a seeded call repeats: the validation video and the final test's agree."""
    from training.inpaint import MASK_FILL, add_noise_to_reference_video

    video = torch.cat([torch.rand(1, 3, 1, 64, 64) * 2 - 1, torch.full((1, 3, 4, 64, 64), MASK_FILL)], dim=2)
    noisy = add_noise_to_reference_video(video, generator=torch.Generator().manual_seed(0), strength=0.0563)
    assert torch.equal(noisy[:, :, 1:], video[:, :, 1:])
    assert abs((noisy - video)[:, :, :1].std().item() - 0.0563) < 0.003

    pipe = pipeline(tiny_fun_inp)
    (start,) = frames_of("waves.mp4", 0)
    first, _ = first_transformer_input(pipe, image=start, generator=torch.Generator().manual_seed(5))
    again, _ = first_transformer_input(pipe, image=start, generator=torch.Generator().manual_seed(5))
    plain, _ = first_transformer_input(pipe, image=start, generator=torch.Generator().manual_seed(5),
                                       noise_aug_strength=0.0)
    assert torch.equal(first, again) and not torch.equal(first, plain)


def test_an_inp_run_validates_and_its_lora_changes_the_inpaint_pipeline(monkeypatch, tiny_fun_inp, tmp_path):
    """--train_mode inpaint trains on Fun's noise schedule (its DDPMScheduler, no snr_shift_scale: 3.0 in the 2b
    config) and validates from --validation_images (and end images) through the inpaint pipeline; the saved LoRA
    reproduces the validation videos in a fresh pipeline (the parity check) and changes its output."""
    from diffusers import CogVideoXDPMScheduler, DDPMScheduler

    import training.core as core

    schedules = []
    load = core.load_training_scheduler
    monkeypatch.setattr(core, "load_training_scheduler", lambda *args: schedules.append(load(*args)) or schedules[-1])
    data = tmp_path / "data"
    shutil.copytree(ASSETS, data)
    start, end = tmp_path / "start.png", tmp_path / "end.png"
    for image, path in zip(frames_of("waves.mp4", 0, 16), (start, end)):
        image.save(path)
    summary = run_trainer([
        "--pretrained_model_name_or_path", tiny_fun_inp, "--data_root", data, "--caption_column", "prompts.txt",
        "--video_column", "videos.txt", "--height_buckets", "32", "--width_buckets", "32", "--frame_buckets", "9",
        "--max_num_frames", "9", "--train_mode", "inpaint", "--output_dir", tmp_path / "out", "--rank", "4",
        "--lora_alpha", "4", "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--seed", "7",
        "--max_train_steps", "2", "--validation_steps", "2", "--validation_prompt", "waves",
        "--validation_images", start, "--validation_end_images", end, *TINY_VALIDATION_FLAGS])
    assert summary["global_step"] == 2
    assert summary["parity"] == {"max_abs_difference": 0.0, "exact": True}
    assert list((tmp_path / "out").glob("validation_step2_video_0_0_*.mp4"))
    from training.lora_formats import read_lora_file

    diffusers_form, _, _ = read_lora_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    fun_form, unmapped, form = read_lora_file(tmp_path / "out" / "pytorch_lora_weights_fun.safetensors")
    assert form == "lora_unet" and not unmapped and fun_form.keys() == diffusers_form.keys()
    assert all(torch.equal(fun_form[m].delta(), diffusers_form[m].delta()) for m in fun_form)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "A CogVideoX-Fun InP (image-to-video) LoRA of" in card and 'tags: ["image-to-video",' in card
    assert "from training.fun_inpaint_pipeline import CogVideoXFunInpaintPipeline" in card
    assert "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)" in card
    assert 'image=load_image("first_frame.png")' in card and "`pytorch_lora_weights_fun.safetensors`" in card
    funs = DDPMScheduler.from_pretrained(tiny_fun_inp, subfolder="scheduler")
    shifted = CogVideoXDPMScheduler.from_pretrained(tiny_fun_inp, subfolder="scheduler")
    assert len(schedules) == 1 and torch.equal(schedules[0].alphas_cumprod, funs.alphas_cumprod)
    assert not torch.allclose(funs.alphas_cumprod.double(), shifted.alphas_cumprod.double())  # the 2b shift: not applied

    pipe = pipeline(tiny_fun_inp)
    images = {"image": Image.open(start), "end_image": Image.open(end)}
    _, base = first_transformer_input(pipe, generator=torch.Generator().manual_seed(0), **images)
    pipe.load_lora_weights(tmp_path / "out")
    _, adapted = first_transformer_input(pipe, generator=torch.Generator().manual_seed(0), **images)
    assert abs(adapted - base).max() > 1e-3


@pytest.mark.parametrize("trainer, changes, expected", [
    (None, ["--validation_prompt", "a:::b", "--validation_images", "START"],
     "2 validation prompts but 1 --validation_images"),
    (None, ["--validation_prompt", "a", "--validation_images", "START", "--validation_end_images", "START:::START"],
     "1 validation prompts but 2 --validation_end_images"),
    (None, ["--validation_prompt", "a", "--validation_images", "START", "--validation_end_images", "nowhere.png"],
     "--validation_end_images: no such file nowhere.png"),
    (None, ["--train_mode", "normal", "--pretrained_model_name_or_path", "2B", "--validation_end_images", "START"],
     "--validation_end_images is for the image-to-video trainers and CogVideoX-Fun InP models"),
    ("cogvideox_image_to_video_lora", ["--train_mode", "normal", "--pretrained_model_name_or_path", "I2V",
                                       "--validation_end_images", "START"],
     "--validation_end_images is for CogVideoX-Fun InP models"),
], ids=["start-images-per-prompt", "end-images-per-prompt", "end-image-missing", "text-to-video",
        "image-to-video-trainer"])
def test_what_inp_validation_cannot_use_is_one_line(capsys, tiny_fun_inp, tiny_model_2b, tiny_models, tmp_path,
                                                    trainer, changes, expected):
    start = tmp_path / "start.png"
    frames_of("waves.mp4", 0)[0].save(start)
    values = {"START": str(start), "START:::START": f"{start}:::{start}", "2B": tiny_model_2b,
              "I2V": tiny_models("5b-i2v")}
    argv = ["--pretrained_model_name_or_path", tiny_fun_inp, "--data_root", ASSETS, "--caption_column",
            "prompts.txt", "--video_column", "videos.txt", "--train_mode", "inpaint", "--output_dir",
            tmp_path / "out", "--dry_run"]
    for flag, value in zip(changes[::2], changes[1::2]):
        value = values.get(value, value)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    lines = stopped_run_stderr(capsys, argv, trainer_main(trainer) if trainer else None)
    assert any(expected in line for line in lines), lines


def test_fun_models_validate_through_their_pipelines_with_funs_sampler(tiny_fun_inp, tiny_model_2b, tiny_models):
    """Validation builds CogVideoXFunInpaintPipeline for InP runs and diffusers' CogVideoXFunControlPipeline for Control
    runs, each with DDIM as Fun validates (CogVideoXPipeline keeps the original's DPM sampler)."""
    from types import SimpleNamespace

    from training.conditioning import FunControl, FunInpaint, TextToVideo
    from training.validation import build_pipeline

    validation = SimpleNamespace(enable_slicing=False, enable_tiling=False)
    for conditioning, model, pipeline_name, scheduler in (
            (FunInpaint(), tiny_fun_inp, "CogVideoXFunInpaintPipeline", "DDIMScheduler"),
            (FunControl(), tiny_model_2b, "CogVideoXFunControlPipeline", "DDIMScheduler"),
            (TextToVideo(), tiny_model_2b, "CogVideoXPipeline", "CogVideoXDPMScheduler")):
        model_flags = SimpleNamespace(pretrained_model_name_or_path=model, revision=None, variant=None, cache_dir=None)
        pipe = build_pipeline(model_flags, validation, conditioning, torch.float32)
        assert (type(pipe).__name__, type(pipe.scheduler).__name__) == (pipeline_name, scheduler)


def test_the_dry_run_estimates_inp_validation(tiny_fun_inp, tmp_path):
    """The validation estimate encodes the masked video and feeds the transformer its 2C + 1 channels."""
    start = tmp_path / "start.png"
    frames_of("waves.mp4", 0)[0].save(start)
    plan = run_trainer(["--pretrained_model_name_or_path", tiny_fun_inp, "--data_root", ASSETS, "--caption_column",
                        "prompts.txt", "--video_column", "videos.txt", "--height_buckets", "32", "--width_buckets",
                        "32", "--frame_buckets", "9", "--max_num_frames", "9", "--train_mode", "inpaint",
                        "--validation_prompt", "waves", "--validation_images", start, *TINY_VALIDATION_FLAGS,
                        "--output_dir", tmp_path / "out", "--dry_run"])["dry_run"]
    assert plan["peak_memory_gib"]["validation"] > 0


def fun_merge_lora(transformer, state_dict, multiplier=1.0):
    """VideoX-Fun's merge_lora (videox_fun/utils/lora_utils.py, commit 804a425) for a transformer, transcribed: its
    key normalisation, its search for the module named by an underscored path, and its merge (alpha / rank from a
    stored `.alpha`, else 1)."""
    from collections import defaultdict

    updates = defaultdict(dict)
    for key, value in state_dict.items():
        if "diffusion_model." in key:
            key = key.replace("diffusion_model.", "")
        if "lora_unet__" not in key:
            key = "lora_unet__" + key
        key = key.replace(".", "_")
        for ending, replacement in (("_lora_up_weight", ".lora_up.weight"), ("_lora_down_weight", ".lora_down.weight"),
                                    ("_lora_A_default_weight", ".lora_A.weight"),
                                    ("_lora_B_default_weight", ".lora_B.weight"), ("_lora_A_weight", ".lora_A.weight"),
                                    ("_lora_B_weight", ".lora_B.weight"), ("_alpha", ".alpha")):
            if key.endswith(ending):
                key = key[:-len(ending)] + replacement
        key = key.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up.")
        layer, elem = key.split(".", 1)
        updates[layer][elem] = value
    merged = 0
    for layer, elems in updates.items():
        layer_infos = layer.split("lora_unet_")[-1].split("_")
        current = transformer
        try:
            current = current.__getattr__("_".join(layer_infos[1:]))
        except Exception:
            temp_name = layer_infos.pop(0)
            while len(layer_infos) > -1:
                try:
                    current = current.__getattr__(temp_name + "_" + "_".join(layer_infos))
                    break
                except Exception:
                    try:
                        current = current.__getattr__(temp_name)
                        if len(layer_infos) > 0:
                            temp_name = layer_infos.pop(0)
                        elif len(layer_infos) == 0:
                            break
                    except Exception:
                        temp_name = temp_name + "_" + layer_infos.pop(0) if len(temp_name) > 0 else layer_infos.pop(0)
        up, down = elems["lora_up.weight"].float(), elems["lora_down.weight"].float()
        alpha = elems["alpha"].item() / up.shape[1] if "alpha" in elems else 1.0
        current.weight.data += multiplier * alpha * torch.mm(up, down)
        merged += 1
    return merged


def test_the_fun_form_merges_in_videox_funs_own_code_as_peft_does(trained_lora, tmp_path):
    """tools/convert_lora.py --to fun writes the form VideoX-Fun's merge_lora reads: merged by (a copy of) Fun's code,
    every weight of the transformer equals peft's merge of the trained LoRA (rank 4, alpha 8: Fun applies alpha /
    rank because the file stores alpha; the diffusers file keeps alpha in metadata, which Fun's code does not read)."""
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import load_file

    from tools.convert_lora import convert

    fun_file = convert(trained_lora["output"] / "pytorch_lora_weights.safetensors", tmp_path / "fun.safetensors",
                       to="fun", log=lambda line: None)
    state = load_file(fun_file)
    assert all(key.startswith("lora_unet__") for key in state)
    transformer = CogVideoXTransformer3DModel.from_pretrained(trained_lora["model"], subfolder="transformer")
    assert fun_merge_lora(transformer, state) == len(state) // 3

    pipe = tiny_pipeline(trained_lora["model"])
    pipe.load_lora_weights(trained_lora["output"])
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    peft_merged = pipe.transformer.state_dict()
    ours = transformer.state_dict()
    assert ours.keys() == peft_merged.keys()
    difference = max((ours[k] - peft_merged[k]).abs().max().item() for k in ours)
    changed = sum(not torch.equal(ours[k], v) for k, v in
                  CogVideoXTransformer3DModel.from_pretrained(trained_lora["model"], subfolder="transformer")
                  .state_dict().items())
    assert difference < 1e-6 and changed == len(state) // 3
