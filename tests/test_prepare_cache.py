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


def test_each_change_recomputes_exactly_the_entries_it_affects(tiny_model_2b, tiny_model_5b, clips, tmp_path):
    """Default keys. Each change below, then prepare again into the same folder: the entries it creates are exactly
    those the change touches; every other entry is reused (same file, not rewritten)."""
    output = tmp_path / "prepared"

    def prepare(model=tiny_model_2b, *extra):
        before = _latents(output) if output.exists() else {}
        run_prepare([a for a in _argv(model, clips, output, *extra) if a != "--hash_videos"])
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
    assert prepare(tiny_model_5b, *buckets, "--skip_frames_start", "1") == 6  # another model
