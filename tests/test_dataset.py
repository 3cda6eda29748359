"""Data loading: the two data-source modes, bucket choice, frame sampling, the bucket sampler."""

import random

import pytest
import torch
from conftest import ASSETS

from training.args import UsageError
from training.buckets import GridBuckets
from training.dataset import (
    BucketBatchSampler,
    VideoDataset,
    assign_buckets,
    choose_frame_bucket,
    choose_resolution_bucket,
    fit_to_bucket,
    frame_indices,
    load_samples,
)
from training.video_io import _read_frames_pyav, probe_video, read_frames


BUCKETS = dict(plan=GridBuckets([5, 9], [32, 48, 64], [32, 64, 96], max_num_frames=9, batch_size=1, stills=1))


def test_txt_and_csv_modes_give_the_same_samples():
    txt = load_samples(ASSETS, None, "prompts.txt", "videos.txt", id_token="BW_STYLE")
    csv = load_samples(ASSETS, ASSETS / "metadata.csv", "caption", "video", id_token="BW_STYLE")
    assert len(txt) == 6
    assert [(s.caption, s.video_path.resolve()) for s in txt] == [(s.caption, s.video_path.resolve()) for s in csv]
    assert all(s.caption.startswith("BW_STYLE ") for s in txt)
    # CSV paths are relative to the CSV's folder when --data_root is not given.
    csv_no_root = load_samples(None, ASSETS / "metadata.csv", "caption", "video")
    assert [s.video_path.resolve() for s in csv_no_root] == [s.video_path.resolve() for s in txt]

    txt_data = VideoDataset(assign_buckets(txt, **BUCKETS)[0])
    csv_data = VideoDataset(assign_buckets(csv, **BUCKETS)[0])
    for a, b in zip(txt_data, csv_data):
        assert a["prompt"] == b["prompt"]
        assert torch.equal(a["video"], b["video"])


def test_mismatched_lists_and_missing_files_are_usage_errors(tmp_path):
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    (tmp_path / "videos.txt").write_text("videos/a.mp4\n")
    with pytest.raises(UsageError, match="2 captions but 1 videos"):
        load_samples(tmp_path, None, "prompts.txt", "videos.txt")
    (tmp_path / "videos.txt").write_text("videos/a.mp4\nvideos/b.mp4\n")
    with pytest.raises(UsageError) as error:
        load_samples(tmp_path, None, "prompts.txt", "videos.txt")
    assert len(error.value.problems) == 2 and "video file not found" in error.value.problems[0]


def test_frame_bucket_choice_never_exceeds_the_clip():
    assert choose_frame_bucket(100, [17, 33, 49], 49) == 49
    assert choose_frame_bucket(40, [17, 33, 49], 49) == 33  # the original picked 49 here and crashed
    assert choose_frame_bucket(49, [17, 33, 49], 33) == 33  # capped by --max_num_frames
    assert choose_frame_bucket(10, [17, 33, 49], 49) is None  # too short: reported, not a crash


def test_frame_indices_spread_over_the_clip_and_honour_skips():
    assert frame_indices(20, 5) == [0, 4, 8, 12, 16]
    assert frame_indices(9, 9) == list(range(9))
    assert frame_indices(30, 5, skip_start=5, skip_end=5) == [5, 9, 13, 17, 21]
    indices = frame_indices(30, 5, skip_start=5, skip_end=5)
    assert min(indices) >= 5 and max(indices) < 25


def test_resolution_bucket_is_nearest_in_l1():
    resolutions = [(h, w) for h in (480, 720) for w in (720, 960)]
    assert choose_resolution_bucket(480, 720, resolutions) == (480, 720)
    assert choose_resolution_bucket(700, 1000, resolutions) == (720, 960)
    assert choose_resolution_bucket(500, 900, resolutions) == (480, 960)


def test_buckets_of_the_bundled_clips_and_short_clips_are_reported():
    samples = load_samples(ASSETS, None, "prompts.txt", "videos.txt")
    usable, skipped = assign_buckets(samples, **BUCKETS)
    assert not skipped
    by_name = {u.sample.video_path.name: u.bucket for u in usable}
    assert by_name["wide.mp4"] == (9, 48, 96)  # 128x48 -> nearest (48, 96)
    assert by_name["tall.mp4"] == (9, 64, 32)

    usable, skipped = assign_buckets(samples, GridBuckets([13], [64], [64], 49, 1, 1))
    assert {s.video_path.split("/")[-1] for s in skipped} == {"ball.mp4", "tall.mp4", "wide.mp4"}
    assert all("fewer than the smallest frame bucket 13" in s.reason for s in skipped)
    assert len(usable) == 3


def test_dataset_items_have_their_bucket_shape_and_range():
    samples = load_samples(ASSETS, None, "prompts.txt", "videos.txt")
    for mode in (None, "center", "random"):
        dataset = VideoDataset(assign_buckets(samples, **BUCKETS)[0], video_reshape_mode=mode)
        for position in range(len(dataset)):
            frames, height, width = dataset.bucket_keys[position]
            video = dataset[position]["video"]
            assert video.shape == (frames, 3, height, width)
            assert video.min() >= -1 and video.max() <= 1


def test_random_flip_is_one_decision_per_clip_and_repeatable():
    samples = load_samples(ASSETS, None, "prompts.txt", "videos.txt")
    items = assign_buckets(samples, **BUCKETS)[0]
    plain = VideoDataset(items)
    flipping = VideoDataset(items, random_flip=0.5, seed=4)
    outcomes = set()
    for epoch in range(4):
        flipping.set_epoch(epoch)
        for position in range(len(plain)):
            reference, video = plain[position]["video"], flipping[position]["video"]
            per_frame = [torch.equal(video[f], reference[f].flip(-1)) for f in range(video.shape[0])]
            assert all(per_frame) or not any(per_frame)
            assert all(per_frame) or torch.equal(video, reference)
            outcomes.add(all(per_frame))
            # The same (seed, epoch, position) gives the same clip, whichever worker or order loads it.
            assert torch.equal(video, flipping[position]["video"])
    assert outcomes == {True, False}


@pytest.mark.parametrize("width", [16, 24, 48, 72])  # the widths decord 0.6 fails on (reference/environment.md)
def test_decord_width_bug_falls_back_to_pyav(tmp_path, monkeypatch, width):
    """A clip of a width decord cannot decode: the frames come from PyAV, with the pixel values written."""
    import imageio
    import numpy as np

    import training.video_io as video_io

    path = tmp_path / f"w{width}.mp4"
    frames = [np.full((32, width, 3), 20 * i, dtype=np.uint8) for i in range(6)]
    imageio.mimwrite(path, frames, fps=8, codec="libx264", macro_block_size=1, output_params=["-pix_fmt", "yuv420p"])
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width) == (6, 32, width)
    fallbacks = []
    monkeypatch.setattr(video_io, "_read_frames_pyav", lambda *a: fallbacks.append(a) or _read_frames_pyav(*a))
    decoded = read_frames(path, [0, 2, 4])
    assert decoded.shape == (3, 32, width, 3) and decoded.dtype == torch.uint8
    if video_io.decord is not None:
        assert len(fallbacks) == 1  # decord was tried and failed (its width bug), PyAV read the clip
    # flat grey frames 0, 40, 80 survive H.264 within a level or two
    for frame, value in zip(decoded, (0, 40, 80)):
        assert (frame.int() - value).abs().max() <= 3


def test_fit_to_bucket_center_crop_keeps_aspect():
    frame = torch.zeros(1, 40, 80, 3, dtype=torch.uint8)
    frame[:, :, 30:50] = 255  # a bright band in the middle of a 2:1 frame
    video = fit_to_bucket(frame, 32, 32, reshape_mode="center")
    assert video.shape == (1, 3, 32, 32)
    # 40x80 -> 32x64, centre 32 columns kept: the band (columns 24-40 after scaling) is inside.
    assert video[0, 0, 16, 16] > 0.9 and video[0, 0, 16, 0] < -0.9


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("num_replicas", [1, 3])
def test_bucket_sampler_invariants(drop_last, num_replicas):
    rng = random.Random(0)
    keys = [rng.choice([(9, 32, 32), (9, 64, 32), (5, 48, 96), (13, 64, 64)]) for _ in range(47)]
    batch_size = 4
    all_batches = []
    for rank in range(num_replicas):
        sampler = BucketBatchSampler(keys, batch_size, drop_last=drop_last, seed=3, num_replicas=num_replicas, rank=rank)
        sampler.set_epoch(0)
        batches = list(sampler)
        assert len(batches) == len(sampler)  # __len__ is the true count
        all_batches.append(batches)
        for batch in batches:
            assert len({keys[i] for i in batch}) == 1  # one shape per batch
            assert 1 <= len(batch) <= batch_size
    assert len({len(b) for b in all_batches}) == 1  # every rank runs the same number of steps
    seen = [i for batches in all_batches for batch in batches for i in batch]
    counts = {key: keys.count(key) for key in set(keys)}
    if not drop_last:
        assert set(seen) == set(range(len(keys)))  # leftovers are kept
        if num_replicas == 1:
            assert sorted(seen) == list(range(len(keys)))  # each exactly once
    else:
        expected = sum((n // batch_size) * batch_size for n in counts.values())
        if num_replicas == 1:
            assert len(seen) == len(set(seen)) == expected


@pytest.mark.parametrize("num_samples, num_replicas", [(1, 4), (3, 8), (5, 2)])
def test_bucket_sampler_gives_every_rank_the_same_number_of_batches_on_tiny_data(num_samples, num_replicas):
    keys = [(9, 32, 32)] * num_samples
    per_rank = []
    for rank in range(num_replicas):
        sampler = BucketBatchSampler(keys, 2, seed=0, num_replicas=num_replicas, rank=rank)
        batches = list(sampler)
        assert len(batches) == len(sampler) >= 1  # no rank waits alone in an all-reduce
        per_rank.append(batches)
    assert {i for batches in per_rank for batch in batches for i in batch} == set(range(num_samples))


def test_bucket_sampler_reshuffles_each_epoch_and_resumes_mid_epoch():
    keys = [(9, 32, 32)] * 10 + [(5, 32, 64)] * 7
    sampler = BucketBatchSampler(keys, 3, seed=1)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1
    sampler.set_epoch(0)
    assert list(sampler) == epoch0  # deterministic per (seed, epoch)
    sampler.set_epoch(0, start_batch=2)
    assert list(sampler) == epoch0[2:]


def test_the_scan_hashes_when_asked_and_notes_the_same_clip_under_two_names(tmp_path):
    import shutil

    from training.dataset import data_notes
    from training.precomputed import ContentHashes, sha256_of_file

    (tmp_path / "videos").mkdir()
    for name in ("a.mp4", "copy_of_a.mp4"):
        shutil.copy(ASSETS / "videos" / "ball.mp4", tmp_path / "videos" / name)
    (tmp_path / "prompts.txt").write_text("a red ball\na red ball\n")
    (tmp_path / "videos.txt").write_text("videos/a.mp4\nvideos/copy_of_a.mp4\n")
    samples = load_samples(tmp_path, None, "prompts.txt", "videos.txt")
    plain, _ = assign_buckets(samples, **BUCKETS)
    assert [u.content_hash for u in plain] == [None, None] and not data_notes(plain)
    hashed, _ = assign_buckets(samples, **BUCKETS, hashes=ContentHashes(tmp_path / "hashes.json"))
    assert [u.content_hash for u in hashed] == [sha256_of_file(ASSETS / "videos" / "ball.mp4")] * 2
    assert [n.reason for n in data_notes(hashed)] == ["duplicate of entry 1"]


def test_bucket_sampler_without_shuffling_keeps_order_and_leftovers():
    """shuffle=False (evaluation, and the order a user can predict): buckets in sorted order, positions in data
    order, each bucket's partial last batch kept."""
    keys = [(9, 32, 32), (5, 48, 96), (9, 32, 32), (9, 32, 32), (5, 48, 96), (9, 32, 32), (9, 32, 32)]
    sampler = BucketBatchSampler(keys, 2, shuffle=False, seed=3)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        assert list(sampler) == [[1, 4], [0, 2], [3, 5], [6]]
    assert len(sampler) == 4
