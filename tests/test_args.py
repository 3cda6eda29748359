"""Bad flags and inputs: one clear `error:` line each, exit status 2, before any model loads (observed by
`no_model_file_opened`: no file of the model but its configs is opened)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import test_bad_inputs
import torch
from conftest import ASSETS, TINY_DATA_FLAGS, lora_argv, prepare_argv, run_prepare, run_trainer

from training.args import frame_rule_problem


no_model_file_opened = test_bad_inputs.no_model_file_opened  # the fixture, shared with this module


def _errors(capsys, argv, runner=run_trainer):
    with pytest.raises(SystemExit) as exit_info:
        runner(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), lines
    assert not any("Traceback" in line for line in lines)
    return lines


def _argv(model, output, *changes, data=ASSETS):
    return [
        "--pretrained_model_name_or_path", str(model), "--data_root", str(data),
        "--caption_column", "prompts.txt", "--video_column", "videos.txt", *TINY_DATA_FLAGS,
        "--output_dir", str(output), "--max_train_steps", "1", *changes,
    ]


@pytest.mark.parametrize(
    "changes, expected",
    [
        (["--frame_buckets", "8"], "--frame_buckets: 8 frames do not suit this model (4k+1); nearest valid: 5 or 9"),
        (["--height_buckets", "40"], "--height_buckets 40: every value must be a positive multiple of 16"),
        (["--max_num_frames", "3"], "--max_num_frames 3 is below the smallest --frame_buckets value 5"),
        (["--caption_column", "captions.txt"], "--caption_column captions.txt: no file"),
        (["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
        (["--resume_from_checkpoint", "nowhere"], "--resume_from_checkpoint nowhere: no such checkpoint folder"),
        (["--load_tensors"], "has no manifest.json; run training/prepare_dataset.py"),
        (["--height", "40"], "--height 40: validation size must be a multiple of 16"),
        (["--validation_num_frames", "10"], "--validation_num_frames: 10 frames do not suit this model"),
        (["--gradient_checkpointing_ratio", "0.5"], "pass --gradient_checkpointing too"),
        (["--train_batch_size", "auto"], "a batch size of auto needs --max_memory_gb N"),
        (["--max_memory_gb", "24"], "--max_memory_gb 24 is only used to choose batch sizes of auto"),
    ],
)
def test_bad_flags_give_one_line_errors(capsys, no_model_file_opened, tiny_model_2b, tmp_path, changes, expected):
    with no_model_file_opened(tiny_model_2b):
        lines = _errors(capsys, _argv(tiny_model_2b, tmp_path / "out", *changes))
    assert any(expected in line for line in lines), lines
    assert not (tmp_path / "out").exists()  # nothing was started


def test_every_problem_is_listed_at_once(capsys, no_model_file_opened, tiny_model_2b, tmp_path):
    with no_model_file_opened(tiny_model_2b):
        lines = _errors(capsys, _argv(tiny_model_2b, tmp_path / "o", "--frame_buckets", "8", "--width_buckets", "50"))
    assert len(lines) == 2


def test_not_a_cogvideox_model(capsys, tmp_path):
    (tmp_path / "model").mkdir()
    lines = _errors(capsys, _argv(tmp_path / "model", tmp_path / "o"))
    assert "no CogVideoX transformer config found there" in lines[0]


def test_missing_data_and_mismatched_lists(capsys, no_model_file_opened, tiny_model_2b, clips, tmp_path):
    with no_model_file_opened(tiny_model_2b):
        lines = _errors(capsys, _argv(tiny_model_2b, tmp_path / "o", data=tmp_path / "nowhere"))
    assert "no such folder" in lines[0]
    (clips / "videos.txt").write_text("videos/ball.mp4\n")
    with no_model_file_opened(tiny_model_2b):
        lines = _errors(capsys, _argv(tiny_model_2b, tmp_path / "o", data=clips))
    assert lines == ["error: 6 captions but 1 videos: the caption and video lists must have one entry per sample, in the same order"]
    # Row 1: one line per missing file, entries in list order, the good ones not named.
    (clips / "videos.txt").write_text("videos/ball.mp4\nvideos/nope2.mp4\nvideos/nope3.mp4\nvideos/ball.mp4\n"
                                      "videos/nope5.mp4\nvideos/nope6.mp4\n")
    with no_model_file_opened(tiny_model_2b):
        lines = _errors(capsys, _argv(tiny_model_2b, tmp_path / "o", data=clips))
    assert lines == [f"error: video file not found: {clips / 'videos' / f'nope{n}.mp4'} (entry {n})" for n in (2, 3, 5, 6)]
    # More than 10: the first 10, then a count of the rest.
    (clips / "prompts.txt").write_text("a caption\n" * 13)
    (clips / "videos.txt").write_text("".join(f"videos/nope{n}.mp4\n" for n in range(1, 14)))
    with no_model_file_opened(tiny_model_2b):
        lines = _errors(capsys, _argv(tiny_model_2b, tmp_path / "o", data=clips))
    assert lines == [f"error: video file not found: {clips / 'videos' / f'nope{n}.mp4'} (entry {n})" for n in range(1, 11)] + [
        "error: ... and 3 more missing files"]


def test_csv_without_the_named_column(capsys, no_model_file_opened, tiny_model_2b, tmp_path):
    argv = [
        "--pretrained_model_name_or_path", tiny_model_2b, "--dataset_file", str(ASSETS / "metadata.csv"),
        "--caption_column", "text", "--video_column", "video", "--output_dir", str(tmp_path / "o"),
    ]
    with no_model_file_opened(tiny_model_2b):
        lines = _errors(capsys, argv)
    assert lines == ["error: --caption_column text: the CSV has no such column (columns: video, caption)"]


def test_non_utf8_caption_file(capsys, no_model_file_opened, tiny_model_2b, clips, tmp_path):
    # Latin-1 after a good first line: the first byte that is not UTF-8 (é, 0xe9) lies at offset 14 (from 0).
    (clips / "prompts.txt").write_bytes("a red ball\ncaf\xe9\n".encode("latin-1") * 3)
    with no_model_file_opened(tiny_model_2b):
        lines = _errors(capsys, _argv(tiny_model_2b, tmp_path / "o", data=clips))
    assert lines == [f"error: --caption_column {clips / 'prompts.txt'}: not UTF-8 text (byte 14); save it as UTF-8"]


def test_load_tensors_with_mismatched_sequence_length(capsys, no_model_file_opened, tiny_model_2b, tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    manifest = {
        "format": "cogvideox-factory/precomputed-v1",
        "model": {"path": "x", "latent_channels": 4, "text_embed_dim": 32},
        "settings": {"max_sequence_length": 226},
        "entries": [{"index": 0, "caption": "c", "file": "latents/a.safetensors", "bucket": [9, 32, 32]}],
    }
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    argv = ["--pretrained_model_name_or_path", tiny_model_2b, "--data_root", str(prepared), "--load_tensors",
            "--output_dir", str(tmp_path / "o")]
    with no_model_file_opened(tiny_model_2b, allow_digest=True):
        lines = _errors(capsys, argv)
    assert any("--max_sequence_length 226 but the model takes 16" in line for line in lines)
    assert any("prepared file(s) missing" in line for line in lines)


def test_prepare_rejects_bad_buckets_and_sequence_length(capsys, tiny_model_2b, tmp_path):
    argv = ["--model_id", tiny_model_2b, "--data_root", str(ASSETS), "--caption_column", "prompts.txt",
            "--video_column", "videos.txt", "--output_dir", str(tmp_path / "p"), "--frame_buckets", "48"]
    lines = _errors(capsys, argv, runner=run_prepare)
    assert any("--frame_buckets: 48 frames do not suit this model" in line for line in lines)
    assert any("--max_sequence_length 226" in line for line in lines)


def test_frame_rule_for_cogvideox_1_5():
    config = {"patch_size_t": 2}
    assert frame_rule_problem(53, config) is None and frame_rule_problem(85, config) is None
    assert frame_rule_problem(49, config).endswith("nearest valid: 45 or 53")
    assert frame_rule_problem(49, {"patch_size_t": None}) is None


@pytest.mark.parametrize(
    "changes, expected",
    [
        (["--use_8bit", "--use_4bit"], "--use_8bit and --use_4bit exclude each other"),
        (["--use_4bit"], "--use_4bit needs --use_torchao"),
        (["--optimizer", "prodigy", "--use_8bit"], "--use_8bit/--use_4bit work with --optimizer adam or adamw"),
        (["--offload_gradients"], "--offload_gradients needs --use_cpu_offload_optimizer"),
        (["--use_cpu_offload_optimizer", "--optimizer", "prodigy"], "changes Prodigy's global step size estimate"),
        (["--use_cpu_offload_optimizer", "--offload_gradients", "--gradient_accumulation_steps", "2"],
         "micro-batches cannot add up"),
        (["--use_cpu_offload_optimizer", "--mixed_precision", "fp16"], "use --mixed_precision bf16"),
        (["--lora_target_modules", " , "], "--lora_target_modules is empty"),
    ],
)
def test_optimizer_and_lora_flag_combinations(capsys, no_model_file_opened, tiny_model_2b, tmp_path, changes, expected):
    with no_model_file_opened(tiny_model_2b):
        lines = _errors(capsys, _argv(tiny_model_2b, tmp_path / "out", *changes))
    assert any(expected in line for line in lines), lines


@pytest.mark.parametrize(
    "changes, module, expected",
    [
        (["--optimizer", "prodigy"], "prodigyopt", "prodigy needs the prodigyopt package: pip install prodigyopt"),
        (["--optimizer", "came"], "came_pytorch", "came needs the came_pytorch package: pip install came-pytorch"),
        (["--use_8bit"], "bitsandbytes", "--use_8bit needs the bitsandbytes package: pip install bitsandbytes"),
        (["--use_torchao", "--use_8bit"], "torchao", "--use_torchao needs the torchao package: pip install torchao"),
        (["--use_cpu_offload_optimizer"], "torchao",
         "--use_cpu_offload_optimizer needs the torchao package: pip install torchao"),
        (["--quantize_base", "nf4"], "bitsandbytes",
         "--quantize_base nf4 needs the bitsandbytes package: pip install bitsandbytes"),
        (["--report_to", "wandb"], "wandb", "--report_to wandb: wandb is not installed (pip install wandb)"),
        (["--report_to", "comet_ml"], "comet_ml", "--report_to comet_ml: comet_ml is not installed (pip install comet_ml)"),
    ],
)
def test_a_missing_optional_package_is_named(capsys, monkeypatch, no_model_file_opened, tiny_model_2b, tmp_path,
                                             changes, module, expected):
    """The package is hidden (None in sys.modules: `import` fails and importlib.util.find_spec finds nothing)."""
    monkeypatch.setitem(sys.modules, module, None)
    from training import optional_libraries

    monkeypatch.setattr(optional_libraries, "_hidden_installed", set())  # not installed, rather than kept out
    with no_model_file_opened(tiny_model_2b):
        lines = _errors(capsys, _argv(tiny_model_2b, tmp_path / "out", *changes))
    assert f"error: {expected}" in lines, lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on machines without a CUDA GPU")
@pytest.mark.parametrize(
    "changes, expected",
    [
        (["--use_cpu_offload_optimizer"], "--use_cpu_offload_optimizer needs a CUDA GPU"),
        (["--quantize_base", "nf4"], "--quantize_base nf4 needs a CUDA GPU"),
    ],
)
def test_cuda_only_options_say_so_on_cpu(capsys, no_model_file_opened, tiny_model_2b, tmp_path, changes, expected):
    with no_model_file_opened(tiny_model_2b):
        lines = _errors(capsys, _argv(tiny_model_2b, tmp_path / "out", *changes))
    assert any(expected in line for line in lines), lines


def test_quantized_base_is_for_lora_only(capsys, tiny_model_2b, tmp_path):
    from training.cogvideox_text_to_video_sft import main

    lines = _errors(capsys, _argv(tiny_model_2b, tmp_path / "out", "--quantize_base", "fp8"), runner=lambda a: run_trainer(a, main=main))
    assert any("--quantize_base fp8 is for LoRA" in line for line in lines), lines


def test_load_tensors_refuses_latents_of_another_vae(capsys, no_model_file_opened, tiny_models, tmp_path):
    prepared = tmp_path / "prepared"
    run_prepare(prepare_argv(tiny_models("2b"), str(ASSETS), str(prepared)))
    model_15 = tiny_models("1.5")
    capsys.readouterr()  # only the trainer's own messages below
    argv = ["--pretrained_model_name_or_path", model_15, "--data_root", str(prepared), "--load_tensors",
            "--output_dir", str(tmp_path / "o"), "--frame_buckets", "13"]
    with no_model_file_opened(model_15, allow_digest=True):
        lines = _errors(capsys, argv)
    # The errors say to re-run prepare with this model (the one given to the trainer). The tiny 1.5's VAE and T5 have
    # 2b's architecture and their own weights.
    made_with = f"{tiny_models('2b')}, whose weights differ from this model's; re-run prepare_dataset.py with " \
                f"--model_id {model_15}"
    assert lines[:2] == [f"error: --load_tensors {prepared}: latents were made by the VAE of {made_with}",
                         f"error: --load_tensors {prepared}: prompts were embedded by the text encoder of {made_with}"]
    # Another VAE and text encoder architecture (2b's configs changed, their weights never read).
    other = tmp_path / "2b-with-other-encoders"
    shutil.copytree(tiny_models("2b"), other)
    for component, key in (("vae", "norm_eps"), ("text_encoder", "d_ff")):
        config = json.loads((other / component / "config.json").read_text())
        (other / component / "config.json").write_text(json.dumps({**config, key: config[key] * 2}))
    with no_model_file_opened(other):
        lines = _errors(capsys, [argv[0], str(other), *argv[2:-1], "9"])
    assert lines == [
        f"error: --load_tensors {prepared}: latents were made by the VAE of {tiny_models('2b')}, which differs from "
        f"this model's; re-run prepare_dataset.py with --model_id {other}",
        f"error: --load_tensors {prepared}: prompts were embedded by the text encoder of {tiny_models('2b')}, which "
        f"differs; re-run prepare_dataset.py with --model_id {other}",
    ]
    # A 5b-style model with 2b's VAE and T5 weights (as the real CogVideoX-2b and -5b share them) but another
    # scaling factor (training applies its own to the stored moments): accepted.
    shared = tmp_path / "5b-with-2b-encoders"
    shutil.copytree(tiny_models("2b"), shared)
    shutil.rmtree(shared / "transformer")
    shutil.copytree(Path(tiny_models("5b")) / "transformer", shared / "transformer")
    vae_config = json.loads((shared / "vae" / "config.json").read_text())
    (shared / "vae" / "config.json").write_text(json.dumps({**vae_config, "scaling_factor": 0.7}))
    argv[1] = str(shared)
    argv[argv.index("--frame_buckets") + 1] = "9"
    summary = run_trainer([*argv, "--max_train_steps", "1", "--train_batch_size", "2"])
    assert summary["global_step"] == 1
    # The same architecture with other VAE and T5 weights (the tiny 5b has its own random ones): refused. Their
    # weight files are read (sampled, for a digest), as the watch sees, but no model is loaded.
    argv[1] = tiny_models("5b")
    capsys.readouterr()
    with no_model_file_opened(argv[1], allow_digest=True) as watch:
        lines = _errors(capsys, argv)
    made_with = f"{tiny_models('2b')}, whose weights differ from this model's; re-run prepare_dataset.py with " \
                f"--model_id {argv[1]}"
    assert lines == [f"error: --load_tensors {prepared}: latents were made by the VAE of {made_with}",
                     f"error: --load_tensors {prepared}: prompts were embedded by the text encoder of {made_with}"]
    assert set(watch.digest_opens) == {"vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}


def test_load_tensors_with_an_id_token_the_prepared_captions_lack(capsys, no_model_file_opened, tiny_model_2b,
                                                                   tmp_path):
    prepared = tmp_path / "prepared"
    run_prepare(prepare_argv(tiny_model_2b, str(ASSETS), str(prepared)))
    capsys.readouterr()
    with no_model_file_opened(tiny_model_2b, allow_digest=True):
        lines = _errors(capsys, ["--pretrained_model_name_or_path", tiny_model_2b, "--data_root", str(prepared),
                                 "--load_tensors", "--id_token", "BW_STYLE", "--output_dir", str(tmp_path / "o"),
                                 "--frame_buckets", "9"])
    assert lines == ["error: --id_token BW_STYLE: the prepared captions do not start with it (prompts are embedded "
                     "by prepare_dataset.py); re-run it with --id_token BW_STYLE, or drop --id_token here"]


def test_the_default_validation_frame_count_is_checked_too(capsys, no_model_file_opened, tiny_models, tmp_path):
    """Without --validation_num_frames, validation videos take the largest frame bucket. With --load_tensors the
    buckets are not checked (prepared entries keep theirs), so the default 49 must be, for CogVideoX 1.5 (8k-3)."""
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text("{}")  # the flags are checked before the manifest is read
    model = tiny_models("1.5")
    capsys.readouterr()  # only the trainer's own messages below
    argv = ["--pretrained_model_name_or_path", model, "--data_root", str(prepared), "--load_tensors",
            "--output_dir", str(tmp_path / "o"), "--validation_prompt", "a cat", "--height", "64", "--width", "64"]
    with no_model_file_opened(model):
        lines = _errors(capsys, argv)
    assert lines == ["error: validation videos default to the largest --frame_buckets value: 49 frames do not suit "
                     "this model ((F-1)/4+1 a multiple of patch_size_t=2, i.e. 8k-3); nearest valid: 45 or 53; pass "
                     "--validation_num_frames"]
    assert not (tmp_path / "o").exists()


def test_a_run_leaves_the_parsed_flags_as_given(tiny_model_2b, tmp_path, monkeypatch):
    """Derived values (--scale_lr's learning rate, the default validation schedule and frame count, CAME's third
    beta) live in the run's settings, not written back into the flags."""
    import copy

    import training.core
    from training.args import parse_args

    parsed = []

    def keep(argv, **trainer):
        parsed.append(parse_args(argv, **trainer))
        return parsed[-1]

    monkeypatch.setattr(training.core, "parse_args", keep)
    argv = [*_argv(tiny_model_2b, tmp_path / "out", "--scale_lr", "--optimizer", "came", "--train_batch_size", "2",
                   "--validation_prompt", "a cat", "--num_inference_steps", "1", "--height", "32", "--width", "32",
                   "--rank", "2")]
    summary = run_trainer(argv)
    assert summary["global_step"] == 1 and summary["parity"]["exact"]
    as_given = copy.deepcopy(vars(parse_args([str(a) for a in argv])))
    assert vars(parsed[0]) == as_given


def test_processes_started_without_a_process_group_are_refused(capsys, monkeypatch, tiny_model_2b, tmp_path):
    """torchrun on a machine without GPUs and without ACCELERATE_USE_CPU: accelerate runs each process alone, and they
    would all write the same output. One error line before anything loads."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "run", "--dry_run"))
    assert exit_.value.code == 2
    assert "started as 2 processes (WORLD_SIZE=2), but each runs alone" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
