"""--ema_decay: the average follows its recurrence over the weights the run trained, resumes bit for bit, leaves
the training itself untouched, validates and evaluates on the average, and is in the memory estimate."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (
    ASSETS,
    ROOT,
    TINY_VALIDATION_FLAGS,
    crashing_env,
    launch_on_cpu,
    lora_argv,
    lora_weights,
    run_trainer,
    stopped_run_stderr,
    trainer_main,
)
from safetensors.torch import load_file


EMA_LORA = "pytorch_lora_weights_ema.safetensors"


def _trained(transformer):
    from training.modes import plain_name

    return {plain_name(name): p.detach().to("cpu", torch.float64, copy=True)
            for name, p in transformer.named_parameters() if p.requires_grad}


def _record_weights(monkeypatch):
    """{0: the trained weights the run starts from, t: those after step t}, recorded from inside the run."""
    import training.core as core

    weights = {}
    build, after_step = core.build_models_and_optimizer, core.after_step

    def recording_build(job):
        trainer = build(job)
        weights[0] = _trained(trainer.transformer)
        return trainer

    def recording_after_step(job, loss, grad_norm):
        weights[job.state.global_step] = _trained(job.trainer.transformer)
        return after_step(job, loss, grad_norm)

    monkeypatch.setattr(core, "build_models_and_optimizer", recording_build)
    monkeypatch.setattr(core, "after_step", recording_after_step)
    return weights


def _recurrence(weights, decay, every, last_step):
    """ema_0 = the starting weights; ema_t = d*ema_{t-1} + (1-d)*w_t on every `every`-th step (float64)."""
    ema = dict(weights[0])
    for step in range(1, last_step + 1):
        if step % every == 0:
            ema = {name: decay * value + (1 - decay) * weights[step][name] for name, value in ema.items()}
    return ema


def _close(saved, expected):
    assert saved.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(saved[name].double(), value, rtol=1e-5, atol=1e-7), name


def _written(folder, trainer, ema=""):
    """The LoRA or transformer/ a run (or the averaging tool) wrote, keyed by the model's parameter names."""
    if trainer.endswith("sft"):
        return load_file(folder / f"transformer{ema}" / "diffusion_pytorch_model.safetensors")
    assert (folder / f"pytorch_lora_weights_comfyui{ema}.safetensors").is_file()
    return {name.removeprefix("transformer.").replace(".weight", ".default.weight"): value
            for name, value in load_file(folder / f"pytorch_lora_weights{ema}.safetensors").items()}


@pytest.mark.parametrize("trainer", ["cogvideox_text_to_video_lora", "cogvideox_text_to_video_sft"])
def test_the_average_follows_its_recurrence_over_the_trained_weights(monkeypatch, tiny_model_2b, tmp_path, trainer):
    weights = _record_weights(monkeypatch)
    output = tmp_path / "run"
    summary = run_trainer(lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "5", "--checkpointing_steps",
                                    "1", "--mixed_precision", "no", "--save_dtype", "fp32", "--ema_decay", "0.6",
                                    "--ema_update_every", "2"), main=trainer_main(trainer))
    assert sorted(weights) == [0, 1, 2, 3, 4, 5]
    expected = _recurrence(weights, 0.6, 2, 5)
    _close(_written(output, trainer, "_ema"), expected)
    _close(load_file(output / "checkpoint-4" / "ema.safetensors"), _recurrence(weights, 0.6, 2, 4))
    # Not trivially the first or the last weights.
    name = next(n for n in expected if not torch.equal(weights[5][n], weights[0][n]))
    assert not torch.allclose(expected[name], weights[5][name]) and not torch.allclose(expected[name], weights[0][name])
    recorded = {"EMA": "decay 0.6 every 2 step(s), fp32 on the accelerator (saved beside the weights, _ema in their "
                       "names)"}
    assert {k: summary["ema"][k] for k in recorded} == recorded
    card = (output / "README.md").read_text()
    assert all(f"| {key} | {value} |" in card for key, value in recorded.items()), card

    # After the run, tools/average_checkpoints.py over the checkpoints (one a step): a uniform mean of steps 2..4,
    # then, checkpoint-3 gone, an EMA over 2, 4, 5 that counts the two steps from 2 to 4 as d^2.
    from tools.average_checkpoints import main as average_checkpoints

    average_checkpoints([str(output), "--from_step", "2", "--to_step", "4", "--output", str(tmp_path / "uniform")])
    _close(_written(tmp_path / "uniform", trainer), {n: (weights[2][n] + weights[3][n] + weights[4][n]) / 3
                                                     for n in expected})
    shutil.rmtree(output / "checkpoint-3")
    average_checkpoints([str(output), "--from_step", "2", "--ema_decay", "0.6", "--output", str(tmp_path / "ema")])
    after_4 = {n: 0.36 * weights[2][n] + 0.64 * weights[4][n] for n in expected}
    _close(_written(tmp_path / "ema", trainer), {n: 0.6 * after_4[n] + 0.4 * weights[5][n] for n in expected})


def test_a_resumed_run_continues_the_average_bit_for_bit(tiny_model_2b, tmp_path):
    def argv(output, *extra):
        return lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "4", "--checkpointing_steps", "2",
                         "--mixed_precision", "no", "--ema_decay", "0.7", "--ema_on_cpu", *extra)

    run_trainer(argv(tmp_path / "reference"))
    (tmp_path / "run").mkdir()
    shutil.copytree(tmp_path / "reference" / "checkpoint-2", tmp_path / "run" / "checkpoint-2")
    run_trainer(argv(tmp_path / "run", "--resume_from_checkpoint", "latest"))
    for name in (EMA_LORA, "pytorch_lora_weights.safetensors"):
        ours, reference = load_file(tmp_path / "run" / name), load_file(tmp_path / "reference" / name)
        assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours), name


def test_ema_validation_and_held_out_loss_leave_the_training_untouched(tiny_model_2b, tmp_path):
    common = ["--max_train_steps", "2", "--mixed_precision", "no", "--eval_split", "0.34", "--eval_steps", "1",
              "--validation_prompt", "a cat walks on the grass", "--validation_steps", "2", *TINY_VALIDATION_FLAGS]
    run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "plain", *common))
    output = tmp_path / "ema"
    summary = run_trainer(lora_argv(tiny_model_2b, ASSETS, output, *common, "--ema_decay", "0.5", "--validate_ema"))
    ours, plain = lora_weights(output), lora_weights(tmp_path / "plain")
    assert ours.keys() == plain.keys() and all(torch.equal(ours[k], plain[k]) for k in ours)
    written = json.loads((output / "summary.json").read_text())
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["eval_loss"] == written["eval_loss"]
    held_out = written["ema"]["eval_loss"]
    assert held_out.keys() == written["eval_loss"].keys() == {"1", "2"}
    assert all(held_out[step] != written["eval_loss"][step] for step in held_out), (held_out, written["eval_loss"])
    assert summary["parity"]["exact"]  # the final test compares with the trained weights' videos, not the EMA's
    assert list(output.glob("validation_ema_step2_video_*.mp4")) and list(output.glob("validation_step2_video_*.mp4"))


@pytest.mark.parametrize(("changes", "problem"), [
    (["--ema_decay", "1"], "--ema_decay must lie between 0 and 1, both excluded (got 1)"),
    (["--ema_decay", "0"], "--ema_decay must lie between 0 and 1, both excluded (got 0)"),
    (["--ema_decay", "0.9", "--ema_update_every", "0"], "--ema_update_every must be at least 1 (got 0)"),
    (["--ema_on_cpu", "--validate_ema"], "--ema_on_cpu, --validate_ema: option(s) of the EMA: pass --ema_decay too"),
    (["--ema_decay", "0.9", "--validate_ema"], "--validate_ema makes validation videos from the EMA weights: pass "
                                               "--validation_prompt too"),
], ids=["decay-one", "decay-zero", "update_every-zero", "options-without-decay", "validate_ema-without-prompt"])
def test_bad_ema_flags_are_one_line_each_before_loading(capsys, tiny_model_2b, tmp_path, changes, problem):
    lines = stopped_run_stderr(capsys, lora_argv(tiny_model_2b, ASSETS, tmp_path / "out", *changes))
    assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0], lines


def test_the_memory_estimate_counts_the_ema_copy_unless_it_is_on_the_cpu(tiny_model_2b, tmp_path):
    def plan(*ema):
        return run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "out", "--dry_run", "--height_buckets", "32",
                                     "--width_buckets", "32", "--frame_buckets", "9", "--validation_prompt", "a cat",
                                     *TINY_VALIDATION_FLAGS, *ema))["dry_run"]

    default = plan()
    with_ema, on_cpu = plan("--ema_decay", "0.99")["peak_memory_bytes"], plan("--ema_decay", "0.99", "--ema_on_cpu")
    fp32_copy = 4 * default["trainable_parameters"]
    for phase in ("training", "validation"):
        added = with_ema[phase] - default["peak_memory_bytes"][phase]
        assert fp32_copy <= added < fp32_copy + 512 * 200, (phase, added, fp32_copy)  # per tensor: 512-byte blocks
    assert on_cpu["peak_memory_bytes"] == default["peak_memory_bytes"]


@pytest.mark.slow
def test_a_run_killed_and_resumed_has_the_same_average(tiny_model_2b, tmp_path):
    def argv(output):
        return lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "5", "--checkpointing_steps", "2",
                         "--mixed_precision", "no", "--ema_decay", "0.8", "--ema_update_every", "2")

    run_trainer(argv(tmp_path / "reference"))
    command = [sys.executable, ROOT / "training" / "cogvideox_text_to_video_lora.py", *argv(tmp_path / "run")]
    killed = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=crashing_env("step:3"),
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_trainer([*argv(tmp_path / "run"), "--resume_from_checkpoint", "latest"])
    ours, reference = load_file(tmp_path / "run" / EMA_LORA), load_file(tmp_path / "reference" / EMA_LORA)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


@pytest.mark.slow
def test_ddp_on_two_processes_keeps_the_average_and_resumes_it_exactly(tiny_model_2b, tmp_path):
    """Two CPU processes (DDP): the main process writes the average; a run resumed from step 2 ends with the same."""
    script = ROOT / "training" / "cogvideox_text_to_video_lora.py"
    flags = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--train_batch_size", "1", "--mixed_precision",
             "no", "--ema_decay", "0.7"]
    first, second = tmp_path / "first", tmp_path / "resumed"
    stderr = launch_on_cpu([[script, *lora_argv(tiny_model_2b, ASSETS, first, *flags)],
                            [script, *lora_argv(tiny_model_2b, ASSETS, second, *flags, "--resume_from_checkpoint",
                                                first / "checkpoint-2")]], timeout=300)
    assert "resumed from" in stderr and (first / "checkpoint-2" / "ema.safetensors").is_file()
    for name in (EMA_LORA, "pytorch_lora_weights.safetensors"):
        ours, reference = load_file(second / name), load_file(first / name)
        assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours), name
    trained = lora_weights(first)
    assert not all(torch.equal(value, trained[key]) for key, value in load_file(first / EMA_LORA).items())


def test_sharded_weights_refuse_the_ema_in_one_line():
    from types import SimpleNamespace

    from training.ema import engine_problems

    training = SimpleNamespace(ema_decay=0.999)
    assert engine_problems(training, SimpleNamespace(weights_sharded=False)) == []
    problems = engine_problems(training, SimpleNamespace(weights_sharded=True))
    assert len(problems) == 1 and problems[0].startswith("--ema_decay under sharded weights (FSDP, DeepSpeed ZeRO-3)")
    assert engine_problems(SimpleNamespace(ema_decay=None), SimpleNamespace(weights_sharded=True)) == []


def test_averaging_a_folder_without_checkpoints_is_one_line(capsys, tmp_path):
    from tools.average_checkpoints import main as average_checkpoints

    with pytest.raises(SystemExit) as exit_info:
        average_checkpoints([str(tmp_path), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {tmp_path}: no complete checkpoint in steps first..last"], lines
    assert not (tmp_path / "out").exists()
