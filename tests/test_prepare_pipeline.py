"""prepare_dataset.py as a pipeline (decoding ahead of the encoder, each distinct caption embedded once, writing in a
background thread): what it writes does not depend on the overlap, and a failure in any stage stops the run with one
line instead of hanging it."""

import json
import threading

import pytest
import torch
from conftest import prepare_argv, run_prepare


def _prepared(output):
    """{source video name: {tensor name: tensor}} of a prepared folder."""
    from pathlib import Path

    from safetensors.torch import load_file

    entries = json.loads((output / "manifest.json").read_text())["entries"]
    return {Path(e["source_video"]).name: load_file(output / e["file"]) for e in entries}


def _with_repeated_captions(clips):
    """The six bundled clips with three distinct captions (the last three repeat the second and third)."""
    captions = (clips / "prompts.txt").read_text().splitlines()
    captions[3], captions[4], captions[5] = captions[1], captions[2], captions[1]
    (clips / "prompts.txt").write_text("\n".join(captions) + "\n")
    return len(set(captions))


def test_decoding_in_workers_or_a_thread_writes_identical_entries(tiny_model_2b, clips, tmp_path):
    """Bitwise the same entries, whether a thread of the process (0 workers) or two worker processes decode; random
    crops and flips included."""
    random_data = ["--video_reshape_mode", "random", "--random_flip", "0.5"]
    results = {}
    for workers in ("0", "2"):
        output = tmp_path / f"workers-{workers}"
        run_prepare(prepare_argv(tiny_model_2b, clips, output, *random_data, "--dataloader_num_workers", workers))
        results[workers] = _prepared(output)
    assert results["0"].keys() == results["2"].keys() and len(results["0"]) == 6
    for clip, tensors in results["0"].items():
        assert tensors.keys() == results["2"][clip].keys()
        for name, tensor in tensors.items():
            assert torch.equal(tensor, results["2"][clip][name]), (clip, name)


def test_batched_vae_encoding_matches_one_clip_at_a_time(tiny_model_2b, clips, tmp_path):
    """--batch_size 2 encodes two clips of a bucket in one VAE call; the latents are those of one call per clip (to
    float rounding: a batched convolution may sum in another order)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_prepare(prepare_argv(tiny_model_2b, clips, one))
    run_prepare(prepare_argv(tiny_model_2b, clips, two, "--batch_size", "2"))
    first, second = _prepared(one), _prepared(two)
    assert first.keys() == second.keys()
    for clip in first:
        for name in first[clip]:
            torch.testing.assert_close(first[clip][name], second[clip][name], rtol=1e-5, atol=1e-5)


def test_each_distinct_caption_is_embedded_once_in_batches(monkeypatch, capsys, tiny_model_2b, clips, tmp_path):
    import training.models

    distinct = _with_repeated_captions(clips)
    calls = []
    encode = training.models.encode_prompts

    def counting(tokenizer, text_encoder, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return encode(tokenizer, text_encoder, prompts, *args, **kwargs)

    monkeypatch.setattr(training.models, "encode_prompts", counting)
    output = tmp_path / "prepared"
    run_prepare(prepare_argv(tiny_model_2b, clips, output))
    assert calls.pop() == [""]  # then the empty prompt, alone, stored once for training's --caption_dropout_rate
    embedded = [prompt for call in calls for prompt in call]
    assert sorted(embedded) == sorted(set(embedded)) and len(embedded) == distinct == 3
    assert len(calls) == 1  # the six clips' captions in one batch

    # Each entry holds its own caption's embedding, as the pipelines compute it (one caption per call).
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(tiny_model_2b)
    manifest = json.loads((output / "manifest.json").read_text())
    from safetensors.torch import load_file

    for entry in manifest["entries"]:
        with torch.no_grad():
            theirs, _ = pipe.encode_prompt(entry["caption"], do_classifier_free_guidance=False,
                                           max_sequence_length=16, device="cpu")
        torch.testing.assert_close(load_file(output / entry["file"])["prompt_embeds"], theirs[0], rtol=1e-5, atol=1e-6)
    assert "clip/s" in capsys.readouterr().err  # the bar counts clips per second (and shows the time left)


def _run_in_thread(argv, timeout=120):
    """run_prepare(argv) in a thread; (finished in time, the exception it raised or None)."""
    outcome = {}

    def target():
        try:
            run_prepare(argv)
        except BaseException as error:  # noqa: BLE001 - SystemExit included: the caller looks at it
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), outcome.get("error")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_clip_failing_to_decode_stops_the_run_with_one_line(monkeypatch, capfd, tiny_model_2b, clips, tmp_path,
                                                              workers):
    """A clip that fails in the decoding stage (a worker process, or the decoding thread with 0 workers): exit status
    1, one `error:` line naming it, no hang; the entries already written stay."""
    import training.dataset
    from training.video_io import VideoReadError

    real = training.dataset.read_frames

    def failing(path, indices):
        if str(path).endswith("sunset.mp4"):
            raise VideoReadError(f"{path}: decoding failed (simulated)")
        return real(path, indices)

    monkeypatch.setattr(training.dataset, "read_frames", failing)  # forked workers inherit it
    output = tmp_path / "prepared"
    capfd.readouterr()
    finished, error = _run_in_thread(prepare_argv(tiny_model_2b, clips, output, "--dataloader_num_workers", workers))
    assert finished, "prepare hung after a clip failed to decode"
    assert isinstance(error, SystemExit) and error.code == 1
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and lines[0].startswith("error: entry 6: ") and "sunset.mp4" in lines[0], lines
    assert "Traceback" not in err
    assert not (output / "manifest.json").exists()


def test_a_failing_write_stops_the_run_and_keeps_what_was_written(monkeypatch, tiny_model_2b, clips, tmp_path):
    """An error in the background writer (here: the disk fills at the third entry) is raised in the run, which does
    not hang; the two entries written before it are complete, and the next run reuses them."""
    import training.prepare_dataset as prepare

    real, saved = prepare._atomic_save, []

    def filling(tensors, path, metadata):
        if len(saved) == 2:
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata)
        saved.append(path)

    monkeypatch.setattr(prepare, "_atomic_save", filling)
    output = tmp_path / "prepared"
    argv = prepare_argv(tiny_model_2b, clips, output)
    finished, error = _run_in_thread(argv)
    assert finished, "prepare hung after a write failed"
    assert isinstance(error, OSError) and "No space left" in str(error)
    assert sorted(p.name for p in (output / "latents").iterdir()) == sorted(p.name for p in saved)

    monkeypatch.setattr(prepare, "_atomic_save", real)
    stamps = {p: p.stat().st_mtime_ns for p in saved}
    run_prepare(argv)
    assert {p: p.stat().st_mtime_ns for p in saved} == stamps
    assert len(json.loads((output / "manifest.json").read_text())["entries"]) == 6


def test_clips_are_written_only_when_asked_and_the_entries_are_the_same(capsys, tiny_model_2b, clips, tmp_path):
    """With latents and embeddings, nothing in videos/ unless --save_videos (the same entries either way); a second
    run reuses every entry; asking for the clips later re-encodes the entries that lack theirs."""
    with_clips, without = tmp_path / "with", tmp_path / "without"
    run_prepare(prepare_argv(tiny_model_2b, clips, with_clips, "--save_videos"))
    run_prepare(prepare_argv(tiny_model_2b, clips, without))
    assert len(list((with_clips / "videos").glob("*.mp4"))) == 6
    assert not (without / "videos").is_dir() or not list((without / "videos").iterdir())
    first, second = _prepared(with_clips), _prepared(without)
    assert all(torch.equal(first[c][n], second[c][n]) for c in first for n in first[c])
    assert (with_clips / "videos.txt").read_text() == (without / "videos.txt").read_text()
    capsys.readouterr()
    run_prepare(prepare_argv(tiny_model_2b, clips, without))
    assert "preparing (rank 0)" not in capsys.readouterr().err  # nothing encoded again
    run_prepare(prepare_argv(tiny_model_2b, clips, without, "--save_videos"))
    assert len(list((without / "videos").glob("*.mp4"))) == 6



def _conv_kernels(run):
    """run(), and how many times each 3-D convolution kernel ran in it (torch's profiler, all threads)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = run()
    names = Counter(event.name for event in prof.events())
    return result, {kernel: names[kernel] for kernel in ("aten::mkldnn_convolution", "aten::slow_conv3d_forward")}


def test_prepare_runs_the_vae_convolutions_on_cpu_through_onednn(tiny_model_2b, clips, tmp_path):
    """prepare routes the VAE's CPU 3-D convolutions to oneDNN, which torch's own rule sends to its much slower native
    kernel for small inputs (the plain VAE below runs it for most layers); the latents are the same to float rounding,
    and with gradients torch chooses as usual (oneDNN's inference call is not differentiable)."""

    from diffusers import AutoencoderKLCogVideoX

    from training.models import convolve_on_cpu_with_onednn

    _, kernels = _conv_kernels(lambda: run_prepare(prepare_argv(tiny_model_2b, clips, tmp_path / "prepared")))
    assert kernels["aten::mkldnn_convolution"] > 0 and kernels["aten::slow_conv3d_forward"] == 0

    plain = AutoencoderKLCogVideoX.from_pretrained(tiny_model_2b, subfolder="vae").eval()
    routed = convolve_on_cpu_with_onednn(AutoencoderKLCogVideoX.from_pretrained(tiny_model_2b, subfolder="vae").eval())
    video = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected, plain_kernels = _conv_kernels(lambda: plain.encode(video).latent_dist.parameters)
        latents, routed_kernels = _conv_kernels(lambda: routed.encode(video).latent_dist.parameters)
    convolutions = sum(plain_kernels.values())
    assert plain_kernels["aten::slow_conv3d_forward"] > convolutions / 2  # the small, deep layers
    assert routed_kernels == {"aten::mkldnn_convolution": convolutions, "aten::slow_conv3d_forward": 0}
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)

    latents, grad_kernels = _conv_kernels(lambda: routed.encode(video.clone().requires_grad_()).latent_dist.parameters)
    assert latents.grad_fn is not None and grad_kernels == plain_kernels
    # bf16 stays on torch's choice: oneDNN's bf16 convolution needs CPU features many CPUs lack (it raises there).
    with torch.no_grad():
        _, bf16_kernels = _conv_kernels(lambda: routed.to(torch.bfloat16).encode(video.bfloat16()))
        _, plain_bf16_kernels = _conv_kernels(lambda: plain.to(torch.bfloat16).encode(video.bfloat16()))
    assert bf16_kernels == plain_bf16_kernels
