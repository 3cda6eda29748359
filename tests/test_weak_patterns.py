"""Issue 32, point 2: the five weak patterns swept over the suite. Each test pins a property the existing tests only
touched at their defaults: every field of a content key, a check that must hold on every rank, a layout option
beyond the fixture's, a seeded draw that must differ (not only repeat), a picture's content (not its existence)."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ASSETS, prepare_argv


# ----------------------------------------------------------------------------------------------
# (a) every field of prepare's content key, and the empty prompt's
# ----------------------------------------------------------------------------------------------


def test_each_field_of_the_cache_key_renames_the_entries_and_the_empty_prompt_where_it_should(tiny_model_2b, tmp_path):
    """prepare_dataset.py names each entry by a hash of its sample and the run's settings (cache_settings): a setting
    that changes what is encoded must rename every entry (it is recomputed, never reused stale), and the empty
    prompt's file must follow exactly the settings its embedding depends on (text encoder, text length, precision),
    not the video ones (so it is not recomputed by a new crop, nor reused from another text encoder). The seed enters
    only where it draws something (random flips or crops): with stretched or centre-cropped clips a new --seed
    recomputes nothing.
    tests/test_prepare_cache.py changes the settings it can run end to end; this covers the rest, by the names."""
    from training.precomputed import vae_fingerprint
    from training.prepare_dataset import build_parser, cache_settings, empty_prompt_file, entry_key, pretrained_of

    model = tmp_path / "model"  # the text encoder's config only (all cache_settings reads from the model path)
    (model / "text_encoder").mkdir(parents=True)
    shutil.copy(Path(tiny_model_2b) / "text_encoder" / "config.json", model / "text_encoder" / "config.json")
    transformer = json.loads((Path(tiny_model_2b) / "transformer" / "config.json").read_text())
    vae = vae_fingerprint(pretrained_of(SimpleNamespace(model_id=tiny_model_2b, revision=None, variant=None,
                                                        cache_dir=None)))
    item = SimpleNamespace(content_hash="0" * 64, sample=SimpleNamespace(caption="a red ball"), bucket=(9, 32, 32),
                           frame_indices=range(9))

    def names(*extra, vae_config=vae, transformer_config=transformer):
        flags = build_parser().parse_args(prepare_argv(str(model), "data", "out", "--seed", "1", *extra))
        settings = cache_settings(flags, vae_config, transformer_config)
        return entry_key(item, settings), empty_prompt_file(settings)

    base = names()
    encoder_config = model / "text_encoder" / "config.json"
    config = json.loads(encoder_config.read_text())
    encoder_config.write_text(json.dumps({**config, "d_ff": config["d_ff"] * 2}))  # the same path, another encoder
    other_encoder = names()
    encoder_config.write_text(json.dumps(config))
    assert names() == base
    wider = transformer["text_embed_dim"] + 8
    # (entry renamed, empty prompt renamed) per change
    changes = {
        "--revision": (names("--revision", "other-revision"), True),
        "the text encoder's config": (other_encoder, True),
        "the prompt width": (names(transformer_config={**transformer, "text_embed_dim": wider}), True),
        "--max_sequence_length": (names("--max_sequence_length", "8"), True),
        "--dtype": (names("--dtype", "bf16"), True),
        "the VAE's config": (names(vae_config={**vae, "latent_channels": 2 * vae["latent_channels"]}), False),
        "--video_reshape_mode": (names("--video_reshape_mode", "center"), False),
        "--random_flip": (names("--random_flip", "0.5"), False),
        "--save_image_latents": (names("--save_image_latents"), False),
    }
    for what, ((entry, empty_prompt), renames_empty_prompt) in changes.items():
        assert entry != base[0], f"{what} does not rename the entries: they would be reused stale"
        assert (empty_prompt != base[1]) == renames_empty_prompt, what
    # The seed: a key field exactly where it draws (random flips, random crops), never otherwise.
    assert names("--seed", "2") == base
    assert names("--video_reshape_mode", "center", "--seed", "2") == changes["--video_reshape_mode"][0]
    assert names("--random_flip", "0.5", "--seed", "2")[0] != changes["--random_flip"][0][0]
    assert names("--video_reshape_mode", "random", "--seed", "2")[0] != names("--video_reshape_mode", "random")[0]
    assert names("--video_reshape_mode", "random", "--seed", "2")[1] == base[1]


# ----------------------------------------------------------------------------------------------
# (b) every rank, (d) draws that differ: the held-out loss
# ----------------------------------------------------------------------------------------------


def test_the_held_out_loss_is_the_mean_over_ranks_with_noise_of_its_own_per_batch_and_timestep(monkeypatch):
    """eval_loss is a collective: a second rank is simulated inside reduce_mean (its loss always 3.0), so the loss
    every rank reports is the mean of both, not this rank's own. Its noise is seeded per (seed, batch, timestep):
    the same on every evaluation (comparable across steps), different between batches and between timesteps (one
    noise for every batch would measure a single draw), and the training RNG is left where it was."""
    import training.validation as validation

    draws = []

    def fake_loss(model, batch, context, conditioning, timestep):
        draws.append((batch["batch"], timestep, torch.randn(8)))
        return draws[-1][2].abs().mean()

    monkeypatch.setattr(validation, "compute_loss", fake_loss)
    backend = SimpleNamespace(device=torch.device("cpu"), model_for_inference=lambda model: model,
                              reduce_mean=lambda tensor: (tensor + 3.0) / 2)
    loader, timesteps, model = [{"batch": 0}, {"batch": 1}], [100, 500], torch.nn.Linear(1, 1)

    torch.manual_seed(0)
    untouched = torch.rand(4)
    torch.manual_seed(0)
    loss = validation.evaluate(model, loader, None, None, backend, timesteps, seed=7)
    assert torch.equal(torch.rand(4), untouched)  # the training RNG goes on as if nothing was drawn
    local = torch.stack([noise.abs().mean() for *_, noise in draws]).mean().item()
    assert loss == pytest.approx((local + 3.0) / 2) and loss != pytest.approx(local)
    first = {(b, t): noise for b, t, noise in draws}
    assert len(first) == 4
    assert not torch.equal(first[0, 100], first[1, 100]) and not torch.equal(first[0, 100], first[0, 500])
    draws.clear()
    validation.evaluate(model, loader, None, None, backend, timesteps, seed=7)
    assert all(torch.equal(noise, first[b, t]) for b, t, noise in draws)  # the same noise at every evaluation
    draws.clear()
    validation.evaluate(model, loader, None, None, backend, timesteps, seed=8)
    assert not any(torch.equal(noise, first[b, t]) for b, t, noise in draws)  # --seed decides it


# ----------------------------------------------------------------------------------------------
# (d) draws that differ: training's flips and crops
# ----------------------------------------------------------------------------------------------


def _flips(dataset, plain, epochs):
    """{epoch: [whether the clip at each position came out mirrored]}."""
    reference = [plain[p]["video"] for p in range(len(plain))]
    out = {}
    for epoch in epochs:
        dataset.set_epoch(epoch)
        out[epoch] = []
        for position in range(len(dataset)):
            video = dataset[position]["video"]
            mirrored = torch.equal(video, reference[position].flip(-1))
            assert mirrored or torch.equal(video, reference[position])
            out[epoch].append(mirrored)
    return out


def test_random_flips_are_drawn_afresh_per_epoch_per_clip_and_per_repeat():
    """--random_flip 0.5 in training: each clip's flip is drawn from (seed, epoch, its random key), so it changes from
    epoch to epoch (the same flip every epoch is no augmentation), differs between clips in an epoch (not one coin for
    the whole set), and a repeat of a clip (num_repeats, --video_repeat: its own random key) draws its own."""
    from training.buckets import GridBuckets
    from training.dataset import VideoDataset, assign_buckets, load_samples

    plan = GridBuckets([5, 9], [32, 48, 64], [32, 64, 96], max_num_frames=9, batch_size=1, stills=1)
    items = assign_buckets(load_samples(ASSETS, None, "prompts.txt", "videos.txt"), plan=plan)[0][:4]
    plain = VideoDataset(items + items)
    keys = [item.sample.index for item in items] + [(item.sample.index, 1) for item in items]
    flips = _flips(VideoDataset(items + items, random_flip=0.5, seed=3, random_keys=keys), plain, range(4))
    count = len(items)
    per_clip = [{flips[epoch][p] for epoch in flips} for p in range(2 * count)]
    assert sum(len(seen) == 2 for seen in per_clip) >= count, flips  # most clips flip in some epochs, not in others
    assert all(len(set(flips[epoch])) == 2 for epoch in flips), flips  # in every epoch some clips flip, some do not
    assert any(flips[epoch][:count] != flips[epoch][count:] for epoch in flips), flips  # repeats draw their own
    assert _flips(VideoDataset(items + items, random_flip=0.5, seed=3, random_keys=keys), plain, [2])[2] == flips[2]


# ----------------------------------------------------------------------------------------------
# (c) layout options beyond the fixture's defaults
# ----------------------------------------------------------------------------------------------


def test_a_dataset_config_reads_its_own_column_names_and_repeats_for_csv_and_list_sources(tmp_path):
    """[[datasets]] tables of a CSV (dataset_file) and of txt lists (data_root) with column names of their own and
    num_repeats: the columns named are read (not the defaults, and not swapped) and every sample gets the table's
    repeats, as a folder table's do."""
    import pandas as pd

    from training.layouts import read_samples
    from training.sections import DataFlags

    shutil.copytree(ASSETS, tmp_path / "lists")
    original = pd.read_csv(ASSETS / "metadata.csv")
    # Decoy columns under the default names: reading them instead of the named ones gives other captions or paths.
    pd.DataFrame({"clip": original["video"], "prompt": original["caption"], "caption": "a decoy caption",
                  "video": "videos/missing.mp4"}).to_csv(tmp_path / "lists" / "renamed.csv", index=False)
    shutil.move(tmp_path / "lists" / "prompts.txt", tmp_path / "lists" / "captions.txt")
    shutil.move(tmp_path / "lists" / "videos.txt", tmp_path / "lists" / "clips.txt")
    (tmp_path / "datasets.toml").write_text(
        '[[datasets]]\ndataset_file = "lists/renamed.csv"\ncaption_column = "prompt"\nvideo_column = "clip"\n'
        'num_repeats = 2\n\n'
        '[[datasets]]\ndata_root = "lists"\ncaption_column = "captions.txt"\nvideo_column = "clips.txt"\n'
        'num_repeats = 3\n')
    samples = read_samples(DataFlags(dataset_config=str(tmp_path / "datasets.toml")))
    lines = (ASSETS / "prompts.txt").read_text().splitlines()
    videos = (ASSETS / "videos.txt").read_text().splitlines()

    def listed(captions, paths):
        return [(caption, (tmp_path / "lists" / video).resolve()) for caption, video in zip(captions, paths)]

    assert [(s.caption, s.video_path.resolve()) for s in samples[:6]] == listed(original["caption"], original["video"])
    assert [(s.caption, s.video_path.resolve()) for s in samples[6:]] == listed(lines, videos)
    assert [s.repeats for s in samples] == [2] * 6 + [3] * 6 and [s.index for s in samples] == list(range(12))


# ----------------------------------------------------------------------------------------------
# (e) a picture's content: the animated previews
# ----------------------------------------------------------------------------------------------


def test_the_animated_preview_shows_the_video_s_frames_in_order_at_its_frame_rate(tmp_path):
    """The GIF beside each validation mp4 (model card, trackers): its frames are the video's, in order, in the
    video's colours (float frames in [0, 1], as the pipeline returns them), each shown 1/fps seconds, looping."""
    import numpy as np
    from PIL import Image, ImageSequence

    from training.report import animated_preview

    height, width, count, fps = 16, 24, 5, 5  # GIF durations count hundredths of a second: 200 ms
    frames = []
    for index in range(count):  # a bar that moves right, on a background that brightens: no two frames alike
        frame = np.zeros((height, width, 3), dtype=np.float32)
        frame[..., 2] = index / (count - 1)
        frame[:, 4 * index:4 * index + 4] = (1.0, 0.5, 0.0)
        frames.append(frame)
    path = animated_preview(frames, tmp_path / "preview.gif", fps)
    with Image.open(path) as gif:
        assert gif.info["loop"] == 0
        shown = [(np.asarray(f.convert("RGB"), dtype=np.float32) / 255, f.info["duration"])
                 for f in ImageSequence.Iterator(gif)]
    assert len(shown) == count
    for (picture, duration), frame in zip(shown, frames):
        assert np.abs(picture - frame).max() < 2 / 255 and duration == 1000 / fps


# ----------------------------------------------------------------------------------------------
# (b) every rank, (d) draws that differ: each rank's noise
# ----------------------------------------------------------------------------------------------


def test_each_data_parallel_rank_draws_its_own_noise_and_a_shard_group_shares_it(monkeypatch, tmp_path):
    """The training RNG (noise, timesteps, dropout draws) is seeded by --seed and the data-parallel rank: two ranks
    that train different samples must not add the same noise to them (DDP would average gradients of correlated
    noise), while the processes of a sequence-parallel shard group, which share a sample, share its noise too.
    Ranks are simulated through Backend.process_index and the backend's shard group (tests/test_multi_node.py
    checks the same on two real processes, slowly)."""
    from conftest import lora_argv

    import training.backend as backend
    import training.core as core
    from training.args import parse_args
    from training.sections import run_flags

    flags = run_flags(parse_args([str(a) for a in lora_argv("model", ASSETS, tmp_path / "out")]))

    def shard(started, shards):
        started.sequence_shards = shards
        return started

    def noise(process_index, shards=None):
        monkeypatch.setattr(backend.Backend, "process_index", property(lambda self: process_index))
        monkeypatch.setattr(core, "build_backend", lambda *sections: shard(backend.build_backend(*sections), shards))
        core.start_processes(flags)
        return torch.randn(16)

    rank_0, rank_1 = noise(0), noise(1)
    assert torch.equal(noise(0), rank_0)  # reproducible
    assert not torch.equal(rank_0, rank_1)
    pair = SimpleNamespace(size=2)
    assert torch.equal(noise(1, pair), rank_0) and torch.equal(noise(2, pair), rank_1)


def test_prepare_shares_the_samples_out_over_ranks_and_rank_0_counts_every_rank_s_disk(tiny_model_2b, tmp_path):
    """prepare_dataset.py on several processes: each rank encodes its own share (together every sample once, none
    twice), skips the entries already prepared in its share, and every rank's plan counts what all ranks still have
    to write, since rank 0 checks the free disk for all of them before anything is encoded."""
    from safetensors.torch import save_file

    from training.prepare_dataset import build_parser, plan_encoding

    output = tmp_path / "prepared"
    (output / "latents").mkdir(parents=True)
    flags = build_parser().parse_args(prepare_argv(tiny_model_2b, "data", str(output)))
    transformer = json.loads((Path(tiny_model_2b) / "transformer" / "config.json").read_text())
    usable = [SimpleNamespace(content_hash=f"{n:064x}", sample=SimpleNamespace(caption=f"clip {n}"),
                              bucket=(9, 32, 32), frame_indices=range(9)) for n in range(5)]

    def plans(world_size):
        return [plan_encoding(flags, output, usable, transformer, rank, world_size) for rank in range(world_size)]

    alone, pair = plans(1)[0], plans(2)
    assert sorted(pair[0].mine + pair[1].mine) == alone.mine == list(range(5))  # every sample once
    assert all(p.to_encode == 5 and p.needed_bytes == alone.needed_bytes > 0 for p in pair)
    done = alone.stems[pair[1].mine[0]]  # one entry of rank 1's share, already prepared
    save_file({"video_latent_dist": torch.zeros(1)}, str(output / "latents" / f"{done}.safetensors"))
    alone, pair = plans(1)[0], plans(2)
    assert len(alone.mine) == 4 and sorted(pair[0].mine + pair[1].mine) == alone.mine
    assert [p.already_prepared for p in pair] == [0, 1]
    assert all(p.to_encode == 4 and p.needed_bytes == alone.needed_bytes for p in pair)


# ----------------------------------------------------------------------------------------------
# (d) draws that differ: validation videos
# ----------------------------------------------------------------------------------------------


def test_validation_videos_draw_their_own_noise_per_prompt_and_per_video(tmp_path):
    """Validation generates every video from one generator seeded by --seed: a prompt listed twice, or
    --num_validation_videos 2, gives different videos (one noise for all would show a single sample as if it were
    several), and the same --seed gives the same videos at every validation (they are compared across steps)."""
    from training.validation import generate_videos

    class Pipe:  # the pipeline's use of the generator: its starting noise decides the video
        transformer = SimpleNamespace(config=SimpleNamespace(max_text_seq_length=16))

        def to(self, device):
            return self

        def __call__(self, prompt, generator, num_frames, height, width, **kwargs):
            noise = torch.rand(num_frames, height, width, 3, generator=generator)
            return SimpleNamespace(frames=[noise.numpy()])

    validation = SimpleNamespace(enable_model_cpu_offload=False, num_validation_videos=2, height=16, width=16,
                                 num_inference_steps=1, guidance_scale=6.0, use_dynamic_cfg=False, fps=8)
    cases = [{"prompt": "a red ball"}, {"prompt": "a red ball"}]

    def videos(seed, tag):
        return [frames for _, frames in generate_videos(Pipe(), cases, validation, seed, 3, "cpu", tmp_path, tag)]

    first = videos(7, "a")
    assert len(first) == 4
    assert all(not (first[i] == first[j]).all() for i in range(4) for j in range(i + 1, 4))
    assert all((a == b).all() for a, b in zip(videos(7, "b"), first))
    assert not any((a == b).all() for a, b in zip(videos(8, "c"), first))
