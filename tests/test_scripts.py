"""The shell entry points users edit: their commands must parse with our flags."""

import os
import shlex
import subprocess

import pytest

from conftest import ROOT
from training.args import build_parser
from training.prepare_dataset import build_parser as build_prepare_parser


def _dry_run(script, **env):
    result = subprocess.run(
        ["bash", str(ROOT / script)], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, DRY_RUN="1", **env), cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if ".py" in line]


def _script_args(command):
    (position,) = [i for i, word in enumerate(command) if word.endswith(".py")]
    return command[position + 1 :]


def test_sweep_script_commands_parse(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
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


@pytest.mark.parametrize("num_gpus, launcher", [("1", "python"), ("4", "torchrun")])
def test_prepare_script_command_parses(num_gpus, launcher):
    (command,) = _dry_run("prepare_dataset.sh", NUM_GPUS=num_gpus)
    assert command[0] == launcher
    args = build_prepare_parser().parse_args(_script_args(command))
    assert args.save_latents_and_embeddings and args.id_token == "BW_STYLE"
