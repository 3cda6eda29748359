"""The shell entry points users edit: their commands must parse with our flags."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, run_trainer, tiny_run_config

from training.args import build_parser, parse_args
from training.prepare_dataset import build_parser as build_prepare_parser


def _run_script(script, cwd=ROOT, timeout=60, **env):
    """Run a top-level script with these environment settings added (None removes one)."""
    environment = {name: value for name, value in dict(os.environ, **env).items() if value is not None}
    return subprocess.run(
        ["bash", str(ROOT / script)], capture_output=True, text=True, timeout=timeout, env=environment, cwd=cwd,
    )


def _dry_run(script, cwd=ROOT, stderr=None, **env):
    result = _run_script(script, cwd=cwd, DRY_RUN="1", **env)
    assert result.returncode == 0, result.stderr
    if stderr is not None:
        stderr.append(result.stderr)
    return [shlex.split(line) for line in result.stdout.splitlines() if ".py" in line]


def _script_args(command):
    (position,) = [i for i, word in enumerate(command) if word.endswith(".py")]
    return command[position + 1 :]


def test_sweep_script_commands_parse(tmp_path):
    commands = _dry_run("train_text_to_video_lora.sh", DATA_ROOT=str(tmp_path))
    assert len(commands) == 4  # 2 learning rates x 1 schedule x 2 optimizers x 1 step count
    outputs = set()
    for command in commands:
        args = build_parser().parse_args(_script_args(command))
        assert args.load_tensors and args.data_root == str(tmp_path) and args.rank == 128
        assert len(args.validation_prompt.split(args.validation_prompt_separator)) == 2
        outputs.add(args.output_dir)
    assert len(outputs) == 4  # one output folder per setting


def test_sweep_script_overrides_from_environment(tmp_path):
    commands = _dry_run(
        "train_text_to_video_lora.sh", LOAD_TENSORS="0", DATA_ROOT=str(tmp_path), LEARNING_RATES="3e-4",
        OPTIMIZERS="adamw", EXTRA_ARGS="--checkpoints_total_limit 2",
    )
    (command,) = commands
    args = build_parser().parse_args(_script_args(command))
    assert not args.load_tensors and args.learning_rate == 3e-4 and args.checkpoints_total_limit == 2


@pytest.mark.parametrize("script", ["train_text_to_video_lora.sh", "train_text_to_video_sft.sh",
                                    "train_image_to_video_lora.sh", "train_image_to_video_sft.sh"])
def test_sp_size_turns_sequence_parallelism_on(script, tmp_path):
    for command in _dry_run(script, DATA_ROOT=str(tmp_path), SP_SIZE="4", GPU_IDS="0,1,2,3,4,5,6,7"):
        args = build_parser().parse_args(_script_args(command))
        assert args.enable_sequence_parallelism and args.sequence_parallel_shards == 4
    for command in _dry_run(script, DATA_ROOT=str(tmp_path)):
        assert "--enable_sequence_parallelism" not in command  # SP_SIZE=1, the default: off
    result = _run_script(script, DRY_RUN="1", DATA_ROOT=str(tmp_path), SP_SIZE="two")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == \
        "error: SP_SIZE must be a whole number of processes per sample (1: off), got 'two'"


@pytest.mark.parametrize("num_gpus, launcher", [("1", "python"), ("4", "torchrun")])
def test_prepare_script_command_parses(num_gpus, launcher):
    (command,) = _dry_run("prepare_dataset.sh", NUM_GPUS=num_gpus)
    assert command[0] == launcher
    args = build_prepare_parser().parse_args(_script_args(command))
    assert args.save_latents_and_embeddings and args.id_token == "BW_STYLE"


def _launch_option(command, name):
    return command[command.index(name) + 1]


# Upstream's defaults for each sweep script (a-r-r-o-w/cogvideox-factory at 80d1150), as parsed flags.
COMMON = dict(
    height_buckets=[480], width_buckets=[720], lr_scheduler="cosine_with_restarts", train_batch_size=1,
    dataloader_num_workers=8, pin_memory=True, seed=42, mixed_precision="bf16", lr_num_cycles=1,
    gradient_checkpointing=True, enable_slicing=True, enable_tiling=True, beta1=0.9, beta2=0.95,
    weight_decay=0.001, max_grad_norm=1.0, allow_tf32=True, report_to="wandb", nccl_timeout=1800,
)
EXPECTED = {
    "train_text_to_video_lora.sh": dict(
        trainer="cogvideox_text_to_video_lora.py", runs=4, config="accelerate_configs/uncompiled_1.yaml", gpus="0",
        pretrained_model_name_or_path="THUDM/CogVideoX-5b", id_token="BW_STYLE", caption_column="prompts.txt",
        frame_buckets=[49], max_num_frames=49, rank=128, lora_alpha=128, max_train_steps=3000, validation_epochs=10,
        checkpointing_steps=1000, gradient_accumulation_steps=1, lr_warmup_steps=400, load_tensors=True,
        enable_model_cpu_offload=True,
    ),
    "train_text_to_video_sft.sh": dict(
        trainer="cogvideox_text_to_video_sft.py", runs=1, config="accelerate_configs/uncompiled_1.yaml", gpus="0",
        pretrained_model_name_or_path="THUDM/CogVideoX-5b", id_token=None, caption_column="captions.txt",
        data_root="data/tom-and-jerry", frame_buckets=[49], max_num_frames=49, learning_rate=1e-4, optimizer="adamw",
        max_train_steps=20000, validation_epochs=1, checkpointing_steps=2000, gradient_accumulation_steps=4,
        lr_warmup_steps=800, load_tensors=False, enable_model_cpu_offload=False,
    ),
    "train_image_to_video_lora.sh": dict(
        trainer="cogvideox_image_to_video_lora.py", runs=4, config="accelerate_configs/uncompiled_1.yaml", gpus="0",
        pretrained_model_name_or_path="THUDM/CogVideoX-5b-I2V", id_token="BW_STYLE", caption_column="prompt.txt",
        data_root="data/disney", frame_buckets=[49], max_num_frames=49, rank=128, lora_alpha=128,
        noised_image_dropout=0.05, max_train_steps=3000, checkpointing_steps=1000, gradient_accumulation_steps=1,
        lr_warmup_steps=400, load_tensors=False, enable_model_cpu_offload=False,
    ),
    "train_image_to_video_sft.sh": dict(
        trainer="cogvideox_image_to_video_sft.py", runs=1, config="accelerate_configs/deepspeed.yaml", gpus="0,1",
        pretrained_model_name_or_path="THUDM/CogVideoX1.5-5B-I2V", id_token="BW_STYLE", caption_column="prompt.txt",
        data_root="data/disney", frame_buckets=[77], max_num_frames=77, noised_image_dropout=0.05,
        learning_rate=1e-4, optimizer="adamw", max_train_steps=20000, checkpointing_steps=2000,
        gradient_accumulation_steps=4, lr_warmup_steps=800, load_tensors=False, enable_model_cpu_offload=False,
    ),
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_every_sweep_script_carries_upstream_defaults(script, tmp_path):
    expected = dict(EXPECTED[script])
    trainer, runs = expected.pop("trainer"), expected.pop("runs")
    config, gpus = expected.pop("config"), expected.pop("gpus")
    env = {"DATA_ROOT": str(tmp_path)} if expected["load_tensors"] else {}
    commands = _dry_run(script, **env)
    assert len(commands) == runs
    outputs = set()
    for command in commands:
        assert command[:2] == ["accelerate", "launch"]
        assert _launch_option(command, "--config_file") == config and _launch_option(command, "--gpu_ids") == gpus
        (trainer_path,) = [word for word in command if word.endswith(".py")]
        assert trainer_path == f"training/{trainer}" and (ROOT / trainer_path).is_file()
        args = build_parser().parse_args(_script_args(command))
        for name, value in {**COMMON, **expected}.items():
            assert getattr(args, name) == value, name
        if "lora" not in trainer:
            assert "--rank" not in command and "--lora_alpha" not in command
        if "image_to_video" in trainer:
            assert args.validation_prompt is None and args.validation_images is None  # no images given
        else:
            assert len(args.validation_prompt.split(args.validation_prompt_separator)) == 2
        outputs.add(args.output_dir)
    assert len(outputs) == runs
    assert len({Path(output).name.split("__")[0] for output in outputs}) == 1


def test_sweep_scripts_write_to_separate_output_folders():
    names = set()
    for script in EXPECTED:
        (command, *_) = _dry_run(script, LEARNING_RATES="1e-4", OPTIMIZERS="adamw", MAX_TRAIN_STEPS="10")
        names.add(Path(_launch_option(command, "--output_dir")).name)
    assert len(names) == len(EXPECTED)


@pytest.mark.parametrize("script", ["train_image_to_video_lora.sh", "train_image_to_video_sft.sh"])
def test_image_to_video_validation_images(script, tmp_path):
    stderr = []
    (command, *_) = _dry_run(script, stderr=stderr)
    assert "--validation_prompt" not in command and "VALIDATION_IMAGES is empty" in stderr[0]

    (tmp_path / "first.png").write_bytes(b"")
    (tmp_path / "second.png").write_bytes(b"")
    # Relative paths are taken from the directory the script is run from.
    commands = _dry_run(script, cwd=tmp_path, stderr=stderr, VALIDATION_IMAGES="first.png:::second.png")
    for command in commands:
        args = build_parser().parse_args(_script_args(command))
        prompts = args.validation_prompt.split(args.validation_prompt_separator)
        images = args.validation_images.split(args.validation_prompt_separator)
        assert images == [str(tmp_path / "first.png"), str(tmp_path / "second.png")]
        assert len(prompts) == len(images) and all(prompt.startswith("BW_STYLE ") for prompt in prompts)
    assert "VALIDATION_IMAGES is empty" not in stderr[1]


def test_image_to_video_image_problems_are_left_to_the_trainer(capsys, tiny_models, tmp_path):
    """One image for two prompts, and that image missing: the script passes VALIDATION_IMAGES on as given (a check of
    its own could only drift from the trainer's), and the trainer refuses it, one `error:` line per problem."""
    missing = tmp_path / "missing.png"
    stderr = []
    (command,) = _dry_run(
        "train_image_to_video_sft.sh", stderr=stderr, MODEL_PATH=tiny_models("1.5-i2v"),
        OUTPUT_ROOT=str(tmp_path / "outputs"), VALIDATION_IMAGES=str(missing),
    )
    assert stderr == [""]
    argv = _script_args(command)
    assert _launch_option(argv, "--validation_images") == str(missing)
    from training.cogvideox_image_to_video_sft import main

    with pytest.raises(SystemExit) as exit_info:
        run_trainer(argv, main=main)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert any("2 validation prompts but 1 validation images" in line for line in errors), errors
    assert any(f"--validation_images: no such file {missing}" in line for line in errors), errors
    assert not (tmp_path / "outputs").exists()


@pytest.fixture()
def fake_accelerate(tmp_path):
    """An ACCELERATE_BIN that records its environment (env.txt) and arguments (args.txt) and succeeds."""
    launcher = tmp_path / "accelerate"
    launcher.write_text(
        '#!/usr/bin/env bash\n'
        'echo "$TOKENIZERS_PARALLELISM $OMP_NUM_THREADS $NCCL_P2P_DISABLE $WANDB_MODE" >"$(dirname "$0")/env.txt"\n'
        'printf "%s\\n" "$@" >"$(dirname "$0")/args.txt"\n'
    )
    launcher.chmod(0o755)
    return launcher


def _launched_args(launcher):
    return build_parser().parse_args(_script_args((launcher.parent / "args.txt").read_text().splitlines()))


def test_image_to_video_sft_environment_and_deepspeed_accumulation(fake_accelerate):
    unset = dict.fromkeys(["TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "NCCL_P2P_DISABLE", "WANDB_MODE"])
    result = _run_script(
        "train_image_to_video_sft.sh", ACCELERATE_BIN=str(fake_accelerate), TRAIN_BATCH_SIZE="2",
        GRADIENT_ACCUMULATION_STEPS=None, **unset,
    )
    assert result.returncode == 0, result.stderr
    assert (fake_accelerate.parent / "env.txt").read_text().split() == ["true", "16", "0", "offline"]
    args = _launched_args(fake_accelerate)
    # deepspeed.yaml with upstream's accumulation of 4: the trainer supports it, so the script launches it.
    assert args.train_batch_size == 2 and args.gradient_accumulation_steps == 4


@pytest.mark.parametrize("config", ["accelerate_configs/deepspeed.yaml", "accelerate_configs/deepspeed_zero3.yaml"])
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_deepspeed_with_gradient_accumulation_is_not_refused(script, config):
    stderr = []
    commands = _dry_run(script, stderr=stderr, ACCELERATE_CONFIG_FILE=config, GRADIENT_ACCUMULATION_STEPS="4")
    assert "warning" not in stderr[0] and "DeepSpeed" not in stderr[0], stderr[0]
    assert commands
    for command in commands:
        assert _launch_option(command, "--config_file") == str(ROOT / config)
        position = command.index("--gradient_accumulation_steps")
        assert command[position : position + 2] == ["--gradient_accumulation_steps", "4"]
        assert build_parser().parse_args(_script_args(command)).gradient_accumulation_steps == 4


def test_missing_manifest_is_left_to_the_trainer(fake_accelerate, tmp_path):
    """LOAD_TENSORS=1 on a folder without manifest.json: the trainer reports it (tests/test_args.py), the script
    launches it with --load_tensors and warns about nothing, also under DRY_RUN=1."""
    unprepared = tmp_path / "unprepared"
    unprepared.mkdir()
    env = dict(LOAD_TENSORS="1", DATA_ROOT=str(unprepared), LEARNING_RATES="1e-4", OPTIMIZERS="adamw")
    stderr = []
    (command,) = _dry_run("train_text_to_video_lora.sh", stderr=stderr, **env)
    assert stderr == [""]
    result = _run_script("train_text_to_video_lora.sh", ACCELERATE_BIN=str(fake_accelerate), **env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    args = _launched_args(fake_accelerate)
    assert args.load_tensors and args.data_root == str(unprepared)


def test_the_sweeps_launch_quietly_so_a_trainer_error_stands_alone(tiny_model_2b, tmp_path):
    """Every sweep launches `accelerate launch --quiet`: a refused flag shows the trainer's `error:` line only, not
    accelerate's CalledProcessError traceback under it."""
    for script in sorted(EXPECTED):
        (command,) = _dry_run(script, DATA_ROOT=str(tmp_path), LEARNING_RATES="1e-4", OPTIMIZERS="adamw")
        assert command[1:3] == ["launch", "--quiet"], command[:4]
    launch = [str(ROOT / ".venv" / "bin" / "accelerate"), "launch", "--quiet", "--config_file",
              str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "training" / "cogvideox_text_to_video_lora.py"),
              "--pretrained_model_name_or_path", tiny_model_2b, "--data_root", str(tmp_path), "--output_dir",
              str(tmp_path / "out"), "--train_batch_size", "0"]
    # OMP_NUM_THREADS set, as the sweeps do: else accelerate's CPU launcher adds a note about threads.
    result = subprocess.run(launch, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and lines and all(line.startswith("error: ") for line in lines), result.stderr


def test_a_failing_launch_shows_only_the_trainer_errors(tmp_path):
    """Under several processes the launcher is torchrun, whose ChildFailedError summary `--quiet` does not silence:
    the sweep passes the launch's stderr through scripts/launch_errors_only.py, which keeps progress bars and log lines
    as they come and drops what follows the trainer's `error:` lines (once each, from any number of ranks)."""
    launcher = tmp_path / "accelerate"
    launcher.write_text(
        "#!/usr/bin/env bash\n"
        "printf 'INFO loading\\nsteps: 1/2\\rsteps: 2/2\\n' >&2\n"
        "for rank in 0 1; do echo 'error: loss became nan at step 2; stopping' >&2; done\n"
        "printf 'Traceback (most recent call last):\\n  File \"run.py\"\\nChildFailedError:\\n======\\n' >&2\n"
        "exit 1\n"
    )
    launcher.chmod(0o755)
    result = _run_script("train_text_to_video_lora.sh", ACCELERATE_BIN=str(launcher), DATA_ROOT=str(tmp_path),
                         LEARNING_RATES="1e-4", OPTIMIZERS="adamw")
    assert result.returncode == 1
    # (text mode reads the progress bar's \r as a line end)
    assert result.stderr == "INFO loading\nsteps: 1/2\nsteps: 2/2\nerror: loss became nan at step 2; stopping\n"
    assert "finished" not in result.stdout  # the sweep stops at the failed run


@pytest.mark.parametrize("tracker", ["tensorboard", "none"])
def test_report_to_chooses_the_sweeps_tracker(tracker):
    """README: the sweeps log to wandb unless REPORT_TO says otherwise."""
    (default,) = {tuple(_script_args(c)[_script_args(c).index("--report_to") + 1:][:1])
                  for c in _dry_run("train_text_to_video_lora.sh")}
    assert default == ("wandb",)
    commands = _dry_run("train_text_to_video_lora.sh", REPORT_TO=tracker)
    assert commands
    for command in commands:
        args = _script_args(command)
        assert args[args.index("--report_to") + 1] == tracker


@pytest.mark.parametrize("script", ["train_text_to_video_lora.sh", "train_text_to_video_sft.sh"])
def test_a_sweep_over_a_config_takes_only_the_settings_you_set(script, tmp_path):
    """CONFIG=run.toml: the file's values, overridden by what you set in the environment (the grid's lists among
    them: one run per value, each in its own folder); the script's defaults do not apply."""
    config = tiny_run_config(tmp_path / "run.toml", "some/model", tmp_path / "from-config")
    commands = _dry_run(script, CONFIG=str(config), LEARNING_RATES="1e-4 3e-4", RANK="16", OUTPUT_ROOT=str(tmp_path))
    assert len(commands) == 2
    outputs = set()
    for command, rate in zip(commands, (1e-4, 3e-4)):
        args = parse_args(_script_args(command))
        assert args.learning_rate == rate and args.max_train_steps == 1 and args.optimizer == "adam"
        assert args.rank == (16 if "lora" in script else 8)  # the full fine-tune has no adapter: RANK is not passed
        assert not args.gradient_checkpointing and args.report_to is None  # no sweep default slipped in
        outputs.add(args.output_dir)
    assert outputs == {str(tmp_path / f"cogvideox-{'lora' if 'lora' in script else 'sft'}__learning-rate_{r}")
                       for r in ("1e-4", "3e-4")}
    (alone,) = _dry_run(script, CONFIG=str(config))
    assert parse_args(_script_args(alone)).output_dir == str(tmp_path / "from-config")


def test_a_sweep_runs_from_a_config(tiny_model_2b, tmp_path):
    output = tmp_path / "run"
    config = tiny_run_config(tmp_path / "run.toml", tiny_model_2b, output)
    result = _run_script("train_text_to_video_lora.sh", timeout=300, CONFIG=str(config), OMP_NUM_THREADS="2",
                         ACCELERATE_CONFIG_FILE=str(ROOT / "accelerate_configs" / "cpu.yaml"),
                         ACCELERATE_BIN=str(ROOT / ".venv" / "bin" / "accelerate"))
    assert result.returncode == 0, result.stderr
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    assert "rank = 8" in (output / "config.toml").read_text()
