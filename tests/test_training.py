"""The real text-to-video LoRA trainer, end to end on tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ASSETS,
    ROOT,
    TINY_DATA_FLAGS,
    TINY_VALIDATION_FLAGS,
    generate,
    lora_argv,
    lora_weights,
    prepare_argv,
    run_prepare,
    run_trainer,
    tiny_pipeline,
)
from safetensors.torch import load_file


def _read_mp4(path):
    import imageio.v3 as iio

    return iio.imread(path)


def test_training_from_raw_videos_writes_lora_validation_and_test(trained_lora):
    output, summary = trained_lora["output"], trained_lora["summary"]
    assert summary["global_step"] == 4
    assert np.isfinite(summary["final_loss"])
    lora = load_file(output / "pytorch_lora_weights.safetensors")
    assert lora and all(key.startswith("transformer.") for key in lora)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())  # it trained
    for step in (2, 4):
        videos = sorted(output.glob(f"validation_step{step}_video_*.mp4"))
        assert len(videos) == 2 and all(v.stat().st_size > 0 for v in videos)
        assert _read_mp4(videos[0]).shape == (9, 32, 32, 3)
    assert len(list(output.glob("test_video_*.mp4"))) == 2
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_lora_parity_saved_file_reproduces_last_validation(trained_lora):
    output, summary = trained_lora["output"], trained_lora["summary"]
    assert summary["parity"] == {"max_abs_difference": 0.0, "exact": True}
    # Independently of the trainer's own check: the mp4s it wrote are frame-identical.
    for index in range(2):
        (validation,) = output.glob(f"validation_step4_video_{index}_0_*.mp4")
        (test,) = output.glob(f"test_video_{index}_0_*.mp4")
        assert np.array_equal(_read_mp4(validation), _read_mp4(test))


def test_saved_lora_loads_in_diffusers_and_changes_output(trained_lora):
    pipe = tiny_pipeline(trained_lora["model"])
    base = generate(pipe)
    pipe.load_lora_weights(trained_lora["output"], adapter_name="mine")
    pipe.set_adapters(["mine"], [1.0])
    with_lora = generate(pipe)
    assert np.abs(with_lora - base).mean() > 1e-4
    pipe.set_adapters(["mine"], [0.0])
    assert np.array_equal(generate(pipe), base)


def test_lora_metadata_holds_what_a_loader_needs_and_nothing_newer(trained_lora):
    """diffusers rebuilds LoraConfig(**metadata) unfiltered: peft's whole config (about 40 keys, newer ones among
    them) would make an older peft fail with a TypeError. Only fields every peft release has are stored."""
    from safetensors import safe_open

    with safe_open(trained_lora["output"] / "pytorch_lora_weights.safetensors", "pt") as f:
        stored = f.metadata()
    adapter = json.loads(stored["lora_adapter_metadata"])
    adapter = {k.removeprefix("transformer."): v for k, v in adapter.items()}
    assert adapter == {"r": 4, "lora_alpha": 8, "target_modules": ["to_k", "to_out.0", "to_q", "to_v"],
                       "rank_pattern": {}, "alpha_pattern": {}}


def test_written_files_are_readable_as_the_umask_says(trained_lora):
    """safetensors writes its files 0600 (a private temporary file, renamed); on a shared server others must be
    able to read a LoRA or a checkpoint as the user's umask allows."""
    from training.files import current_umask

    expected = 0o666 & ~current_umask()
    written = [p for p in trained_lora["output"].rglob("*") if p.is_file() and "logs" not in p.parts]
    assert any(p.suffix == ".safetensors" for p in written)
    wrong = {str(p.relative_to(trained_lora["output"])): oct(p.stat().st_mode & 0o777) for p in written
             if p.stat().st_mode & 0o777 != expected}
    assert not wrong, (oct(expected), wrong)


def test_the_final_lora_is_stored_in_the_training_precision_unless_asked(tiny_model_2b, tmp_path, caplog):
    for extra, dtype in (([], torch.bfloat16), (["--save_dtype", "fp32"], torch.float32)):
        output = tmp_path / str(dtype)
        run_trainer(lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "1", "--mixed_precision", "bf16",
                              "--checkpointing_steps", "1", *extra))
        lora = load_file(output / "pytorch_lora_weights.safetensors")
        assert {v.dtype for v in lora.values()} == {dtype}
        checkpoint = load_file(output / "checkpoint-1" / "pytorch_lora_weights.safetensors")
        assert {v.dtype for v in checkpoint.values()} == {torch.float32}  # resume stays exact
    assert "optimizer that steps: torch.optim.adam.Adam" in caplog.text  # the default --optimizer adam


def test_lora_alpha_is_stored_so_weight_one_is_the_trained_scale(trained_lora):
    from safetensors import safe_open

    with safe_open(trained_lora["output"] / "pytorch_lora_weights.safetensors", "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 8
    assert set(metadata["transformer.target_modules"]) == {"to_k", "to_q", "to_v", "to_out.0"}


def test_precompute_then_load_tensors_training(tiny_model_2b, tmp_path, caplog):
    prepared = tmp_path / "prepared"
    argv = prepare_argv(tiny_model_2b, ASSETS, prepared, "--batch_size", "2")
    run_prepare(argv)
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert len(manifest["entries"]) == 6
    entry = load_file(prepared / manifest["entries"][0]["file"])
    frames, height, width = manifest["entries"][0]["bucket"]
    assert entry["video_latent_dist"].shape == (8, (frames - 1) // 4 + 1, height // 8, width // 8)  # mean+logvar
    assert entry["prompt_embeds"].shape == (16, 32)
    lines = (prepared / "videos.txt").read_text().split()
    # The original's list, one line per entry; the clips themselves only with --save_videos (training never reads them).
    assert len(lines) == 6 and all(line.startswith("videos/") for line in lines)
    assert not any((prepared / line).exists() for line in lines)

    # A second run reuses every entry (names are content keys; files untouched).
    stamps = {p: p.stat().st_mtime_ns for p in (prepared / "latents").iterdir()}
    run_prepare(argv)
    assert {p: p.stat().st_mtime_ns for p in (prepared / "latents").iterdir()} == stamps

    output = tmp_path / "run"
    argv = lora_argv(tiny_model_2b, prepared, output, "--load_tensors", "--max_train_steps", "3")
    summary = run_trainer(argv)
    assert summary["global_step"] == 3 and np.isfinite(summary["final_loss"])
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    # The model card shows the buckets the prepared data trained in, not the bucket flags (which it ignores).
    card = (output / "README.md").read_text()
    trained = sorted(tuple(map(int, name.split("x"))) for name in summary["buckets"])
    assert f"| buckets (F x H x W, from the prepared data) | {', '.join('x'.join(map(str, b)) for b in trained)} |" in card
    assert "| frame buckets |" not in card
    # The bucket flags above agree with the prepared data (as a sweep script passes them): no warning. Flags that
    # would have changed it are named.
    assert "ignored with --load_tensors" not in caplog.text
    run_trainer([*argv, "--height_buckets", "32", "--random_flip", "0.5", "--dry_run"])
    (warning,) = [r.getMessage() for r in caplog.records if "ignored with --load_tensors" in r.getMessage()]
    assert warning.startswith("--height_buckets, --random_flip ignored")


def test_precomputed_embeddings_match_the_pipeline(tiny_model_2b):
    from training.models import encode_prompts

    pipe = tiny_pipeline(tiny_model_2b)
    prompts = ["a dog runs in the park", "BW_STYLE a red car drives along the coast road"]
    ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, 16, "cpu", torch.float32)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16, device="cpu")
    assert torch.equal(ours, theirs)


def test_rotary_embeddings_match_the_pipeline(tiny_model_5b):
    from training.models import rotary_embeddings

    pipe = tiny_pipeline(tiny_model_5b)
    for frames, height, width in [(3, 32, 32), (2, 48, 96), (3, 64, 32)]:
        ours = rotary_embeddings(dict(pipe.transformer.config), frames, height // 8, width // 8, "cpu")
        theirs = pipe._prepare_rotary_positional_embeddings(height, width, frames, torch.device("cpu"))
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_csv_mode_with_rotary_model_and_crop(tiny_model_5b, tmp_path):
    output = tmp_path / "run"
    argv = [
        "--pretrained_model_name_or_path", tiny_model_5b, "--dataset_file", ASSETS / "metadata.csv",
        "--caption_column", "caption", "--video_column", "video", *TINY_DATA_FLAGS,
        "--video_reshape_mode", "center", "--random_flip", "0.5", "--id_token", "BW_STYLE",
        "--output_dir", output, "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "2", "--rank", "2", "--lora_alpha", "2", "--gradient_checkpointing",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--optimizer", "adamw", "--seed", "3",
        "--report_to", "tensorboard",
    ]
    summary = run_trainer(argv)
    assert summary["global_step"] == 2
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    assert list((output / "logs").rglob("events.out.tfevents.*"))


def test_resume_from_checkpoint_continues_to_the_same_weights(tiny_model_2b, tmp_path):
    straight = tmp_path / "straight"
    run_trainer(lora_argv(tiny_model_2b, ASSETS, straight, "--max_train_steps", "4", "--checkpointing_steps", "2"))

    resumed = tmp_path / "resumed"
    run_trainer(lora_argv(tiny_model_2b, ASSETS, resumed, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    assert (resumed / "checkpoint-2" / "training_state.json").is_file()
    summary = run_trainer(
        lora_argv(
            tiny_model_2b, ASSETS, resumed, "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1",
        )
    )
    assert summary["global_step"] == 4
    assert [p.name for p in resumed.glob("checkpoint-*")] == ["checkpoint-4"]
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow  # subprocesses or several runs
def test_accelerate_launch_runs_the_entry_point(tiny_model_2b, tmp_path):
    output = tmp_path / "launched"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", ROOT / "accelerate_configs" / "cpu.yaml",
        ROOT / "training" / "cogvideox_text_to_video_lora.py",
        *lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "2", "--validation_prompt", "a dog runs",
                   *TINY_VALIDATION_FLAGS),
    ]
    env = dict(os.environ, WANDB_MODE="offline")
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((output / "summary.json").read_text())["parity"]["exact"] is True
    assert list(output.glob("validation_step2_video_0_0_*.mp4"))


def test_a_short_clip_is_skipped_and_reported(tiny_model_2b, clips, tmp_path):
    import imageio

    frames = [np.zeros((32, 32, 3), dtype=np.uint8)] * 3  # fewer than the smallest bucket (5)
    imageio.mimwrite(clips / "videos" / "short.mp4", frames, fps=8, macro_block_size=1)
    with open(clips / "prompts.txt", "a") as f:
        f.write("a very short clip\n")
    with open(clips / "videos.txt", "a") as f:
        f.write("videos/short.mp4\n")
    output = tmp_path / "run"
    summary = run_trainer(lora_argv(tiny_model_2b, clips, output, "--max_train_steps", "1", "--skip_bad_samples"))
    assert summary["skipped_samples"] == 1
    (line,) = (output / "skipped_samples.jsonl").read_text().splitlines()
    report = json.loads(line)
    assert report["entry"] == 7 and report["video"].endswith("short.mp4") and "3 usable frames" in report["reason"]


@pytest.mark.slow  # subprocesses or several runs
def test_prepare_with_two_processes_matches_one(tiny_model_2b, mixed_folder, tmp_path):
    """On the mixed folder (clips and stills, captions beside them) with a bucket config: the layouts and buckets of
    tests/test_data_layouts.py, prepared by two processes."""
    flags = ["--model_id", tiny_model_2b, "--data_root", mixed_folder, "--bucket_config",
             mixed_folder.parent / "bucket.yaml", "--max_sequence_length", "16", "--save_latents_and_embeddings"]
    run_prepare([*flags, "--output_dir", tmp_path / "one"])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               ROOT / "training" / "prepare_dataset.py", *flags, "--output_dir", tmp_path / "two", "--batch_size", "2"]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1: 4 sample(s) to encode" in result.stderr
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())["entries"]
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())["entries"]
    assert [e["file"] for e in one] == [e["file"] for e in two]
    for entry in one:
        a, b = load_file(tmp_path / "one" / entry["file"]), load_file(tmp_path / "two" / entry["file"])
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_wandb_offline_tracker_gets_loss_and_videos(tiny_model_2b, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    logged, video = [], wandb.Video
    monkeypatch.setattr(wandb, "Video", lambda path, **kwargs: logged.append((Path(path).suffix, kwargs.get("fps")))
                        or video(path, **kwargs))
    output = tmp_path / "run"
    run_trainer(lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "2", "--report_to", "wandb",
                          "--validation_prompt", "a dog runs", "--validation_steps", "2", "--fps", "12",
                          *TINY_VALIDATION_FLAGS))
    # the validation and the test video at --fps, each with its GIF preview (whose frame times are in the file)
    assert logged == [(".mp4", 12), (".gif", None), (".mp4", 12), (".gif", None)]
    import time

    (run_dir,) = list((tmp_path / "wandb").glob("offline-run-*"))
    deadline = time.time() + 30  # wandb's service process may still be flushing the run
    while True:
        media = run_dir / "files" / "media"
        videos = sorted(p.name.split("_")[0] for p in (media / "videos").glob("*.mp4"))
        previews = sorted(p.name.split("_")[0] for p in (media / "videos").glob("*.gif"))
        sheets = sorted(p.name.split("_")[0] for p in (media / "images").glob("*.png"))
        records = b"".join(p.read_bytes() for p in run_dir.glob("run-*.wandb"))  # offline log: holds metric names
        if (sheets == ["test", "validation"] and b"grad_norm" in records) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert videos == previews == sheets == ["test", "validation"]
    assert b"loss" in records and b"grad_norm" in records


def test_compiled_model_saves_plain_keys(tiny_model_2b, tmp_path):
    """accelerate keeps the torch.compile wrapper by default; its `_orig_mod.` prefix must not reach the LoRA file."""
    from accelerate import Accelerator
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from training.backend import Backend
    from training.modes import LoRA
    from training.sections import LoraFlags, TrainingFlags

    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_model_2b, subfolder="transformer")
    mode = LoRA()
    mode.prepare(transformer, TrainingFlags(seed=None, master_weight_dtype="fp32"),
                 LoraFlags(rank=2, lora_alpha=2, lora_target_modules="to_q,to_v"))
    plain = Backend(Accelerator(cpu=True)).unwrap(torch.compile(transformer))  # compile is lazy: nothing is built here
    assert plain is transformer
    mode.save(plain, tmp_path, CogVideoXPipeline)
    assert not [k for k in load_file(tmp_path / "pytorch_lora_weights.safetensors") if "_orig_mod" in k]
    pipe = CogVideoXPipeline.from_pretrained(tiny_model_2b)
    mode.apply_to_pipeline(pipe, tmp_path)  # raises if a saved tensor does not arrive


@pytest.mark.slow  # subprocesses or several runs
@pytest.mark.parametrize(
    "flags",
    [
        ["--optimizer", "prodigy", "--learning_rate", "1.0", "--prodigy_use_bias_correction", "--prodigy_decouple"],
        ["--optimizer", "came", "--learning_rate", "1e-3"],
        ["--optimizer", "adamw", "--use_8bit"],
    ],
    ids=["prodigy", "came", "bnb-adamw8bit"],
)
def test_optional_optimizers_train_and_resume(tiny_model_2b, tmp_path, flags):
    """Each optimizer's state survives a checkpoint: 2 steps + resume for the third equals 3 steps straight."""
    output, straight = tmp_path / "run", tmp_path / "straight"
    run_trainer(lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "2", "--checkpointing_steps", "1", *flags))
    summary = run_trainer(lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "3", "--checkpointing_steps",
                                    "1", "--resume_from_checkpoint", "latest", *flags))
    run_trainer(lora_argv(tiny_model_2b, ASSETS, straight, "--max_train_steps", "3", "--checkpointing_steps", "1", *flags))
    assert summary["global_step"] == 3
    resumed, reference = load_file(output / "pytorch_lora_weights.safetensors"), lora_weights(straight)
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in resumed)
    before = load_file(output / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(before[k], resumed[k]) for k in resumed)  # the resumed step did update


def test_validation_prompt_alone_validates_every_epoch(tiny_model_2b, clips, tmp_path):
    """No --validation_epochs or --validation_steps (the original crashed): once per epoch."""
    (clips / "prompts.txt").write_text("a red ball bounces in the park\na blue square moves\n")
    (clips / "videos.txt").write_text("videos/ball.mp4\nvideos/square.mp4\n")  # two buckets: 2 steps an epoch
    summary = run_trainer(lora_argv(tiny_model_2b, clips, tmp_path / "out", "--num_train_epochs", "3",
                                    "--validation_prompt", "a dog runs", *TINY_VALIDATION_FLAGS))
    videos = (tmp_path / "out").glob("validation_step*_video_*.mp4")
    assert summary["global_step"] == 6 and sorted(int(p.name.split("_")[1][4:]) for p in videos) == [2, 4, 6]


def test_the_artifact_is_on_disk_before_the_final_validation(tiny_model_2b, tmp_path, monkeypatch):
    """A final validation (the last step is not a validation step) that runs out of memory loses nothing."""
    from training.validation import Validation

    on_disk, real_run = {}, Validation.run

    def spy(self, context, transformer, step, tag="validation"):
        on_disk[step] = (tmp_path / "pytorch_lora_weights.safetensors").is_file()
        return real_run(self, context, transformer, step, tag)

    monkeypatch.setattr(Validation, "run", spy)
    run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path, "--max_train_steps", "3", "--validation_steps", "2",
                          "--validation_prompt", "a dog runs", *TINY_VALIDATION_FLAGS))
    assert on_disk == {2: False, 3: True}


def test_a_model_id_is_found_in_the_cache_dir(tiny_model_2b, tmp_path, monkeypatch):
    """--cache_dir: a Hub id resolved in that cache (the layout huggingface_hub writes), offline, for every load of the
    run (training, validation, the final test)."""
    import shutil

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    repo = cache / "models--someone--tiny-cogvideox"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_2b, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    argv = lora_argv("someone/tiny-cogvideox", ASSETS, tmp_path / "out", "--max_train_steps", "1",
                     "--validation_prompt", "a dog runs", "--validation_steps", "1", *TINY_VALIDATION_FLAGS)
    with pytest.raises(SystemExit):  # without the flag the id means nothing offline: one error line
        run_trainer(argv)
    summary = run_trainer([*argv, "--cache_dir", cache])
    assert summary["global_step"] == 1 and summary["parity"]["exact"]


def test_scale_lr_multiplies_by_batch_accumulation_and_processes(tiny_model_2b, tmp_path, monkeypatch):
    import training.core as core

    rates, real_step = [], core.train_step

    def spy(trainer, batches, size):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        return real_step(trainer, batches, size)

    monkeypatch.setattr(core, "train_step", spy)
    run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path, "--max_train_steps", "1", "--learning_rate", "1e-3",
                          "--gradient_accumulation_steps", "3", "--scale_lr"))  # --train_batch_size 2, 1 process
    assert rates == [pytest.approx(1e-3 * 2 * 3 * 1)]


def test_the_tiny_model_builder_command_writes_a_pipeline_diffusers_loads(tmp_path, capsys):
    from diffusers import CogVideoXImageToVideoPipeline

    from tools.build_tiny_model import main

    main(["--output_dir", str(tmp_path / "tiny"), "--variant", "5b-i2v", "--seed", "3"])
    assert "tiny CogVideoX-5b-i2v-style pipeline written to" in capsys.readouterr().out
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(tmp_path / "tiny")
    assert pipe.transformer.config.use_learned_positional_embeddings and pipe.transformer.config.in_channels == 8


def test_the_parity_check_reports_a_difference_when_the_videos_differ(caplog):
    """The final test's videos against the last validation's: identical gives exact parity, a single changed pixel
    of any video gives its size and a warning (a check that cannot say no would hide a saved file that does not
    reproduce the training)."""
    import logging
    from types import SimpleNamespace

    import numpy as np

    from training.validation import Validation

    rng = np.random.default_rng(0)
    last = [("a cat", rng.random((9, 8, 8, 3))), ("a dog", rng.random((9, 8, 8, 3)))]
    check = Validation.__new__(Validation)  # only the parity state: no pipeline is built
    check.last_videos = last
    mode = SimpleNamespace(name="lora")
    assert check._parity([(p, v.copy()) for p, v in last], mode) == {"max_abs_difference": 0.0, "exact": True}
    changed = [(p, v.copy()) for p, v in last]
    changed[1][1][4, 2, 2, 0] += 0.25
    with caplog.at_level(logging.WARNING, logger="cogvideox_factory"):
        parity = check._parity(changed, mode)
    assert parity["exact"] is False and parity["max_abs_difference"] == pytest.approx(0.25)
    assert "parity check: saved weights give videos differing" in caplog.text
