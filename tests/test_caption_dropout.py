"""Caption dropout (--caption_dropout_rate) and caption shuffle (--caption_shuffle, --keep_tokens): the draws (rate,
independence, determinism), the empty prompt as the pipeline encodes it, both data paths, the checks, the record,
and an exact resume."""

import json
import random
import subprocess
import sys

import pytest
import torch
from conftest import (
    ASSETS,
    ROOT,
    crashing_env,
    lora_argv,
    prepare_argv,
    run_prepare,
    run_trainer,
    stopped_run_stderr,
    tiny_pipeline,
)

from training.dataset import CaptionDraws, shuffle_tags


TAGS = ["a cat", "grass", "sunny day", "slow motion", "close-up", "green"]


def _tagged_clips(folder):
    """The bundled clips with comma-separated tag captions (all the same tags, in one order)."""
    captions = [", ".join(TAGS[:3] + [f"clip {i}"] + TAGS[3:]) for i in range(6)]
    (folder / "prompts.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    return folder


def test_dropout_rate_is_p_independent_across_samples_and_epochs_and_repeatable():
    rate, samples, epochs = 0.1, 4000, 5
    draws = CaptionDraws(dropout_rate=rate, seed=3)
    dropped = torch.tensor([[draws.dropped(epoch, key) for key in range(samples)] for epoch in range(epochs)],
                           dtype=torch.float64)
    # Independent: a sample dropped in one epoch is dropped in the next at the rate P (not always, not never),
    # and neighbouring samples likewise; repeats of a sample ((index, repeat) keys) too.
    pairs = [(dropped[:-1], dropped[1:]), (dropped[:, :-1], dropped[:, 1:])]
    for first, second in pairs:
        both = (first * second).sum() / first.sum()
        assert abs(both.item() - rate) < 4 * (rate * (1 - rate) / first.sum().item()) ** 0.5
    n = samples * epochs
    tolerance = 4 * (rate * (1 - rate) / n) ** 0.5  # four standard deviations of the measured rate
    assert abs(dropped.mean().item() - rate) < tolerance
    repeats = torch.tensor([draws.dropped(0, (key, 1)) for key in range(samples)], dtype=torch.float64)
    assert abs((repeats * dropped[0]).sum().item() / dropped[0].sum().item() - rate) < 0.08
    # The same (seed, epoch, sample) draws the same; another seed draws otherwise.
    again = CaptionDraws(dropout_rate=rate, seed=3)
    assert all(again.dropped(epoch, key) == bool(dropped[epoch, key]) for epoch in range(epochs) for key in range(500))
    other = CaptionDraws(dropout_rate=rate, seed=4)
    assert [other.dropped(0, key) for key in range(500)] != dropped[0, :500].bool().tolist()
    # What a sample trains with agrees with `dropped` (the raw path's caption, the prepared path's embedding).
    assert all((draws.caption("a b, c", 2, key) == "") == bool(dropped[2, key]) for key in range(500))
    assert not any(CaptionDraws(seed=3).dropped(0, key) for key in range(500))


def test_shuffle_keeps_the_first_tags_and_the_trigger_word_in_front():
    caption = "sks " + ", ".join(TAGS)
    orders = set()
    for epoch in range(40):
        shuffled = CaptionDraws(shuffle=True, keep_tokens=2, seed=1).caption(caption, epoch, 5, id_token="sks")
        assert shuffled.startswith("sks a cat, grass, ")
        tags = shuffled[len("sks "):].split(", ")
        assert sorted(tags) == sorted(TAGS) and tags[:2] == TAGS[:2]
        assert shuffled == CaptionDraws(shuffle=True, keep_tokens=2, seed=1).caption(caption, epoch, 5, id_token="sks")
        orders.add(shuffled)
    assert len(orders) > 10  # a new order (nearly) every epoch
    # With no tag kept, the trigger word still stays in front, alone: the first tag moves.
    firsts = set()
    for epoch in range(20):
        shuffled = CaptionDraws(shuffle=True, seed=1).caption(caption, epoch, 5, id_token="sks")
        assert shuffled.startswith("sks ") and sorted(shuffled[len("sks "):].split(", ")) == sorted(TAGS)
        firsts.add(shuffled.split(", ")[0])
    assert len(firsts) > 1 and all(first.startswith("sks ") for first in firsts)
    # Without the trigger word in the caption nothing is kept beyond keep_tokens; empty tags disappear.
    assert shuffle_tags("x, , y", 2, random.Random(0)) == "x, y"


def test_raw_clips_drop_the_caption_and_keep_the_image(clips):
    from training.buckets import GridBuckets
    from training.dataset import VideoDataset, assign_buckets, load_samples

    samples = load_samples(clips, None, "prompts.txt", "videos.txt")
    items, _ = assign_buckets(samples, GridBuckets([9], [32], [32], max_num_frames=9, batch_size=1, stills=1))
    draws = CaptionDraws(dropout_rate=0.5, seed=7)
    dataset = VideoDataset(items, image_to_video=True, seed=7, captions=draws)
    plain = VideoDataset(items, image_to_video=True, seed=7)
    seen = set()
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        for position, item in enumerate(items):
            sample, reference = dataset[position], plain[position]
            expected = "" if draws.dropped(epoch, item.sample.index) else item.sample.caption
            assert sample["prompt"] == expected
            assert torch.equal(sample["image"], reference["image"]) and torch.equal(sample["video"], reference["video"])
            seen.add(expected == "")
    assert seen == {True, False}


def test_prepared_data_store_the_empty_prompt_and_train_on_it(capsys, tiny_model_2b, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from training.data_source import PreparedEntries

    prepared = tmp_path / "prepared"
    run_prepare(prepare_argv(tiny_model_2b, ASSETS, prepared))
    manifest = json.loads((prepared / "manifest.json").read_text())
    empty = load_file(prepared / manifest["empty_prompt"])["prompt_embeds"]
    # The pipeline's own embedding of the negative prompt it uses by default ("") (under no_grad, as in __call__).
    with torch.no_grad():
        _, negative = tiny_pipeline(tiny_model_2b).encode_prompt("x", do_classifier_free_guidance=True,
                                                                 max_sequence_length=16, device="cpu")
    assert torch.equal(empty, negative[0])

    seen, real_encode = [], PreparedEntries.encode

    def recording(self, batch, context):
        seen.extend(zip(batch["index"], batch["prompt_embeds"]))
        return real_encode(self, batch, context)

    monkeypatch.setattr(PreparedEntries, "encode", recording)
    # 6 samples in 5 batches: epoch 0 is steps 1-5.
    summary = run_trainer(lora_argv(tiny_model_2b, prepared, tmp_path / "run", "--load_tensors", "--max_train_steps",
                                    "5", "--caption_dropout_rate", "0.5"))
    draws = CaptionDraws(dropout_rate=0.5, seed=7)
    own = {entry["index"]: load_file(prepared / entry["file"])["prompt_embeds"] for entry in manifest["entries"]}
    assert sorted(index for index, _ in seen) == sorted(own)
    assert {draws.dropped(0, index) for index in own} == {True, False}
    for index, embeds in seen:
        assert torch.equal(embeds, empty if draws.dropped(0, index) else own[index])
    assert summary["captions"] == {"caption dropout": 0.5, "caption shuffle": "off"}
    assert "| caption dropout | 0.5 |" in (tmp_path / "run" / "README.md").read_text()

    # A folder prepared before caption dropout existed: one line naming the fix; re-preparing adds only the prompt.
    (prepared / manifest.pop("empty_prompt")).unlink()
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_trainer(lora_argv(tiny_model_2b, prepared, tmp_path / "old", "--load_tensors", "--caption_dropout_rate", "0.1"))
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "--caption_dropout_rate 0.1" in line and "re-run prepare_dataset.py" in line
    stamps = {p: p.stat().st_mtime_ns for p in (prepared / "latents").iterdir()}
    run_prepare(prepare_argv(tiny_model_2b, ASSETS, prepared))
    assert {p: p.stat().st_mtime_ns for p in (prepared / "latents").iterdir()} == stamps
    restored = load_file(prepared / json.loads((prepared / "manifest.json").read_text())["empty_prompt"])
    assert torch.equal(restored["prompt_embeds"], empty)


BAD = {
    ("--caption_dropout_rate", "1"): "--caption_dropout_rate must be at least 0 and below 1",
    ("--caption_dropout_rate", "-0.1"): "--caption_dropout_rate must be at least 0 and below 1",
    ("--caption_shuffle", "--keep_tokens", "-1"): "--keep_tokens must be 0 or more",
    ("--keep_tokens", "2"): "pass --caption_shuffle too",
    ("--caption_shuffle", "--load_tensors"): "--caption_shuffle needs raw clips",
}


@pytest.mark.parametrize("flags", list(BAD))
def test_bad_caption_flags_get_one_line(capsys, tiny_model_2b, tmp_path, flags):
    stderr = stopped_run_stderr(capsys, lora_argv(tiny_model_2b, tmp_path / "none" if "--load_tensors" in flags
                                                  else ASSETS, tmp_path / "run", *flags))
    lines = [line for line in stderr if line.startswith("error: ")]
    assert [line for line in lines if BAD[flags] in line], lines


@pytest.mark.slow  # a run killed in a subprocess, then resumed
def test_killed_and_resumed_with_dropout_and_shuffle_gives_the_same_weights(tiny_model_2b, clips, tmp_path):
    from conftest import lora_weights

    data = _tagged_clips(clips)

    def argv(output):  # 7 steps: epoch 1 starts at step 6, after the resume from checkpoint-3
        return lora_argv(tiny_model_2b, data, output, "--max_train_steps", "7", "--checkpointing_steps", "3",
                         "--caption_dropout_rate", "0.5", "--caption_shuffle", "--keep_tokens", "1",
                         "--dataloader_num_workers", "2")

    summary = run_trainer(argv(tmp_path / "straight"))
    assert summary["captions"] == {"caption dropout": 0.5, "caption shuffle": "tags after the first 1"}
    command = [sys.executable, ROOT / "training" / "cogvideox_text_to_video_lora.py", *argv(tmp_path / "run")]
    killed = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=crashing_env("step:5"),
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_trainer([*argv(tmp_path / "run"), "--resume_from_checkpoint", "latest"])
    ours, reference = lora_weights(tmp_path / "run"), lora_weights(tmp_path / "straight")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    # The captions did change training: without them the weights differ.
    run_trainer(lora_argv(tiny_model_2b, data, tmp_path / "plain", "--max_train_steps", "7"))
    plain = lora_weights(tmp_path / "plain")
    assert not all(torch.equal(plain[k], reference[k]) for k in plain)
