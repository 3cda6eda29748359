"""Bucket configs as Open-Sora and the Ascend port mean them (training/buckets.py ConfiguredBuckets, dataset.py,
core.py's Schedule): a clip takes the most frames it has at the largest resolution it fills, a keep_prob draw keeps it
there or sends it to the NEXT RESOLUTION, the draws are made again every epoch from (seed, epoch, sample), and a clip
that every draw passes on sits that epoch out.

The references are written here from their code, not from ours: `open_sora_bucket_id` is Open-Sora 2.0's
`opensora/datasets/bucket.py` `Bucket.get_bucket_id` (hpcaitech/Open-Sora 7ad6a96) with its sampler's seed
(`sampler.py`: seed + epoch + sample id x num_bucket); `ascend_bucket_id` is the Ascend port's copy (mindspore-lab/
mindone examples/diffusers/cogvideox_factory/cogvideox/datasets/bucket.py, Open-Sora 1.2's), which also reads
keep_prob written [keep, p]. Both compare (resolution, frame count); the shape within a resolution is not the point.
"""

import itertools
import math
from collections import Counter, OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ASSETS, run_trainer, trained_weights

from training.buckets import ConfiguredBuckets, read_bucket_config, shapes_of, uniform
from training.dataset import BucketBatchSampler, BucketedSample, Sample, VideoDataset, assign_buckets


# The Ascend port's example (mindone examples/diffusers/cogvideox_factory/scripts/bucket.yaml), as it stands.
ASCEND_YAML = """\
bucket_config:
  # Structure: "resolution": { num_frames: [ keep_prob, batch_size ] }
  # Setting [ keep_prob, batch_size ] to [ 0.0, 0 ] forces longer videos into smaller resolution buckets
  "144p": { 37: [1.0, 90], 53: [1.0, 44], 101: [1.0, 20], 197: [1.0, 8], 381: [1.0, 6]}
  "256": { 37: [1.0, 44], 53: [1.0, 22], 101: [1.0, 7], 197: [1.0, 4], 381: [1.0, 3]}
  "240p": { 37: [1.0, 30], 53: [1.0, 15], 101: [1.0, 7], 197: [1.0, 3], 381: [1.0, 2]}
  "360p": { 37: [1.0, 12], 53: [1.0, 6], 101: [1.0, 3], 197: [1.0, 1], 381: [1.0, 1]}
  "512": { 37: [0.3, 12], 53: [0.2, 6], 101: [0.6, 3], 197: [1.0, 1], 381: [1.0, 1]}
  "480p": { 37: [0.4, 8], 53: [0.4, 3], 101: [0.3, 2], 197: [1.0, 1], 381: [1.0, 1]}
  "720p": { 37: [0.5, 2], 53: [0.2, 1] , 77: [0.4, 1] }
  "1024": { 37: [0.2, 2], 53: [0.2, 1] , 77: [0.3, 1] }
  "1080p": { 37: [1.0, 1] }
  "2048": { 9: [ 0.01, 3 ] }
"""

# The references' resolution areas (the Ascend port's aspect.py ASPECT_RATIOS, its first values), and the explicit
# sizes the tests below use.
AREAS = {"144p": 36864, "256": 65536, "240p": 102240, "360p": 230400, "512": 262144, "480p": 409920,
         "720p": 921600, "1024": 1048576, "1080p": 2073600, "2048": 4194304,
         "64x96": 64 * 96, "48x64": 48 * 64, "32x32": 32 * 32}


def open_sora_bucket_id(bucket_config, T, H, W, seed):
    """Open-Sora 2.0's Bucket.__init__ ordering and get_bucket_id, float keep probabilities (fps mapping left out:
    T is the frames it would sample)."""
    bucket_names = sorted(bucket_config.keys(), key=lambda x: AREAS[x], reverse=True)
    bucket_probs = OrderedDict()
    for key in bucket_names:
        bucket_time_names = sorted(bucket_config[key].keys(), key=lambda x: x, reverse=True)
        bucket_probs[key] = OrderedDict({k: bucket_config[key][k][0] for k in bucket_time_names})
    hw_criteria = {k: AREAS[k] for k in bucket_names}

    approx = 0.8
    resolution = H * W
    rng = np.random.default_rng(seed)
    for hw_id, t_criteria in bucket_probs.items():
        if resolution < hw_criteria[hw_id] * approx:
            continue
        if T == 1:
            if 1 in t_criteria:
                if rng.random() < t_criteria[1]:
                    return hw_id, 1
            continue
        for t_id, prob in t_criteria.items():
            if T >= t_id and t_id != 1:
                next_hw_prob = prob
                if next_hw_prob >= 1 or rng.random() <= next_hw_prob:
                    return hw_id, t_id
                else:
                    break
    return None


def open_sora_epoch(bucket_config, T, H, W, samples, seed, epoch):
    """Every sample's (resolution, frames) in `epoch`, seeded as Open-Sora's sampler seeds them."""
    num_bucket = sum(len(frames) for frames in bucket_config.values()) * 17  # x aspect ratios: a stride only
    return [open_sora_bucket_id(bucket_config, T, H, W, seed + epoch + i * num_bucket) for i in range(samples)]


def ascend_bucket_id(bucket_config, T, H, W, random):
    """The Ascend port's get_bucket_id (Open-Sora 1.2's): keep_prob may be [keep, p]; `random` its random.random."""
    bucket_probs = {}
    for key in sorted(bucket_config.keys(), key=lambda x: AREAS[x], reverse=True):
        bucket_probs[key] = {k: bucket_config[key][k][0] for k in sorted(bucket_config[key].keys(), reverse=True)}
    resolution = H * W
    approx = 0.8
    fail = True
    for hw_id, t_criteria in bucket_probs.items():
        if resolution < AREAS[hw_id] * approx:
            continue
        if T == 1:
            if 1 in t_criteria:
                if random() < t_criteria[1]:
                    fail = False
                    t_id = 1
                    break
            else:
                continue
        t_fail = True
        for t_id, prob in t_criteria.items():
            if isinstance(prob, list):
                prob_t = prob[1]
                if random() > prob_t:
                    continue
            if T >= t_id and t_id != 1:
                t_fail = False
                break
        if t_fail:
            continue
        if isinstance(prob, list):
            prob = prob[0]
        if prob >= 1 or random() < prob:
            fail = False
            break
    if fail:
        return None
    return hw_id, t_id


def ours(config, seed=0, stills=1):
    """ConfiguredBuckets of a {resolution: {frames: [keep, batch]}} mapping (lists as YAML gives them)."""
    groups = [(name, shapes_of(name), {count: (tuple(keep) if isinstance(keep, list) else keep, batch)
                                       for count, (keep, batch) in frames.items()})
              for name, frames in config.items()]
    return ConfiguredBuckets(groups, stills, seed)


def named(plan, frames, height, width, is_image=False):
    """{bucket: (resolution, frame count)} of what the plan can give such a clip, to compare with the references."""
    return {bucket: (plan.groups[number][0], count)
            for number, count, _, _, bucket in plan.route(frames, height, width, is_image)}


def our_epoch(plan, frames, height, width, samples, epoch=0):
    names = named(plan, frames, height, width)
    return [names.get(plan.choose(frames, height, width, False, key=k, epoch=epoch)) for k in range(samples)]


def shares(outcomes):
    return {key: n / len(outcomes) for key, n in Counter(outcomes).items()}


def assert_same_shares(got, reference, samples):
    """Every outcome's share within 4.5 standard deviations of the difference of two samples' shares."""
    for key in set(got) | set(reference):
        p, q = got.get(key, 0.0), reference.get(key, 0.0)
        mean = (p + q) / 2
        assert abs(p - q) <= 4.5 * math.sqrt(2 * max(mean * (1 - mean), 1 / samples) / samples), (key, got, reference)


# ----------------------------------------------------------------------------------------------
# The rule, against the references
# ----------------------------------------------------------------------------------------------


def test_the_ascend_example_config_gives_open_soras_shares(tmp_path):
    """100-frame 720x1280 clips with the Ascend port's own example: 30 % 1024 77f, 28 % 720p 77f, 16.8 % 480p 53f,
    5 % 512 53f, 20 % 360p 53f, as Open-Sora's get_bucket_id gives them; none at 720p 53f or 37f (where a rule that
    tries the next frame count of the same resolution puts 12 % and 24 %). 40-frame 854x480 clips: 480p, 512 and
    360p at 37 frames, none sitting out."""
    (tmp_path / "bucket.yaml").write_text(ASCEND_YAML)
    config = read_bucket_config(tmp_path / "bucket.yaml")  # the port's names (256, 512, 1024, 2048) are read
    reference_config = {name: {t: (keep, batch) for t, (keep, batch) in frames.items()} for name, frames in config.items()}
    plan = ours(config, seed=7)
    samples = 3000
    for frames, height, width in ((100, 720, 1280), (40, 480, 854)):
        got = shares(our_epoch(plan, frames, height, width, samples))
        reference = shares(open_sora_epoch(reference_config, frames, height, width, samples, seed=7, epoch=0))
        assert_same_shares(got, reference, samples)
        exact = {names: plan.landings(plan.route(frames, height, width, False)).get(bucket, 0.0)
                 for bucket, names in named(plan, frames, height, width).items()}
        assert_same_shares(got, {k: v for k, v in exact.items() if v}, samples)
    got = shares(our_epoch(plan, 100, 720, 1280, samples))
    assert got.get(("720p", 53), 0) == got.get(("720p", 37), 0) == 0 and got[("720p", 77)] > 0.2
    assert abs(got[("480p", 53)] - 0.7 * 0.6 * 0.4) < 0.04 and None not in got


def test_zero_keep_sends_longer_clips_to_smaller_resolutions():
    """[0.0, 0] (the Ascend port: "forces longer videos into smaller resolution buckets"): a clip whose largest frame
    count at 720p is such an entry goes to 480p, never to 720p's shorter entry; a shorter clip stays at 720p."""
    config = {"720p": {77: [0.0, 0], 37: [1.0, 2]}, "480p": {77: [1.0, 1], 37: [1.0, 4]}}
    plan = ours(config)
    for frames, expected in ((100, ("480p", 77)), (50, ("720p", 37))):
        got = set(our_epoch(plan, frames, 720, 1280, 200))
        assert got == {expected} == set(open_sora_epoch(config, frames, 720, 1280, 200, seed=0, epoch=0))
    # Where no smaller resolution takes it, no draw can keep the clip: it fits no bucket (reported as unusable).
    assert "fits no bucket" in ours({"720p": config["720p"]}).choose(100, 720, 1280, False, key=0)


def test_draws_are_independent_across_resolutions_and_frame_counts():
    """Issue 32's bug 1 under this rule: one draw per (sample, epoch, resolution, frame count). With 720p and 480p
    at keep_prob 0.5 above a 360p that keeps all, a quarter land at 480p (a draw reused across resolutions would
    send none there); with [keep, p] entries (the Ascend port's), p = 0.5 at 49 and 17 frames sends a quarter to
    17 (a reused draw: none)."""
    samples = 4000
    config = {"720p": {49: [0.5, 1]}, "480p": {49: [0.5, 2]}, "360p": {49: [1.0, 4]}}
    got = shares(our_epoch(ours(config), 100, 720, 1280, samples))
    reference = shares(open_sora_epoch(config, 100, 720, 1280, samples, seed=0, epoch=0))
    assert_same_shares(got, reference, samples)
    assert abs(got[("480p", 49)] - 0.25) < 0.035

    import random

    config = {"720p": {49: [[1.0, 0.5], 1], 17: [[1.0, 0.5], 1]}, "480p": {49: [1.0, 2]}}
    got = shares(our_epoch(ours(config), 100, 720, 1280, samples))
    draws = random.Random(3)
    reference = shares([ascend_bucket_id(config, 100, 720, 1280, draws.random) for _ in range(samples)])
    assert_same_shares(got, reference, samples)
    assert abs(got[("720p", 17)] - 0.25) < 0.035 and abs(got[("480p", 49)] - 0.25) < 0.035


# ----------------------------------------------------------------------------------------------
# Every epoch, every process, every resume
# ----------------------------------------------------------------------------------------------


def drawn_items(plan, count, frames=100, height=720, width=1280):
    """BucketedSamples as the scan makes them for clips whose bucket is drawn every epoch (no file behind them)."""
    route = plan.route(frames, height, width, False)
    landings = tuple((bucket, (0,) * bucket[0]) for bucket in plan.landings(route))
    return [BucketedSample(Sample(i, "a clip", Path(f"clip{i}.mp4")), landings[0][0], landings[0][1],
                           landings=landings, route=route) for i in range(count)]


def test_buckets_are_drawn_again_every_epoch_the_same_in_every_process_and_on_resume():
    """Epochs 0 and 1 differ (about 1 - sum p^2 of the clips move), the same epoch draws the same on a new dataset (a
    resumed run, a DataLoader worker), two processes train exactly the positions and buckets one process trains, a
    resumed epoch goes on with that epoch's batches, and the schedule counts each epoch's own batches."""
    from training.core import Schedule

    config = {"720p": {49: [0.5, 1]}, "480p": {49: [0.5, 2]}, "360p": {49: [0.5, 4]}}
    plan = ours(config, seed=5)
    items = drawn_items(plan, 400)
    dataset = VideoDataset(items, plan=plan)
    assert dataset.redraws
    epoch0, epoch1 = dataset.bucket_keys_at(0), dataset.bucket_keys_at(1)
    moved = sum(a != b for a, b in zip(epoch0, epoch1)) / len(items)
    expected = 1 - sum(p * p for p in [0.5, 0.25, 0.125, 0.125])  # three buckets and sitting out
    assert abs(moved - expected) < 0.1
    assert VideoDataset(items, plan=plan).bucket_keys_at(1) == epoch1  # the same draws, wherever they are made
    assert VideoDataset(items, plan=ours(config, seed=6)).bucket_keys_at(1) != epoch1
    assert 0.08 < epoch0.count(None) / len(items) < 0.17  # an eighth sits out

    sizes = dict.fromkeys(dataset.landing_counts(), 3)
    one = BucketBatchSampler(dataset.bucket_keys_at, sizes, seed=1)
    two = [BucketBatchSampler(dataset.bucket_keys_at, sizes, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        for sampler in (one, *two):
            sampler.set_epoch(epoch)
        keys = dataset.bucket_keys_at(epoch)
        alone = sorted(i for batch in one for i in batch)
        together = {i for sampler in two for batch in sampler for i in batch}  # padding repeats whole batches
        assert alone == sorted(together) == [i for i, key in enumerate(keys) if key is not None]
        assert all(len({keys[i] for i in batch}) == 1 for sampler in two for batch in sampler)
    one.set_epoch(1, start_batch=4)
    resumed = list(one)
    one.set_epoch(1)
    assert resumed == list(one)[4:]

    training = SimpleNamespace(gradient_accumulation_steps=2, max_train_steps=None, num_train_epochs=4)
    schedule = Schedule.of(training, one)
    assert schedule.epoch_batches == tuple(one.batches_in(epoch) for epoch in range(4))
    assert len(set(schedule.epoch_batches)) > 1  # epochs differ in length
    assert schedule.max_train_steps == sum(math.ceil(b / 2) for b in schedule.epoch_batches)
    capped = Schedule.of(SimpleNamespace(gradient_accumulation_steps=2, max_train_steps=150, num_train_epochs=1), one)
    steps = list(itertools.accumulate(math.ceil(b / 2) for b in capped.epoch_batches))
    assert capped.max_train_steps == 150 and steps[-1] >= 150 > steps[-2]  # as many epochs as the steps need


def test_the_draw_seed_holds_the_epoch_and_the_sample():
    """uniform: a function of its numbers alone, spread over [0, 1) (the draws' source)."""
    values = [uniform(0, epoch, key, 1, 49, 1) for epoch in range(20) for key in range(200)]
    assert values == [uniform(0, epoch, key, 1, 49, 1) for epoch in range(20) for key in range(200)]
    assert len(set(values)) == len(values) and all(0 <= v < 1 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.02
    assert uniform(0, 0, (3, 1), 1, 49, 1) != uniform(0, 0, 3, 1, 49, 1)  # a repeat's key draws its own


# ----------------------------------------------------------------------------------------------
# Sitting out is not being unusable
# ----------------------------------------------------------------------------------------------

DRAWN_YAML = """\
bucket_config:
  "64x96": {9: [0.5, 1], 5: [1.0, 2]}
  "48x64": {9: [0.5, 2], 5: [1.0, 3], 1: [1.0, 4]}
  "32x32": {9: [0.5, 2], 5: [1.0, 2], 1: [1.0, 2]}
"""


def test_a_clip_every_draw_passes_on_sits_out_the_epoch_and_is_not_unusable(tmp_path):
    """The bundled clips with keep_prob 0.5 at every 9-frame entry: every clip of 9 frames or more can sit out an
    epoch (each passes on to the next resolution, not to 5 frames), yet the scan finds none unusable; the frames read
    are those of the epoch's bucket."""
    from training.layouts import read_samples

    (tmp_path / "bucket.yaml").write_text(DRAWN_YAML)
    config = read_bucket_config(tmp_path / "bucket.yaml")
    plan = ConfiguredBuckets([(name, shapes_of(name), frames) for name, frames in config.items()], 1, seed=0)
    data = SimpleNamespace(data_root=ASSETS, dataset_file=None, caption_column="prompts.txt",
                           video_column="videos.txt", caption_extension=".txt", id_token=None, dataset_config=None,
                           train_data_meta=None, control_column=None)
    usable, skipped = assign_buckets(read_samples(data, 1), plan)
    assert skipped == [] and len(usable) == 6 and all(item.landings for item in usable)
    dataset = VideoDataset(usable, plan=plan)
    assert dataset.bucket_keys_at(0).count(None) == 2  # (seed 0) sitting out the first epoch does not make it unusable
    tall = next(item for item in usable if item.sample.video_path.name == "tall.mp4")  # 64x32: fills only 32x32
    assert tall.buckets == [(9, 32, 32)]  # never (5, 32, 32): passed on at 32x32, it sits out
    position = usable.index(tall)
    epochs = [dataset.bucket_keys_at(epoch)[position] for epoch in range(12)]
    assert set(epochs) == {(9, 32, 32), None}
    kept = epochs.index((9, 32, 32))
    dataset.set_epoch(kept)
    assert tuple(dataset[position]["video"].shape) == (9, 3, 32, 32)
    waves = next(item for item in usable if item.sample.video_path.name == "waves.mp4")
    assert sorted(waves.buckets) == [(9, 32, 32), (9, 48, 64), (9, 64, 96)]


@pytest.mark.slow
def test_a_run_with_drawn_buckets_counts_the_sit_outs_and_resumes_exactly(monkeypatch, tiny_model_2b, mixed_folder,
                                                                       tmp_path):
    """The trainer on the mixed folder with DRAWN_YAML for 2 epochs (seed 3: 4 and 3 batches, 2 and 3 samples sitting
    out): the dry run lists no unusable sample and counts each epoch's sit-outs; every sample not sitting out trains
    once per epoch; summary.json counts the sit-outs; a run resumed in the middle of epoch 1 (the checkpoint of step 5)
    ends bitwise equal to the uninterrupted one."""
    import json
    import shutil

    from test_data_layouts import folder_argv, spy_on_batches

    (mixed_folder.parent / "bucket.yaml").write_text(DRAWN_YAML)

    def argv(output, *extra):
        return folder_argv(tiny_model_2b, mixed_folder, output, "--num_train_epochs", "2", "--checkpointing_steps", "5",
                           "--seed", "3", *extra)

    plan = run_trainer(argv(tmp_path / "dry", "--dry_run"))["dry_run"]
    assert plan["samples_unusable"] == [] and plan["samples_for_training"] == 9
    sitting = plan["bucket_draws"]["samples_sitting_out_per_epoch"]
    assert sitting == [2, 3] and plan["bucket_draws"]["batches_per_process_per_epoch"] == [4, 3]

    seen = spy_on_batches(monkeypatch)
    summary = run_trainer(argv(tmp_path / "straight"))
    assert summary["samples_sat_out"] == {str(epoch): n for epoch, n in enumerate(sitting)}
    trained = sum(row["samples_trained"] for row in summary["buckets"].values())
    assert summary["global_step"] == len(seen) == 7  # each epoch's own batches
    assert trained == sum(size for _, size in seen) == 2 * 9 - sum(sitting)  # one process: no padding
    assert json.loads((tmp_path / "straight" / "summary.json").read_text())["samples_sat_out"] == \
        summary["samples_sat_out"]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-5", resumed / "checkpoint-5")  # epoch 1, its first batch done
    again = run_trainer(argv(resumed, "--resume_from_checkpoint", "latest"))
    assert again["buckets"] == summary["buckets"] and again["samples_sat_out"] == summary["samples_sat_out"]
    theirs, reference = trained_weights(resumed, "lora"), trained_weights(tmp_path / "straight", "lora")
    assert theirs.keys() == reference.keys() and all((theirs[k] == reference[k]).all() for k in theirs)
