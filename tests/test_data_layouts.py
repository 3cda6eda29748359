"""Data as people have it: bucket configs with per-bucket batch sizes, batch sizes chosen by the memory estimate,
still images with clips, captions beside files, several sources in one run (training/buckets.py, layouts.py,
batch_size.py)."""

import json
import math
import shutil
from argparse import Namespace

import pytest
import torch
from conftest import ASSETS, BUCKET_YAML, lora_argv, run_trainer, trained_weights, trainer_main

from training.args import UsageError
from training.buckets import ConfiguredBuckets, nearest_shape, read_bucket_config, shapes_of, still_frames
from training.dataset import BucketBatchSampler, assign_buckets


# Where each file of the mixed folder goes with BUCKET_YAML, and the batch size there.
EXPECTED_BUCKETS = {
    "waves.mp4": (9, 64, 96), "wide.mp4": (9, 64, 96),  # fill 64x96 (area >= 80 % of it), 9+ frames
    "square.mp4": (9, 48, 64), "ball.mp4": (9, 48, 64), "sunset.mp4": (9, 48, 64),
    "tall.mp4": (5, 32, 32),  # 32x64 is too small for 48x64; 32x32 has 5 frames at most
    "still_a.png": (1, 48, 64), "still_b.jpg": (1, 48, 64), "still_c.webp": (1, 48, 64),  # no still entry at 64x96
}
BATCH_SIZES = {(9, 64, 96): 1, (9, 48, 64): 2, (5, 32, 32): 2, (1, 48, 64): 4}


def folder_argv(model, folder, output, *extra):
    """lora_argv for a folder with captions beside the files (no lists) and the bucket config beside it."""
    argv = lora_argv(model, folder, output, "--bucket_config", folder.parent / "bucket.yaml", *extra)
    for flag in ("--caption_column", "--video_column"):
        position = argv.index(flag)
        del argv[position : position + 2]
    return argv


def spy_on_batches(monkeypatch):
    """[(bucket, batch size)] of every training batch, in order, as the loader delivers them."""
    import training.data_source as data_source

    seen, collate = [], data_source.collate

    def recording(items):
        batch = collate(items)
        if batch["video"] is not None:
            shape = tuple(batch["video"].shape)
            seen.append(((shape[1], shape[3], shape[4]), shape[0]))
        else:  # prepared entries: the bucket is in the entry
            seen.append((None, len(batch["index"])))
        return batch

    monkeypatch.setattr(data_source, "collate", recording)
    return seen


# ----------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------


def test_named_resolutions_are_aspect_ratio_sets_of_about_their_area():
    for name, (height, width) in {"480p": (480, 720), "720p": (720, 1280), "768p": (768, 1360)}.items():
        shapes = shapes_of(name)
        assert (height, width) in shapes  # the models' own training sizes are in their sets
        assert len(shapes) == 7 and all(h % 16 == 0 and w % 16 == 0 for h, w in shapes)
        assert all(0.9 < h * w / (height * width) < 1.1 for h, w in shapes)
        ratios = sorted(h / w for h, w in shapes)
        assert ratios[0] < 0.6 and ratios[-1] > 1.7 and any(abs(r - 1) < 0.02 for r in ratios)  # 9:16 .. 16:9
    assert shapes_of("480x720") == [(480, 720)]
    for bad, message in (("481x720", "multiples of 16"), ("500p", "unknown resolution")):
        with pytest.raises(UsageError, match=message):
            shapes_of(bad)
    # The shape of the nearest aspect ratio: a 16:9 clip takes 480p's 16:9 shape, a portrait one a portrait shape.
    assert nearest_shape(1080, 1920, shapes_of("480p")) == (448, 784)
    assert nearest_shape(1920, 1080, shapes_of("480p")) == (784, 448)


def configured(config, seed=0, stills=1):
    return ConfiguredBuckets([(name, shapes_of(name), frames) for name, frames in config.items()], stills, seed)


def test_a_sample_goes_to_the_largest_resolution_and_frame_count_it_fills():
    plan = configured({"480p": {49: (1.0, 4), 17: (1.0, 8), 1: (1.0, 16)}, "720p": {49: (1.0, 1), 17: (1.0, 2)}})
    assert plan.choose(100, 720, 1280, False, key=0) == (49, 720, 1280)
    assert plan.choose(30, 720, 1280, False, key=0) == (17, 720, 1280)  # too short for 49
    assert plan.choose(100, 480, 854, False, key=0) == (49, 448, 784)  # too small for 720p: 480p, its 16:9 shape
    assert plan.choose(1, 1024, 1024, True, key=0) == (1, 592, 592)  # a still: 720p has no still entry
    assert "fits no bucket" in plan.choose(10, 720, 1280, False, key=0)  # shorter than every frame count
    assert "fits no bucket" in plan.choose(100, 240, 320, False, key=0)  # smaller than every resolution
    assert plan.batch_size((49, 720, 1280)) == 1 and plan.batch_size((1, 592, 592)) == 16
    # 1.5 holds a still for 5 frames (its transformer groups latent frames in pairs).
    assert still_frames({"patch_size_t": 2}) == 5 and still_frames({"patch_size_t": None}) == 1
    assert configured({"480p": {1: (1.0, 2)}}, stills=5).choose(1, 480, 720, True, key=0) == (5, 480, 720)


def test_keep_probability_passes_samples_down_reproducibly():
    config = {"720p": {49: (0.25, 1), 17: (0.0, 0)}, "480p": {49: (1.0, 2)}}
    choices = [configured(config).choose(100, 720, 1280, False, key=k) for k in range(400)]
    kept = sum(bucket == (49, 720, 1280) for bucket in choices)
    assert 70 <= kept <= 130  # about a quarter stay; [0.0, 0] passes every other one on, to 480p
    assert all(bucket in ((49, 720, 1280), (49, 448, 784)) for bucket in choices)
    assert choices == [configured(config).choose(100, 720, 1280, False, key=k) for k in range(400)]  # same draws
    assert choices != [configured(config, seed=1).choose(100, 720, 1280, False, key=k) for k in range(400)]


@pytest.mark.parametrize("text, message", [
    ("bucket_config: [1, 2]", 'expected a mapping "bucket_config:"'),
    ("bucket_config: {'480p': {49: [1.0]}}", "give [keep_prob, batch_size]"),
    ("bucket_config: {'480p': {49: [1.5, 2]}}", "keep_prob 1.5 must be a number from 0 to 1"),
    ("bucket_config: {'480p': {49: [1.0, -1]}}", "batch_size -1 must be a whole number (0 or more) or auto"),
    ("bucket_config: {'480p': {'many': [1.0, 1]}}", "the frame count must be a positive whole number"),
    ("bucket_config: {'480p': {49: [1.0, 1]}", "not valid YAML"),
])
def test_a_broken_bucket_config_is_named_in_one_line(tmp_path, text, message):
    (tmp_path / "bucket.yaml").write_text(text)
    with pytest.raises(UsageError) as error:
        read_bucket_config(tmp_path / "bucket.yaml")
    assert len(error.value.problems) == 1 and message in error.value.problems[0]


def test_bucket_config_frame_counts_follow_the_model_before_anything_loads(capsys, tiny_models, tmp_path):
    """CogVideoX 1.0 takes 4k+1 frames, 1.5 takes 8k-3; both checked when the flags are, with every problem listed."""
    from conftest import run_trainer

    (tmp_path / "bucket.yaml").write_text('bucket_config:\n  "48x64": {48: [1.0, 2], 9: [1.0, 2], 1: [1.0, 4]}\n'
                                          '  "40x64": {5: [1.0, 1]}\n')
    for model, lines in ((tiny_models("2b"), ['"48x64" 48: 48 frames do not suit this model (4k+1)',
                                              'resolution "40x64": height and width must be positive multiples of 16']),
                         (tiny_models("1.5"), ['"48x64" 48: 48 frames do not suit this model',
                                               '"48x64" 9: 9 frames do not suit this model'])):
        with pytest.raises(SystemExit) as exit_:
            run_trainer(lora_argv(model, ASSETS, tmp_path / "out", "--bucket_config", tmp_path / "bucket.yaml"))
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert all(line in err for line in lines), err
        assert "Traceback" not in err


def test_each_bucket_batches_at_its_own_size_on_every_rank():
    keys = [(9, 64, 96)] * 5 + [(9, 48, 64)] * 7 + [(1, 48, 64)] * 9
    sizes = {(9, 64, 96): 1, (9, 48, 64): 3, (1, 48, 64): 4}
    one = BucketBatchSampler(keys, sizes, seed=3)
    batches = list(one)
    assert len(batches) == len(one) == 5 + 3 + 3
    for batch in batches:
        assert len({keys[i] for i in batch}) == 1  # never two shapes in one batch
        assert len(batch) <= sizes[keys[batch[0]]]
    assert sorted(i for batch in batches for i in batch) == list(range(len(keys)))  # each sample once
    assert {len(b) for b in batches if keys[b[0]] == (1, 48, 64)} == {4, 1}  # 9 = 4 + 4 + 1 (kept, not dropped)
    ranks = [BucketBatchSampler(keys, sizes, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(list(ranks[0])) == len(list(ranks[1])) == len(ranks[0]) == 6  # 11 batches, padded to 12
    delivered = {}  # what the two ranks' loaders deliver in epoch 0, per bucket (a padding batch included)
    for sampler in ranks:
        for batch in sampler:
            delivered[keys[batch[0]]] = delivered.get(keys[batch[0]], 0) + len(batch)
    assert ranks[0].samples_trained(epoch=0, batches_per_rank=6) == delivered and sum(delivered.values()) > len(keys)
    half = ranks[0].samples_trained(epoch=0, batches_per_rank=3)
    assert sum(half.values()) == sum(len(b) for r in ranks for b in list(r)[:3])


# ----------------------------------------------------------------------------------------------
# Layouts and stills
# ----------------------------------------------------------------------------------------------


def layout_args(**given):
    defaults = dict(data_root=None, dataset_file=None, caption_column="text", video_column="video",
                    caption_extension=".txt", id_token=None, dataset_config=None, train_data_meta=None,
                    control_column=None)
    return Namespace(**{**defaults, **given})


def test_a_folder_with_captions_beside_the_files_is_read_in_order(mixed_folder):
    from training.buckets import GridBuckets
    from training.layouts import read_samples

    (mixed_folder / "more").mkdir()
    shutil.copy(mixed_folder / "ball.mp4", mixed_folder / "more" / "ball2.mp4")  # sub-folders count; no caption
    (mixed_folder / ".hidden").mkdir()
    shutil.copy(mixed_folder / "ball.mp4", mixed_folder / ".hidden" / "ball3.mp4")  # hidden ones do not
    samples = read_samples(layout_args(data_root=str(mixed_folder), id_token="STYLE"))
    names = [str(s.video_path.relative_to(mixed_folder)) for s in samples]
    assert names == sorted([*EXPECTED_BUCKETS, "more/ball2.mp4"])
    by_name = {s.video_path.name: s for s in samples}
    assert by_name["waves.mp4"].caption == "STYLE waves crash on the beach under a cloudy sky"
    assert by_name["still_b.jpg"].caption == "STYLE a red ball in the park, a photo"
    usable, skipped = assign_buckets(samples, GridBuckets([5, 9], [32, 48, 64], [32, 64, 96], 9, 1, 1))
    assert [(s.video_path.split("/")[-1], s.reason) for s in skipped] == [
        ("ball2.mp4", "empty caption (ball2.txt beside it is missing or empty)")]
    assert {u.sample.video_path.name: u.bucket for u in usable}["still_a.png"] == (1, 48, 64)


def test_upper_case_suffixes_are_media_like_their_lower_case_kin(mixed_folder, tmp_path):
    """Cameras and Windows tools write clip.MP4 and photo.JPG: they are read (not silently left out), captioned by
    the .txt beside them, and bucketed as the same files in lower case; a folder of them alone is a data set."""
    from training.buckets import GridBuckets
    from training.layouts import check_data_source, read_samples

    copies = {"clip.MP4": "ball.mp4", "photo.JPG": "still_b.jpg"}  # upper-case name: lower-case original
    for name, original in copies.items():
        shutil.copy(mixed_folder / original, mixed_folder / name)
        (mixed_folder / name).with_suffix(".txt").write_text(f"the copy of {original}")
    samples = read_samples(layout_args(data_root=str(mixed_folder)))
    assert sorted(s.video_path.name for s in samples) == sorted([*EXPECTED_BUCKETS, *copies])
    captions = {s.video_path.name: s.caption for s in samples}
    assert all(captions[name] == f"the copy of {original}" for name, original in copies.items())
    usable, skipped = assign_buckets(samples, GridBuckets([5, 9], [32, 48, 64], [32, 64, 96], 9, 1, 1))
    buckets = {u.sample.video_path.name: u.bucket for u in usable}
    assert not skipped and all(buckets[name] == buckets[original] for name, original in copies.items())
    assert buckets["photo.JPG"][0] == 1  # a still, not a clip

    alone = tmp_path / "upper"
    alone.mkdir()
    shutil.copy(mixed_folder / "photo.JPG", alone / "photo.JPG")
    shutil.copy(mixed_folder / "photo.txt", alone / "photo.txt")
    problems = []
    check_data_source(layout_args(data_root=str(alone)), problems)
    assert problems == [] and [s.video_path.name for s in read_samples(layout_args(data_root=str(alone)))] == [
        "photo.JPG"]


def test_captions_are_read_from_the_caption_extension_given(mixed_folder, tmp_path):
    """--caption_extension .caption (and caption_extension in a [[datasets]] table of --dataset_config) captions
    clip.mp4 with clip.caption, not with the clip.txt beside it; without it, .txt is read."""
    from training.layouts import read_samples

    txt = {}
    for path in sorted(mixed_folder.glob("*.txt")):
        txt[path.stem] = " ".join(path.read_text().split())
        path.with_suffix(".caption").write_text(f"captioned: {txt[path.stem]}\n")
    expected = {stem: f"captioned: {caption}" for stem, caption in txt.items()}

    def captions(samples):
        return {s.video_path.stem: s.caption for s in samples}

    by_flag = read_samples(layout_args(data_root=str(mixed_folder), caption_extension=".caption"))
    assert len(by_flag) == len(EXPECTED_BUCKETS) and captions(by_flag) == expected
    assert {s.caption_file.suffix for s in by_flag} == {".caption"}
    (tmp_path / "datasets.toml").write_text('[[datasets]]\nfolder = "mixed"\ncaption_extension = ".caption"\n')
    assert captions(read_samples(layout_args(dataset_config=str(tmp_path / "datasets.toml")))) == expected
    assert captions(read_samples(layout_args(data_root=str(mixed_folder)))) == txt  # the default: .txt


def test_a_still_image_is_a_clip_of_one_held_frame(mixed_folder, tmp_path):
    from training.video_io import VideoReadError, probe_video, read_frames

    info = probe_video(mixed_folder / "still_a.png")
    assert (info.num_frames, info.height, info.width) == (1, 48, 64)
    held = read_frames(mixed_folder / "still_b.jpg", [0] * 5)
    assert held.shape == (5, 64, 64, 3) and held.dtype == torch.uint8
    assert all(torch.equal(held[0], frame) for frame in held)
    broken = tmp_path / "broken.png"
    broken.write_bytes((mixed_folder / "still_a.png").read_bytes()[:60])
    with pytest.raises(VideoReadError, match="cannot read as an image"):
        probe_video(broken)


def test_a_dataset_config_mixes_sources_with_their_repeats_and_id_tokens(mixed_folder, tmp_path):
    from training.layouts import expand_repeats, read_samples

    shutil.copytree(ASSETS, tmp_path / "lists")
    (tmp_path / "meta.json").write_text(json.dumps([
        {"file_path": "lists/videos/ball.mp4", "text": "a red ball", "type": "video"},
        {"file_path": "mixed/still_a.png", "text": "a square", "type": "image"}]))
    (tmp_path / "datasets.toml").write_text(
        '[[datasets]]\nfolder = "mixed"\nnum_repeats = 3\nid_token = "MIX"\n\n'
        '[[datasets]]\ndata_root = "lists"\ncaption_column = "prompts.txt"\nvideo_column = "videos.txt"\n\n'
        '[[datasets]]\ndataset_file = "lists/metadata.csv"\nid_token = "CSV"\n\n'
        '[[datasets]]\nmeta = "meta.json"\nnum_repeats = 2\n')
    samples = read_samples(layout_args(dataset_config=str(tmp_path / "datasets.toml"), id_token="GLOBAL"))
    assert len(samples) == 9 + 6 + 6 + 2 and [s.index for s in samples] == list(range(23))  # one numbering
    assert [s.repeats for s in samples] == [3] * 9 + [1] * 12 + [2] * 2
    assert all(s.caption.startswith("MIX ") for s in samples[:9])
    assert all(s.caption.startswith("GLOBAL ") for s in samples[9:15] + samples[21:])  # the run's own id token
    assert all(s.caption.startswith("CSV ") for s in samples[15:21])
    assert samples[22].video_path == tmp_path / "mixed" / "still_a.png"
    items = [Namespace(sample=s) for s in samples]
    expanded, keys = expand_repeats(items)
    assert len(expanded) == 27 + 12 + 4 and len(set(map(str, keys))) == len(keys)  # a repeat draws its own crop
    (tmp_path / "bad.toml").write_text('[[datasets]]\nfolder = "mixed"\nrepeats = 2\n')
    with pytest.raises(UsageError, match=r"\[\[datasets\]\] #1: unknown key\(s\) repeats"):
        read_samples(layout_args(dataset_config=str(tmp_path / "bad.toml")))


def test_funs_metadata_reads_as_json_or_as_csv_by_its_name(mixed_folder, tmp_path):
    """--train_data_meta as CogVideoX-Fun's dataset reads it: a .csv file through csv.DictReader (columns file_path,
    text, type), anything else as a JSON list; the same entries give the same samples either way."""
    import csv

    from training.layouts import read_samples

    shutil.copytree(ASSETS, tmp_path / "lists")
    entries = [{"file_path": "lists/videos/ball.mp4", "text": "a red ball, rolling", "type": "video"},
               {"file_path": "mixed/still_a.png", "text": 'a "square"', "type": "image"}]
    (tmp_path / "meta.json").write_text(json.dumps(entries))
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_path", "text", "type"])
        writer.writeheader()
        writer.writerows(entries)
    from_json, from_csv = (read_samples(layout_args(train_data_meta=str(tmp_path / name), data_root=str(tmp_path)))
                           for name in ("meta.json", "meta.csv"))
    assert [(s.caption, s.video_path) for s in from_csv] == [(s.caption, s.video_path) for s in from_json] == [
        ("a red ball, rolling", tmp_path / "lists/videos/ball.mp4"), ('a "square"', tmp_path / "mixed/still_a.png")]


# ----------------------------------------------------------------------------------------------
# Batch sizes of auto
# ----------------------------------------------------------------------------------------------


def test_the_largest_batch_under_the_limit_takes_few_simulations():
    from training.batch_size import largest_batch_under

    def linear(batch):  # 10 GiB of weights and states, 3 GiB per sample
        calls.append(batch)
        return (10 + 3 * batch) * 2**30

    for limit, most, expected in ((40, 64, 10), (40, 4, 4), (12.9, 8, 0), (13, 8, 1), (16.5, 8, 2), (100, 1, 1)):
        calls = []
        batch, peaks = largest_batch_under(limit * 2**30, linear, most)
        assert batch == expected and len(calls) <= 3, (limit, most, calls)
        assert all(peaks[b] == linear(b) for b in peaks)
    # Faster than linear (attention): the line's guess, 6, is over (46 GiB); the search settles on 5 (37.5 GiB).
    batch, peaks = largest_batch_under(40 * 2**30, lambda b: (10 + 3 * b + 0.5 * b * b) * 2**30, 64)
    assert batch == 5 and len(peaks) <= 5


def test_max_memory_gb_is_a_limit_in_gib(monkeypatch):
    """--max_memory_gb N allows N GiB (2**30 bytes), as the estimate and nvidia-smi count: with 10 GiB of weights and
    3 GiB per sample (the simulation faked), 40 allows the batch whose peak is exactly 40 GiB, over 40 GB (1e9)."""
    import training.batch_size as batch_size
    import training.memory_estimate as memory_estimate
    from training.sections import MemoryFlags, TrainingFlags

    def peak(batch):
        return (10 + 3 * batch) * 2**30

    monkeypatch.setattr(batch_size, "component_configs", lambda args: (None, None))
    monkeypatch.setattr(memory_estimate, "estimate_training",
                        lambda data, training, *rest: {"training_peak": peak(training.train_batch_size)})
    args = Namespace(max_memory_gb=40, train_batch_size="auto")
    auto, fixed = (9, 48, 64), (1, 48, 64)
    chosen, simulated = batch_size.choose_batch_sizes(
        None, None, TrainingFlags(train_batch_size=args.train_batch_size), None, None, None,
        MemoryFlags(max_memory_gb=args.max_memory_gb), None, {}, None, None, torch.float32, {auto: 64, fixed: 9},
        {auto: "auto", fixed: 4})
    largest = max(batch for batch in range(1, 65) if peak(batch) <= 40 * 2**30)
    assert peak(largest) > 40e9  # the batch a limit in GB would refuse
    assert chosen == {auto: largest, fixed: 4}
    assert all(value == peak(batch) for (bucket, batch), value in simulated.items()) and (auto, largest) in simulated


# ----------------------------------------------------------------------------------------------
# Through the trainers
# ----------------------------------------------------------------------------------------------


def expected_plan(epochs=1):
    counts = {}
    for bucket in EXPECTED_BUCKETS.values():
        counts[bucket] = counts.get(bucket, 0) + 1
    return {"x".join(map(str, b)): (n * epochs, BATCH_SIZES[b]) for b, n in counts.items()}


def test_a_mixed_folder_trains_each_bucket_at_its_batch_size_and_resumes_exactly(capsys, monkeypatch, tiny_model_2b,
                                                                                   mixed_folder, tmp_path):
    """Clips of several shapes and lengths and three stills, captions beside them, a bucket config with a batch size
    per bucket: the dry run's plan, the batches the loader delivers, summary.json, and a resumed run bitwise equal
    to the uninterrupted one."""
    def argv(output, *extra):
        return folder_argv(tiny_model_2b, mixed_folder, output, "--num_train_epochs", "2", "--random_flip", "0.5",
                           "--checkpointing_steps", "4", *extra)

    plan = run_trainer(argv(tmp_path / "dry", "--dry_run"))["dry_run"]
    rows = {name: (row["samples"], row["batch_size"]) for name, row in plan["bucket_plan"].items()}
    assert rows == expected_plan() and plan["batches_per_epoch_per_process"] == 6  # 2/1 + 3/2 + 1/2 + 3/4 batches
    assert all(row["batches_per_epoch"] == math.ceil(n / b) and row["peak_training_gib"] > 0
               for (n, b), row in zip(rows.values(), plan["bucket_plan"].values()))
    assert json.loads((tmp_path / "dry" / "dry_run_plan.json").read_text())["bucket_plan"] == plan["bucket_plan"]
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["bucket", "(FxHxW)", "samples", "batch", "batches/epoch", "training", "GiB"] in printed
    assert [row[:4] for row in printed if row and row[0] in rows] == [  # one printed row per bucket, sorted
        [name, str(n), str(b), str(math.ceil(n / b))] for name, (n, b) in sorted(rows.items(),
                                                                               key=lambda r: tuple(map(int, r[0].split("x"))))]

    seen = spy_on_batches(monkeypatch)
    summary = run_trainer(argv(tmp_path / "straight"))
    assert summary["global_step"] == 12 and len(seen) == 12
    # Each bucket cut at its own batch size (a bucket's last batch holds what is left): per epoch, 2 clips of
    # 9x64x96 in 2 batches of 1, 3 of 9x48x64 in 2 + 1, 1 of 5x32x32 alone, the 3 stills together (size 4).
    delivered = {}
    for bucket, size in seen:
        delivered.setdefault(bucket, []).append(size)
    assert {bucket: sorted(sizes) for bucket, sizes in delivered.items()} == {
        (9, 64, 96): [1, 1, 1, 1], (9, 48, 64): [1, 1, 2, 2], (5, 32, 32): [1, 1], (1, 48, 64): [3, 3]}
    assert {name: (row["samples_trained"], row["batch_size"]) for name, row in summary["buckets"].items()} == \
        expected_plan(epochs=2)
    startup = summary["startup_seconds"]  # by phase, from the process's start (this pytest process: long ago)
    assert list(startup) == ["python and imports", "flags, processes and data scan", "models, optimizer and resume",
                             "first step"] and all(seconds >= 0 for seconds in startup.values())
    assert startup["flags, processes and data scan"] > 0 and startup["python and imports"] > startup["first step"]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-8", resumed / "checkpoint-8")  # step 8: epoch 1, batch 2
    again = run_trainer(argv(resumed, "--resume_from_checkpoint", "latest"))
    assert again["buckets"] == summary["buckets"]  # counted over the whole run, resumed steps included
    ours, reference = trained_weights(resumed, "lora"), trained_weights(tmp_path / "straight", "lora")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


@pytest.mark.slow
def test_the_mixed_folder_prepared_first_trains_the_same_way(monkeypatch, tiny_model_2b, mixed_folder, tmp_path):
    """prepare_dataset.py with the bucket config and the folder layout: the same buckets, its batch sizes stored in
    the manifest, and training on the prepared entries batches exactly as on the raw files. (Two processes prepare
    this folder in tests/test_training.py::test_prepare_with_two_processes_matches_one.)"""
    from conftest import run_prepare

    prepared = tmp_path / "prepared"
    run_prepare(["--model_id", tiny_model_2b, "--data_root", mixed_folder, "--bucket_config",
                 mixed_folder.parent / "bucket.yaml", "--max_sequence_length", "16", "--save_latents_and_embeddings",
                 "--output_dir", prepared])
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert {e["source_video"].split("/")[-1]: tuple(e["bucket"]) for e in manifest["entries"]} == EXPECTED_BUCKETS
    assert manifest["batch_sizes"] == {"x".join(map(str, b)): n for b, n in BATCH_SIZES.items()}

    seen = spy_on_batches(monkeypatch)
    raw = run_trainer(folder_argv(tiny_model_2b, mixed_folder, tmp_path / "raw"))
    from_raw = [size for _, size in seen]
    seen.clear()
    # No --bucket_config now: the batch sizes come from the manifest.
    ready = run_trainer(lora_argv(tiny_model_2b, prepared, tmp_path / "ready", "--load_tensors"))
    assert [size for _, size in seen] == from_raw and ready["buckets"] == raw["buckets"]


@pytest.mark.slow
def test_image_to_video_on_the_mixed_folder_with_batch_sizes_of_auto(tiny_models, mixed_folder, tmp_path):
    """Image-to-video LoRA on clips and stills; buckets marked auto get the largest batch the memory estimate puts
    under --max_memory_gb, checked here against the estimate itself, batch by batch."""
    from training.args import parse_args
    from training.batch_size import component_configs
    from training.conditioning import CONDITIONINGS
    from training.memory_estimate import estimate_training
    from training.modes import MODES
    from training.sections import run_flags

    model = tiny_models("5b-i2v")
    (mixed_folder.parent / "bucket.yaml").write_text(BUCKET_YAML.replace("[1.0, 2], 5", "[1.0, auto], 5")
                                                     .replace("1: [1.0, 4]", "1: [1.0, auto]"))
    limit_gb = 0.012
    argv = folder_argv(model, mixed_folder, tmp_path / "out", "--max_memory_gb", limit_gb,
                       "--ignore_learned_positional_embeddings")
    summary = run_trainer(argv, main=trainer_main("cogvideox_image_to_video_lora"))
    sizes = {tuple(map(int, name.split("x"))): row["batch_size"] for name, row in summary["buckets"].items()}
    assert sizes[(9, 64, 96)] == 1 and sizes[(5, 32, 32)] == 2  # as the config gives them
    args = parse_args([str(a) for a in argv])
    vae_config, text_encoder_config = component_configs(run_flags(args).model)
    transformer_config = json.loads((tmp_path.parent / model / "transformer" / "config.json").read_text())

    def peak(bucket, batch):
        args.train_batch_size = batch
        f = run_flags(args)
        return estimate_training(f.data, f.training, f.optimizer, f.lora, f.validation, f.memory, f.parallelism,
                                 transformer_config, vae_config, text_encoder_config,
                                 CONDITIONINGS["image-to-video"](), MODES["lora"](), torch.float32,
                                 bucket)["training_peak"]

    counts = {(9, 48, 64): 3, (1, 48, 64): 3}
    for bucket, samples in counts.items():
        chosen = sizes[bucket]
        assert 1 <= chosen <= samples and peak(bucket, chosen) <= limit_gb * 2**30
        assert chosen == samples or peak(bucket, chosen + 1) > limit_gb * 2**30, (bucket, chosen)
    assert sizes[(9, 48, 64)] < sizes[(1, 48, 64)]  # the limit bites on the clips, not on the stills
    assert {name: row["samples_trained"] for name, row in summary["buckets"].items()} == {
        name: n for name, (n, _) in expected_plan().items()}
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# CogVideoX-Fun's sampling options
# ----------------------------------------------------------------------------------------------


def test_fun_options_through_the_trainer(capsys, tiny_model_2b, mixed_folder, tmp_path):
    """Fun's flags on the command line: its buckets, centre crops (no stretching notes), --video_repeat for videos only;
    with --bucket_config as well, one error line."""
    from training.layouts import read_samples

    argv = folder_argv(tiny_model_2b, mixed_folder, tmp_path / "out", "--dry_run", "--enable_bucket",
                       "--video_sample_size", "48", "--image_sample_size", "64", "--video_sample_n_frames", "9",
                       "--video_sample_stride", "1", "--video_repeat", "2")
    plan = run_trainer([a for a in argv if a != "--bucket_config" and not str(a).endswith("bucket.yaml")])["dry_run"]
    assert plan["samples_for_training"] == 6 * 2 + 3
    assert set(plan["buckets"]) <= {f"{f}x{h}x{w}" for f in (1, 5, 9) for h, w in fun_shapes(48) + fun_shapes(64)}
    assert not (tmp_path / "out" / "data_notes.jsonl").exists()  # centre crops: nothing stretched
    samples = read_samples(layout_args(data_root=str(mixed_folder)), video_repeat=2)
    assert sorted((s.video_path.suffix, s.repeats) for s in samples) == sorted(
        [(".mp4", 2)] * 6 + [(".png", 1), (".jpg", 1), (".webp", 1)])
    with pytest.raises(SystemExit) as exit_:
        run_trainer(argv)
    assert exit_.value.code == 2 and "--bucket_config and CogVideoX-Fun's sampling options" in capsys.readouterr().err


def fun_shapes(side):
    from training.buckets import ASPECT_RATIOS, fun_shape

    return [fun_shape(ratio, side) for ratio in ASPECT_RATIOS]

