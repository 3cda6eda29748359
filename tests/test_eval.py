"""Held-out evaluation loss: fixed noise and timesteps, so it is comparable over a run; it never disturbs training."""

import pytest
import torch
from conftest import ASSETS, lora_argv, run_trainer
from safetensors.torch import load_file


@pytest.mark.slow  # several runs with evaluation
def test_eval_loss_is_fixed_when_weights_are(tiny_model_2b, tmp_path):
    # lr 0: the weights never change, so every evaluation must give the very same number.
    summary = run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "frozen", "--max_train_steps", "4",
                                    "--learning_rate", "1e-30", "--eval_split", "0.34", "--eval_steps", "1"))
    losses = list(summary["eval_loss"].values())
    assert len(losses) == 4 and len(set(losses)) == 1 and losses[0] > 0

    summary = run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "trained", "--max_train_steps", "4",
                                    "--eval_split", "0.34", "--eval_steps", "2", "--report_to", "tensorboard"))
    assert sorted(summary["eval_loss"]) == [2, 4]
    assert summary["eval_loss"][4] != losses[0]  # training moved it
    events = b"".join(p.read_bytes() for p in (tmp_path / "trained" / "logs").rglob("events.out.tfevents.*"))
    assert b"eval_loss" in events

    # Evaluation never disturbs training: evaluating at every step (1-4) trains the weights of evaluating at 2 and 4.
    summary = run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "every-step", "--max_train_steps", "4",
                                    "--eval_split", "0.34", "--eval_steps", "1"))
    assert sorted(summary["eval_loss"]) == [1, 2, 3, 4]
    a = load_file(tmp_path / "trained" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "every-step" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_separate_held_out_list(tiny_model_2b, clips, tmp_path):
    (clips / "eval_prompts.txt").write_text("a red ball bounces in the park\nbirds fly above the mountains at sunset\n")
    (clips / "eval_videos.txt").write_text("videos/ball.mp4\nvideos/sunset.mp4\n")
    summary = run_trainer(lora_argv(tiny_model_2b, clips, tmp_path / "run", "--max_train_steps", "2",
                                    "--eval_video_column", "eval_videos.txt", "--eval_caption_column",
                                    "eval_prompts.txt", "--eval_steps", "1"))
    assert sorted(summary["eval_loss"]) == [1, 2] and all(v > 0 for v in summary["eval_loss"].values())


def test_held_out_list_flag_errors(capsys, tiny_model_2b, tmp_path):
    import pytest

    with pytest.raises(SystemExit):
        run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "run", "--eval_split", "0.2",
                              "--eval_video_column", "videos.txt"))
    err = capsys.readouterr().err
    assert "exclude each other" in err and "--eval_video_column needs --eval_caption_column" in err


def test_evaluation_runs_the_model_the_way_validation_does(monkeypatch):
    """Under FSDP1 only the root wrapper gathers the sharded weights: evaluation must run what validation runs
    (backend.model_for_inference), not the unwrapped module."""
    from types import SimpleNamespace

    import training.validation

    wrapper, inner = torch.nn.Module(), torch.nn.Module()
    backend = SimpleNamespace(device=torch.device("cpu"), unwrap=lambda model: inner,
                              model_for_inference=lambda model: wrapper, reduce_mean=lambda tensor: tensor)
    ran = []
    monkeypatch.setattr(training.validation, "compute_loss",
                        lambda model, *args, **kwargs: ran.append(model) or torch.tensor(1.0))
    args = SimpleNamespace(eval_timesteps=[100, 500], seed=0)
    loss = training.validation.evaluate("prepared model", [{"batch": 0}], None, None, backend, args.eval_timesteps,
                                        args.seed)
    assert loss == 1.0 and ran == [wrapper, wrapper]
    assert wrapper.training  # left as it was


def test_held_out_defaults_the_seeded_split_and_a_held_out_csv(tiny_model_2b, clips, tmp_path):
    """README's defaults: timesteps 100 300 500 700 900, every --checkpointing_steps; the split is chosen by --seed;
    --eval_dataset_file names a held-out CSV with the training columns."""
    from training.args import parse_args
    from training.conditioning import TextToVideo
    from training.dataset import split_for_eval
    from training.modes import LoRA
    from training.sections import run_flags
    from training.settings import validate_training_args

    args = parse_args([str(a) for a in lora_argv(tiny_model_2b, clips, tmp_path / "x", "--eval_split", "0.05",
                                                 "--checkpointing_steps", "7")])
    assert args.eval_timesteps == [100, 300, 500, 700, 900]
    assert validate_training_args(run_flags(args), TextToVideo(), LoRA()).eval_every == 7
    items = list(range(40))
    assert split_for_eval(items, 0.05, seed=1) == split_for_eval(items, 0.05, seed=1)
    assert split_for_eval(items, 0.05, seed=1)[1] != split_for_eval(items, 0.05, seed=2)[1]
    assert len(split_for_eval(items, 0.05, seed=1)[1]) == 2 and len(split_for_eval(items[:5], 0.05, 1)[1]) == 1

    (clips / "held_out.csv").write_text("caption,video\na red ball bounces,videos/ball.mp4\nwaves,videos/waves.mp4\n")
    plan = run_trainer(lora_argv(tiny_model_2b, clips, tmp_path / "run", "--eval_dataset_file",
                                 clips / "held_out.csv", "--eval_caption_column", "caption", "--eval_video_column",
                                 "video", "--dry_run"))["dry_run"]
    assert plan["samples_held_out"] == 2 and plan["samples_for_training"] == 6
