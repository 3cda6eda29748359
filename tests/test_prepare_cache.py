"""The precompute cache is never stale: an entry is recomputed when anything it depends on changes, and only then
(default keys: path, size and mtime; --hash_videos: the video's bytes)."""

import json
import os
import shutil
import time
from pathlib import Path

import torch
from conftest import prepare_argv, run_prepare


def _argv(model, data, output, *extra):
    return prepare_argv(model, str(data), str(output), "--hash_videos", *extra)


def _latents(output):
    return {p.name: p.stat().st_mtime_ns for p in (output / "latents").iterdir()}


def test_hash_videos_recomputes_a_video_replaced_with_the_same_size_and_mtime(capsys, tiny_model_2b, clips, tmp_path):
    output = tmp_path / "prepared"
    run_prepare(_argv(tiny_model_2b, clips, output))
    before = _latents(output)
    hashes = json.loads((output / "video_hashes.json").read_text())["files"]
    assert len(before) == 6 and len(hashes) == 6
    capsys.readouterr()

    # Another file of the same size in its place, its mtime set back (as `touch -r` or `cp -p` would).
    video = clips / "videos" / "waves.mp4"
    stat = video.stat()
    data = video.read_bytes()
    video.write_bytes(data.replace(b"Lavf", b"LAVF", 1))  # the encoder tag: still a valid, readable video
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (video.stat().st_size, video.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)

    run_prepare(_argv(tiny_model_2b, clips, output))
    assert "preparing (rank 0): 100%|██████████| 1/1" in capsys.readouterr().err  # exactly that one
    after = _latents(output)
    (new,) = set(after) - set(before)
    assert {name: after[name] for name in before if name in after} == {n: t for n, t in before.items() if n in after}
    manifest = json.loads((output / "manifest.json").read_text())
    changed = [e for e in manifest["entries"] if e["source_video"].endswith("waves.mp4")]
    assert changed[0]["file"] == f"latents/{new}" and changed[0]["video_sha256"] != hashes[str(video.resolve())]["sha256"]


def test_hash_videos_reuses_every_entry_after_the_folder_is_moved_and_a_file_renamed(capsys, tiny_model_2b, clips,
                                                                                   tmp_path):
    output = tmp_path / "prepared"
    run_prepare(_argv(tiny_model_2b, clips, output))
    before = _latents(output)
    capsys.readouterr()

    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(clips, moved)  # a copy (new inodes and times), as on another machine
    shutil.rmtree(clips)
    (moved / "videos" / "waves.mp4").rename(moved / "videos" / "sea.mp4")
    listing = moved / "videos.txt"
    listing.write_text(listing.read_text().replace("videos/waves.mp4", "videos/sea.mp4"))

    run_prepare(_argv(tiny_model_2b, moved, output))
    assert "preparing (rank 0)" not in capsys.readouterr().err  # nothing encoded
    assert _latents(output) == before
    manifest = json.loads((output / "manifest.json").read_text())
    assert all(e["source_video"].startswith(str(moved)) for e in manifest["entries"])
    hashed = json.loads((output / "video_hashes.json").read_text())["files"]
    assert str((moved / "videos" / "sea.mp4").resolve()) in hashed and len(hashed) == 6


def test_hashes_are_remembered_and_taken_again_only_for_changed_files(clips, tmp_path):
    from training.precomputed import ContentHashes, sha256_of_file

    store = tmp_path / "video_hashes.json"
    videos = sorted((clips / "videos").iterdir())
    first = ContentHashes(store)
    digests = [first.digest(v) for v in videos]
    first.save()
    assert first.hashed == len(videos) and digests[0] == sha256_of_file(videos[0])

    again = ContentHashes(store)
    assert [again.digest(v) for v in videos] == digests and (again.hashed, again.reused) == (0, len(videos))

    stat = videos[0].stat()
    deadline = time.monotonic() + 5
    while videos[0].stat().st_ctime_ns == stat.st_ctime_ns and time.monotonic() < deadline:  # a timestamp tick
        videos[0].write_bytes(videos[0].read_bytes())  # same bytes, same mtime restored: only the ctime moved
        os.utime(videos[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert videos[0].stat().st_ctime_ns != stat.st_ctime_ns
    third = ContentHashes(store)
    assert third.digest(videos[0]) == digests[0] and third.hashed == 1


def test_random_crops_and_flips_depend_on_the_seed_and_the_sample_only(tiny_model_2b, clips, tmp_path):
    """Random crops and flips in prepare come from (--seed, the entry): listed in another order (as another process
    would get them, or next to other clips), every entry comes out the same; another --seed changes them."""
    from safetensors.torch import load_file

    random_data = ["--video_reshape_mode", "random", "--random_flip", "0.5"]

    def prepare(data, name, seed):
        output = tmp_path / name
        run_prepare(_argv(tiny_model_2b, data, output, *random_data, "--seed", str(seed)))
        manifest = json.loads((output / "manifest.json").read_text())
        return {Path(e["source_video"]).name: load_file(output / e["file"])["video_latent_dist"]
                for e in manifest["entries"]}

    reordered = tmp_path / "reordered"
    shutil.copytree(clips, reordered)
    for name in ("prompts.txt", "videos.txt"):  # the same pairs, in reverse order
        (reordered / name).write_text("".join(reversed((clips / name).read_text().splitlines(keepends=True))))
    first, again = prepare(clips, "first", 3), prepare(reordered, "reordered", 3)
    assert first.keys() == again.keys() and len(first) == 6
    for clip in first:
        assert torch.equal(first[clip], again[clip]), clip
    other_seed = prepare(clips, "other-seed", 4)
    assert any(not torch.equal(first[clip], other_seed[clip]) for clip in first)


def _entries(output):
    return {e["file"] for e in json.loads((output / "manifest.json").read_text())["entries"]}


def _tensors(output, name):
    """Tensor `name` of every entry in the manifest."""
    from safetensors.torch import load_file

    return [load_file(output / file)[name] for file in _entries(output)]


def test_each_change_recomputes_exactly_the_entries_it_affects(tiny_model_2b, tiny_model_5b, clips, tmp_path):
    """Default keys (and at the end the switch to --hash_videos). Each change below, then prepare again into the same
    folder: the entries it creates are exactly those the change touches; every other entry is reused (same file, not
    rewritten). A setting (model, dtype, clip fitting, flips, text length, first frame) touches every entry."""
    output = tmp_path / "prepared"
    model_5b = shutil.copytree(tiny_model_5b, tmp_path / "model-5b")  # a copy: its config is edited below

    def prepare(model=tiny_model_2b, *extra, data=clips, hash_videos=False):
        before = _latents(output) if output.exists() else {}
        run_prepare([a for a in _argv(model, data, output, *extra) if hash_videos or a != "--hash_videos"])
        entries = _entries(output)
        assert len(entries) == 6
        reused = {f for f in entries if Path(f).name in before}
        assert all(_latents(output)[Path(f).name] == before[Path(f).name] for f in reused)  # not rewritten
        return len(entries - reused)

    assert prepare() == 6
    video = clips / "videos" / "ball.mp4"
    video.write_bytes(video.read_bytes().replace(b"Lavf", b"LAVF", 1))  # an edited video: new mtime
    assert prepare() == 1
    captions = clips / "prompts.txt"
    lines = captions.read_text().splitlines()
    captions.write_text("\n".join([lines[0], lines[1] + " at dawn", *lines[2:]]) + "\n")
    assert prepare() == 1
    assert prepare(tiny_model_2b, "--id_token", "BW_STYLE") == 6  # every caption changes
    # A bucket: without 96-wide buckets, the clips that filled one (waves 96x64, wide 128x48) take another.
    buckets = ["--width_buckets", "32", "64", "--id_token", "BW_STYLE"]
    assert prepare(tiny_model_2b, *buckets) == 2
    # Frame sampling: skipping the first frame shifts every clip's frames.
    assert prepare(tiny_model_2b, *buckets, "--skip_frames_start", "1") == 6
    assert prepare(model_5b, *buckets, "--skip_frames_start", "1") == 6  # another model
    latest = (model_5b, *buckets, "--skip_frames_start", "1", "--dtype", "bf16")
    assert prepare(*latest) == 6  # another dtype
    assert all(t.dtype == torch.bfloat16 for t in _tensors(output, "video_latent_dist"))
    # How clips are fitted to their bucket: cropped at the centre instead of stretched (no seed enters the key).
    latest = (*latest, "--video_reshape_mode", "center")
    assert prepare(*latest) == 6
    # Random flips: on (the seed enters the key with them), then another probability (the same seed).
    assert prepare(*latest, "--random_flip", "0.5") == 6
    latest = (*latest, "--random_flip", "0.25")
    assert prepare(*latest) == 6
    # The first frame for image-to-video: entries without it are not reused.
    latest = (*latest, "--save_image_latents")
    assert prepare(*latest) == 6
    assert len(_tensors(output, "first_frame")) == 6
    # The text length: the model's config edited in place (the flag must match it), the same path and components.
    config_file = Path(model_5b) / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "max_text_seq_length": config["max_text_seq_length"] // 2}))
    latest = (*latest, "--max_sequence_length", str(config["max_text_seq_length"] // 2))
    assert prepare(*latest) == 6
    assert {t.shape[0] for t in _tensors(output, "prompt_embeds")} == {config["max_text_seq_length"] // 2}
    # Default keys cannot see a video replaced by another of the same size with its mtime kept (docs/bad-inputs.md,
    # row 35): the entry is reused. --hash_videos keys by the bytes: switching it on recomputes every entry once.
    video = clips / "videos" / "waves.mp4"
    stat = video.stat()
    video.write_bytes(video.read_bytes().replace(b"Lavf", b"LAVF", 1))
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prepare(*latest) == 0
    assert prepare(*latest, hash_videos=True) == 6 and prepare(*latest, hash_videos=True) == 0
    # A moved data folder (row 36): new paths, so with default keys every entry is recomputed.
    moved = tmp_path / "elsewhere"
    shutil.copytree(clips, moved)
    assert prepare(*latest, data=moved) == 6


def test_the_weights_digest_reads_64_slices_of_64_kib_per_file(monkeypatch, tmp_path):
    """docs/bad-inputs.md: the VAE and T5 weight files are read in 64 slices of 64 KiB for the digest (a few MiB even
    for T5-XXL); a change inside a slice, or in size, changes it; a byte between slices does not (not every byte)."""
    import builtins

    import training.precomputed as precomputed
    from training.models import Pretrained

    weights = tmp_path / "model" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    data = bytearray(os.urandom(16 << 20))
    weights.write_bytes(data)
    where = Pretrained(str(tmp_path / "model"))
    reads = []

    class Counted:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def seek(self, offset):
            return self.file.seek(offset)

        def read(self, size=-1):
            chunk = self.file.read(size)
            reads.append(len(chunk))
            return chunk

    monkeypatch.setattr(precomputed, "open", lambda path, mode="r": Counted(builtins.open(path, mode)), raising=False)
    digest = precomputed.weights_digest(where, "vae")
    assert reads == [64 << 10] * 64  # 4 MiB of the 16

    stride = len(data) // 64
    data[stride + 5] ^= 0xFF  # inside the second slice
    weights.write_bytes(data)
    assert precomputed.weights_digest(where, "vae") != digest
    data[stride + 5] ^= 0xFF
    data[(64 << 10) + 5] ^= 0xFF  # between the first and the second slice
    weights.write_bytes(data)
    assert precomputed.weights_digest(where, "vae") == digest
    weights.write_bytes(data + b"\0")
    assert precomputed.weights_digest(where, "vae") != digest
