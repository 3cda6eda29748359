"""The four trainers on the model variants: 2b, 5b-I2V (learned positions), 1.5 T2V and I2V (patch_size_t, ofs)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ASSETS,
    TINY_VALIDATION_FLAGS,
    generate,
    lora_argv,
    prepare_argv,
    run_prepare,
    run_trainer,
    tiny_pipeline,
    trainer_main,
)
from safetensors.torch import load_file


FRAMES_1_5 = ["--frame_buckets", "5", "13", "--max_num_frames", "13"]


def _assert_lora_changes_output(model, output, image=None, num_frames=9, drop_positions=False):
    from training.conditioning import drop_learned_positional_embeddings

    pipe = tiny_pipeline(model, image is not None)
    if drop_positions:  # what the README tells users of --ignore_learned_positional_embeddings to do
        drop_learned_positional_embeddings(pipe.transformer)
    base = generate(pipe, image=image, num_frames=num_frames, seed=3)
    pipe.load_lora_weights(output, adapter_name="trained")
    pipe.set_adapters(["trained"], [1.0])
    assert np.abs(generate(pipe, image=image, num_frames=num_frames, seed=3) - base).mean() > 1e-4


def _assert_transformer_changes_output(model, output, image=None, num_frames=9):
    from diffusers import CogVideoXTransformer3DModel

    pipe = tiny_pipeline(model, image is not None)
    base = generate(pipe, image=image, num_frames=num_frames, seed=3)
    pipe.transformer = CogVideoXTransformer3DModel.from_pretrained(output / "transformer")
    assert np.abs(generate(pipe, image=image, num_frames=num_frames, seed=3) - base).mean() > 1e-4


def test_text_to_video_sft(tiny_model_2b, tmp_path):
    output = tmp_path / "sft"
    summary = run_trainer(
        lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "3", "--learning_rate", "1e-3",
                  "--validation_prompt", "a cat walks on the grass", *TINY_VALIDATION_FLAGS),
        main=trainer_main("cogvideox_text_to_video_sft"),
    )
    assert summary["parity"]["exact"]  # the final test ran the saved transformer, not the base model
    assert (output / "transformer" / "config.json").is_file() and not (output / "pytorch_lora_weights.safetensors").exists()
    _assert_transformer_changes_output(tiny_model_2b, output)
    _assert_full_fine_tune_card_and_plot(tiny_model_2b, output, summary)


def _assert_full_fine_tune_card_and_plot(model, output, summary):
    """README: every run, a full fine-tune too, writes a model card (README.md) and a loss plot beside its weights;
    the card of a full fine-tune loads transformer/ (no LoRA file, no ComfyUI section)."""
    import yaml
    from PIL import Image

    card = (output / "README.md").read_text()
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("\n---\n", 1)[0][4:])
    assert header["base_model"] == model and header["library_name"] == "diffusers" and header["license"]
    assert {"text-to-video", "full-fine-tune", "cogvideox"} <= set(header["tags"]) and "lora" not in header["tags"]
    assert [w["text"] for w in header["widget"]] == ["a cat walks on the grass"]
    assert (output / header["widget"][0]["output"]["url"]).is_file()  # the final test's GIF
    assert "| trainer | text-to-video full fine-tune |" in card and "| steps | 3 |" in card and "| rank |" not in card
    assert "Data: 6 training samples." in card and f"Final training loss: {summary['final_loss']:.4f}." in card
    assert 'CogVideoXTransformer3DModel.from_pretrained("path/to/this/folder", subfolder="transformer"' in card
    assert "pytorch_lora_weights" not in card and "ComfyUI" not in card
    assert "(loss.png)" in card
    with Image.open(output / "loss.png") as plot:
        assert plot.format == "PNG" and plot.size == (800, 450)


def test_sft_resume_gives_the_same_weights(tiny_model_2b, tmp_path):
    sft = trainer_main("cogvideox_text_to_video_sft")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ("--learning_rate", "1e-3", "--checkpointing_steps", "2")
    run_trainer(lora_argv(tiny_model_2b, ASSETS, straight, "--max_train_steps", "4", *flags), main=sft)
    run_trainer(lora_argv(tiny_model_2b, ASSETS, resumed, "--max_train_steps", "2", *flags), main=sft)
    assert (resumed / "checkpoint-2" / "transformer").is_dir()
    run_trainer(lora_argv(tiny_model_2b, ASSETS, resumed, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                          *flags), main=sft)
    a = load_file(straight / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    halfway = load_file(straight / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], halfway[k]) for k in a)  # steps 3-4 did train


def test_image_to_video_lora_multiresolution(tiny_models, first_frame_png, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    import training.validation

    model, output = tiny_models("5b-i2v"), tmp_path / "i2v-lora"
    sheets, picture_files = [], training.validation.picture_files
    monkeypatch.setattr(training.validation, "picture_files", lambda *args, **kwargs: sheets.append(args) or
                        picture_files(*args, **kwargs))
    summary = run_trainer(
        lora_argv(model, ASSETS, output, "--max_train_steps", "3", "--ignore_learned_positional_embeddings",
                  "--noised_image_dropout", "0.2", "--validation_prompt", "a cat walks on the grass",
                  "--validation_images", first_frame_png, *TINY_VALIDATION_FLAGS),
        main=trainer_main("cogvideox_image_to_video_lora"),
    )
    assert summary["parity"]["exact"]
    assert list(output.glob("validation_step3_video_0_0_*.mp4"))
    # Each contact sheet is handed the conditioning image, which it shows first (tests/test_report.py)
    assert [name for _, _, _, name, *_ in sheets] == ["validation_step3", "test"]
    for *_, images in sheets:
        assert len(images) == 1 and np.array_equal(np.asarray(images[0]), np.asarray(Image.open(first_frame_png)))
    _assert_lora_changes_output(model, output, image=first_frame_png, drop_positions=True)


def test_image_to_video_learned_positions_at_their_size(tiny_models, tmp_path, monkeypatch):
    """At the size its learned position table holds, 5b-I2V trains with that table: it is neither dropped nor
    replaced, and every step sees the 64x64 table (as the pipeline does at inference)."""
    from diffusers import CogVideoXTransformer3DModel

    import training.conditioning as conditioning

    def refuse(transformer):
        raise AssertionError("the learned positions were dropped")

    monkeypatch.setattr(conditioning, "drop_learned_positional_embeddings", refuse)
    model, output = tiny_models("5b-i2v"), tmp_path / "i2v-64"
    table = CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer").patch_embed.pos_embedding
    argv = lora_argv(model, ASSETS, output, "--max_train_steps", "2")
    argv[argv.index("--height_buckets") + 1 : argv.index("--frame_buckets")] = ["64", "--width_buckets", "64"]
    argv += ["--height", "64", "--width", "64"]
    seen = []
    real_forward = CogVideoXTransformer3DModel.forward

    def spy(self, *args, **kwargs):
        embed = self.patch_embed  # (the loaded table, within float rounding)
        seen.append(embed.use_learned_positional_embeddings and torch.allclose(embed.pos_embedding.double(), table.double(), atol=1e-6))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(CogVideoXTransformer3DModel, "forward", spy)
    summary = run_trainer(argv, main=trainer_main("cogvideox_image_to_video_lora"))
    assert summary["global_step"] == 2 and seen and all(seen)
    lora = load_file(output / "pytorch_lora_weights.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())


def test_image_to_video_sft_cogvideox_1_5(tiny_models, first_frame_png, tmp_path):
    model, output = tiny_models("1.5-i2v"), tmp_path / "i2v-sft"
    argv = lora_argv(model, ASSETS, output, "--max_train_steps", "3", "--learning_rate", "1e-3",
                     "--validation_prompt", "a cat", "--validation_images", first_frame_png, *TINY_VALIDATION_FLAGS)
    argv[argv.index("--frame_buckets") : argv.index("--max_num_frames") + 2] = FRAMES_1_5
    argv[argv.index("--validation_num_frames") + 1] = "13"
    summary = run_trainer(argv, main=trainer_main("cogvideox_image_to_video_sft"))
    assert summary["parity"]["exact"]
    _assert_transformer_changes_output(model, output, image=first_frame_png, num_frames=13)
    # The saved config is the base model's (image channels, temporal patches, ofs embedding): the pipeline loads it.
    base = json.loads((Path(model) / "transformer" / "config.json").read_text())
    saved = json.loads((output / "transformer" / "config.json").read_text())
    assert {k: v for k, v in saved.items() if not k.startswith("_")} == {k: v for k, v in base.items() if not k.startswith("_")}
    assert saved["in_channels"] == 2 * saved["out_channels"] and saved["ofs_embed_dim"] and saved["patch_size_t"] == 2


def test_text_to_video_lora_cogvideox_1_5(tiny_models, tmp_path):
    model, output = tiny_models("1.5"), tmp_path / "t2v-15"
    argv = lora_argv(model, ASSETS, output, "--max_train_steps", "3")
    argv[argv.index("--frame_buckets") : argv.index("--max_num_frames") + 2] = FRAMES_1_5
    run_trainer(argv)
    _assert_lora_changes_output(model, output, num_frames=13)


def test_image_to_video_from_precomputed_data(tiny_models, tmp_path, monkeypatch):
    model, prepared = tiny_models("1.5-i2v"), tmp_path / "prepared"
    run_prepare(prepare_argv(model, ASSETS, prepared, "--save_image_latents",
                             data_flags=["--height_buckets", "32", "64", "--width_buckets", "32", "64", *FRAMES_1_5]))
    manifest = json.loads((prepared / "manifest.json").read_text())
    entry = load_file(prepared / manifest["entries"][0]["file"])
    frames, height, width = manifest["entries"][0]["bucket"]
    assert entry["first_frame"].shape == (1, 3, height, width) and "image_latent_dist" not in entry  # never read
    # Mark every stored first frame: training must condition on exactly these pixels, not decode the clip again.
    from safetensors.torch import save_file

    from training.conditioning import ImageToVideo

    for item in manifest["entries"]:
        stored = load_file(prepared / item["file"])
        stored["first_frame"] = torch.full_like(stored["first_frame"], 0.25)
        save_file(stored, str(prepared / item["file"]))
    conditioned_on, real_model_input = [], ImageToVideo.model_input

    def spy(self, noisy_latents, batch, context):
        conditioned_on.append(batch["image"])
        return real_model_input(self, noisy_latents, batch, context)

    monkeypatch.setattr(ImageToVideo, "model_input", spy)
    output = tmp_path / "run"
    summary = run_trainer(
        ["--pretrained_model_name_or_path", model, "--data_root", prepared, "--load_tensors", "--output_dir", output,
         "--max_train_steps", "2", "--train_batch_size", "2", "--rank", "4", "--lora_alpha", "4", "--seed", "1",
         "--frame_buckets", "13"],
        main=trainer_main("cogvideox_image_to_video_lora"),
    )
    assert summary["global_step"] == 2 and np.isfinite(summary["final_loss"])
    assert len(conditioned_on) == 2 and all(bool((image == 0.25).all()) for image in conditioned_on)


@pytest.mark.parametrize(
    "trainer, variant, extra, expected",
    [
        ("cogvideox_text_to_video_lora", "5b-i2v", [], "is an image-to-video model"),
        ("cogvideox_image_to_video_lora", "2b", [], "is a text-to-video model"),
        ("cogvideox_image_to_video_lora", "5b-i2v", ["--validation_prompt", "a cat", "--ignore_learned_positional_embeddings"],
         "--validation_prompt needs --validation_images"),
        ("cogvideox_image_to_video_lora", "5b-i2v", [], "learned positional embeddings for 64x64 only"),
        ("cogvideox_text_to_video_lora", "1.5", [], "9 frames do not suit this model"),
        ("cogvideox_text_to_video_sft", "2b", ["--ignore_learned_positional_embeddings"], "only for the image-to-video"),
    ],
)
def test_variant_errors(capsys, tiny_models, tmp_path, trainer, variant, extra, expected):
    with pytest.raises(SystemExit) as exit_info:
        run_trainer(lora_argv(tiny_models(variant), ASSETS, tmp_path / "o", *extra), main=trainer_main(trainer))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err
    if variant == "1.5":
        assert "nearest valid: 5 or 13" in err


def _errors_of(capsys, trainer, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_trainer(argv, main=trainer_main(trainer))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), lines
    return lines


def test_learned_positions_need_their_frame_count_too(capsys, tiny_models, tmp_path):
    """CogVideoX-5b-I2V's learned positions exist for one (frames, height, width); at another frame count diffusers
    silently swaps in a sin-cos table the model never saw. The tiny copy's are 9x64x64."""
    model = tiny_models("5b-i2v")
    capsys.readouterr()
    argv = lora_argv(model, ASSETS, tmp_path / "o", "--max_train_steps", "1")
    argv[argv.index("--height_buckets") + 1 : argv.index("--frame_buckets")] = ["64", "--width_buckets", "64"]
    argv += ["--height", "64", "--width", "64"]
    argv[argv.index("--frame_buckets") : argv.index("--max_num_frames") + 2] = ["--frame_buckets", "5",
                                                                                  "--max_num_frames", "5"]
    (line,) = _errors_of(capsys, "cogvideox_image_to_video_lora", argv)
    assert "learned positional embeddings for 64x64 only, at 9 frames" in line and "buckets 5x64x64" in line
    assert not (tmp_path / "o" / "checkpoint-1").exists()


def test_a_bucket_beyond_the_cogvideox_1_5_position_grid_is_refused(capsys, tiny_models, tmp_path):
    """CogVideoX 1.5's rotary table covers sample_height x sample_width latents (the tiny copy: 256x256 pixels); a
    larger bucket would crash the first step with a size mismatch. Refused before any model loads, as is a
    validation size beyond it."""
    model = tiny_models("1.5")
    argv = lora_argv(model, ASSETS, tmp_path / "o", *FRAMES_1_5, "--max_train_steps", "1")
    argv[argv.index("--height_buckets") + 1 : argv.index("--frame_buckets")] = ["288", "--width_buckets", "64"]
    lines = _errors_of(capsys, "cogvideox_text_to_video_lora", argv)
    assert [line.split(": ")[1] for line in lines] == ["bucket 5x288x64 (3 clip(s))", "bucket 13x288x64 (3 clip(s))"]
    assert all("288x64 is larger than this model's position grid (256x256 pixels at most)" in line for line in lines)
    argv = lora_argv(model, ASSETS, tmp_path / "o", *FRAMES_1_5, "--validation_prompt", "a cat", "--height", "512",
                     "--validation_num_frames", "13")
    (line,) = _errors_of(capsys, "cogvideox_text_to_video_lora", argv)
    assert line.startswith("error: --height 512 --width 720 (validation videos): 512x720 is larger than")


def test_full_fine_tuning_loads_the_checkpoint_in_the_master_dtype(tiny_model_2b, tmp_path, monkeypatch):
    """An fp16 checkpoint (as CogVideoX-2b's) trained in bf16 mixed precision with fp32 master weights: loaded
    straight into fp32, every weight as stored, not rounded to bf16 first. --save_dtype fp32 writes transformer/ in
    full precision (without it: the --mixed_precision dtype, bf16)."""
    import shutil

    from diffusers import CogVideoXTransformer3DModel

    import training.core

    model = tmp_path / "fp16-model"
    shutil.copytree(tiny_model_2b, model)
    stored = CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer").to(torch.float16)
    stored.save_pretrained(model / "transformer")
    expected = {name: p.detach().float() for name, p in stored.named_parameters()}
    assert any(not torch.equal(v, v.bfloat16().float()) for v in expected.values())  # bf16 would round them

    loaded, load = {}, training.core.load_transformer

    def recording(args, dtype):
        transformer = load(args, dtype)
        loaded.update({name: p.detach().clone() for name, p in transformer.named_parameters()})
        return transformer

    monkeypatch.setattr(training.core, "load_transformer", recording)
    summary = run_trainer(lora_argv(str(model), ASSETS, tmp_path / "run", "--max_train_steps", "1",
                                    "--mixed_precision", "bf16", "--save_dtype", "fp32"),
                         main=trainer_main("cogvideox_text_to_video_sft"))
    assert summary["global_step"] == 1
    assert loaded.keys() == expected.keys()
    assert all(loaded[name].dtype == torch.float32 and torch.equal(loaded[name], expected[name]) for name in expected)
    saved = {}
    for shard in sorted((tmp_path / "run" / "transformer").glob("*.safetensors")):
        saved.update(load_file(shard))
    assert expected.keys() <= saved.keys()
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}
    # Full precision, not bf16 values widened again on the way out.
    assert any(not torch.equal(v, v.bfloat16().float()) for v in saved.values() if v.is_floating_point())
