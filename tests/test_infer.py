"""tools/infer.py and run_infer_*.sh: prompts shared out over processes, one mp4 per prompt named after it, a contact
sheet; a video is the same however many processes generate."""

import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT


PROMPTS = ["a cat walks on the grass", "a red car drives", "BW_STYLE a panda plays the guitar"]
TINY = ["--height", "32", "--width", "32", "--num_frames", "9", "--num_inference_steps", "2", "--dtype", "fp32"]


def frames_of(folder):
    from diffusers.utils import load_video

    return {path.name: np.asarray(load_video(str(path))) for path in sorted(folder.glob("*.mp4"))}


@pytest.mark.slow  # a two-process launch
def test_prompts_shared_over_processes_and_videos_split_over_them_give_the_videos_of_one(trained_lora, tmp_path):
    from tools.infer import main

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = ["--model_name_or_path", trained_lora["model"], "--lora_path", trained_lora["output"], "--prompts_file",
            tmp_path / "prompts.txt", *TINY]
    main([str(a) for a in [*argv, "--output_dir", tmp_path / "one"]])
    one = frames_of(tmp_path / "one")
    assert list(one) == ["000_a-cat-walks-on-the-grass.mp4", "001_a-red-car-drives.mp4",
                         "002_bw-style-a-panda-plays-the-guitar.mp4"]
    assert (tmp_path / "one" / "sheet.png").is_file() and all(v.shape == (9, 32, 32, 3) for v in one.values())

    # Four processes: two groups share out the prompts, the two processes of a group split each video's tokens.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", ROOT / "tools" / "infer.py",
               *argv, "--sequence_parallel_shards", "2", "--output_dir", tmp_path / "four"]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Each group ran its videos sharded: one transformer call per denoising step (2), guidance batched in it.
    sharded = sorted(line for line in result.stdout.splitlines() if "transformer calls sharded" in line)
    assert sharded == ["group 0: 4 transformer calls sharded over 2 processes",
                       "group 1: 2 transformer calls sharded over 2 processes"], result.stdout[-2000:]
    four = frames_of(tmp_path / "four")
    assert four.keys() == one.keys() and all(np.array_equal(one[name], four[name]) for name in one)
    assert len({video.tobytes() for video in one.values()}) == 3  # three prompts, three different videos

    # The LoRA is applied: without it the same seed gives another video.
    main([str(a) for a in ["--model_name_or_path", trained_lora["model"], "--prompt", PROMPTS[0], *TINY,
                           "--output_dir", tmp_path / "base"]])
    assert not np.array_equal(frames_of(tmp_path / "base")["000_a-cat-walks-on-the-grass.mp4"],
                              one["000_a-cat-walks-on-the-grass.mp4"])


def test_each_video_is_seeded_by_its_place_in_the_prompt_list(tiny_model_2b, tmp_path):
    """Video i is generated with --seed + i: the same prompt listed twice gives two different videos, and the second is
    the video a run of that prompt alone at --seed + 1 gives (so a video does not depend on how the list is shared
    out over processes)."""
    from tools.infer import file_name, main

    prompt = PROMPTS[0]
    model = ["--model_name_or_path", tiny_model_2b, "--prompt", prompt, *TINY]
    main([str(a) for a in [*model, "--prompt", prompt, "--seed", "7", "--output_dir", tmp_path / "twice"]])
    main([str(a) for a in [*model, "--seed", "8", "--output_dir", tmp_path / "alone"]])
    twice, alone = frames_of(tmp_path / "twice"), frames_of(tmp_path / "alone")
    first, second = twice[file_name(0, prompt)], twice[file_name(1, prompt)]
    assert first.shape == second.shape == (9, 32, 32, 3) and not np.array_equal(first, second)
    assert np.array_equal(second, alone[file_name(0, prompt)])


def test_the_shell_scripts_run_the_tool_with_their_settings(tmp_path):
    from tools.infer import build_parser

    env = dict(os.environ, DRY_RUN="1", MODEL_NAME_OR_PATH="THUDM/CogVideoX-5b-I2V", LORA_PATH="outputs/my-lora",
               PROMPTS_FILE="prompts.txt", IMAGES_FILE="images.txt", H="480", W="720", F="49", NUM_GPUS="4",
               OUTPUT_DIR=str(tmp_path / "videos"), STEPS="30", SP_SIZE="2")
    result = subprocess.run(["bash", str(ROOT / "run_infer_image_to_video.sh")], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    assert command[:5] == ["accelerate", "launch", "--num_processes", "4", "--multi_gpu"]
    args = build_parser().parse_args(command[command.index("tools/infer.py") + 1:])
    assert (args.height, args.width, args.num_frames, args.num_inference_steps) == (480, 720, 49, 30)
    assert args.sequence_parallel_shards == 2
    assert args.lora_path == str(tmp_path / "outputs/my-lora") and args.images_file == str(tmp_path / "images.txt")
    missing = subprocess.run(["bash", str(ROOT / "run_infer_image_to_video.sh")], capture_output=True, text=True,
                             env={k: v for k, v in env.items() if not k.startswith("IMAGES")}, timeout=60)
    assert missing.returncode == 1 and "set IMAGE or IMAGES_FILE" in missing.stderr


def test_mismatched_images_are_one_line_before_any_model_loads(capsys, tmp_path):
    from tools.infer import main

    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        main(["--model_name_or_path", str(tmp_path / "no-model"), "--prompt", "one", "--prompt", "two",
              "--prompt", "three", "--image", str(tmp_path / "a.png"), "--image", str(tmp_path / "a.png")])
    assert exit_.value.code == 2
    assert "2 --image for 3 prompts: give one, or one per prompt" in capsys.readouterr().err


@pytest.mark.parametrize("variant, expected", [("1.5", (768, 1360)), ("2b", (64, 64))])
def test_without_a_size_a_model_generates_at_the_size_it_was_trained_at(tiny_models, variant, expected):
    """CogVideoX 1.5's config holds its rotary grid's cap (300 latent px): the pipelines' default made 2400 x 2400
    videos. It was trained at 768 x 1360; 2b/5b at their sample size (the tiny 2b's: 8 latent px, 64 px)."""
    from types import SimpleNamespace

    from diffusers import CogVideoXTransformer3DModel
    from diffusers.configuration_utils import FrozenDict

    from tools.infer import InferFlags, build_parser, generate
    from training.sections import section_of

    config = CogVideoXTransformer3DModel.load_config(tiny_models(variant), subfolder="transformer")
    calls = []

    class Pipeline:
        transformer = SimpleNamespace(config=FrozenDict(config))  # what a loaded pipeline's transformer has
        vae_scale_factor_spatial = 8

        def __call__(self, prompt, **kwargs):
            calls.append(kwargs)
            return SimpleNamespace(frames=[None])

    args = build_parser().parse_args(["--model_name_or_path", tiny_models(variant), "--prompt", "a cat"])
    generate(Pipeline(), section_of(InferFlags, args), "a cat", {}, 0)
    assert (calls[0]["height"], calls[0]["width"]) == expected
    args = build_parser().parse_args(["--model_name_or_path", "m", "--prompt", "a cat", "--height", "32", "--width", "48"])
    generate(Pipeline(), section_of(InferFlags, args), "a cat", {}, 0)
    assert (calls[1]["height"], calls[1]["width"]) == (32, 48)


def test_an_image_to_video_sheet_starts_each_row_with_its_image(tiny_models, first_frame_png, tmp_path, monkeypatch):
    """sheet.png of an image-to-video run: each row's conditioning image first (training/report.py's layout is
    tested in tests/test_report.py)."""
    from PIL import Image

    import training.report
    from tools.infer import main

    sheets, contact_sheet = [], training.report.contact_sheet
    monkeypatch.setattr(training.report, "contact_sheet", lambda *args, **kwargs: sheets.append(kwargs) or
                        contact_sheet(*args, **kwargs))
    main([str(a) for a in ["--model_name_or_path", tiny_models("5b-i2v"), "--prompt", PROMPTS[0], "--image",
                           first_frame_png, *TINY, "--height", "64", "--width", "64", "--output_dir", tmp_path]])
    (images,) = [sheet["images"] for sheet in sheets]
    assert len(images) == 1 and np.array_equal(np.asarray(images[0]), np.asarray(Image.open(first_frame_png)))
    assert (tmp_path / "sheet.png").is_file()


def test_fun_models_generate_with_their_inputs_as_their_pipelines_do(monkeypatch, tiny_fun_inp, first_frame_png,
                                                                      tmp_path):
    """A Fun InP model (2C + 1 channels) is recognised and generates from --image and --end_image through the inpaint
    pipeline with DDIM; a Fun Control model (2C, given --control_video) through CogVideoXFunControlPipeline, following
    the control video's first --num_frames frames: each video equals that pipeline's own at the same seed."""
    import diffusers.utils
    import numpy as np
    import torch
    from diffusers import CogVideoXFunControlPipeline, DDIMScheduler
    from diffusers.utils import load_image, load_video

    from tools.build_tiny_model import save_tiny_model
    from tools.infer import main
    from training.fun_inpaint_pipeline import CogVideoXFunInpaintPipeline

    control_model = save_tiny_model(tmp_path / "fun-control", "2b", seed=12, transformer={"in_channels": 8})
    control_video = str(ROOT / "assets" / "tests" / "videos" / "waves.mp4")
    written, export = {}, diffusers.utils.export_to_video
    monkeypatch.setattr(diffusers.utils, "export_to_video",
                        lambda frames, path, **kwargs: written.setdefault(path, np.stack(frames)) is None or
                        export(frames, path, **kwargs))
    common = ["--height", "32", "--width", "32", "--num_frames", "9", "--num_inference_steps", "2", "--dtype", "fp32",
              "--seed", "3"]
    main([str(a) for a in ["--model_name_or_path", tiny_fun_inp, "--prompt", "waves", "--image", first_frame_png,
                           "--end_image", first_frame_png, *common, "--output_dir", tmp_path / "inp"]])
    main([str(a) for a in ["--model_name_or_path", control_model, "--prompt", "waves", "--control_video",
                           control_video, *common, "--output_dir", tmp_path / "control"]])

    expected = {}
    for name, pipeline_class, model, inputs in (
            ("inp", CogVideoXFunInpaintPipeline, tiny_fun_inp,
             {"image": load_image(first_frame_png), "end_image": load_image(first_frame_png), "num_frames": 9}),
            ("control", CogVideoXFunControlPipeline, control_model, {"control_video": load_video(control_video)[:9]})):
        pipe = pipeline_class.from_pretrained(model)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        expected[name] = pipe(prompt="waves", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                              generator=torch.Generator().manual_seed(3), output_type="np", **inputs).frames[0]
    for name in ("inp", "control"):
        frames = written[str(tmp_path / name / "000_waves.mp4")]
        # the same video; the tool decodes through oneDNN on a CPU (training/models.py), rounding differently
        assert frames.shape == (9, 32, 32, 3) and np.abs(frames - expected[name]).max() < 1e-4


@pytest.mark.parametrize("model, flags, expected", [
    ("inp", [], "a fun-inpaint model (9 input channels) needs --image"),
    ("2b", ["--end_image", "IMAGE"], "--end_image: a text-to-video model (4 input channels) takes none"),
    ("2b", ["--control_video", "VIDEO"], "--control_video: a text-to-video model (4 input channels) takes none"),
    ("inp", ["--image", "IMAGE", "--control_video", "VIDEO"], "--control_video: a fun-inpaint model (9 input"),
    ("control", ["--control_video", "VIDEO", "--num_frames", "49"], "waves.mp4 has 17 frames; the videos have 49"),
], ids=["inp-without-image", "end-image-on-t2v", "control-on-t2v", "control-on-inp", "control-video-too-short"])
def test_inputs_a_model_cannot_take_are_one_line_before_it_loads(capsys, tiny_fun_inp, tiny_model_2b,
                                                                  first_frame_png, tmp_path, model, flags, expected):
    from tools.infer import main

    values = {"IMAGE": first_frame_png, "VIDEO": str(ROOT / "assets" / "tests" / "videos" / "waves.mp4")}
    models = {"inp": tiny_fun_inp, "2b": tiny_model_2b}
    if model == "control":
        from tools.build_tiny_model import save_tiny_model

        models["control"] = save_tiny_model(tmp_path / "fun-control", "2b", seed=12, transformer={"in_channels": 8})
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in ["--model_name_or_path", models[model], "--prompt", "waves",
                               *(values.get(f, f) for f in flags), "--output_dir", tmp_path / "out"]])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert any(expected in line for line in lines) and not (tmp_path / "out").exists(), lines
