"""What a run leaves for its user to look at and share: the model card, the loss plot, validation contact sheets
and GIFs (also in TensorBoard), and the --push_to_hub upload (the network call replaced)."""

import json
from pathlib import Path

import pytest
from conftest import ASSETS, TINY_VALIDATION_FLAGS, lora_argv, run_trainer


PROMPTS = ["a cat walks on the grass", "a red car drives"]


@pytest.fixture(scope="module")
def reported_run(tiny_model_2b, tmp_path_factory):
    """A LoRA run with everything on: trigger word, held-out loss, validation, TensorBoard, checkpoints, upload."""
    import huggingface_hub

    output = tmp_path_factory.mktemp("reported")
    uploads = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: type("Repo", (), {"repo_id": f"me/{repo_id}"}))
        patch.setattr(huggingface_hub, "upload_folder", lambda **kw: uploads.append(kw))
        summary = run_trainer(lora_argv(
            tiny_model_2b, ASSETS, output, "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--id_token", "BW_STYLE", "--eval_split", "0.34", "--report_to", "tensorboard",
            "--validation_prompt", ":::".join(PROMPTS), "--validation_steps", "2", *TINY_VALIDATION_FLAGS,
            "--push_to_hub", "--hub_model_id", "bw-style-lora",
        ))
    return {"output": output, "summary": summary, "uploads": uploads, "model": tiny_model_2b}


def front_matter(text):
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def test_model_card_describes_the_run_in_hugging_face_form(reported_run):
    output, summary = reported_run["output"], reported_run["summary"]
    card = (output / "README.md").read_text()
    header = front_matter(card)
    assert header["base_model"] == reported_run["model"] and header["library_name"] == "diffusers"
    assert {"text-to-video", "lora", "cogvideox"} <= set(header["tags"])
    assert header["license"] == "other" and header["instance_prompt"] == "BW_STYLE"
    assert [w["text"] for w in header["widget"]] == PROMPTS
    for widget in header["widget"]:
        assert (output / widget["output"]["url"]).is_file()
    assert "# bw-style-lora" in card and "`BW_STYLE`" in card
    for prompt in PROMPTS:
        assert f"**{prompt}**" in card
    for link in ("test_sheet.png", "loss.png", "test_video_0_0_a_cat_walks_on_the_grass.mp4"):
        assert f"({link})" in card and (output / link).is_file()
    assert f"Final training loss: {summary['final_loss']:.4f}." in card
    last_eval = summary["eval_loss"][max(summary["eval_loss"])]
    assert f"Held-out loss (last evaluation): {last_eval:.4f}." in card
    assert "| rank | 4 |" in card and "| alpha | 8 |" in card and "| steps | 4 |" in card
    assert "Data: 4 training samples." in card  # 6 clips, a third held out
    assert 'weight_name="pytorch_lora_weights.safetensors"' in card and 'pipe.set_adapters(["lora"], [1.0])' in card
    assert "`pytorch_lora_weights_comfyui.safetensors` into `ComfyUI/models/loras/`" in card
    assert "strength_model at 1.0" in card


def test_the_license_comes_from_the_base_model(tmp_path):
    from training.report import base_model_license

    assert base_model_license("THUDM/CogVideoX-2b") == {"license": "apache-2.0"}
    assert base_model_license("zai-org/CogVideoX1.5-5B-I2V")["license_name"] == "cogvideox-license"
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- video\n---\n# a model\n")
    assert base_model_license(str(tmp_path)) == {"license": "mit"}
    assert base_model_license(str(tmp_path / "elsewhere")) == {"license": "other"}


def test_push_to_hub_uploads_the_weights_card_and_pictures_but_no_checkpoint(reported_run):
    from huggingface_hub.utils import filter_repo_objects

    output = reported_run["output"]
    (call,) = reported_run["uploads"]
    assert call["repo_id"] == "me/bw-style-lora" and call["folder_path"] == str(output)
    files = [str(p.relative_to(output)) for p in output.rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(files, allow_patterns=call["allow_patterns"],
                                       ignore_patterns=call["ignore_patterns"]))
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_comfyui.safetensors", "README.md",
                 "loss.png", "test_sheet.png", "test_video_1_0_a_red_car_drives.mp4",
                 "test_video_1_0_a_red_car_drives.gif", "validation_step2_sheet.png"):
        assert name in uploaded, name
    assert not [f for f in uploaded if f.startswith(("checkpoint-", "logs"))]


def test_loss_plot_is_drawn_at_checkpoints_and_at_the_end(reported_run):
    from PIL import Image

    output = reported_run["output"]
    with Image.open(output / "loss.png") as image:
        assert image.format == "PNG" and image.size == (800, 450)
    saved = json.loads((output / "checkpoint-4" / "training_state.json").read_text())["loss_history"]
    assert [row[0] for row in saved["train"]] == [1, 2, 3, 4]
    assert saved["train"][-1][1] == pytest.approx(reported_run["summary"]["final_loss"])
    assert [row[0] for row in saved["held_out"]] == sorted(reported_run["summary"]["eval_loss"])


def test_the_loss_plot_draws_each_series_on_its_own_axis(monkeypatch, tmp_path):
    """loss.png shows the raw and smoothed training loss and the held-out loss against the loss axis, and the learning
    rate against its own axis at the right: the figure's lines, read as it is saved, hold exactly those values."""
    from matplotlib.figure import Figure

    from training.report import LossHistory, plot_losses, smoothed

    saved, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: saved.append(self) or savefig(self, *args,
                                                                                                          **kwargs))
    train = [[step, 2.0 / step + 0.1 * (step % 2), 1e-4 * min(step, 3) / 3] for step in range(1, 9)]  # warm-up
    held_out = [[4, 0.8], [8, 0.45]]
    assert plot_losses(LossHistory(train, held_out), tmp_path / "loss.png") == tmp_path / "loss.png"
    (figure,) = saved
    loss_axis, rate_axis = figure.axes

    def series(axis):
        return {line.get_label(): ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
                for line in axis.get_lines()}

    steps, losses, rates = ([row[column] for row in train] for column in range(3))
    assert series(loss_axis) == {"training loss": (steps, losses), "training loss, smoothed": (steps, smoothed(losses)),
                                 "held-out loss": ([row[0] for row in held_out], [row[1] for row in held_out])}
    assert series(rate_axis) == {"learning rate": (steps, rates)}
    assert (loss_axis.get_ylabel(), rate_axis.get_ylabel()) == ("loss", "learning rate")


def test_the_checkpoint_loss_plot_is_drawn_off_the_step(monkeypatch, tmp_path):
    """At a checkpoint loss.png is drawn in a thread, from the history as it was then, while training goes on; the
    file appears whole (drawn under another name, then renamed) and `wait` returns once it is written."""
    import threading

    from training import report

    started, release, drawn = threading.Event(), threading.Event(), []

    def slow_plot(history, path):
        started.set()
        if release.wait(3):
            drawn.append([row[0] for row in history.train])
            Path(path).write_bytes(b"png")
            return Path(path)

    monkeypatch.setattr(report, "_plot_losses", slow_plot)
    history = report.LossHistory([[1, 1.0, 1e-4]], [])
    plot = report.LossPlotInBackground()
    plot.draw(history, tmp_path / "loss.png")  # returns while the picture is still being drawn
    assert started.wait(3)
    history.train.append([2, 0.5, 1e-4])  # the next step
    assert not (tmp_path / "loss.png").exists()
    release.set()
    plot.wait()
    assert drawn == [[1]] and (tmp_path / "loss.png").read_bytes() == b"png"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_a_resumed_run_plots_its_whole_history(reported_run, tmp_path):
    import shutil

    output = tmp_path / "resumed"
    shutil.copytree(reported_run["output"] / "checkpoint-2", output / "checkpoint-2")
    early = json.loads((output / "checkpoint-2" / "training_state.json").read_text())["loss_history"]
    summary = run_trainer(lora_argv(reported_run["model"], ASSETS, output, "--max_train_steps", "4",
                                    "--checkpointing_steps", "2", "--eval_split", "0.34", "--resume_from_checkpoint",
                                    "latest"))
    history = json.loads((output / "checkpoint-4" / "training_state.json").read_text())["loss_history"]
    assert [row[0] for row in history["train"]] == [1, 2, 3, 4] and history["train"][:2] == early["train"]
    assert [row[0] for row in history["held_out"]] == [2, 4]
    assert history["train"][-1][1] == pytest.approx(summary["final_loss"])
    assert (output / "loss.png").is_file()


def test_each_validation_has_a_contact_sheet_and_gifs(reported_run):
    import imageio.v3 as iio
    from PIL import Image

    output = reported_run["output"]
    for tag in ("validation_step2", "validation_step4", "test"):
        with Image.open(output / f"{tag}_sheet.png") as sheet:
            assert sheet.size[1] > sheet.size[0] / 4 * 1.5  # two rows of frames
        for mp4 in sorted(output.glob(f"{tag}_video_*.mp4")):
            with Image.open(mp4.with_suffix(".gif")) as gif:
                assert gif.format == "GIF" and gif.n_frames == len(iio.imread(mp4)) == 9
                assert gif.info["loop"] == 0


def test_tensorboard_gets_the_sheets_and_animated_previews(reported_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for folder in {p.parent for p in (reported_run["output"] / "logs").rglob("events.out.tfevents.*")}:
        events = EventAccumulator(str(folder), size_guidance={"images": 0}).Reload()
        tags = events.Tags()["images"]
        if tags:  # the run's own folder (accelerate writes its hyperparameters in another)
            break
    assert {"validation/sheet", "test/sheet"} <= set(tags)
    gifs = [t for t in tags if t.startswith("test/test_video_")]
    assert len(gifs) == len(PROMPTS)
    assert events.Images(gifs[0])[0].encoded_image_string.startswith(b"GIF8")
    assert [e.step for e in events.Images("validation/sheet")] == [2, 4]


def test_a_full_fine_tune_card_loads_the_transformer_and_has_no_comfyui_section():
    from training.report import model_card

    card = model_card({"title": "t", "base_model": "THUDM/CogVideoX-5b-I2V", "license": {"license": "other"},
                       "conditioning": "image-to-video", "mode": "sft", "id_token": None, "prompts": ["a dog runs"],
                       "videos": [("test_video_0_0_a_dog_runs.mp4", "test_video_0_0_a_dog_runs.gif")], "sheet": None,
                       "plot": None, "settings": {"steps": 10}, "samples": 3, "final_loss": 0.5, "held_out_loss": None,
                       "lora_file": "x", "comfyui_file": "y"})
    assert "full-fine-tune" in front_matter(card)["tags"] and "image-to-video" in front_matter(card)["tags"]
    assert 'CogVideoXTransformer3DModel.from_pretrained("path/to/this/folder", subfolder="transformer"' in card
    assert 'image=load_image("first_frame.png")' in card and "ComfyUI" not in card
    assert "](https://huggingface.co/THUDM/CogVideoX-5b-I2V)" in card


# ----------------------------------------------------------------------------------------------
# The contact sheet's picture: frames filling it at any video size, prompts clear of them, an I2V image first
# ----------------------------------------------------------------------------------------------

LONG_PROMPT = ("BW_STYLE A black and white cartoon goat stands among floating musical notes, then a grinning mouse "
               "leans in and tugs at its beard, and the two of them dance around the gramophone until the record ends.")


def _videos(frames, height, width, count=2, seed=0):
    """Videos of mid-grey noise: no pixel of a frame is near white, the sheet's background."""
    import numpy as np

    return [np.random.default_rng(seed + i).uniform(0.1, 0.8, (frames, height, width, 3)) for i in range(count)]


def _drawn(figure):
    """(tiles, prompts, labels) of a drawn sheet figure: their extents in pixels, and the RGB pixels, top row first."""
    import numpy as np

    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    tiles = [(axis.get_gid(), axis.get_window_extent()) for axis in figure.axes]
    prompts = [text.get_window_extent(renderer) for text in figure.texts if text.get_gid() == "prompt"]
    labels = [text.get_window_extent(renderer) for axis in figure.axes for text in axis.texts]
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3] / 255.0
    return tiles, prompts, labels, pixels


@pytest.mark.parametrize("height, width", [(32, 32), (120, 180), (180, 120), (32, 128), (72, 128)])  # 480x720's and
# 768x1360's shapes, portrait, square, a strip
def test_a_contact_sheet_is_filled_with_frames_and_its_prompts_stand_clear(height, width, tmp_path):
    """Before: 2.2-inch cells whatever the video's shape (a 32x128 video drew its frames as strips in mostly white
    cells), and each prompt drawn at 1.2 axes heights above its row, over the `frame N` titles of the row."""
    import numpy as np
    from PIL import Image

    from training.report import contact_sheet, sheet_figure

    videos, prompts = _videos(9, height, width), [LONG_PROMPT, "a cat"]
    figure = sheet_figure(videos, prompts)
    tiles, prompt_boxes, labels, pixels = _drawn(figure)
    sheet = figure.bbox
    assert [gid for gid, _ in tiles] == ["frame"] * 8 and len(prompt_boxes) == 2
    for _, box in tiles:  # each tile the video's shape, inside the sheet
        assert box.width / box.height == pytest.approx(width / height, rel=0.02) and sheet.contains(box.x0, box.y0)
    covered = sum(box.width * box.height for _, box in tiles) / (sheet.width * sheet.height)
    assert covered > 0.65, covered  # the sheet this replaced: 0.10 (32x128) to 0.40 (32x32)
    for prompt in prompt_boxes:
        assert sheet.x0 <= prompt.x0 and prompt.x1 <= sheet.x1 and sheet.y0 <= prompt.y0 and prompt.y1 <= sheet.y1
        assert not any(prompt.overlaps(box) for _, box in tiles) and not any(prompt.overlaps(box) for box in labels)
    # Each prompt heads its own row: below the row above, above its own tiles.
    rows = sorted({round(box.y1) for _, box in tiles}, reverse=True)
    assert [p.y0 >= row for p, row in zip(prompt_boxes, rows)] == [True, True]
    assert prompt_boxes[1].y1 < min(box.y0 for _, box in tiles if round(box.y1) == rows[0])
    # The picture itself: frame pixels (never white) cover the same share of the written PNG.
    path = contact_sheet(videos, prompts, tmp_path / "sheet.png")
    with Image.open(path) as written:
        png = np.asarray(written.convert("RGB")) / 255.0
    assert png.shape == pixels.shape
    assert (png.min(axis=-1) < 0.9).mean() > 0.65


def test_an_image_to_video_sheet_shows_its_conditioning_image_first():
    import numpy as np
    from PIL import Image

    from training.report import sheet_figure

    height, width = 60, 90
    ys, xs = np.mgrid[0:height * 2, 0:width * 2]  # the image at twice the video's size: shown resized to it
    image = Image.fromarray(np.stack([xs * 255 // (width * 2), ys * 255 // (height * 2), 255 - xs * 255 // (width * 2)],
                                     axis=-1).astype("uint8"))
    videos = _videos(9, height, width)
    tiles, _, _, pixels = _drawn(sheet_figure(videos, ["a cat", "a dog"], images=[image, image]))
    assert [gid for gid, _ in tiles] == ["image", "frame", "frame", "frame", "frame"] * 2
    for row in (0, 5):
        first = tiles[row][1]
        assert first.x0 == min(box.x0 for _, box in tiles[row:row + 5])
        top = pixels.shape[0] - round(first.y1)  # pixels count rows from the top
        crop = pixels[top:top + round(first.height), round(first.x0):round(first.x0) + round(first.width)]
        shown = np.asarray(Image.fromarray((crop * 255).round().astype("uint8")).resize((width, height))) / 255.0
        expected = np.asarray(image.resize((width, height), Image.BICUBIC)) / 255.0
        upper = slice(0, height * 2 // 3)  # the label sits in the lower left corner
        assert np.abs(shown[upper] - expected[upper]).mean() < 0.03
        assert np.abs(shown[upper] - videos[row // 5][0][upper]).mean() > 0.1  # not the first frame
