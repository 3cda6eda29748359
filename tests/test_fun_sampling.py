"""CogVideoX-Fun's sampling options (training/buckets.py FunBuckets, training/dataset.py FunBatches) against a
reference transcribed from CogVideoX-Fun's code, not from ours: aigc-apps/VideoX-Fun at 804a425,
scripts/cogvideox_fun/train_lora.py (`get_random_downsample_ratio`, `get_length_to_frame_num`, the size drawn in
`collate_fn`) and videox_fun/data/dataset_image_video.py (`resize_frame`, `ImageVideoDataset.get_batch`'s frames)."""

import pickle
import random
from argparse import Namespace
from collections import Counter

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------
# The reference: Fun's code, transcribed (names and arithmetic as there)
# ----------------------------------------------------------------------------------------------


def fun_get_random_downsample_ratio(sample_size, image_ratio=[], all_choices=False, rng=None):  # noqa: B006 (Fun's)
    def _create_special_list(length):
        if length == 1:
            return [1.0]
        if length >= 2:
            first_element = 0.75
            remaining_sum = 1.0 - first_element
            other_elements_value = remaining_sum / (length - 1)
            special_list = [first_element] + [other_elements_value] * (length - 1)
            return special_list

    if sample_size >= 1536:
        number_list = [1, 1.25, 1.5, 2, 2.5, 3] + image_ratio
    elif sample_size >= 1024:
        number_list = [1, 1.25, 1.5, 2] + image_ratio
    elif sample_size >= 768:
        number_list = [1, 1.25, 1.5] + image_ratio
    elif sample_size >= 512:
        number_list = [1] + image_ratio
    else:
        number_list = [1]
    if all_choices:
        return number_list
    number_list_prob = np.array(_create_special_list(len(number_list)))
    return rng.choice(number_list, p=number_list_prob)


def fun_get_length_to_frame_num(args, token_length, sample_n_frames_bucket_interval=4):
    if args.image_sample_size > args.video_sample_size:
        sample_sizes = list(range(args.video_sample_size, args.image_sample_size + 1, 128))
        if sample_sizes[-1] != args.image_sample_size:
            sample_sizes.append(args.image_sample_size)
    else:
        sample_sizes = [args.image_sample_size]
    return {
        sample_size: min(token_length / sample_size / sample_size, args.video_sample_n_frames)
        // sample_n_frames_bucket_interval * sample_n_frames_bucket_interval + 1 for sample_size in sample_sizes
    }


def fun_resize_frame(h, w, target_short_side):
    """(height, width) after `resize_frame`."""
    if h < w:
        if target_short_side > h:
            return h, w
        return target_short_side, int(target_short_side * w / h)
    if target_short_side > w:
        return h, w
    return int(target_short_side * h / w), target_short_side


def fun_video_batch(args, examples, rng, patch_size_t=None, sample_n_frames_bucket_interval=4):
    """`collate_fn`'s (frames, side) for a batch of videos; examples: [(frames loaded, height, width)] as loaded."""
    target_token_length = args.video_sample_n_frames * args.token_sample_size * args.token_sample_size
    length_to_frame_num = fun_get_length_to_frame_num(args, target_token_length)
    if args.random_hw_adapt:
        if args.training_with_video_token_length:
            local_min_size = np.min(np.array([np.mean(np.array([h, w])) for _, h, w in examples]))
            choice_list = [length for length in list(length_to_frame_num.keys()) if length < local_min_size * 1.25]
            if len(choice_list) == 0:
                choice_list = list(length_to_frame_num.keys())
            local_video_sample_size = rng.choice(choice_list)
            batch_video_length = length_to_frame_num[local_video_sample_size]
            random_downsample_ratio = args.video_sample_size / local_video_sample_size
        else:
            random_downsample_ratio = fun_get_random_downsample_ratio(args.video_sample_size, rng=rng)
            batch_video_length = args.video_sample_n_frames + sample_n_frames_bucket_interval
    else:
        random_downsample_ratio = 1
        batch_video_length = args.video_sample_n_frames + sample_n_frames_bucket_interval
    for frames, _, _ in examples:
        batch_video_length = int(min(batch_video_length, frames))
        local_latent_length = (batch_video_length - 1) // sample_n_frames_bucket_interval + 1
        local_video_length = (batch_video_length - 1) // sample_n_frames_bucket_interval * \
            sample_n_frames_bucket_interval + 1
        if patch_size_t is not None and local_latent_length % patch_size_t != 0:
            local_video_length -= local_latent_length % patch_size_t * sample_n_frames_bucket_interval
        batch_video_length = max(local_video_length, 1)
    return batch_video_length, args.video_sample_size / random_downsample_ratio


def fun_random_frame_crop(video_sample_n_frames, rng, sample_n_frames_bucket_interval=4):
    """The training loop's --random_frame_crop frame count (before the batch is cut to it)."""
    def _create_special_list(length):
        if length == 1:
            return [1.0]
        if length >= 2:
            last_element = 0.90
            remaining_sum = 1.0 - last_element
            other_elements_value = remaining_sum / (length - 1)
            special_list = [other_elements_value] * (length - 1) + [last_element]
            return special_list
    select_frames = [_tmp for _tmp in list(range(sample_n_frames_bucket_interval + 1, video_sample_n_frames +
                                                 sample_n_frames_bucket_interval, sample_n_frames_bucket_interval))]
    select_frames_prob = np.array(_create_special_list(len(select_frames)))
    return rng.choice(select_frames, p=select_frames_prob) if len(select_frames) != 0 else 1


def fun_batch_index(num_frames, video_sample_n_frames, video_sample_stride, rng,
                    video_length_drop_start=0.0, video_length_drop_end=1.0):
    """`get_batch`'s frame indices of a video of num_frames frames."""
    min_sample_n_frames = min(video_sample_n_frames, int(
        num_frames * (video_length_drop_end - video_length_drop_start) // video_sample_stride))
    video_length = int(video_length_drop_end * num_frames)
    clip_length = min(video_length, (min_sample_n_frames - 1) * video_sample_stride + 1)
    start_idx = rng.randint(int(video_length_drop_start * video_length), video_length - clip_length) \
        if video_length != clip_length else 0
    return np.linspace(start_idx, start_idx + clip_length - 1, min_sample_n_frames, dtype=int)


# ----------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------


def fun_plan(stills=1, seed=0, **options):
    from training.args import frame_rule_problem
    from training.buckets import FUN_OPTIONS, FunBuckets

    config = {"patch_size_t": None if stills == 1 else 2}
    return FunBuckets(Namespace(**{**FUN_OPTIONS, **options}), 1, stills,
                      lambda count: frame_rule_problem(count, config) is None, lambda h, w: None, seed)


# Fun's documented example (docs: training_with_video_token_length), with its script's stride.
EXAMPLE = dict(video_sample_size=256, image_sample_size=1024, token_sample_size=512, video_sample_n_frames=49,
               video_sample_stride=3, random_hw_adapt=True, training_with_video_token_length=True)


def loaded_examples(args, sizes, frames=300):
    """(frames loaded, height, width) of Fun's loader for clips of these (height, width)."""
    short = max(args.image_sample_size, args.video_sample_size)
    loaded = min(args.video_sample_n_frames, int(frames // args.video_sample_stride))
    return [(loaded, *fun_resize_frame(h, w, short)) for h, w in sizes]


N_DRAWS = 2000


def test_token_length_example_trains_256x256x49_up_to_1024x1024x13_as_funs_code():
    """Fun's README says 1024x1024 gets 9 frames (~512*512*49/1024/1024); its code rounds 12.25 down to 12 and adds 1:
    13. We follow the code."""
    from training.buckets import fun_side_frames

    args = Namespace(**EXAMPLE)
    table = fun_get_length_to_frame_num(args, 49 * 512 * 512)
    assert fun_side_frames(args) == table
    assert (table[256], table[768], table[1024]) == (49, 21, 13)
    rng = np.random.default_rng(0)
    for stills, patch in ((1, None), (5, 2)):  # CogVideoX 1.0, and 1.5 (latent frames made even)
        plan = fun_plan(stills=stills, **EXAMPLE)
        for sizes in ([(1080, 1920)] * 2, [(1080, 1920), (480, 854)]):  # sides below 1.25 x the batch's smallest
            examples = loaded_examples(args, sizes)
            expected = Counter(fun_video_batch(args, examples, rng, patch) for _ in range(N_DRAWS))
            clips = [plan.clip(300, h, w, False) for h, w in sizes]
            ours = Counter((f, h) for f, h, w in (plan.draw(clips, 0, batch) for batch in range(N_DRAWS)))
            assert set(ours) == set(expected)
            for key, n in expected.items():  # an even draw among the sides: within sampling noise of Fun's
                assert abs(ours[key] - n) / N_DRAWS < 4 * (2 * (n / N_DRAWS) * (1 - n / N_DRAWS) / N_DRAWS) ** 0.5, key
        clip = plan.clip(300, 1080, 1920, False)
        alone = {plan.draw([clip], 0, b) for b in range(400)}
        assert (45 if patch else 49, 256, 256) in alone and (13, 1024, 1024) in alone


def test_random_hw_adapt_keeps_the_full_size_three_times_in_four():
    from training.buckets import fun_downsample_ratios

    for size, image_ratio in ((1024, []), (1536, []), (768, [2.0]), (1024, [4.0]), (256, [4.0])):
        ratios, probabilities = fun_downsample_ratios(size, image_ratio)
        assert ratios == fun_get_random_downsample_ratio(size, image_ratio, all_choices=True)
        assert probabilities[0] == (0.75 if len(ratios) > 1 else 1.0) and abs(sum(probabilities) - 1) < 1e-12
    args = Namespace(**{**EXAMPLE, "video_sample_size": 1024, "training_with_video_token_length": False})
    plan = fun_plan(**vars(args))
    clip = plan.clip(300, 1080, 1920, False)
    n = 4000
    ours = Counter(plan.draw([clip], 3, batch)[1] for batch in range(n))
    rng = np.random.default_rng(1)
    fun = Counter(int(fun_video_batch(args, loaded_examples(args, [(1080, 1920)]), rng)[1] / 16) * 16
                  for _ in range(n))
    assert set(ours) == set(fun) == {1024, 816, 672, 512}
    assert abs(ours[1024] / n - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5
    for side, count in fun.items():
        assert abs(ours[side] - count) / n < 4 * (2 * (count / n) * (1 - count / n) / n) ** 0.5, side
    # Still images: --image_sample_size down to --video_sample_size too (1024 / 4 = 256).
    images = fun_plan(**{**vars(args), "video_sample_size": 256})
    still = images.clip(1, 900, 900, True)
    assert {images.draw([still], 0, b)[1] for b in range(400)} == {1024, 816, 672, 512, 256}


def test_random_frame_crop_keeps_the_full_count_nine_times_in_ten():
    plan = fun_plan(video_sample_n_frames=49, video_sample_stride=1, random_frame_crop=True)
    clip = plan.clip(100, 480, 720, False)
    n, rng = 4000, np.random.default_rng(2)
    ours = Counter(plan.draw([clip], 1, batch)[0] for batch in range(n))
    fun = Counter(min(int(fun_random_frame_crop(49, rng)), 49) for _ in range(n))  # a batch of 49 cut to it
    assert set(ours) == set(fun) == set(range(5, 50, 4))
    for count, k in fun.items():
        assert abs(ours[count] - k) / n < 4 * (2 * (k / n) * (1 - k / n) / n) ** 0.5 + 1 / n, count


def test_frame_window_moves_every_epoch_within_funs_window():
    plan = fun_plan(video_sample_n_frames=17, video_sample_stride=2, seed=5)
    clip = plan.clip(200, 480, 720, False, first=4)  # 200 usable frames after --skip_frames_start 4
    rng = random.Random(0)
    funs = {tuple(int(i) + 4 for i in fun_batch_index(200, 17, 2, rng)) for _ in range(20000)}
    assert len(funs) == 200 - 32  # every start from 0 to 167
    windows = [tuple(plan.window(clip, 17, epoch, key)) for epoch in range(200) for key in range(10)]
    assert set(windows) <= funs and len(set(windows)) > 150
    starts = [w[0] - 4 for w in windows]
    assert min(starts) < 5 and max(starts) > 162  # covers the window, not just the first frames
    assert plan.window(clip, 9, 7, 3) == list(windows[7 * 10 + 3][:9])  # a batch of 9 keeps the first 9; reproducible
    assert sum(plan.window(clip, 17, 0, k) != plan.window(clip, 17, 1, k) for k in range(10)) >= 9  # per epoch
    assert len({tuple(plan.window(clip, 17, 0, k)) for k in range(10)}) >= 9  # per load (repeats have their keys)
    for frames in (33, 34, 40):  # the frames Fun loads: usable // stride, at most --video_sample_n_frames
        assert plan.clip(frames, 480, 720, False).loaded == len(fun_batch_index(frames, 17, 2, rng))
    short = fun_plan(video_sample_n_frames=17, video_sample_stride=1)
    clip = short.clip(12, 480, 720, False)  # its 12 frames fill the window: Fun starts at 0
    assert short.window(clip, 9, 4, 0) == [int(i) for i in fun_batch_index(12, 17, 1, rng)][:9]


def test_batch_sizes_drawn_per_batch_same_in_every_process_and_on_resume():
    from training.dataset import BucketBatchSampler, FunBatches

    plan = fun_plan(enable_bucket=True, **EXAMPLE)
    sizes = [(1080, 1920), (720, 1280), (480, 854), (1920, 1080), (600, 600)]
    clips = [plan.clip(300 - 7 * i, *sizes[i % 5], False) for i in range(40)]
    clips += [plan.clip(1, *sizes[i % 5], True) for i in range(9)]

    def sampler(rank):  # one process's: its own objects, as another process builds them
        batches = FunBatches(plan, clips, seed=3, batch_size=3)
        made = BucketBatchSampler(batches.keys, batch_size=dict.fromkeys(batches.landing_counts(), 3), seed=3,
                                  num_replicas=2, rank=rank, batches_at=batches.batches)
        return batches, made

    (fun0, rank0), (fun1, rank1) = sampler(0), sampler(1)
    drawn = set()
    for epoch in range(3):
        for s in (rank0, rank1):
            s.set_epoch(epoch)
        assert fun0.batches(epoch) == fun1.batches(epoch) and fun0.keys(epoch) == fun1.keys(epoch)
        mine = list(rank0) + list(rank1)
        assert sorted(p for batch in fun0.batches(epoch) for p in batch) == list(range(len(clips)))
        assert sorted(map(tuple, mine)) == sorted(map(tuple, rank0._all_batches(epoch)))  # the ranks share them out
        keys = fun0.keys(epoch)
        for batch in mine:  # one group and one drawn size per batch
            assert len({keys[p] for p in batch}) == 1 and len({(clips[p].image, clips[p].group) for p in batch}) == 1
        assert len(rank0) == len(list(rank0))
        drawn |= set(keys)
        resumed = sampler(1)[1]
        resumed.set_epoch(epoch, start_batch=2)
        assert list(resumed) == list(rank1)[2:]
    assert drawn <= set(fun0.landing_counts())
    assert len({bucket[1:] for bucket in drawn}) > 4  # sizes differ between batches...
    assert fun0.keys(0) != fun0.keys(1)  # ...and between epochs


def test_fun_sizes_and_windows_reach_the_loaded_batches():
    """Through assign_buckets, VideoDataset and the loader: every batch decodes at its drawn size, and a clip's
    frames move between epochs."""
    from tests.conftest import ASSETS
    from training.buckets import bucket_plan
    from training.data_source import build_dataloader
    from training.dataset import assign_buckets, load_samples

    buckets = Namespace(bucket_config=None, enable_bucket=True, video_sample_size=32, image_sample_size=64,
                        token_sample_size=32, video_sample_n_frames=5, video_sample_stride=1, random_hw_adapt=True,
                        training_with_video_token_length=True, random_frame_crop=False)
    plan = bucket_plan(buckets, {"patch_size_t": None}, 2, seed=1)
    samples = load_samples(ASSETS, None, "prompts.txt", "videos.txt")
    items, skipped = assign_buckets(samples, plan)
    assert not skipped and all(item.fun for item in items)
    from training.dataset import VideoDataset

    dataset = VideoDataset(items, "center", seed=1, plan=plan)
    backend = Namespace(data_parallel_size=1, data_parallel_rank=0)
    loader, sampler = build_dataloader(dataset, backend, dict.fromkeys(dataset.landing_counts(), 2), seed=1,
                                       num_workers=0, pin_memory=False)
    assert pickle.loads(pickle.dumps(dataset)).fun.keys(2) == dataset.fun.keys(2)  # as loader workers get it
    seen = {}
    for epoch in range(3):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        order = [[items[p].sample.index for p in batch] for batch in dataset.fun.batches(epoch)]
        assert [batch["index"] for batch in loader] == order  # the loader's batches are those that drew the sizes
        for batch in loader:
            keys = {dataset.bucket_keys_at(epoch)[[i.sample.index for i in items].index(j)] for j in batch["index"]}
            assert len(keys) == 1 and tuple(batch["video"].shape[1:]) == (next(iter(keys))[0], 3,
                                                                           *next(iter(keys))[1:])
            for index, video in zip(batch["index"], batch["video"]):
                seen.setdefault(index, []).append(video)
    assert any(a.shape == b.shape and not torch.equal(a, b) for videos in seen.values() for a, b in zip(videos, videos[1:]))


def test_a_run_with_funs_random_sizes_trains_them_and_resumes_exactly(monkeypatch, tiny_model_2b, mixed_folder,
                                                                      tmp_path):
    """The trainer with Fun's example options on the mixed folder for 2 epochs: its batches train at sizes drawn per
    batch (more than one), each among the buckets the dry run plans for; a run resumed from the checkpoint of step 5
    ends bitwise equal to the uninterrupted one."""
    import shutil

    from conftest import run_trainer, trained_weights
    from test_data_layouts import folder_argv, spy_on_batches

    def argv(output, *extra):
        argv = folder_argv(tiny_model_2b, mixed_folder, output, "--enable_bucket", "--video_sample_size", "32",
                           "--image_sample_size", "64", "--token_sample_size", "32", "--video_sample_n_frames", "9",
                           "--video_sample_stride", "1", "--random_hw_adapt", "--training_with_video_token_length",
                           "--num_train_epochs", "2", "--checkpointing_steps", "5", "--seed", "3", *extra)
        position = argv.index("--bucket_config")
        return argv[:position] + argv[position + 2 :]

    plan = run_trainer(argv(tmp_path / "dry", "--dry_run"))["dry_run"]
    assert plan["samples_unusable"] == [] and plan["samples_for_training"] == 9
    seen = spy_on_batches(monkeypatch)
    summary = run_trainer(argv(tmp_path / "straight"))
    assert {"x".join(map(str, (f, h, w))) for (f, h, w), _ in seen} <= set(plan["bucket_plan"])
    assert len({bucket for bucket, _ in seen}) > 3 and {f for (f, _, _), _ in seen} > {1}
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-5", resumed / "checkpoint-5")
    again = run_trainer(argv(resumed, "--resume_from_checkpoint", "latest"))
    assert again["buckets"] == summary["buckets"]
    theirs, reference = trained_weights(resumed, "lora"), trained_weights(tmp_path / "straight", "lora")
    assert theirs.keys() == reference.keys() and all((theirs[k] == reference[k]).all() for k in theirs)
