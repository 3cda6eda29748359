"""tools/import_prepared.py: a folder written by the original cogvideox-factory's prepare_dataset.py (80d1150) trains
with --load_tensors after one conversion, and holds what our prepare_dataset.py writes for the same clips.

`write_original_folder` writes that folder as the original did (from its description in the reference notes, not from
our code): decord frames at a uniform stride, stretched to the nearest bucket, in [-1, 1]; `vae._encode` (the latent
distribution's mean and log-variance, unscaled) per clip and of its first frame; T5 embeddings padded to the model's
length; each tensor in its own `.pt` under a uuid4 stem; the first frame as a PNG; the lists and data.jsonl."""

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from conftest import ASSETS, generate, lora_argv, prepare_argv, run_prepare, run_trainer, tiny_pipeline, trainer_main
from safetensors.torch import load_file


# Clips whose size is a bucket and whose stride is 1, so the original's sampling and resizing and ours take the same
# pixels (the comparison below is then exact up to the encoders' arithmetic).
CLIPS = ("videos/waves.mp4", "videos/ball.mp4", "videos/square.mp4")
BUCKET_FLAGS = ["--height_buckets", "48", "64", "--width_buckets", "64", "96", "--frame_buckets", "9",
                "--max_num_frames", "9"]
HEIGHTS, WIDTHS, FRAMES = (48, 64), (64, 96), (9,)


def _captions():
    captions = dict(zip((ASSETS / "videos.txt").read_text().split(), (ASSETS / "prompts.txt").read_text().splitlines()))
    return [captions[video] for video in CLIPS]


def _original_clip(path, max_num_frames=9):
    """VideoDatasetWithResizing at 80d1150: the nearest frame bucket, indices range(0, N, N // bucket) (first `bucket`
    kept), the nearest (h, w) by |h - H| + |w - W|, a bilinear stretch, x / 255 then Normalize(0.5, 0.5)."""
    import decord

    reader = decord.VideoReader(str(path))
    count = len(reader)
    bucket = min(FRAMES, key=lambda b: abs(b - min(count, max_num_frames)))
    indices = list(range(0, count, count // bucket))[:bucket]
    frames = torch.from_numpy(reader.get_batch(indices).asnumpy()).permute(0, 3, 1, 2).float()  # [F, C, H, W]
    height, width = min(((h, w) for h in HEIGHTS for w in WIDTHS),
                        key=lambda hw: abs(hw[0] - frames.shape[2]) + abs(hw[1] - frames.shape[3]))
    if frames.shape[2:] != (height, width):  # torchvision's resize of a tensor: bilinear, antialiased
        frames = torch.nn.functional.interpolate(frames, size=(height, width), mode="bilinear", antialias=True)
    return (frames / 255.0 - 0.5) / 0.5


def write_original_folder(folder, model, image_latents=True, dtype=torch.float32):
    """The folder the original's prepare_dataset.py --save_latents_and_embeddings [--save_image_latents] writes for
    CLIPS with the tiny `model`."""
    from diffusers import AutoencoderKLCogVideoX
    from diffusers.utils import export_to_video
    from PIL import Image
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype).eval()
    vae = AutoencoderKLCogVideoX.from_pretrained(model, subfolder="vae", torch_dtype=dtype).eval()
    length = json.loads((Path(model) / "transformer" / "config.json").read_text())["max_text_seq_length"]
    for kind in ("images", "image_latents", "videos", "video_latents", "prompts", "prompt_embeds"):
        (folder / kind).mkdir(parents=True)  # all of them, with or without --save_image_latents
    records = []
    for video, caption in zip(CLIPS, _captions()):
        stem = str(uuid.uuid4())
        clip = _original_clip(ASSETS / video).to(dtype)  # [F, C, H, W]
        with torch.no_grad():
            moments = vae._encode(clip.unsqueeze(0).permute(0, 2, 1, 3, 4))[0]  # [2C, f, h, w], not sampled or scaled
            ids = tokenizer([caption], padding="max_length", max_length=length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids
            embeds = text_encoder(ids)[0][0]
        torch.save(moments, folder / "video_latents" / f"{stem}.pt")
        torch.save(embeds, folder / "prompt_embeds" / f"{stem}.pt")
        if image_latents:
            image = clip[:1].clone()
            with torch.no_grad():
                torch.save(vae._encode(image.unsqueeze(0).permute(0, 2, 1, 3, 4))[0], folder / "image_latents" / f"{stem}.pt")
            pixels = ((image[0].float() + 1) / 2).mul(255).byte().permute(1, 2, 0).numpy()  # torchvision's to_pil_image
            Image.fromarray(pixels).save(folder / "images" / f"{stem}.png")
        export_to_video(list(((clip.float() + 1) / 2).permute(0, 2, 3, 1).numpy()), str(folder / "videos" / f"{stem}.mp4"), fps=8)
        (folder / "prompts" / f"{stem}.txt").write_text(caption)
        (folder / "videos" / f"{stem}.txt").write_text(json.dumps(dict(zip(("num_frames", "height", "width"),
                                                                            (clip.shape[0], *clip.shape[2:])))))
        records.append({"prompt": caption, "prompt_embed": f"prompt_embeds/{stem}.pt", "image": f"images/{stem}.png",
                        "image_latent": f"image_latents/{stem}.pt", "video": f"videos/{stem}.mp4",
                        "video_latent": f"video_latents/{stem}.pt",
                        "metadata": json.loads((folder / "videos" / f"{stem}.txt").read_text())})
    (folder / "prompts.txt").write_text("".join(r["prompt"] + "\n" for r in records))
    (folder / "videos.txt").write_text("".join(r["video"] + "\n" for r in records))
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def import_main(argv):
    from tools.import_prepared import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def original_folder(tiny_model_2b, tmp_path_factory):
    return write_original_folder(tmp_path_factory.mktemp("original") / "prepared", tiny_model_2b)


def _by_caption(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest, {entry["caption"]: (entry, load_file(folder / entry["file"])) for entry in manifest["entries"]}


def test_imported_folder_holds_what_our_prepare_writes(original_folder, tiny_model_2b, tmp_path):
    """Nothing re-encoded: the original's moments and embeddings, unchanged, equal ours for the same pixels; the first
    frame comes back from its 8-bit PNG."""
    imported = tmp_path / "imported"
    import_main(["--prepared", original_folder, "--model_id", tiny_model_2b, "--output", imported])
    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    for video in CLIPS:
        shutil.copy(ASSETS / video, data / video)
    (data / "videos.txt").write_text("\n".join(CLIPS) + "\n")
    (data / "prompts.txt").write_text("\n".join(_captions()) + "\n")
    ours = tmp_path / "ours"
    run_prepare(prepare_argv(tiny_model_2b, data, ours, "--save_image_latents", data_flags=BUCKET_FLAGS))

    manifest, theirs = _by_caption(imported)
    our_manifest, mine = _by_caption(ours)
    assert sorted(theirs) == sorted(mine) == sorted(_captions())
    assert manifest["settings"]["image_latents"] and manifest["settings"]["imported_from"]
    for key in ("vae_config", "text_encoder_config", "max_sequence_length", "dtype"):
        assert manifest["settings"][key] == our_manifest["settings"][key], key
    assert manifest["model"] == our_manifest["model"]
    for caption, (entry, tensors) in theirs.items():
        our_entry, our_tensors = mine[caption]
        assert entry["bucket"] == our_entry["bucket"]
        stem = Path(entry["file"]).stem
        # The original's tensors as they were, byte for byte.
        original = torch.load(original_folder / "video_latents" / f"{stem}.pt", weights_only=True)
        assert torch.equal(tensors["video_latent_dist"], original)
        torch.testing.assert_close(tensors["video_latent_dist"], our_tensors["video_latent_dist"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tensors["prompt_embeds"], our_tensors["prompt_embeds"], rtol=1e-5, atol=1e-5)
        assert tensors["first_frame"].shape == our_tensors["first_frame"].shape == (1, 3, *entry["bucket"][1:])
        assert (tensors["first_frame"] - our_tensors["first_frame"]).abs().max() <= 2 / 255 + 1e-6  # 8-bit PNG
        assert set(tensors) == {"video_latent_dist", "prompt_embeds", "first_frame"}
    # The lists and the clips come along (hard links where possible).
    assert (imported / "videos.txt").read_text() == (original_folder / "videos.txt").read_text()
    assert all((imported / line).is_file() for line in (imported / "videos.txt").read_text().split())


def test_original_folder_trains_with_load_tensors_and_its_lora_loads(original_folder, tiny_model_2b, tmp_path, capsys):
    folder = tmp_path / "prepared"
    shutil.copytree(original_folder, folder)
    output = tmp_path / "run"
    argv = lora_argv(tiny_model_2b, folder, output, "--load_tensors", "--max_train_steps", "2", "--train_batch_size", "1")
    # Before: refused with the command that converts it.
    with pytest.raises(SystemExit):
        run_trainer(argv)
    error = capsys.readouterr().err
    assert "written by the original cogvideox-factory" in error and "tools/import_prepared.py" in error

    import_main(["--prepared", folder, "--model_id", tiny_model_2b])  # in place
    assert (folder / "manifest.json").is_file()
    summary = run_trainer(argv)
    assert summary["global_step"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))
    pipe = tiny_pipeline(tiny_model_2b)
    before = generate(pipe)
    pipe.load_lora_weights(output, weight_name="pytorch_lora_weights.safetensors", adapter_name="imported")
    after = generate(pipe)
    assert pipe.get_list_adapters() == {"transformer": ["imported"]}
    assert abs(after - before).max() > 0  # the trained LoRA changes the output


class Payload:
    """An object pickled into a .pt: torch.load(weights_only=True) refuses to build it."""


def _tool_errors(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        import_main(argv)
    assert exit_info.value.code == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


def test_bad_original_folders_get_one_line(original_folder, tiny_model_2b, tmp_path, capsys):
    folder = tmp_path / "prepared"
    shutil.copytree(original_folder, folder)
    stems = [Path(line).stem for line in (folder / "videos.txt").read_text().split()]

    (folder / "prompts.txt").rename(folder / "kept.txt")
    (line,) = _tool_errors(capsys, ["--prepared", folder, "--model_id", tiny_model_2b])
    assert "no prompts.txt" in line and "not a folder written by the original" in line
    (folder / "kept.txt").rename(folder / "prompts.txt")

    moved = folder / "video_latents" / f"{stems[1]}.pt"
    moved.rename(tmp_path / "moved.pt")
    (line,) = _tool_errors(capsys, ["--prepared", folder, "--model_id", tiny_model_2b])
    assert f"entry {stems[1]} has no" in line and "video_latents" in line
    (tmp_path / "moved.pt").rename(moved)

    embeds = folder / "prompt_embeds" / f"{stems[0]}.pt"
    torch.save(torch.zeros(226, 4096), embeds)  # the real models' size, not the tiny one's
    (line,) = _tool_errors(capsys, ["--prepared", folder, "--model_id", tiny_model_2b])
    assert "shape [226, 4096]" in line and "[16, 32]" in line
    embeds.write_bytes(b"not a tensor file")
    (line,) = _tool_errors(capsys, ["--prepared", folder, "--model_id", tiny_model_2b])
    assert line.startswith(f"error: {embeds}: cannot read it as a tensor file")

    torch.save({"embeds": torch.zeros(16, 32), "code": Payload()}, embeds)
    (line,) = _tool_errors(capsys, ["--prepared", folder, "--model_id", tiny_model_2b])
    assert line == f"error: {embeds}: holds pickled objects other than tensors, which are not loaded (weights_only=True)"
    torch.save({"embeds": torch.zeros(16, 32)}, embeds)
    (line,) = _tool_errors(capsys, ["--prepared", folder, "--model_id", tiny_model_2b])
    assert line == f"error: {embeds}: holds a dict, not a tensor"
    shutil.copy(original_folder / "prompt_embeds" / f"{stems[0]}.pt", embeds)
    assert not (folder / "manifest.json").exists() and not (folder / "latents").exists()  # nothing was written

    # An image-to-video folder with an image latent missing.
    (folder / "image_latents" / f"{stems[2]}.pt").unlink()
    (line,) = _tool_errors(capsys, ["--prepared", folder, "--model_id", tiny_model_2b])
    assert f"entry {stems[2]} has no" in line and "image_latents" in line

    # Prepared without --save_latents_and_embeddings: the original made video_latents/ and left it empty.
    for path in (folder / "video_latents").iterdir():
        path.unlink()
    (line,) = _tool_errors(capsys, ["--prepared", folder, "--model_id", tiny_model_2b])
    assert "prepared without --save_latents_and_embeddings" in line and "without --load_tensors" in line


def test_text_only_folder_is_refused_for_image_to_video(original_folder, tiny_model_2b, tmp_path):
    """A folder the original prepared without --save_image_latents imports for text-to-video; image-to-video training
    refuses it in one line, as caption dropout does until the empty prompt is embedded."""
    from training.conditioning import ImageToVideo, TextToVideo
    from training.models import Pretrained
    from training.precomputed import load_manifest, manifest_problems

    folder = tmp_path / "prepared"
    shutil.copytree(original_folder, folder)
    for path in [*(folder / "images").iterdir(), *(folder / "image_latents").iterdir()]:
        path.unlink()  # as the original leaves them without --save_image_latents: there, and empty
    import_main(["--prepared", folder, "--model_id", tiny_model_2b])
    manifest = load_manifest(folder)
    config = json.loads((Path(tiny_model_2b) / "transformer" / "config.json").read_text())

    class Data:
        data_root, id_token, caption_dropout_rate = folder, None, 0.0

    pretrained = Pretrained(tiny_model_2b)
    assert manifest_problems(manifest, config, TextToVideo(), pretrained, Data) == []
    (line,) = manifest_problems(manifest, config, ImageToVideo(), pretrained, Data)
    assert "prepared without --save_image_latents" in line and "text-to-video only" in line
    Data.caption_dropout_rate = 0.1
    (line,) = manifest_problems(manifest, config, TextToVideo(), pretrained, Data)
    assert "--embed_empty_prompt" in line
    import_main(["--prepared", folder, "--model_id", tiny_model_2b, "--embed_empty_prompt"])
    assert manifest_problems(load_manifest(folder), config, TextToVideo(), pretrained, Data) == []


def test_original_image_to_video_folder_trains_on_its_first_frames(tiny_models, tmp_path, monkeypatch):
    """Image-to-video from an imported folder conditions on the original's PNG first frames, and its LoRA loads."""
    from diffusers import CogVideoXImageToVideoPipeline

    from training.conditioning import ImageToVideo

    model = tiny_models("5b-i2v")
    folder = write_original_folder(tmp_path / "prepared", model)
    import_main(["--prepared", folder, "--model_id", model])
    conditioned_on, real_model_input = [], ImageToVideo.model_input

    def spy(self, noisy_latents, batch, context):
        conditioned_on.append(batch["image"])
        return real_model_input(self, noisy_latents, batch, context)

    monkeypatch.setattr(ImageToVideo, "model_input", spy)
    output = tmp_path / "run"
    argv = lora_argv(model, folder, output, "--load_tensors", "--max_train_steps", "2", "--train_batch_size", "1",
                     "--ignore_learned_positional_embeddings")
    summary = run_trainer(argv, main=trainer_main("cogvideox_image_to_video_lora"))
    assert summary["global_step"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))
    stored = [load_file(path)["first_frame"] for path in (folder / "latents").iterdir()]
    assert len(conditioned_on) == 2
    assert all(any(torch.equal(image[0], frame) for frame in stored) for image in conditioned_on)
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(model)
    pipe.load_lora_weights(output, weight_name="pytorch_lora_weights.safetensors", adapter_name="imported")
    assert pipe.get_list_adapters() == {"transformer": ["imported"]}


def test_a_bf16_folder_keeps_its_dtype(original_folder, tiny_model_2b, tmp_path, capsys):
    """The original's --dtype bf16 folder: the tensors keep their dtype and values, and the manifest says bf16; a folder
    mixing dtypes is refused."""
    folder = tmp_path / "prepared"
    shutil.copytree(original_folder, folder)
    for path in [*folder.glob("video_latents/*.pt"), *folder.glob("prompt_embeds/*.pt"), *folder.glob("image_latents/*.pt")]:
        torch.save(torch.load(path, weights_only=True).to(torch.bfloat16), path)
    mixed = next(folder.glob("video_latents/*.pt"))
    kept = torch.load(mixed, weights_only=True)
    torch.save(kept.float(), mixed)
    (line,) = _tool_errors(capsys, ["--prepared", folder, "--model_id", tiny_model_2b])
    assert "latents of dtypes" in line and "bfloat16" in line and "float32" in line
    torch.save(kept, mixed)

    import_main(["--prepared", folder, "--model_id", tiny_model_2b])
    manifest, entries = _by_caption(folder)
    assert manifest["settings"]["dtype"] == "bf16"
    for entry, tensors in entries.values():
        stem = Path(entry["file"]).stem
        assert torch.equal(tensors["video_latent_dist"], torch.load(folder / "video_latents" / f"{stem}.pt", weights_only=True))
        assert tensors["prompt_embeds"].dtype == tensors["first_frame"].dtype == torch.bfloat16
