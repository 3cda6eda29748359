"""Many processes: DeepSpeed ZeRO-2/3 and FSDP, with the shipped accelerate configs, on CPU.

The configs are read by accelerate's own launcher code into the environment `accelerate launch` would give the
training process. DeepSpeed runs as a one-process job (accelerate cannot run DeepSpeed on several CPU processes), with
the configs as shipped: the offloaded optimizer steps with DeepSpeed's CPU Adam (compiled once per machine, see
conftest.deepspeed_cpu_adam). Killed runs are launched with `accelerate launch` as users launch them and killed by a
real SIGKILL; the other runs are in this process. FSDP runs as two CPU processes under torchrun
(tests/launch_on_cpu.py lets accelerate take FSDP on CPU). Every run is killed or checkpointed part way and resumed:
the weights must come out identical.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    ASSETS,
    ROOT,
    TINY_VALIDATION_FLAGS,
    crashing_env,
    free_port,
    launch_on_cpu,
    lora_argv,
    lora_weights,
    run_trainer,
    trainer_main,
    transformer_weights,
)
from safetensors.torch import load_file


pytestmark = pytest.mark.slow  # several processes, DeepSpeed and FSDP: minutes on 2 CPU cores


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install -r requirements.txt)")
CONFIGS = ROOT / "accelerate_configs"
LORA = "cogvideox_text_to_video_lora"
SFT = "cogvideox_text_to_video_sft"


def launch_env(config_file, *overrides):
    """The variables `accelerate launch --config_file config_file *overrides` sets for the training process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), *overrides, "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate.commands.launch.launch_command does
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


@pytest.fixture(autouse=True)
def restore_functional_linear():
    """ZeRO-3 replaces torch.nn.functional.linear for the rest of the process ("persists unless manually reset"):
    harmless in a training process, but later tests in this one (FP8 layers) would get DeepSpeed's version."""
    original = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = original


@pytest.fixture()
def deepspeed_job(monkeypatch):
    """deepspeed_job("deepspeed_zero3.yaml"): this process becomes rank 0 of a one-process DeepSpeed job with that
    config as shipped (fp32 on CPU)."""
    from training import core

    def use(config):
        env = launch_env(CONFIGS / config, "--num_processes", "1", "--mixed_precision", "no")
        env.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        # Every DeepSpeed process on CPU sets up its shared-memory all-reduce when the job starts; set up again for
        # each run of this process it would collide with the last one's, and a one-process job never reduces.
        monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
        build = core.build_backend

        def fresh_job(*sections):
            # Each run ends its process group (accelerator.end_training); DeepSpeed's cache of groups would
            # outlive it in this process (a real job runs once).
            from deepspeed.utils import groups

            if not torch.distributed.is_initialized():
                groups._release_process_group_references()
            return build(*sections)

        monkeypatch.setattr(core, "build_backend", fresh_job)

    yield use
    if torch.distributed.is_initialized():  # the next test starts without a process group
        torch.distributed.destroy_process_group()


def _launched_and_killed(config, trainer, argv, crash_at):
    """`accelerate launch --config_file accelerate_configs/<config> training/<trainer>.py argv`, as a user types it
    (one CPU process, fp32; tests/launch_on_cpu.py leaves out the all-reduce op a one-process job never uses),
    SIGKILLed by the crash hook (COGVIDEOX_FACTORY_CRASH_AT) at crash_at. Its stderr."""
    command = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
               CONFIGS / config, "--num_processes", "1", "--mixed_precision", "no", "--main_process_port",
               free_port(), ROOT / "tests" / "launch_on_cpu.py", ROOT / "training" / f"{trainer}.py", *argv]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600,
                            env=crashing_env(crash_at))
    assert "Signal 9 (SIGKILL) received" in result.stderr, result.stderr[-3000:]  # torchrun's report of its child
    return result.stderr


def _assert_identical(ours, reference):
    assert ours.keys() == reference.keys()
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key


def _assert_real_lora(lora):
    """Every adapter tensor of the tiny model's one block (to_q, to_k, to_v, to_out.0; A and B), full size."""
    assert len(lora) == 8
    for key, value in lora.items():
        assert value.shape == ((4, 16) if "lora_A" in key else (16, 4)), key
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())  # it trained


def _assert_complete_transformer(ours, model):
    base = load_file(os.path.join(model, "transformer", "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == base.keys()
    assert all(ours[k].shape == base[k].shape and ours[k].isfinite().all() for k in base)
    assert sum(not torch.equal(ours[k], base[k]) for k in base) > len(base) // 2  # it trained, every block


def _assert_lora_loads_in_diffusers(model, output):
    from diffusers import CogVideoXPipeline

    from training.modes import LoRA

    LoRA().apply_to_pipeline(CogVideoXPipeline.from_pretrained(model), output)  # raises unless every tensor loads


@needs_deepspeed
def test_deepspeed_zero2_lora_with_accumulation_resumed(tiny_model_2b, tmp_path, monkeypatch, deepspeed_job,
                                                        deepspeed_cpu_adam):
    """deepspeed.yaml as shipped (ZeRO-2, optimizer offloaded to DeepSpeed's CPU Adam): accumulation 2, resumed from
    the step-2 checkpoint without any pickle (the ZeRO-3 tests below kill their runs; here the checkpoint is copied,
    as if the run stopped after it)."""
    import pickle
    import shutil

    deepspeed_job("deepspeed.yaml")
    flags = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--train_batch_size", "1",
             "--gradient_accumulation_steps", "2"]
    reference = tmp_path / "reference"
    run_trainer(lora_argv(tiny_model_2b, ASSETS, reference, *flags), main=trainer_main(LORA))
    assert (reference / "checkpoint-2" / "pytorch_model").is_dir()  # the engine's own partitioned files

    output = tmp_path / "run"
    argv = lora_argv(tiny_model_2b, ASSETS, output, *flags)
    shutil.copytree(reference / "checkpoint-2", output / "checkpoint-2")

    real_load = torch.load

    def weights_only_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        return real_load(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint file was unpickled")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", weights_only_load)
        patch.setattr(pickle, "load", refuse)
        patch.setattr(pickle, "loads", refuse)
        summary = run_trainer([*argv, "--resume_from_checkpoint", "latest", "--validation_prompt", "a dog runs",
                               *TINY_VALIDATION_FLAGS], main=trainer_main(LORA))
    assert summary["global_step"] == 4
    _assert_identical(lora_weights(output), lora_weights(reference))
    assert summary["parity"] == {"max_abs_difference": 0.0, "exact": True}  # validated once the engine was released

    # DeepSpeed steps where the loop's accumulation group ends: the same update as without DeepSpeed.
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    plain = tmp_path / "plain"
    run_trainer(lora_argv(tiny_model_2b, ASSETS, plain, *flags), main=trainer_main(LORA))
    for key, value in lora_weights(plain).items():
        torch.testing.assert_close(lora_weights(reference)[key], value, rtol=1e-5, atol=1e-6)
    _assert_lora_loads_in_diffusers(tiny_model_2b, output)


@needs_deepspeed
@pytest.mark.parametrize("trainer", [SFT, LORA])
def test_deepspeed_zero3_as_shipped_killed_by_a_signal_and_resumed(tiny_model_2b, tmp_path, monkeypatch,
                                                                   deepspeed_job, deepspeed_cpu_adam, trainer):
    """deepspeed_zero3.yaml as shipped (parameters and optimizer offloaded, DeepSpeed's CPU Adam), accumulation 2:
    launched with `accelerate launch`, SIGKILLed at step 3, resumed from checkpoint-2 to the weights of a run never
    killed, for the full fine-tune and for LoRA. The gathered artifact is complete, and the LoRA's update is that of a
    run without DeepSpeed."""
    weights = transformer_weights if trainer == SFT else lora_weights
    flags = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--train_batch_size", "1",
             "--gradient_accumulation_steps", "2"]
    output = tmp_path / "run"
    argv = lora_argv(tiny_model_2b, ASSETS, output, *flags)
    stderr = _launched_and_killed("deepspeed_zero3.yaml", trainer, argv, "step:3")
    assert "optimizer that steps: deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam" in stderr
    assert (output / "checkpoint-2" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()  # ZeRO-3
    assert not (output / "checkpoint-4").exists() and not (output / "summary.json").exists()

    deepspeed_job("deepspeed_zero3.yaml")
    summary = run_trainer([*argv, "--resume_from_checkpoint", "latest"], main=trainer_main(trainer))
    assert summary["global_step"] == 4
    reference = tmp_path / "reference"
    run_trainer(lora_argv(tiny_model_2b, ASSETS, reference, *flags), main=trainer_main(trainer))
    _assert_identical(weights(output), weights(reference))
    if trainer == SFT:
        _assert_complete_transformer(weights(output), tiny_model_2b)
    else:
        _assert_real_lora(weights(output))

    if trainer == LORA:  # DeepSpeed steps where the loop's accumulation group ends: the update of a run without it
        monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
        plain = tmp_path / "plain"
        run_trainer(lora_argv(tiny_model_2b, ASSETS, plain, *flags), main=trainer_main(trainer))
        for key, value in weights(plain).items():
            torch.testing.assert_close(weights(reference)[key], value, rtol=1e-5, atol=1e-6)


@needs_deepspeed
def test_deepspeed_zero3_lora_is_gathered_and_validates_on_the_sharded_model(tiny_model_2b, tmp_path, deepspeed_job,
                                                                             deepspeed_cpu_adam):
    """Validation runs the ZeRO-3 model itself; the saved (gathered) LoRA must reproduce those videos exactly."""
    deepspeed_job("deepspeed_zero3.yaml")
    output = tmp_path / "run"
    summary = run_trainer(lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "2", "--validation_prompt",
                                    "a dog runs", "--validation_steps", "2", *TINY_VALIDATION_FLAGS), main=trainer_main(LORA))
    assert summary["parity"] == {"max_abs_difference": 0.0, "exact": True}
    _assert_real_lora(lora_weights(output))
    _assert_lora_loads_in_diffusers(tiny_model_2b, output)


@needs_deepspeed
def test_a_fun_inp_run_under_deepspeed_validates_from_its_start_image(tiny_fun_inp, first_frame_png, tmp_path,
                                                                       deepspeed_job, deepspeed_cpu_adam):
    """deepspeed.yaml (ZeRO-2) as shipped with a CogVideoX-Fun InP run: the inpaint latents are built outside the
    engine, validation runs the inpaint pipeline, and the saved LoRA (and its Fun form) reproduce it."""
    deepspeed_job("deepspeed.yaml")
    output = tmp_path / "run"
    summary = run_trainer(lora_argv(tiny_fun_inp, ASSETS, output, "--train_mode", "inpaint", "--max_train_steps", "2",
                                    "--train_batch_size", "1", "--validation_prompt", "a dog runs",
                                    "--validation_images", first_frame_png, "--validation_steps", "2",
                                    *TINY_VALIDATION_FLAGS), main=trainer_main(LORA))
    assert summary["global_step"] == 2 and summary["parity"] == {"max_abs_difference": 0.0, "exact": True}
    _assert_real_lora(lora_weights(output))
    assert (output / "pytorch_lora_weights_fun.safetensors").is_file()


@needs_deepspeed
@pytest.mark.parametrize("flags", [["--optimizer", "prodigy"], ["--optimizer", "adamw", "--use_8bit"]])
def test_an_optimizer_deepspeed_would_swap_for_cpu_adam_is_refused(capsys, tiny_model_2b, tmp_path, deepspeed_job,
                                                                    flags):
    """With the optimizer offloaded (as shipped), accelerate replaces the trainer's optimizer by DeepSpeed's CPU Adam:
    prodigy would run as Adam at lr 1, 8-bit states in full precision. Refused in one line, before any model loads."""
    deepspeed_job("deepspeed.yaml")
    with pytest.raises(SystemExit) as exit_info:
        run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "run", "--max_train_steps", "1", *flags),
                    main=trainer_main(LORA))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --optimizer {' '.join(flags[1:])} under DeepSpeed"), lines
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_fsdp_on_two_processes_resumes_lora_and_full_exactly(tiny_model_2b, tiny_fun_inp, tmp_path):
    """fsdp.yaml (FSDP2, FULL_SHARD, one unit per CogVideoXBlock) on two CPU processes, accumulation 2: LoRA and full
    fine-tuning train, checkpoint, resume from step 2 to the same weights, and validate on both ranks in step. The
    LoRA is the one DDP trains on the same two processes. CogVideoX-Fun runs there too: an InP run under DDP resumes
    to the weights of a run never stopped (each rank's masks come back with its generators), and a Control run under
    FSDP validates through the control pipeline on both ranks and its saved LoRA reproduces that."""
    import shutil

    from tools.build_tiny_model import save_tiny_model

    runs = []  # eight runs in the same two processes: imports are paid once
    flags = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--train_batch_size", "1",
             "--gradient_accumulation_steps", "2"]
    for trainer in (LORA, SFT):
        script = ROOT / "training" / f"{trainer}.py"
        first, second = tmp_path / f"{trainer}-first", tmp_path / f"{trainer}-resumed"
        runs += [[script, *lora_argv(tiny_model_2b, ASSETS, first, *flags)],
                 [script, *lora_argv(tiny_model_2b, ASSETS, second, *flags, "--resume_from_checkpoint",
                                     first / "checkpoint-2", "--validation_prompt", "a dog runs", *TINY_VALIDATION_FLAGS)]]
    runs.append(["--env", "ACCELERATE_USE_FSDP=false", ROOT / "training" / f"{LORA}.py",
                 *lora_argv(tiny_model_2b, ASSETS, tmp_path / "ddp", *flags)])
    data = tmp_path / "control-data"  # the clips, each its own control video
    shutil.copytree(ASSETS, data)
    (data / "controls").mkdir()
    for video in (data / "videos.txt").read_text().split():
        shutil.copy(data / video, data / "controls" / video.split("/")[-1])
    (data / "controls.txt").write_text((data / "videos.txt").read_text().replace("videos/", "controls/"))
    control_model = save_tiny_model(tmp_path / "fun-control", "2b", seed=12, transformer={"in_channels": 8})
    fun = ["--env", "ACCELERATE_USE_FSDP=false", ROOT / "training" / f"{LORA}.py"]
    inp = ["--train_mode", "inpaint", "--max_train_steps", "4", "--checkpointing_steps", "2", "--train_batch_size", "1"]
    runs += [[*fun, *lora_argv(tiny_fun_inp, ASSETS, tmp_path / "inp-first", *inp)],
             [*fun, *lora_argv(tiny_fun_inp, ASSETS, tmp_path / "inp-resumed", *inp, "--resume_from_checkpoint",
                               tmp_path / "inp-first" / "checkpoint-2")],
             [ROOT / "training" / f"{LORA}.py",  # under FSDP: validation in step on both ranks
              *lora_argv(control_model, data, tmp_path / "control", "--control_column", "controls.txt",
                               "--max_train_steps", "2", "--train_batch_size", "1", "--validation_prompt", "waves",
                               "--validation_control_videos", data / "controls" / "waves.mp4",
                               *TINY_VALIDATION_FLAGS)]]
    stderr = launch_on_cpu(runs, launch_env(CONFIGS / "fsdp.yaml", "--num_processes", "2", "--mixed_precision", "no"),
                           timeout=300)
    assert stderr.count("resumed from") == 3
    _assert_identical(lora_weights(tmp_path / "inp-resumed"), lora_weights(tmp_path / "inp-first"))
    _assert_real_lora(lora_weights(tmp_path / "inp-resumed"))
    control = json.loads((tmp_path / "control" / "summary.json").read_text())
    assert control["parity"]["exact"] is True and (tmp_path / "control" / "pytorch_lora_weights_fun.safetensors").is_file()
    first, second = tmp_path / f"{LORA}-first", tmp_path / f"{LORA}-resumed"
    assert (first / "checkpoint-2" / "optimizer_full_state.bin").is_file()
    _assert_identical(lora_weights(second), lora_weights(first))
    _assert_real_lora(lora_weights(second))
    assert json.loads((second / "summary.json").read_text())["parity"]["exact"] is True
    assert (tmp_path / "ddp" / "checkpoint-2" / "optimizer.bin").is_file()  # DDP's checkpoint, not FSDP's
    for key, value in lora_weights(tmp_path / "ddp").items():  # FSDP reduces where the accumulation group ends
        torch.testing.assert_close(lora_weights(first)[key], value, rtol=1e-5, atol=1e-6)
    first, second = tmp_path / f"{SFT}-first", tmp_path / f"{SFT}-resumed"
    _assert_identical(transformer_weights(second), transformer_weights(first))
    _assert_complete_transformer(transformer_weights(second), tiny_model_2b)
    assert json.loads((second / "summary.json").read_text())["parity"]["exact"] is True


def test_a_validation_longer_than_the_collective_timeout_in_a_two_process_launch(tiny_model_2b, tmp_path):
    """DDP on two CPU processes with --nccl_timeout 15, and a first validation (step 1 of 2) that takes 30 s longer
    than it would: rank 1 waits for it in the waiting room, not in step 2's gradient all-reduce, which would time out
    and end the run."""
    output = tmp_path / "run"
    argv = lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "2", "--train_batch_size", "1",
                     "--nccl_timeout", "15", "--validation_prompt", "a dog runs", "--validation_steps", "1",
                     *TINY_VALIDATION_FLAGS)
    stderr = launch_on_cpu([[ROOT / "training" / f"{LORA}.py", *argv]], {"SLOW_FIRST_VALIDATION": "30"}, timeout=300)
    assert "running validation at step 1" in stderr
    summary = json.loads((output / "summary.json").read_text())
    assert summary["global_step"] == 2
    assert [path.name for path in output.glob("validation_step1_*.mp4")] == ["validation_step1_video_0_0_a_dog_runs.mp4"]
