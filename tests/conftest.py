"""Shared fixtures: tiny random CogVideoX pipelines built offline, the bundled clips, and
helpers that run the real entry points in this process (imports are paid once)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# First, as a trainer's process imports it: bitsandbytes and torchao stay hidden until an option asks for them
# (training/optional_libraries.py), so every test runs the code paths that must bring them in.
import training  # noqa: E402, F401


ASSETS = ROOT / "assets" / "tests"

# Small settings that suit the tiny models and the bundled clips (9-17 frames, 32-128 px).
TINY_DATA_FLAGS = [
    "--height_buckets", "32", "48", "64",
    "--width_buckets", "32", "64", "96",
    "--frame_buckets", "5", "9",
    "--max_num_frames", "9",
]
TINY_VALIDATION_FLAGS = ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--validation_num_frames", "9"]


# Sized for the bundled clips (32-128 px, 9-17 frames) and the tiny models. Each line: resolution -> frames ->
# [keep_prob, batch_size]; 1 holds still images. A clip takes the most frames it has at a resolution (32x32 has no
# 9: its clips train 5 frames there).
BUCKET_YAML = """\
bucket_config:
  "64x96": {9: [1.0, 1], 5: [1.0, 2]}
  "48x64": {9: [1.0, 2], 5: [1.0, 3], 1: [1.0, 4]}
  "32x32": {5: [1.0, 2], 1: [1.0, 2]}
"""


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch computes on its share of the CPU cores: workers x torch's default
    threads (one per core) would contend for the cores. Set here, not through OMP_NUM_THREADS: the processes that
    tests launch (trainers under torchrun, killed runs) keep their own default."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(items):
    """Slow tests first (stable otherwise): spread over the CPU cores by pytest-xdist, the long multi-process runs
    start at once and the quick tests fill the gaps, instead of the longest starting last. Of the slow tests, those
    that need DeepSpeed's compiled CPU Adam come last: it compiles in the background meanwhile."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 DEEPSPEED_CPU_ADAM_FIXTURE in getattr(item, "fixturenames", ())))
    if any(DEEPSPEED_CPU_ADAM_FIXTURE in getattr(item, "fixturenames", ()) for item in items):
        start_compiling_deepspeed_cpu_adam()


# DeepSpeed JIT-compiles its CPU Adam, which steps the shipped configs' offloaded optimizer, on first use into
# torch's extension cache (~/.cache/torch_extensions): about 2 minutes of 2 cores on a fresh machine, then cached.
DEEPSPEED_CPU_ADAM_FIXTURE = "deepspeed_cpu_adam"


def compile_deepspeed_cpu_adam():
    """Compile (or load from the cache) CPU Adam as DeepSpeed's runtime does, through its accelerator's builder. A
    process that finds another one compiling waits for it on torch's build lock."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("CPUAdamBuilder").load()


@pytest.fixture(scope="session")
def deepspeed_cpu_adam():
    """DeepSpeed's CPU Adam, compiled and cached (by the background compile started at collection, or here)."""
    compile_deepspeed_cpu_adam()


def start_compiling_deepspeed_cpu_adam():
    """Compile CPU Adam in a background process at the lowest priority, so that the compiler takes the CPU time the
    tests leave idle; the tests that need it come last and wait for it in `deepspeed_cpu_adam`. Only one
    pytest-xdist worker starts it; nothing starts once the op is in the cache."""
    import importlib.util
    import tempfile

    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0" or importlib.util.find_spec("deepspeed") is None:
        return
    if cpu_adam_compiled():
        return
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import conftest; conftest.compile_deepspeed_cpu_adam()"
    with open(os.path.join(tempfile.gettempdir(), "cogvideox-factory-deepspeed-cpu-adam.log"), "w") as log:
        subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                         start_new_session=True, preexec_fn=lambda: os.nice(19))


def cpu_adam_compiled():
    """Whether DeepSpeed's CPU Adam is in torch's extension cache, where DeepSpeed's JIT build puts it."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        accelerator = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{python}_{accelerator}")  # as torch.utils.cpp_extension
    return os.path.isfile(os.path.join(root, "cpu_adam", "cpu_adam.so"))


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
def tiny_fun_inp(tmp_path_factory):
    """A tiny CogVideoX-Fun-2b-InP: a 2b-shaped pipeline whose transformer takes 2C + 1 channels (33 in the released
    model, 9 for the tiny VAE's 4 latent channels) and adds noise to the masked clip (add_noise_in_inpaint_model)."""
    import json

    from tools.build_tiny_model import save_tiny_model

    path = tmp_path_factory.mktemp("CogVideoX-Fun-2b-InP")
    save_tiny_model(path, "2b", seed=11, transformer={"in_channels": 9})
    config_file = path / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "add_noise_in_inpaint_model": True}))
    return path


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


def stopped_run_stderr(capsys, argv, main=None):
    """The stderr lines of a trainer run that must stop on its flags (exit status 2) before anything trains."""
    with pytest.raises(SystemExit) as stop:
        run_trainer(argv, main)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def trainer_main(name):
    """The `main` of an entry point, e.g. trainer_main("cogvideox_text_to_video_sft")."""
    import importlib

    return importlib.import_module(f"training.{name}").main


def run_prepare(argv):
    from training.prepare_dataset import main

    return main([str(a) for a in argv])


def tiny_run_config(path, model, output_dir, steps=1, learning_rate=0.01, rank=8):
    """A --config file of a LoRA run on the bundled clips (one 9x32x32 bucket); returns its path."""
    path.write_text(f'''[model]
pretrained_model_name_or_path = "{model}"
[data]
data_root = "{ASSETS}"
caption_column = "prompts.txt"
video_column = "videos.txt"
[buckets]
height_buckets = [32]
width_buckets = [32]
frame_buckets = [9]
[training]
output_dir = "{output_dir}"
max_train_steps = {steps}
learning_rate = {learning_rate}
mixed_precision = "no"
[lora]
rank = {rank}
lora_alpha = {rank}
''', encoding="utf-8")
    return path


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


def prepare_argv(model, data_root, output_dir, *extra, data_flags=TINY_DATA_FLAGS):
    """prepare_dataset.py's command line for the bundled layout (prompts.txt + videos.txt), latents and embeddings."""
    return [
        "--model_id", model,
        "--data_root", data_root,
        "--caption_column", "prompts.txt",
        "--video_column", "videos.txt",
        *data_flags,
        "--max_sequence_length", "16",
        "--save_latents_and_embeddings",
        "--output_dir", output_dir,
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def crashing_env(crash_at):
    """The environment of a run the crash hook kills at crash_at ("step:3"), with this process's torch threads: the
    run is resumed here and compared bit for bit, and sums split over other thread counts may round differently."""
    import torch

    return dict(os.environ, COGVIDEOX_FACTORY_CRASH_AT=crash_at, OMP_NUM_THREADS=str(torch.get_num_threads()))


def launch_on_cpu(runs, env_extra=None, timeout=420):
    """torchrun with two CPU processes (gloo): tests/launch_on_cpu.py runs each run (an entry point and its flags,
    optionally after `--env KEY=VALUE`) in turn in the same processes. Its stderr; a failed launch fails the test."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
               ROOT / "tests" / "launch_on_cpu.py"]
    for index, run in enumerate(runs):
        command += (["--then"] if index else []) + list(run)
    process = subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks
        raise
    assert process.returncode == 0, stderr[-3000:]
    return stderr


# ----------------------------------------------------------------------------------------------
# What a run wrote, and the pipelines that load it
# ----------------------------------------------------------------------------------------------


def lora_weights(output):
    from safetensors.torch import load_file

    return load_file(Path(output) / "pytorch_lora_weights.safetensors")


def transformer_weights(output):
    from safetensors.torch import load_file

    return load_file(Path(output) / "transformer" / "diffusion_pytorch_model.safetensors")


def trained_weights(output, trainer):
    """The artifact of an entry point's run: the transformer of a *_sft trainer, else the LoRA."""
    return transformer_weights(output) if trainer.endswith("sft") else lora_weights(output)


def tiny_pipeline(model, image_to_video=False):
    """The model's diffusers pipeline with the DPM scheduler the trainer validates with, quiet."""
    from diffusers import CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline, CogVideoXPipeline

    pipe = (CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline).from_pretrained(model)
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_output(transformer, timestep=10):
    """A transformer's output on fixed inputs (2b: sincos positions, no rotary)."""
    import torch

    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, 2, config.in_channels, 4, 4, generator=generator),
                           encoder_hidden_states=torch.randn(1, config.max_text_seq_length, config.text_embed_dim,
                                                             generator=generator),
                           timestep=torch.tensor([timestep]), return_dict=False)[0]


def generate(pipe, prompt="a cat walks on the grass", image=None, num_frames=9, seed=42):
    """A 32x32 video (frames as numpy) in two denoising steps; `image`: a path, for image-to-video."""
    import torch
    from PIL import Image

    kwargs = {"image": Image.open(image).convert("RGB")} if image else {}
    return pipe(
        prompt=prompt, height=32, width=32, num_frames=num_frames, num_inference_steps=2, max_sequence_length=16,
        generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs,
    ).frames[0]


@pytest.fixture()
def mixed_folder(tmp_path):
    """The bundled clips and three stills (png, jpg, webp) in one folder, each with its caption in a .txt beside it;
    and the bucket config."""
    import imageio.v3 as iio
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    captions = (ASSETS / "prompts.txt").read_text().splitlines()
    for caption, video in zip(captions, (ASSETS / "videos.txt").read_text().splitlines()):
        shutil.copy(ASSETS / video, folder / video.split("/")[-1])
        (folder / video.split("/")[-1]).with_suffix(".txt").write_text(caption + "\n")
    for name, clip, caption in (("still_a.png", "square", "a blue square, a still picture"),
                                ("still_b.jpg", "ball", "a red ball in the park, a photo"),
                                ("still_c.webp", "sunset", "birds above the mountains, a photo")):
        Image.fromarray(iio.imread(ASSETS / "videos" / f"{clip}.mp4")[2]).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(caption)
    (tmp_path / "bucket.yaml").write_text(BUCKET_YAML)
    return folder
