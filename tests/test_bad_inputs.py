"""Broken samples among good ones: one report before any model loads; --skip_bad_samples trains on the rest.

Also the `no_model_file_opened` fixture, which observes "before any model loads" directly (tests/test_args.py uses
it too)."""

import csv
import ctypes
import ctypes.util
import json
import os
import struct
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ASSETS, TINY_DATA_FLAGS, prepare_argv, run_prepare, run_trainer


# ----------------------------------------------------------------------------------------------
# "Before any model loads", observed: every file of the model folder the process opens
# ----------------------------------------------------------------------------------------------

# Files of a pipeline folder a check may read before any model loads: the configs the flags are checked against.
CONFIG_FILES = ("model_index.json", "config.json", "scheduler_config.json")

# The audit hook below reports to the active watches. Audit hooks cannot be removed: it is added once, at the first
# watch, and does nothing while no watch is active.
_ACTIVE_WATCHES = []
_HOOK_ADDED = []


def _audit_hook(event, args):
    if event == "open" and _ACTIVE_WATCHES:
        for watch in _ACTIVE_WATCHES:
            watch.python_open(args[0])


_IN_CLOSE_WRITE, _IN_CLOSE_NOWRITE, _IN_OPEN, _IN_Q_OVERFLOW, _IN_ISDIR, _IN_NONBLOCK = (
    0x8, 0x10, 0x20, 0x4000, 0x40000000, 0o4000)


def _inotify():
    """(libc, an inotify file descriptor), or None where the kernel has no inotify (not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = libc.inotify_init1(_IN_NONBLOCK)
    except (OSError, AttributeError, TypeError):
        return None
    return (libc, fd) if fd >= 0 else None


class ModelFileWatch:
    """Inside `with`, records every opening of a file under the model folder; on a clean exit, fails if any file
    but the configs (CONFIG_FILES) was opened: weights (`*.safetensors`, `*.bin`), tokenizer files, anything.

    Two observers: the kernel (inotify on every folder of the model: it sees every open(2), also the ones native
    code makes, as safetensors and PyTorch's C++ readers do; an audit hook alone never sees those) and an audit
    hook on Python's "open" event, which tells which Python code opened a file. With `allow_digest`, the weight
    files may be opened by `training.precomputed.weights_digest` (64 slices of 64 KiB hashed to tell two models'
    VAE and T5 weights apart; no tensor is built), as many times as it opened them and no more. `expect`: files the
    block must have opened (the transformer config, which every check reads), so a watch that sees nothing fails.
    """

    def __init__(self, model, allow_digest=False, expect=("transformer/config.json",)):
        self.root = os.path.abspath(model)
        self.roots = {self.root, os.path.realpath(model)}  # as Python code may name the files
        self.allow_digest, self.expect = allow_digest, tuple(expect)
        self.kernel_opens = Counter()  # relative path -> open(2) calls seen by inotify
        self.digest_opens = Counter()  # relative path -> Python opens made by weights_digest
        self.python_opens = Counter()  # relative path -> other Python opens
        self.errors = []
        self.kernel = None

    # Python's opens, from the audit hook (which must never raise: the open itself would fail).
    def python_open(self, path):
        try:
            if isinstance(path, int) or path is None:
                return
            path = os.path.abspath(os.fsdecode(path))
            root = next((r for r in self.roots if path.startswith(r + os.sep)), None)
            if root is None:
                return
            relative = os.path.relpath(path, root)
            frame = sys._getframe(1)
            while frame is not None and frame.f_code is not self._digest_code:
                frame = frame.f_back
            (self.digest_opens if frame is not None else self.python_opens)[relative] += 1
        except Exception as error:  # reported by check()
            self.errors.append(repr(error))

    def __enter__(self):
        from training.precomputed import weights_digest

        self._digest_code = weights_digest.__code__
        self.kernel = _inotify()
        if self.kernel is None:
            warnings.warn("no inotify here: only Python's own opens are watched (safetensors opens files natively)")
        else:
            libc, fd = self.kernel
            self.folders = {}
            for folder, _, _ in os.walk(self.root):
                wd = libc.inotify_add_watch(fd, os.fsencode(folder), _IN_OPEN | _IN_CLOSE_WRITE | _IN_CLOSE_NOWRITE)
                if wd < 0:
                    os.close(fd)
                    raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
                self.folders[wd] = folder
        if not _HOOK_ADDED:
            sys.addaudithook(_audit_hook)
            _HOOK_ADDED.append(True)
        _ACTIVE_WATCHES.append(self)
        return self

    def _read_kernel_events(self):
        """Every open(2) of a file (not a folder listing). The close events are watched too so that two openings of
        one file are never adjacent identical events, which the kernel would merge into one."""
        fd = self.kernel[1]
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _, size = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + size].rstrip(b"\0").decode()
                offset += 16 + size
                if mask & _IN_Q_OVERFLOW:
                    self.errors.append("inotify queue overflow: openings were lost")
                elif mask & _IN_OPEN and not mask & _IN_ISDIR:
                    self.kernel_opens[os.path.relpath(os.path.join(self.folders[wd], name), self.root)] += 1
        os.close(fd)

    def stop(self):
        if self in _ACTIVE_WATCHES:
            _ACTIVE_WATCHES.remove(self)
            if self.kernel is not None:
                self._read_kernel_events()

    def __exit__(self, exc_type, *_):
        self.stop()
        if exc_type is None:
            self.check()

    @property
    def opened(self):
        """Every file of the model opened inside the block (relative paths)."""
        return sorted(set(self.kernel_opens) | set(self.python_opens) | set(self.digest_opens))

    def check(self):
        assert not self.errors, self.errors
        opened = self.kernel_opens if self.kernel is not None else self.python_opens + self.digest_opens
        allowed = self.digest_opens if self.allow_digest else Counter()
        loaded = {path: count - allowed[path] for path, count in opened.items()
                  if Path(path).name not in CONFIG_FILES and count > allowed[path]}
        loaded.update({path: count for path, count in self.python_opens.items()
                       if Path(path).name not in CONFIG_FILES})
        assert not loaded, f"model files opened before the error: {loaded} (all opened: {self.opened})"
        missing = [path for path in self.expect if path not in opened]
        assert not missing, f"the watch did not see {missing} opened (saw {self.opened}): is it watching?"


@pytest.fixture()
def no_model_file_opened():
    """`with no_model_file_opened(model_folder): ...` fails if the block opened any file of the model but its
    configs (see ModelFileWatch: `allow_digest=True` for --load_tensors, `expect=()` where no config is read)."""
    watches = []

    def watch(model, **options):
        watches.append(ModelFileWatch(model, **options))
        return watches[-1]

    yield watch
    for watch in watches:  # a test that failed inside the block leaves it open
        watch.stop()


def faststart_clip(path, frames=17, height=64, width=96):
    """An mp4 with its index (moov) before the frame data, as web-ready exports are (`-movflags +faststart`):
    cut short or corrupted in the frame data, its header still reads fine. Noise frames: about 10 kB each."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def packet_offsets(path):
    """Byte offset of every frame's packet, in decode order (demuxed: PyAV before 16 has no Stream.index_entries)."""
    import av

    with av.open(str(path)) as container:
        return [packet.pos for packet in container.demux(container.streams.video[0]) if packet.size]


def cut_in_the_frame_data(source, target):
    """A faststart mp4 cut inside frame 9's packet: the header (moov, at the front) is whole."""
    data = source.read_bytes()
    target.write_bytes(data[: packet_offsets(source)[8] + 100])
    return target


def corrupt_in_the_middle(source, target):
    """A faststart mp4 with frame 9's packet overwritten with 0xff (its NAL size field among them)."""
    data = bytearray(source.read_bytes())
    offset = packet_offsets(source)[8]
    data[offset : offset + 64] = b"\xff" * 64
    target.write_bytes(bytes(data))
    return target


@pytest.fixture()
def broken_csv(clips):
    """The bundled clips plus seven unusable entries, in CSV mode."""
    import imageio

    videos = clips / "videos"
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "notes.mp4").write_text("this is not a video\n")
    whole = (videos / "waves.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    imageio.mimwrite(videos / "short.mp4", [np.zeros((32, 32, 3), np.uint8)] * 3, fps=8, macro_block_size=1)
    good = faststart_clip(clips / "faststart.mp4")
    cut_in_the_frame_data(good, videos / "cut_faststart.mp4")
    corrupt_in_the_middle(good, videos / "corrupt.mp4")
    rows = list(csv.reader(open(clips / "metadata.csv")))
    rows += [["videos/empty.mp4", "an empty file"], ["videos/notes.mp4", "a text file"],
             ["videos/truncated.mp4", "a cut download"], ["videos/short.mp4", "three frames"],
             ["videos/ball.mp4", ""], ["videos/cut_faststart.mp4", "a cut download, header intact"],
             ["videos/corrupt.mp4", "corrupt bytes in the middle"]]
    with open(clips / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return clips


EXPECTED = {  # entry number -> what the report says
    7: "cannot read as a video", 8: "cannot read as a video", 9: "cannot read as a video",
    10: "fewer than the smallest frame bucket", 11: "empty caption",
    12: "truncated: frame 9 of 17 lies beyond the end of the file", 13: "corrupt video data at frame 9 of 17",
}


def _argv(model, data, output):
    return ["--pretrained_model_name_or_path", model, "--dataset_file", str(data / "metadata.csv"),
            "--caption_column", "caption", "--video_column", "video", *TINY_DATA_FLAGS, "--output_dir", str(output),
            "--max_train_steps", "2", "--train_batch_size", "2"]


def test_bad_samples_stop_the_run_with_one_report(capsys, no_model_file_opened, tiny_model_2b, broken_csv, tmp_path):
    output = tmp_path / "run"
    with no_model_file_opened(tiny_model_2b), pytest.raises(SystemExit) as exit_info:
        run_trainer(_argv(tiny_model_2b, broken_csv, output))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == len(EXPECTED) + 1
    for entry, reason in EXPECTED.items():
        assert any(line.startswith(f"error: entry {entry} (") and reason in line for line in lines), (entry, lines)
    assert "pass --skip_bad_samples" in lines[-1] and "training has not started" in lines[-1]
    report = [json.loads(line) for line in (output / "skipped_samples.jsonl").read_text().splitlines()]
    assert sorted(r["entry"] for r in report) == sorted(EXPECTED)
    assert not list(output.glob("checkpoint-*"))


def test_skip_bad_samples_trains_on_the_rest_and_lists_them(tiny_model_2b, broken_csv, tmp_path):
    output = tmp_path / "run"
    summary = run_trainer([*_argv(tiny_model_2b, broken_csv, output), "--skip_bad_samples"])
    assert summary["global_step"] == 2 and summary["skipped_samples"] == len(EXPECTED)
    report = {json.loads(line)["entry"]: json.loads(line)["reason"]
              for line in (output / "skipped_samples.jsonl").read_text().splitlines()}
    assert all(reason in report[entry] for entry, reason in EXPECTED.items())


def test_prepare_stops_on_bad_samples_and_can_skip_them(capsys, no_model_file_opened, tiny_model_2b, broken_csv,
                                                        tmp_path):
    output = tmp_path / "prepared"
    argv = ["--model_id", tiny_model_2b, "--dataset_file", str(broken_csv / "metadata.csv"), "--caption_column", "caption",
            "--video_column", "video", *TINY_DATA_FLAGS, "--max_sequence_length", "16", "--save_latents_and_embeddings",
            "--output_dir", str(output)]
    with no_model_file_opened(tiny_model_2b), pytest.raises(SystemExit):
        run_prepare(argv)
    assert "encoding has not started" in capsys.readouterr().err
    assert not (output / "latents").exists()  # stopped before encoding: no entry, not even the folder
    run_prepare([*argv, "--skip_bad_samples"])
    manifest = json.loads((output / "manifest.json").read_text())
    assert len(manifest["entries"]) == 6 and len(manifest["skipped"]) == len(EXPECTED)


def test_truncated_cache_entry_is_refused_and_recomputed(capsys, no_model_file_opened, tiny_model_2b, tmp_path):
    output = tmp_path / "prepared"
    argv = prepare_argv(tiny_model_2b, str(ASSETS), str(output))
    run_prepare(argv)
    assert not (output / "video_hashes.json").exists()  # without --hash_videos: keyed by path, size and mtime
    entry = sorted((output / "latents").iterdir())[0]
    entry.write_bytes(entry.read_bytes()[:100])  # a write cut short
    capsys.readouterr()
    with no_model_file_opened(tiny_model_2b, allow_digest=True), pytest.raises(SystemExit):
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

    from training.video_io import _read_frames_pyav, probe_video, read_frames

    source, path = tmp_path / "src.mp4", tmp_path / f"clip.{suffix}"
    import imageio

    imageio.mimwrite(source, [np.full((32, 64, 3), 40 * i, np.uint8) for i in range(5)], fps=8, macro_block_size=1)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(source), "-c:v", codec,
                    "-pix_fmt", pix_fmt, str(path)], check=True)
    assert probe_video(path).num_frames == 5
    # decord where it reads the file, and PyAV (its fallback, and the only reader where decord is not installed)
    for frames in (read_frames(path, [0, 2, 4]), _read_frames_pyav(path, [0, 2, 4])):
        assert frames.shape == (3, 32, 64, 3) and frames.dtype == torch.uint8
        assert frames[2].float().mean() > frames[0].float().mean() + 100  # content, not a blank decode


def _output_dir_errors(capsys, runner, model, output):
    argv = ["--data_root", str(ASSETS), "--caption_column", "prompts.txt", "--video_column", "videos.txt",
            *TINY_DATA_FLAGS, "--output_dir", str(output)]
    if runner is run_prepare:
        argv = ["--model_id", model, *argv, "--max_sequence_length", "16", "--save_latents_and_embeddings"]
    else:
        argv = ["--pretrained_model_name_or_path", model, *argv]
    with pytest.raises(SystemExit) as exit_info:
        runner(argv)
    assert exit_info.value.code == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("runner", [run_trainer, run_prepare], ids=["train", "prepare"])
def test_output_dir_below_a_file(capsys, no_model_file_opened, tiny_model_2b, tmp_path, runner):
    (tmp_path / "afile").write_text("x")
    with no_model_file_opened(tiny_model_2b):
        lines = _output_dir_errors(capsys, runner, tiny_model_2b, tmp_path / "afile" / "run")
    assert lines == [f"error: --output_dir {tmp_path / 'afile' / 'run'}: cannot create it ({tmp_path / 'afile'} is "
                     "a file, not a folder)"]


@pytest.mark.parametrize("runner", [run_trainer, run_prepare], ids=["train", "prepare"])
def test_output_dir_that_is_not_writable(capsys, monkeypatch, no_model_file_opened, tiny_model_2b, tmp_path, runner):
    """A read-only folder (the output folder itself, or the one it would be created in)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_access = os.access
    if real_access(locked, os.W_OK):  # root writes anywhere: make the check see what it sees for other users
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
            False if Path(path) == locked and mode & os.W_OK else real_access(path, mode, **kw)))
    try:
        for output in (locked, locked / "run"):
            with no_model_file_opened(tiny_model_2b):
                lines = _output_dir_errors(capsys, runner, tiny_model_2b, output)
            assert lines == [f"error: --output_dir {output}: cannot write there ({locked} is not writable)"]
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_prepare_checks_free_disk_space_before_encoding(capsys, monkeypatch, no_model_file_opened, tiny_model_2b,
                                                        tmp_path):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with no_model_file_opened(tiny_model_2b), pytest.raises(SystemExit):
        run_prepare(prepare_argv(tiny_model_2b, str(ASSETS), str(tmp_path / "p")))
    err = capsys.readouterr().err
    assert "GiB but only 0.00 GiB are free there" in err
    assert not (tmp_path / "p" / "latents").exists()  # stopped before encoding: no entry, not even the folder


def test_dry_run_shows_the_plan_and_trains_nothing(capsys, tiny_model_2b, broken_csv, tmp_path, no_model_file_opened):
    output = tmp_path / "run"
    with no_model_file_opened(tiny_model_2b):  # "nothing is loaded but configuration files"
        summary = run_trainer([*_argv(tiny_model_2b, broken_csv, output), "--dry_run", "--eval_split", "0.2"])
    plan = summary["dry_run"]
    assert plan["samples_for_training"] + plan["samples_held_out"] == 6
    assert len(plan["samples_unusable"]) == len(EXPECTED) and sum(plan["buckets"].values()) == plan["samples_for_training"]
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
    assert "usable samples: 6; to encode: 6" in out and f"unusable samples: {len(EXPECTED)}" in out
    # nothing but the scan's reports (review 2.2 #11: it made empty latents/ and videos/)
    assert {path.name for path in output.iterdir()} <= {"data_notes.jsonl", "skipped_samples.jsonl"}


def test_a_stream_broken_behind_a_good_header_is_found_by_the_scan(clips):
    """Cut in the frame data or corrupt in the middle: the header probe passes and decoding fails, so only the
    stream check of the scan finds them before training; a clip cut after the frames training takes is usable."""
    from training.buckets import GridBuckets
    from training.dataset import assign_buckets, load_samples
    from training.video_io import VideoReadError, probe_video, read_frames

    good = faststart_clip(clips / "good.mp4", frames=40, height=32, width=32)
    cut = cut_in_the_frame_data(good, clips / "videos" / "cut.mp4")
    corrupt = corrupt_in_the_middle(good, clips / "videos" / "corrupt.mp4")
    tail = clips / "videos" / "tail_cut.mp4"  # frames 37-40 missing; with the last 20 skipped, 0-16 are taken
    tail.write_bytes(good.read_bytes()[: packet_offsets(good)[36]])
    for path in (cut, corrupt):
        assert probe_video(path).num_frames == 40  # the header reads fine...
        with pytest.raises(VideoReadError):  # ...but this is what a loader worker would hit in training
            read_frames(path, list(range(0, 40, 4)))

    (clips / "prompts.txt").write_text("a cut clip\na corrupt clip\nthe end cut\n")
    (clips / "videos.txt").write_text("videos/cut.mp4\nvideos/corrupt.mp4\nvideos/tail_cut.mp4\n")
    samples = load_samples(clips, None, "prompts.txt", "videos.txt")
    usable, skipped = assign_buckets(samples, GridBuckets([5], [32], [32], 5, 1, 1), skip_frames_end=20)
    reasons = {s.video_path.split("/")[-1]: s.reason for s in skipped}
    # From the mp4's packet index (PyAV 16 and newer), or found when the data runs out (older PyAV).
    assert any(message in reasons["cut.mp4"] for message in (
        "truncated: frame 9 of 40 lies beyond the end of the file", "at frame 9 of 40", "ends after 8 of 40 frames"))
    assert "corrupt video data at frame 9 of 40" in reasons["corrupt.mp4"]
    assert [u.sample.video_path.name for u in usable] == ["tail_cut.mp4"] and max(usable[0].frame_indices) == 16
    assert read_frames(tail, usable[0].frame_indices).shape == (5, 32, 32, 3)
    # Without the stream check (as before) both broken clips pass the scan.
    assert len(assign_buckets(samples, GridBuckets([5], [32], [32], 5, 1, 1), check_streams=False)[0]) == 3


@pytest.mark.parametrize("runner", [run_trainer, run_prepare], ids=["train", "prepare"])
def test_a_clip_failing_in_a_loader_worker_stops_the_run_with_one_line_naming_it(capfd, monkeypatch, tiny_model_2b,
                                                                                 clips, tmp_path, runner):
    """If a clip passes the scan and still fails to decode (here the stream check is switched off), training and
    prepare_dataset.py stop with exit status 1 and one `error:` line naming the entry and file and saying what to do;
    nothing on stderr (read at the file descriptor, where a worker process writes too) is a traceback."""
    import training.dataset

    corrupt_in_the_middle(faststart_clip(tmp_path / "good.mp4"), clips / "videos" / "corrupt.mp4")
    with open(clips / "prompts.txt", "a") as f:
        f.write("corrupt bytes in the middle\n")
    with open(clips / "videos.txt", "a") as f:
        f.write("videos/corrupt.mp4\n")
    unchecked = training.dataset.probe_video
    monkeypatch.setattr(training.dataset, "probe_video", lambda path, last_frame_for=None: unchecked(path))
    data = ["--data_root", str(clips), "--caption_column", "prompts.txt", "--video_column", "videos.txt",
            *TINY_DATA_FLAGS, "--output_dir", str(tmp_path / "run"), "--dataloader_num_workers", "1"]
    if runner is run_prepare:
        argv = ["--model_id", tiny_model_2b, *data, "--max_sequence_length", "16", "--save_latents_and_embeddings"]
    else:
        argv = ["--pretrained_model_name_or_path", tiny_model_2b, *data, "--max_train_steps", "7",
                "--train_batch_size", "1"]
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        runner(argv)
    assert exit_info.value.code == 1
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1, lines
    message = lines[0]  # a line of its own: the progress bar ended its line first
    assert message.startswith("error: entry 7: "), lines
    assert str(clips / "videos" / "corrupt.mp4") in message
    assert "remove this clip from the data list (or re-encode it) and run again" in message
    assert "--resume_from_checkpoint latest goes on from the last checkpoint" in message
    assert "prepare_dataset.py keeps what it finished" in message
    assert "Traceback" not in err and "DataLoader worker" not in err and "ClipDecodeError" not in err


# ----------------------------------------------------------------------------------------------
# Errors that point the right way: a model not in the cache, lists not named, a blank caption line, third-party notes
# ----------------------------------------------------------------------------------------------


def test_a_hub_id_missing_from_the_cache_offline_is_one_line_saying_so(tmp_path):
    """Run as a user would (a process of its own: warnings print as they do there). Before: `no CogVideoX transformer
    config found there (OSError)` behind huggingface_hub's local_dir_use_symlinks deprecation warning, which
    accelerate then quoted as the failed launch's headline."""
    import subprocess

    from conftest import ROOT

    empty = tmp_path / "hf-cache"
    result = subprocess.run(
        [sys.executable, str(ROOT / "training" / "cogvideox_text_to_video_lora.py"), "--pretrained_model_name_or_path",
         "THUDM/CogVideoX-5b", "--cache_dir", str(empty), "--data_root", str(ASSETS), "--caption_column", "prompts.txt",
         "--video_column", "videos.txt", "--output_dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: --pretrained_model_name_or_path THUDM/CogVideoX-5b: not in the Hugging Face cache ({empty}), and "
        "HF_HUB_OFFLINE=1 forbids downloading it: download it once without HF_HUB_OFFLINE (hf download "
        f"THUDM/CogVideoX-5b --cache-dir {empty}), or give the pipeline's local folder"]


@pytest.mark.parametrize("cause, says", [
    ("unreachable", "not in the Hugging Face cache ({cache}), and the Hub could not be reached (no network? a proxy?)"),
    ("no such repo", "no such model (or revision) on the Hugging Face Hub: check the id"),
    ("local typo", "no such folder (a local path; a Hub id looks like THUDM/CogVideoX-5b)"),
])
def test_a_model_that_cannot_be_found_says_why(monkeypatch, tmp_path, cause, says):
    """diffusers reports each as `OSError: ... does not appear to have a file named config.json`, the cause chained
    behind it (huggingface_hub 1.x, after its retries: LocalEntryNotFoundError without a network)."""
    import socket

    import httpx
    import huggingface_hub.constants
    from diffusers import CogVideoXTransformer3DModel
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    from training.args import UsageError, load_transformer_config
    from training.models import Pretrained

    def load_config(path, **kwargs):
        try:
            if cause == "unreachable":
                raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                              "cannot find the requested files in the local cache.")
            url = f"https://huggingface.co/{path}/resolve/main/transformer/config.json"
            raise RepositoryNotFoundError("404 Client Error. Repository Not Found for url",
                                          response=httpx.Response(404, request=httpx.Request("HEAD", url)))
        except Exception as error:
            raise OSError(f"{path} does not appear to have a file named config.json.") from error

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(CogVideoXTransformer3DModel, "load_config", load_config)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port: [])  # the Hub's host resolves: the download is tried
    model = "./models/CogVideoX-5b" if cause == "local typo" else "THUDM/CogVideoX-5b"
    with pytest.raises(UsageError) as error:
        load_transformer_config(Pretrained(path=model, cache_dir=str(tmp_path)))
    (line,) = error.value.problems
    assert line.startswith(f"--pretrained_model_name_or_path {model}: {says.format(cache=tmp_path)}"), line


def test_without_a_network_a_model_missing_from_the_cache_is_said_at_once(monkeypatch, tmp_path):
    """The Hub's host has no address: no download is tried (huggingface_hub would retry for about 25 s, then
    report what this says); a model in the cache still loads from it."""
    import socket

    import huggingface_hub
    import huggingface_hub.constants
    from diffusers import CogVideoXTransformer3DModel

    from training.args import UsageError, load_transformer_config
    from training.models import Pretrained

    def no_address(host, port):
        raise socket.gaierror(-2, "Name or service not known")

    tried = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_address)
    monkeypatch.setattr(CogVideoXTransformer3DModel, "load_config", lambda *a, **k: tried.append(a) or {})
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(UsageError) as error:
        load_transformer_config(Pretrained(path="THUDM/CogVideoX-5b", cache_dir=str(tmp_path)))
    assert error.value.problems == [
        f"--pretrained_model_name_or_path THUDM/CogVideoX-5b: not in the Hugging Face cache ({tmp_path}), and the Hub "
        f"could not be reached (no network? a proxy?): download it once (hf download THUDM/CogVideoX-5b --cache-dir "
        f"{tmp_path}), or give the pipeline's local folder"]
    assert not tried
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: str(tmp_path / "config.json"))
    assert load_transformer_config(Pretrained(path="THUDM/CogVideoX-5b", cache_dir=str(tmp_path))) == {}
    assert len(tried) == 1  # cached: loaded as before
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy the host need not resolve here
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    assert load_transformer_config(Pretrained(path="THUDM/CogVideoX-5b", cache_dir=str(tmp_path))) == {}


def _folder_of_clips(root, **files):
    (root / "videos").mkdir(parents=True)
    for name in ("ball.mp4", "waves.mp4"):
        (root / "videos" / name).write_bytes((ASSETS / "videos" / name).read_bytes())
    for name, text in files.items():
        (root / name.replace("_", ".")).write_text(text, encoding="utf-8")
    return root


def test_a_folder_with_caption_and_video_lists_but_no_columns_names_the_lists(capsys, tiny_model_2b, tmp_path):
    """The Disney set's layout (prompt.txt, videos.txt, videos/) without --caption_column/--video_column: before, the
    folder counted as captions beside clips and every clip was reported `empty caption (ball.txt beside it is missing
    or empty)`."""
    data = _folder_of_clips(tmp_path / "disney", prompt_txt="a ball\nwaves\n", videos_txt="videos/ball.mp4\nvideos/waves.mp4\n")
    with pytest.raises(SystemExit) as exit_info:
        run_trainer(["--pretrained_model_name_or_path", tiny_model_2b, "--data_root", data, *TINY_DATA_FLAGS,
                     "--output_dir", tmp_path / "run", "--dry_run"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --data_root {data} has prompt.txt and videos.txt (lists, one entry per line), but --caption_column "
        "text and --video_column video name no file there and no clip has a caption file beside it: pass "
        "--caption_column prompt.txt --video_column videos.txt"]


def test_a_folder_of_captioned_clips_with_a_stray_list_still_trains_as_such(tmp_path):
    from training.layouts import check_data_source
    from training.sections import DataFlags

    data = _folder_of_clips(tmp_path / "clips", videos_txt="videos/ball.mp4\n")
    (data / "videos" / "ball.txt").write_text("a ball", encoding="utf-8")
    problems = []
    check_data_source(DataFlags(data_root=str(data)), problems)
    assert problems == []


def test_a_blank_caption_line_in_a_list_is_named_by_its_line(tmp_path):
    from training.args import UsageError
    from training.dataset import load_samples

    videos = "videos/ball.mp4\nvideos/waves.mp4\nvideos/ball.mp4\n"
    data = _folder_of_clips(tmp_path / "blank", prompts_txt="a ball\n\nthe ball again\n", videos_txt=videos)
    with pytest.raises(UsageError) as error:
        load_samples(data, None, "prompts.txt", "videos.txt")
    assert error.value.problems == [
        "--caption_column prompts.txt: line 2 is blank, but line 2 of videos.txt is a video (videos/waves.mp4): write "
        "its caption there, or remove the line from both lists"]
    (data / "videos.txt").write_text("videos/ball.mp4\n\nvideos/ball.mp4\n", encoding="utf-8")  # blank in both: spacing
    samples = load_samples(data, None, "prompts.txt", "videos.txt")
    assert [(s.caption, s.video_path.name) for s in samples] == [("a ball", "ball.mp4"), ("the ball again", "ball.mp4")]
    (data / "videos.txt").write_text("videos/ball.mp4\nvideos/waves.mp4\n\n\n", encoding="utf-8")  # spacing, one list
    assert len(load_samples(data, None, "prompts.txt", "videos.txt")) == 2


def test_a_library_warning_never_heads_a_failed_launch():
    """scripts/launch_errors_only.py: a third-party Python warning printed before the trainer's error goes after it;
    one printed in a run that goes on keeps its place."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("launch_errors_only", ROOT / "scripts" / "launch_errors_only.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    warning = (b"/venv/lib/python3.11/site-packages/huggingface_hub/utils/_validators.py:205: UserWarning: The "
               b"`local_dir_use_symlinks` argument is deprecated\n  warnings.warn(\n")

    def filtered(stream):
        chunks, written = [stream], []
        module.filter_stream(lambda: chunks.pop(0) if chunks else b"", written.append)
        return b"".join(written).decode().splitlines()

    failed = filtered(warning + b"error: --frame_buckets 48: no such bucket\nRuntimeError: /venv/...py:205: ...\n")
    assert failed[0] == "error: --frame_buckets 48: no such bucket" and len(failed) == 3 and "UserWarning" in failed[1]
    going_on = filtered(b"INFO loading\n" + warning + b"steps: 1/2\n")
    assert going_on == ["INFO loading", *warning.decode().splitlines(), "steps: 1/2"]
