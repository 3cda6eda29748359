"""Long-run guarantees: a run killed with SIGKILL resumes to bitwise the same weights; NaN stops the run."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import ASSETS, ROOT, crashing_env, lora_argv, prepare_argv, run_trainer, trained_weights, trainer_main


pytestmark = pytest.mark.slow  # runs killed in subprocesses, then resumed


RANDOM_DATA = ["--random_flip", "0.5", "--video_reshape_mode", "random", "--dataloader_num_workers", "2"]


def _killed_run(trainer, argv, crash_at):
    command = [sys.executable, ROOT / "training" / f"{trainer}.py", *argv]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=crashing_env(crash_at),
                            timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]  # SIGKILL: no cleanup ran


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_2b, tmp_path_factory):
    """Reference runs, never killed: 6 steps with random flips and crops, 2 loader workers."""
    runs = {}
    for trainer in ("cogvideox_text_to_video_lora", "cogvideox_text_to_video_sft"):
        output = tmp_path_factory.mktemp(trainer)
        run_trainer(lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "6", "--checkpointing_steps", "2",
                              *RANDOM_DATA), main=trainer_main(trainer))
        runs[trainer] = trained_weights(output, trainer)
    return runs


@pytest.mark.parametrize("trainer", ["cogvideox_text_to_video_lora", "cogvideox_text_to_video_sft"])
def test_sigkill_at_a_random_step_then_resume_gives_identical_weights(tiny_model_2b, tmp_path, uninterrupted, trainer):
    output = tmp_path / "run"
    argv = lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "6", "--checkpointing_steps", "2", *RANDOM_DATA)
    # A different step each run, reproducible: KILL_SEED=<the seed in the failure message> repeats it.
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
    step = random.Random(seed).randint(3, 5)
    _killed_run(trainer, argv, f"step:{step}")
    assert not (output / "summary.json").exists()
    summary = run_trainer([*argv, "--resume_from_checkpoint", "latest"], main=trainer_main(trainer))
    assert summary["global_step"] == 6
    ours, reference = trained_weights(output, trainer), uninterrupted[trainer]
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours), f"killed at step {step} (KILL_SEED={seed})"


def test_resume_from_a_checkpoint_at_an_epoch_boundary_is_exact(tiny_model_2b, tmp_path):
    """The bundled clips make 5 batches an epoch: a checkpoint at step 5 ends epoch 0, and the resumed run must start
    epoch 1 at its first batch (with epoch 1's shuffle and flips), not replay or skip any."""
    def argv(output):
        return lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "6", "--checkpointing_steps", "5",
                         *RANDOM_DATA)

    run_trainer(argv(tmp_path / "reference"))
    _killed_run("cogvideox_text_to_video_lora", argv(tmp_path / "run"), "step:6")
    state = json.loads((tmp_path / "run" / "checkpoint-5" / "training_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 0)  # the boundary, as the checkpoint records it
    run_trainer([*argv(tmp_path / "run"), "--resume_from_checkpoint", "latest"])
    ours, reference = trained_weights(tmp_path / "run", "lora"), trained_weights(tmp_path / "reference", "lora")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


def test_kill_while_writing_a_checkpoint_never_leaves_a_picked_partial(tiny_model_2b, tmp_path, uninterrupted):
    trainer = "cogvideox_text_to_video_lora"
    output = tmp_path / "run"
    argv = lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "6", "--checkpointing_steps", "2",
                     "--checkpoints_total_limit", "1", *RANDOM_DATA)
    _killed_run(trainer, argv, "checkpoint:4")
    assert (output / ".checkpoint-4.partial").is_dir() and not (output / "checkpoint-4").exists()
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-2"]
    run_trainer([*argv, "--resume_from_checkpoint", "latest"], main=trainer_main(trainer))
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-6"]  # the limit keeps exactly the newest
    ours = trained_weights(output, trainer)
    assert all(torch.equal(ours[k], uninterrupted[trainer][k]) for k in ours)


@pytest.mark.parametrize("where, blown_up", [("weights", 1e30), ("weights", float("inf")), ("optimizer", float("inf"))],
                         ids=["huge-weights-then-nan-loss", "non-finite-weights", "non-finite-optimizer-states"])
def test_nan_loss_stops_the_run_naming_the_step(capsys, monkeypatch, tiny_model_2b, tmp_path, where, blown_up):
    """A divergent update at step 3 (the adapters blown up to 1e30: finite, but the next loss is not; or to inf; or
    AdamW's second moments to inf, with weights and losses still finite, since the update then divides by inf).
    The run stops with one line naming the last checkpoint whose weights precede the divergence (step 2: checkpoint 3
    holds the blown-up weights, or is never written when they are not finite), sets the bad one aside, and
    `--resume_from_checkpoint latest` from there trains on."""
    import training.core

    step = training.core.train_step

    def diverging(trainer, *args, **kwargs):
        outcome = step(trainer, *args, **kwargs)
        if trainer.lr_scheduler.last_epoch == 3:  # the third optimizer step just ran
            with torch.no_grad():
                for parameter in trainer.parameters:
                    if where == "weights":
                        parameter.fill_(blown_up)
                    else:
                        trainer.optimizer.state[parameter]["exp_avg_sq"].fill_(blown_up)
        return outcome

    output = tmp_path / "run"
    argv = lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "5", "--checkpointing_steps", "1")
    monkeypatch.setattr(training.core, "train_step", diverging)
    with pytest.raises(SystemExit) as exit_info:
        run_trainer(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-1500:]
    line = lines[0]
    assert ("loss became" in line and " at step 4" in line) or ("non-finite at step 3" in line)
    assert "the last good checkpoint is" in line and line.split("the last good checkpoint is ")[1].startswith(
        str(output / "checkpoint-2"))
    assert not (output / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == (
        ["checkpoint-1", "checkpoint-2", "checkpoint-3-diverged"] if blown_up == 1e30 else ["checkpoint-1", "checkpoint-2"])

    monkeypatch.setattr(training.core, "train_step", step)
    summary = run_trainer([*argv, "--resume_from_checkpoint", "latest"])
    assert summary["global_step"] == 5 and torch.isfinite(torch.tensor(summary["final_loss"]))


def test_killed_prepare_resumes_with_no_corrupt_entry(tiny_model_2b, tmp_path):
    from conftest import run_prepare

    from training.precomputed import readable_entry

    output = tmp_path / "prepared"
    argv = prepare_argv(tiny_model_2b, ASSETS, output)
    command = [sys.executable, ROOT / "training" / "prepare_dataset.py", *argv]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300,
                            env=crashing_env("prepare:3"))
    assert result.returncode == -9, result.stderr[-2000:]
    done = sorted((output / "latents").glob("*.safetensors"))
    assert len(done) == 3 and all(readable_entry(p) for p in done) and not (output / "manifest.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in done}
    run_prepare([str(a) for a in argv])
    assert {p: p.stat().st_mtime_ns for p in done} == stamps  # finished entries are reused, not redone
    import json

    entries = json.loads((output / "manifest.json").read_text())["entries"]
    assert len(entries) == 6 and all(readable_entry(output / e["file"]) for e in entries)


def test_resume_runs_no_pickle(monkeypatch, tiny_model_2b, tmp_path):
    import pickle

    output = tmp_path / "run"
    argv = lora_argv(tiny_model_2b, ASSETS, output, "--checkpointing_steps", "2")
    run_trainer([*argv, "--max_train_steps", "2"])

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint file was unpickled")

    real_load = torch.load

    def safe_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", safe_load)
    summary = run_trainer([*argv, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    assert summary["global_step"] == 3


@pytest.mark.parametrize("other_rank_sees", [2, None])
def test_processes_that_find_different_checkpoints_stop_together(tmp_path, other_rank_sees):
    """--resume_from_checkpoint latest on machines that do not share --output_dir: each process finds its own latest
    checkpoint (or none), so every process stops with one line naming what each found, instead of resuming
    different steps (or one starting afresh) and training on out of step. Where they agree, that checkpoint."""
    from types import SimpleNamespace

    from training.checkpoint import STATE_FILE, agreed_resume_path
    from training.errors import TrainingError

    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_FILE).write_text(json.dumps({"global_step": step}))
    gathered = []

    def gather_ints(value):  # two processes: this one (rank 0), and one that saw `other_rank_sees`
        gathered.append(value)
        return [value, -1 if other_rank_sees is None else other_rank_sees]

    backend = SimpleNamespace(gather_ints=gather_ints)
    with pytest.raises(TrainingError) as stopped:
        agreed_resume_path(backend, tmp_path, "latest")
    seen = "step 2" if other_rank_sees else "none"
    assert gathered == [4] and f"(rank 0: step 4, rank 1: {seen})" in str(stopped.value)
    assert "--resume_from_checkpoint latest" in str(stopped.value) and "same --output_dir" in str(stopped.value)
    agreeing = SimpleNamespace(gather_ints=lambda value: [value, value])
    assert agreed_resume_path(agreeing, tmp_path, "latest") == tmp_path / "checkpoint-4"
    assert agreed_resume_path(agreeing, tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"
