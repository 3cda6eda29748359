"""Shared fixtures: tiny random CogVideoX pipelines built offline, the bundled clips, and
helpers that run the real entry points in this process (imports are paid once)."""

import shutil
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ASSETS = ROOT / "assets" / "tests"

# Small settings that suit the tiny models and the bundled clips (9-17 frames, 32-128 px).
TINY_DATA_FLAGS = [
    "--height_buckets", "32", "48", "64",
    "--width_buckets", "32", "64", "96",
    "--frame_buckets", "5", "9",
    "--max_num_frames", "9",
]
TINY_VALIDATION_FLAGS = ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--validation_num_frames", "9"]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """tiny_models("5b-i2v") -> path of a tiny pipeline of that variant, built once per session."""
    from tools.build_tiny_model import VARIANTS, save_tiny_model

    built = {}

    def get(variant):
        if variant not in built:
            built[variant] = str(save_tiny_model(tmp_path_factory.mktemp(f"tiny-{variant}"), variant=variant, seed=sorted(VARIANTS).index(variant)))
        return built[variant]

    return get


@pytest.fixture(scope="session")
def tiny_model_2b(tiny_models):
    return tiny_models("2b")


@pytest.fixture(scope="session")
def tiny_model_5b(tiny_models):
    return tiny_models("5b")


@pytest.fixture(scope="session")
def first_frame_png(tmp_path_factory):
    """A validation image: the first frame of one bundled clip."""
    import imageio.v3 as iio

    path = tmp_path_factory.mktemp("images") / "first.png"
    iio.imwrite(path, iio.imread(ASSETS / "videos" / "square.mp4")[0])
    return str(path)


@pytest.fixture()
def clips(tmp_path):
    """A private copy of the bundled clips (tests may add broken files to it)."""
    target = tmp_path / "data"
    shutil.copytree(ASSETS, target)
    return target


def run_trainer(argv, main=None):
    if main is None:
        from training.cogvideox_text_to_video_lora import main
    reset_accelerate()
    try:
        return main([str(a) for a in argv])
    finally:
        reset_accelerate()


def run_prepare(argv):
    from training.prepare_dataset import main

    return main([str(a) for a in argv])


def lora_argv(model, data_root, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", model,
        "--data_root", data_root,
        "--caption_column", "prompts.txt",
        "--video_column", "videos.txt",
        *TINY_DATA_FLAGS,
        "--output_dir", output_dir,
        "--train_batch_size", "2",
        "--rank", "4",
        "--lora_alpha", "8",
        "--learning_rate", "1e-2",
        "--lr_warmup_steps", "0",
        "--seed", "7",
        *extra,
    ]


@pytest.fixture(scope="session")
def trained_lora(tiny_model_2b, tmp_path_factory):
    """One real training run (raw videos, validation every 2 steps) shared by several tests."""
    output = tmp_path_factory.mktemp("trained-lora")
    summary = run_trainer(
        lora_argv(
            tiny_model_2b, ASSETS, output,
            "--max_train_steps", "4",
            "--checkpointing_steps", "2",
            "--validation_prompt", "a cat walks on the grass:::a red car drives",
            "--validation_steps", "2",
            *TINY_VALIDATION_FLAGS,
        )
    )
    return {"model": tiny_model_2b, "output": Path(output), "summary": summary}
