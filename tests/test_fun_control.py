"""CogVideoX-Fun's Control models (pose, depth, canny videos), trained from control videos beside the clips.

The reference is Fun's own code (aigc-apps/VideoX-Fun, commit 804a425): scripts/cogvideox_fun/train_control.py
encodes the control clip with the VAE (`vae.encode(...)[0].sample()`, times `vae.config.scaling_factor`, laid out
"b f c h w"), and its transformer (videox_fun/models/cogvideox_transformer3d.py) concatenates
`torch.concat([hidden_states, control_latents], 2)`; its dataset (ImageVideoControlDataset) reads the control clip
at the clip's frame indices and puts both through one transform. Its metadata names the control clip
`control_file_path`. At inference, diffusers' CogVideoXFunControlPipeline concatenates in the same order.
"""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ASSETS,
    TINY_DATA_FLAGS,
    TINY_VALIDATION_FLAGS,
    prepare_argv,
    run_prepare,
    run_trainer,
    stopped_run_stderr,
    trainer_main,
)


@pytest.fixture(scope="module")
def tiny_fun_control(tmp_path_factory):
    """A tiny CogVideoX-Fun Control model: a 2b-shaped pipeline whose transformer takes 2C channels (32 in the
    released V1.1 Pose models, 8 for the tiny VAE's 4 latent channels)."""
    from tools.build_tiny_model import save_tiny_model

    path = tmp_path_factory.mktemp("CogVideoX-Fun-V1.1-2b-Pose")
    save_tiny_model(path, "2b", seed=12, transformer={"in_channels": 8})
    return path


@pytest.fixture(scope="module")
def control_data(tmp_path_factory):
    """The bundled clips with a control clip each (the clip, colours inverted, in controls/), listed in controls.txt,
    and Fun's layout of the same: metadata.json with control_file_path."""
    import imageio.v3 as iio

    folder = tmp_path_factory.mktemp("control_data")
    shutil.copytree(ASSETS, folder, dirs_exist_ok=True)
    (folder / "controls").mkdir()
    videos = (folder / "videos.txt").read_text().split()
    for video in videos:
        frames = iio.imread(folder / video)
        iio.imwrite(folder / "controls" / video.split("/")[-1], 255 - frames, fps=8, codec="libx264",
                    macro_block_size=1)
    controls = [f"controls/{video.split('/')[-1]}" for video in videos]
    (folder / "controls.txt").write_text("\n".join(controls) + "\n")
    captions = (folder / "prompts.txt").read_text().splitlines()
    (folder / "metadata.json").write_text(json.dumps([
        {"file_path": video, "text": caption, "type": "video", "control_file_path": control}
        for video, caption, control in zip(videos, captions, controls)]))
    return folder


def control_argv(model, data, output, *extra):
    return ["--pretrained_model_name_or_path", model, "--data_root", data, "--caption_column", "prompts.txt",
            "--video_column", "videos.txt", "--control_column", "controls.txt", *TINY_DATA_FLAGS,
            "--output_dir", output, "--train_batch_size", "2", "--rank", "4", "--lora_alpha", "4",
            "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--seed", "7", *extra]


def fun_control_input(vae, noisy_latents, control_pixel_values):
    """train_control.py's control latents and its transformer's concatenation, transcribed (einops' rearrange as
    permute)."""
    pixel_values = control_pixel_values.permute(0, 2, 1, 3, 4)  # "b f c h w -> b c f h w"
    control_latents = vae.encode(pixel_values)[0].sample()
    control_latents = control_latents * vae.config.scaling_factor
    control_latents = control_latents.permute(0, 2, 1, 3, 4)  # "b c f h w -> b f c h w"
    return torch.concat([noisy_latents, control_latents], 2)


@pytest.mark.parametrize("variant", ["2b", "1.5"])
def test_the_control_latents_follow_funs_training(tiny_models, variant):
    """The transformer's input is Fun's: the noisy latents, then the control clip's VAE sample times the scaling
    factor, also for CogVideoX 1.5's VAE (whose inverted scale Fun and diffusers' control pipeline do not apply)."""
    from diffusers import AutoencoderKLCogVideoX

    from training.conditioning import FunControl

    vae = AutoencoderKLCogVideoX.from_pretrained(tiny_models(variant), subfolder="vae").eval()
    control = torch.rand(2, 9, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noisy = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    context = SimpleNamespace(vae=vae, device=torch.device("cpu"), vae_scaling_factor=vae.config.scaling_factor)
    torch.manual_seed(3)
    ours = FunControl().model_input(noisy, {"control": control}, context)
    torch.manual_seed(3)
    with torch.no_grad():
        reference = fun_control_input(vae, noisy, control)
    assert ours.shape == (2, 3, 8, 4, 4) and torch.equal(ours, reference)


def test_a_control_clip_gets_its_clips_frames_crop_and_flip(control_data):
    """The loader reads the control clip at the clip's frame indices, crops it at the same random offset and flips it
    with the clip: a control clip that is a copy of its clip comes out equal to it."""
    from training.buckets import GridBuckets
    from training.dataset import VideoDataset, assign_buckets, load_samples

    shutil.copy(control_data / "videos" / "waves.mp4", control_data / "controls" / "copy.mp4")
    (control_data / "copy.txt").write_text("controls/copy.mp4\n")
    (control_data / "one_video.txt").write_text("videos/waves.mp4\n")
    (control_data / "one_prompt.txt").write_text("waves\n")
    samples = load_samples(control_data, None, "one_prompt.txt", "one_video.txt", control_column="copy.txt")
    usable, skipped = assign_buckets(samples, GridBuckets([9], [32], [32], 9, 1, 1))  # 64x96 -> 32x48, cropped
    assert not skipped
    dataset = VideoDataset(usable, video_reshape_mode="random", random_flip=0.5, seed=0)
    crops = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        item = dataset[0]
        assert item["control"].shape == item["video"].shape == (9, 3, 32, 32)
        assert torch.equal(item["control"], item["video"])
        crops.add(tuple(item["video"][0, 0, 0].tolist()))
    assert len(crops) > 1  # the crops and flips did vary


def test_a_control_run_trains_validates_and_its_lora_changes_the_control_pipeline(monkeypatch, tiny_fun_control,
                                                                                  control_data, tmp_path):
    """Two steps on control clips, with Fun's noise schedule (its DDPMScheduler: the config's snr_shift_scale is not
    applied), with validation through CogVideoXFunControlPipeline; the saved LoRA reproduces the last validation
    videos when loaded into a fresh pipeline (the parity check), and changes its output."""
    from diffusers import CogVideoXFunControlPipeline, DDIMScheduler, DDPMScheduler
    from PIL import Image

    import training.core as core
    from training.video_io import read_frames

    schedules = []
    load = core.load_training_scheduler
    monkeypatch.setattr(core, "load_training_scheduler", lambda *args: schedules.append(load(*args)) or schedules[-1])

    control_video = str(control_data / "controls" / "waves.mp4")
    summary = run_trainer(control_argv(
        tiny_fun_control, control_data, tmp_path / "out", "--max_train_steps", "2", "--validation_prompt", "waves",
        "--validation_control_videos", control_video, "--validation_steps", "2", *TINY_VALIDATION_FLAGS))
    assert summary["global_step"] == 2
    assert summary["parity"] == {"max_abs_difference": 0.0, "exact": True}
    funs = DDPMScheduler.from_pretrained(tiny_fun_control, subfolder="scheduler")
    assert len(schedules) == 1 and torch.equal(schedules[0].alphas_cumprod, funs.alphas_cumprod)

    pipe = CogVideoXFunControlPipeline.from_pretrained(tiny_fun_control)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    frames = [Image.fromarray(frame.numpy()) for frame in read_frames(control_video, list(range(9)))]

    def generate():
        return pipe(prompt="waves", control_video=frames, height=32, width=32, num_inference_steps=2,
                    max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]

    base = generate()
    pipe.load_lora_weights(tmp_path / "out")
    adapted = generate()
    assert base.shape == adapted.shape == (9, 32, 32, 3) and abs(adapted - base).max() > 1e-3


# scripts/cogvideox_fun/train_control.sh (V1.1), as it is printed there: Fun's full fine-tune of a Control model.
TRAIN_CONTROL_COMMAND = """
accelerate launch --mixed_precision="bf16" scripts/cogvideox_fun/train_control.py \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --train_data_dir=$DATASET_NAME \\
  --train_data_meta=$DATASET_META_NAME \\
  --image_sample_size=512 \\
  --video_sample_size=512 \\
  --token_sample_size=512 \\
  --video_sample_stride=3 \\
  --video_sample_n_frames=49 \\
  --train_batch_size=1 \\
  --video_repeat=1 \\
  --gradient_accumulation_steps=1 \\
  --dataloader_num_workers=8 \\
  --num_train_epochs=100 \\
  --checkpointing_steps=50 \\
  --learning_rate=2e-05 \\
  --lr_scheduler="constant_with_warmup" \\
  --lr_warmup_steps=100 \\
  --seed=43 \\
  --output_dir="output_dir_cogvideox_fun_control" \\
  --gradient_checkpointing \\
  --mixed_precision="bf16" \\
  --adam_weight_decay=3e-2 \\
  --adam_epsilon=1e-10 \\
  --vae_mini_batch=1 \\
  --max_grad_norm=0.05 \\
  --random_hw_adapt \\
  --training_with_video_token_length \\
  --enable_bucket \\
  --trainable_modules "."
"""


def test_funs_control_command_runs_and_its_dry_run_counts_the_control_encode(monkeypatch, tiny_fun_control,
                                                                             control_data, tmp_path):
    """Fun's train_control.sh as written, on Fun's layout (--train_data_meta with control_file_path), with the full
    fine-tune trainer: the Control conditioning is chosen, and the dry run's memory estimate runs its step, control
    encode included, for all six clips, and the validation's control encode."""
    from test_fun_guide import command_argv

    import training.conditioning as conditioning

    encoded = []
    original = conditioning.FunControl.model_input

    def recording(self, noisy_latents, batch, context):
        encoded.append(tuple(batch["control"].shape))
        return original(self, noisy_latents, batch, context)

    monkeypatch.setattr(conditioning.FunControl, "model_input", recording)
    argv = command_argv(TRAIN_CONTROL_COMMAND, tiny_fun_control, f"{control_data}/", control_data / "metadata.json",
                        tmp_path / "out")
    plan = run_trainer([*argv, "--validation_prompt", "waves", "--validation_control_videos",
                        control_data / "controls" / "waves.mp4", *TINY_VALIDATION_FLAGS, "--dry_run"],
                       trainer_main("cogvideox_text_to_video_sft"))["dry_run"]
    assert plan["samples_for_training"] == 6
    assert encoded and all(shape[2] == 3 for shape in encoded)
    assert plan["peak_memory_gib"]["validation"] > 0  # the control video encoded, then the transformer on 2C channels


def test_control_videos_of_a_mixed_data_set_are_not_dropped(capsys, tiny_model_2b, control_data, tmp_path):
    """A --dataset_config meta table whose entries name control videos, in a run that cannot read them (a
    text-to-video model), stops saying so rather than training without them."""
    (control_data / "datasets.toml").write_text('[[datasets]]\nmeta = "metadata.json"\n')
    lines = stopped_run_stderr(capsys, ["--pretrained_model_name_or_path", tiny_model_2b, "--dataset_config",
                                        control_data / "datasets.toml", *TINY_DATA_FLAGS, "--output_dir",
                                        tmp_path / "out", "--dry_run"])
    assert any("6 samples have control videos, which a text-to-video run does not read" in line for line in lines)


def test_a_control_run_resumes_exactly(tiny_fun_control, control_data, tmp_path):
    """The control latents' VAE samples come from the generators a checkpoint keeps: four steps, and two resumed
    from the second step's checkpoint, end on the same LoRA."""
    from conftest import lora_weights

    def argv(output, *extra):
        return control_argv(tiny_fun_control, control_data, output, "--max_train_steps", "4", "--checkpointing_steps",
                            "2", *extra)

    run_trainer(argv(tmp_path / "whole"))
    run_trainer(argv(tmp_path / "resumed", "--resume_from_checkpoint", tmp_path / "whole" / "checkpoint-2"))
    whole, resumed = lora_weights(tmp_path / "whole"), lora_weights(tmp_path / "resumed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("model, trainer, changes, expected", [
    ("control", None, ["--control_column", "prompts.txt"], "control video file not found: "),
    ("control", None, ["--control_column", "short.txt"], "--control_column short.txt: 2 control videos for 6 videos"),
    ("control", None, ["--control_column", "missing.txt"], "--control_column missing.txt: no file"),
    ("2b", None, [], "control videos train a CogVideoX-Fun Control model (8 input channels"),
    ("control", None, ["--control_column", None], "a CogVideoX-Fun Control model takes as many: give its control"),
    ("control", "cogvideox_image_to_video_lora", [], "control videos (--control_column, control_file_path, "
                                                     "--validation_control_videos) train CogVideoX-Fun Control"),
    ("control", None, ["--validation_prompt", "a:::b", "--validation_control_videos", "CONTROL"],
     "2 validation prompts but 1 --validation_control_videos"),
    ("control", None, ["--validation_prompt", "a", "--validation_control_videos", "CONTROL",
                       "--validation_num_frames", "49"], "has 17 frames; validation videos have 49"),
    ("control", None, ["--load_tensors", True], "--load_tensors with control videos: prepared data holds no control"),
], ids=["control-list-is-not-paths", "control-list-too-short", "control-list-missing", "text-to-video-model",
        "control-model-without-control-videos", "image-to-video-trainer", "validation-count",
        "validation-control-too-short", "prepared-data"])
def test_what_a_control_run_cannot_use_is_one_line(capsys, tiny_fun_control, tiny_model_2b, control_data, tmp_path,
                                                    model, trainer, changes, expected):
    (control_data / "short.txt").write_text("controls/waves.mp4\ncontrols/ball.mp4\n")
    argv = control_argv(tiny_fun_control if model == "control" else tiny_model_2b, control_data, tmp_path / "out",
                        "--dry_run")
    control = str(control_data / "controls" / "waves.mp4")
    for flag, value in zip(changes[::2], changes[1::2]):
        position = argv.index(flag) if flag in argv else None
        value = control if value == "CONTROL" else value
        if value is True:  # a switch
            argv.append(flag)
        elif position is not None and value is None:
            del argv[position:position + 2]
        elif position is not None:
            argv[position + 1] = value
        else:
            argv += [flag, value]
    if "--validation_num_frames" not in argv and "--validation_prompt" in argv:
        argv += ["--validation_num_frames", "9"]
    lines = stopped_run_stderr(capsys, argv, trainer_main(trainer) if trainer else None)
    assert any(expected in line for line in lines), lines


def test_control_clips_that_do_not_fit_their_clip_are_named(capsys, tiny_fun_control, control_data, tmp_path):
    """A control clip of another size, or with fewer frames than its clip trains, stops the run naming it (or, with
    --skip_bad_samples, is listed in skipped_samples.jsonl): it cannot be read frame for frame with its clip."""
    shutil.copy(control_data / "videos" / "ball.mp4", control_data / "controls" / "wrong_size.mp4")  # 64x64, 11
    shutil.copy(control_data / "videos" / "wide.mp4", control_data / "controls" / "few.mp4")  # 48x128, 9 frames
    lines = (control_data / "controls.txt").read_text().split()
    lines[0] = "controls/wrong_size.mp4"  # for square.mp4, 48x64
    lines[1] = "controls/few.mp4"  # for waves.mp4, 64x96 and 17 frames: but sizes differ first
    (control_data / "bad_controls.txt").write_text("\n".join(lines) + "\n")
    argv = control_argv(tiny_fun_control, control_data, tmp_path / "out")
    argv[argv.index("controls.txt")] = "bad_controls.txt"
    with pytest.raises(SystemExit):
        run_trainer(argv)
    error = capsys.readouterr().err
    assert "wrong_size.mp4 is 64x64, the clip 48x64" in error and "few.mp4 is 48x128, the clip 64x96" in error


def test_a_control_clip_shorter_than_its_clip_is_skipped(control_data):
    from training.buckets import GridBuckets
    from training.dataset import assign_buckets, load_samples

    shutil.copy(control_data / "videos" / "waves.mp4", control_data / "controls" / "long.mp4")  # 17 frames
    (control_data / "pair_videos.txt").write_text("videos/waves.mp4\n")
    (control_data / "pair_prompts.txt").write_text("waves\n")
    import imageio.v3 as iio

    frames = iio.imread(control_data / "videos" / "waves.mp4")[:5]
    iio.imwrite(control_data / "controls" / "five.mp4", frames, fps=8, codec="libx264", macro_block_size=1)
    # (Frame buckets spread over the clip: even 5 frames of waves.mp4 reach its frame 17.)
    for control, frame_bucket, usable_count in (("five.mp4", 9, 0), ("five.mp4", 5, 0), ("long.mp4", 9, 1)):
        (control_data / "pair_controls.txt").write_text(f"controls/{control}\n")
        samples = load_samples(control_data, None, "pair_prompts.txt", "pair_videos.txt",
                               control_column="pair_controls.txt")
        usable, skipped = assign_buckets(samples, GridBuckets([frame_bucket], [64], [96], frame_bucket, 1, 1))
        assert len(usable) == usable_count, skipped
        if skipped:
            assert "five.mp4 has 5 frames, the clip trains frame" in skipped[0].reason


def test_partial_control_metadata_and_prepare_are_refused(capsys, tiny_fun_control, control_data, tmp_path):
    """Fun's control dataset needs control_file_path on every entry; prepare_dataset.py does not encode control clips,
    so it says so before encoding anything."""
    from training.args import UsageError
    from training.layouts import read_meta

    entries = json.loads((control_data / "metadata.json").read_text())
    del entries[2]["control_file_path"]
    (control_data / "partial.json").write_text(json.dumps(entries))
    with pytest.raises(UsageError, match='entries 3 have no "control_file_path" while others have one'):
        read_meta(control_data / "partial.json")
    with pytest.raises(SystemExit):
        run_prepare(prepare_argv(tiny_fun_control, control_data, tmp_path / "prepared", "--control_column",
                                 "controls.txt"))
    assert "prepared data holds no control latents" in capsys.readouterr().err


@pytest.mark.parametrize("variant, kind, trainer", [
    ("5b", "inp", "cogvideox_text_to_video_sft"), ("1.5", "inp", "cogvideox_text_to_video_lora"),
    ("5b", "control", "cogvideox_text_to_video_lora"), ("1.5", "control", "cogvideox_text_to_video_sft"),
], ids=["v1.1-5b-inp-full", "v1.5-inp-lora", "v1.1-5b-control-lora", "v1.5-control-full"])
def test_every_fun_variant_trains_validates_and_reproduces(tmp_path_factory, control_data, tmp_path, variant, kind,
                                                          trainer):
    """CogVideoX-Fun V1.1 (5b: rotary positions) and V1.5 (temporal patches) InP and Control models, LoRA and full
    fine-tuning: two steps, validation through their pipelines, and the saved weights reproduce it."""
    from PIL import Image

    from tools.build_tiny_model import save_tiny_model
    from training.video_io import read_frames

    model = save_tiny_model(tmp_path_factory.mktemp(f"fun-{variant}-{kind}"), variant, seed=13,
                            transformer={"in_channels": 9 if kind == "inp" else 8})
    start = tmp_path / "start.png"
    Image.fromarray(read_frames(control_data / "videos" / "waves.mp4", [0])[0].numpy()).save(start)
    argv = ["--pretrained_model_name_or_path", model, "--data_root", control_data, "--caption_column", "prompts.txt",
            "--video_column", "videos.txt", "--height_buckets", "32", "--width_buckets", "32", "--frame_buckets", "5",
            "--max_num_frames", "5", "--output_dir", tmp_path / "out", "--train_batch_size", "2",
            "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "7", "--max_train_steps", "2",
            "--validation_steps", "2", "--validation_prompt", "waves", "--num_inference_steps", "2", "--height", "32",
            "--width", "32", "--validation_num_frames", "5"]
    if kind == "inp":
        argv += ["--train_mode", "inpaint", "--validation_images", start]
    else:
        argv += ["--control_column", "controls.txt", "--validation_control_videos",
                 control_data / "controls" / "waves.mp4"]
    if trainer.endswith("lora"):
        argv += ["--rank", "4", "--lora_alpha", "4"]
    summary = run_trainer(argv, trainer_main(trainer))
    assert summary["global_step"] == 2
    assert summary["parity"] == {"max_abs_difference": 0.0, "exact": True}
