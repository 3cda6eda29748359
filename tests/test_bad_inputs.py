"""Broken samples among good ones: one report before any model loads; --skip_bad_samples trains on the rest."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import TINY_DATA_FLAGS, run_prepare, run_trainer


@pytest.fixture()
def broken_csv(clips):
    """The bundled clips plus five unusable entries, in CSV mode."""
    import imageio

    videos = clips / "videos"
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "notes.mp4").write_text("this is not a video\n")
    whole = (videos / "waves.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    imageio.mimwrite(videos / "short.mp4", [np.zeros((32, 32, 3), np.uint8)] * 3, fps=8, macro_block_size=1)
    rows = list(csv.reader(open(clips / "metadata.csv")))
    rows += [["videos/empty.mp4", "an empty file"], ["videos/notes.mp4", "a text file"],
             ["videos/truncated.mp4", "a cut download"], ["videos/short.mp4", "three frames"],
             ["videos/ball.mp4", ""]]
    with open(clips / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return clips


EXPECTED = {  # entry number -> what the report says
    7: "cannot read as a video", 8: "cannot read as a video", 9: "cannot read as a video",
    10: "fewer than the smallest frame bucket", 11: "empty caption",
}


def _argv(model, data, output):
    return ["--pretrained_model_name_or_path", model, "--dataset_file", str(data / "metadata.csv"),
            "--caption_column", "caption", "--video_column", "video", *TINY_DATA_FLAGS, "--output_dir", str(output),
            "--max_train_steps", "2", "--train_batch_size", "2"]


def test_bad_samples_stop_the_run_with_one_report(capsys, tiny_model_2b, broken_csv, tmp_path):
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_trainer(_argv(tiny_model_2b, broken_csv, output))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 6
    for entry, reason in EXPECTED.items():
        assert any(line.startswith(f"error: entry {entry} (") and reason in line for line in lines), (entry, lines)
    assert "pass --skip_bad_samples" in lines[-1] and "training has not started" in lines[-1]
    report = [json.loads(line) for line in (output / "skipped_samples.jsonl").read_text().splitlines()]
    assert sorted(r["entry"] for r in report) == sorted(EXPECTED)
    assert not list(output.glob("checkpoint-*"))


def test_skip_bad_samples_trains_on_the_rest_and_lists_them(tiny_model_2b, broken_csv, tmp_path):
    output = tmp_path / "run"
    summary = run_trainer([*_argv(tiny_model_2b, broken_csv, output), "--skip_bad_samples"])
    assert summary["global_step"] == 2 and summary["skipped_samples"] == 5
    report = {json.loads(line)["entry"]: json.loads(line)["reason"]
              for line in (output / "skipped_samples.jsonl").read_text().splitlines()}
    assert all(reason in report[entry] for entry, reason in EXPECTED.items())


def test_prepare_stops_on_bad_samples_and_can_skip_them(capsys, tiny_model_2b, broken_csv, tmp_path):
    output = tmp_path / "prepared"
    argv = ["--model_id", tiny_model_2b, "--dataset_file", str(broken_csv / "metadata.csv"), "--caption_column", "caption",
            "--video_column", "video", *TINY_DATA_FLAGS, "--max_sequence_length", "16", "--save_latents_and_embeddings",
            "--output_dir", str(output)]
    with pytest.raises(SystemExit):
        run_prepare(argv)
    assert "encoding has not started" in capsys.readouterr().err
    assert not list((output / "latents").iterdir())
    run_prepare([*argv, "--skip_bad_samples"])
    manifest = json.loads((output / "manifest.json").read_text())
    assert len(manifest["entries"]) == 6 and len(manifest["skipped"]) == 5


def test_truncated_cache_entry_is_refused_and_recomputed(capsys, tiny_model_2b, tmp_path):
    from conftest import ASSETS

    output = tmp_path / "prepared"
    argv = ["--model_id", tiny_model_2b, "--data_root", str(ASSETS), "--caption_column", "prompts.txt",
            "--video_column", "videos.txt", *TINY_DATA_FLAGS, "--max_sequence_length", "16",
            "--save_latents_and_embeddings", "--output_dir", str(output)]
    run_prepare(argv)
    entry = sorted((output / "latents").iterdir())[0]
    entry.write_bytes(entry.read_bytes()[:100])  # a write cut short
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_trainer(["--pretrained_model_name_or_path", tiny_model_2b, "--data_root", str(output), "--load_tensors",
                     "--output_dir", str(tmp_path / "o")])
    assert "1 prepared file(s) truncated or corrupt" in capsys.readouterr().err
    from training.precomputed import readable_entry

    others = {p: p.stat().st_mtime_ns for p in (output / "latents").iterdir() if p != entry}
    run_prepare(argv)  # recomputes just that entry
    assert readable_entry(entry) and "preparing (rank 0): 100%|██████████| 1/1" in capsys.readouterr().err
    assert others == {p: p.stat().st_mtime_ns for p in others}


def test_notes_for_duplicates_upscaling_and_stretching(tiny_model_2b, clips, tmp_path):
    import imageio

    videos = clips / "videos"
    imageio.mimwrite(videos / "tiny.mp4", [np.full((16, 16, 3), 90, np.uint8)] * 9, fps=8, macro_block_size=1)
    imageio.mimwrite(videos / "strip.mp4", [np.full((32, 256, 3), 90, np.uint8)] * 9, fps=8, macro_block_size=1)
    with open(clips / "prompts.txt", "a") as f:
        f.write("a red ball bounces in the park\na tiny clip\na very wide strip\n")
    with open(clips / "videos.txt", "a") as f:
        f.write("videos/ball.mp4\nvideos/tiny.mp4\nvideos/strip.mp4\n")
    output = tmp_path / "run"
    run_trainer(["--pretrained_model_name_or_path", tiny_model_2b, "--data_root", str(clips), "--caption_column",
                 "prompts.txt", "--video_column", "videos.txt", *TINY_DATA_FLAGS, "--output_dir", str(output),
                 "--max_train_steps", "1"])
    notes = [json.loads(line) for line in (output / "data_notes.jsonl").read_text().splitlines()]
    reasons = {note["entry"]: note["reason"] for note in notes}
    assert reasons[7] == "duplicate of entry 3"
    assert reasons[8].startswith("upscaled from 16x16 to its bucket 32x32")
    assert "stretched" in reasons[9] and "--video_reshape_mode center" in reasons[9]


@pytest.mark.parametrize("pix_fmt, codec, suffix", [("gray", "libx264", "mp4"), ("rgba", "png", "mov")])
def test_grayscale_and_alpha_videos_read_as_rgb(tmp_path, pix_fmt, codec, suffix):
    import subprocess

    import imageio_ffmpeg

    from training.video_io import probe_video, read_frames

    source, path = tmp_path / "src.mp4", tmp_path / f"clip.{suffix}"
    import imageio

    imageio.mimwrite(source, [np.full((32, 64, 3), 40 * i, np.uint8) for i in range(5)], fps=8, macro_block_size=1)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(source), "-c:v", codec,
                    "-pix_fmt", pix_fmt, str(path)], check=True)
    assert probe_video(path).num_frames == 5
    frames = read_frames(path, [0, 2, 4])
    assert frames.shape == (3, 32, 64, 3) and frames.dtype == torch.uint8
    assert frames[2].float().mean() > frames[0].float().mean() + 100  # content, not a blank decode


def test_output_dir_below_a_file(capsys, tiny_model_2b, tmp_path):
    from conftest import ASSETS

    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        run_trainer(["--pretrained_model_name_or_path", tiny_model_2b, "--data_root", str(ASSETS), "--caption_column",
                     "prompts.txt", "--video_column", "videos.txt", "--output_dir", str(tmp_path / "afile" / "run")])
    assert "is a file, not a folder" in capsys.readouterr().err


def test_prepare_checks_free_disk_space_before_encoding(capsys, monkeypatch, tiny_model_2b, tmp_path):
    import shutil
    from collections import namedtuple

    from conftest import ASSETS

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(SystemExit):
        run_prepare(["--model_id", tiny_model_2b, "--data_root", str(ASSETS), "--caption_column", "prompts.txt",
                     "--video_column", "videos.txt", *TINY_DATA_FLAGS, "--max_sequence_length", "16",
                     "--save_latents_and_embeddings", "--output_dir", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert "GiB but only 0.00 GiB are free there" in err
    assert not list((tmp_path / "p" / "latents").iterdir())


def test_dry_run_shows_the_plan_and_trains_nothing(capsys, tiny_model_2b, broken_csv, tmp_path):
    output = tmp_path / "run"
    summary = run_trainer([*_argv(tiny_model_2b, broken_csv, output), "--dry_run", "--eval_split", "0.2"])
    plan = summary["dry_run"]
    assert plan["samples_for_training"] + plan["samples_held_out"] == 6
    assert len(plan["samples_unusable"]) == 5 and sum(plan["buckets"].values()) == plan["samples_for_training"]
    assert plan["trainable_parameters"] > 0 and plan["optimizer_steps"] == 2
    out = capsys.readouterr().out
    assert "dry run: nothing will be trained" in out and "the run would stop" in out
    assert not (output / "pytorch_lora_weights.safetensors").exists() and not list(output.glob("checkpoint-*"))


def test_prepare_dry_run_encodes_nothing(capsys, tiny_model_2b, broken_csv, tmp_path):
    output = tmp_path / "prepared"
    run_prepare(["--model_id", tiny_model_2b, "--dataset_file", str(broken_csv / "metadata.csv"), "--caption_column",
                 "caption", "--video_column", "video", *TINY_DATA_FLAGS, "--max_sequence_length", "16",
                 "--save_latents_and_embeddings", "--output_dir", str(output), "--dry_run"])
    out = capsys.readouterr().out
    assert "usable samples: 6; to encode: 6" in out and "unusable samples: 5" in out
    assert not list((output / "latents").iterdir()) and not (output / "manifest.json").exists()
