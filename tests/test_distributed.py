"""Many processes: DeepSpeed ZeRO-2/3 and FSDP, with the shipped accelerate configs, on CPU.

The configs are read by accelerate's own launcher code into the environment `accelerate launch` would give the
training process. DeepSpeed runs in this process as a one-process job (accelerate cannot run DeepSpeed on several
CPU processes); FSDP runs as two CPU processes under torchrun (tests/fsdp_on_cpu.py lets accelerate take FSDP on CPU).
Every run is killed (the crash hook) or checkpointed part way and resumed: the weights must come out identical.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import (
    ASSETS,
    ROOT,
    TINY_VALIDATION_FLAGS,
    free_port,
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
    config (fp32 on CPU). DeepSpeed's CPU Adam is a C++ op compiled on first use (about 2 minutes on 2 cores, then
    cached): unless cpu_adam=True the offloaded partitions are stepped by torch's AdamW instead
    (zero_force_ds_cpu_optimizer off). Offload, partitioning, checkpoints and the trainer's code are those of the
    shipped config either way."""
    import accelerate.accelerator

    from training import backend, core

    def use(config, cpu_adam=False):
        env = launch_env(CONFIGS / config, "--num_processes", "1", "--mixed_precision", "no")
        env.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        if not cpu_adam:
            configure = backend.configure_deepspeed

            def with_torch_adam(accelerator, args):
                configure(accelerator, args)
                if accelerator.state.deepspeed_plugin is not None:
                    accelerator.state.deepspeed_plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] = False

            monkeypatch.setattr(backend, "configure_deepspeed", with_torch_adam)
            monkeypatch.setattr(accelerate.accelerator, "map_pytorch_optim_to_deepspeed", lambda optimizer: optimizer)
        # DeepSpeed JIT-compiles its shared-memory all-reduce for CPU processes (about 50 s, once per machine); a
        # one-process job never reduces across processes, so it is left out here.
        monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
        build = core.build_backend

        def fresh_job(args):
            # Each run ends its process group (accelerator.end_training); DeepSpeed's cache of groups would
            # outlive it in this process (a real job runs once).
            from deepspeed.utils import groups

            if not torch.distributed.is_initialized():
                groups._release_process_group_references()
            return build(args)

        monkeypatch.setattr(core, "build_backend", fresh_job)

    yield use
    if torch.distributed.is_initialized():  # the next test starts without a process group
        torch.distributed.destroy_process_group()


def _cpu_adam_built():
    """Whether DeepSpeed's CPU Adam op is already compiled in torch's extension cache (where its JIT build goes)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        accelerator = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
        root = os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_{accelerator}")
    return os.path.isfile(os.path.join(root, "cpu_adam", "cpu_adam.so"))


class Killed(Exception):
    pass


def _killed_here(monkeypatch, trainer, argv, crash_at):
    """The crash hook (COGVIDEOX_FACTORY_CRASH_AT), with the SIGKILL turned into an exception so the job stays in
    this process: what is on disk is what a killed run leaves."""
    real_kill = os.kill

    def kill(pid, sig):
        if pid == os.getpid() and sig == signal.SIGKILL:
            raise Killed
        real_kill(pid, sig)

    with monkeypatch.context() as patch:
        patch.setenv("COGVIDEOX_FACTORY_CRASH_AT", crash_at)
        patch.setattr(os, "kill", kill)
        with pytest.raises(Killed):
            run_trainer(argv, main=trainer_main(trainer))


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
def test_deepspeed_zero2_lora_with_accumulation_resumed(tiny_model_2b, tmp_path, monkeypatch, deepspeed_job):
    """deepspeed.yaml (ZeRO-2, optimizer offloaded): accumulation 2, resumed from the step-2 checkpoint without any
    pickle (the ZeRO-3 tests below kill their runs; here the checkpoint is copied, as if the run stopped after it)."""
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
def test_deepspeed_zero3_killed_and_resumed(tiny_model_2b, tmp_path, monkeypatch, deepspeed_job, trainer):
    """deepspeed_zero3.yaml (parameters and optimizer offloaded): the gathered artifact is complete, and a run killed
    at step 3 resumes to the same weights, for the full fine-tune and for LoRA."""
    deepspeed_job("deepspeed_zero3.yaml")
    weights = transformer_weights if trainer == SFT else lora_weights
    flags = ["--max_train_steps", "4", "--checkpointing_steps", "2"]
    reference = tmp_path / "reference"
    run_trainer(lora_argv(tiny_model_2b, ASSETS, reference, *flags), main=trainer_main(trainer))
    assert (reference / "checkpoint-2" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()  # ZeRO-3
    output = tmp_path / "run"
    argv = lora_argv(tiny_model_2b, ASSETS, output, *flags)
    _killed_here(monkeypatch, trainer, argv, "step:3")
    summary = run_trainer([*argv, "--resume_from_checkpoint", "latest"], main=trainer_main(trainer))
    assert summary["global_step"] == 4
    _assert_identical(weights(output), weights(reference))
    if trainer == SFT:
        _assert_complete_transformer(weights(output), tiny_model_2b)
    else:
        _assert_real_lora(weights(output))


@needs_deepspeed
def test_deepspeed_zero3_lora_is_gathered_and_validates_on_the_sharded_model(tiny_model_2b, tmp_path, deepspeed_job):
    """Validation runs the ZeRO-3 model itself; the saved (gathered) LoRA must reproduce those videos exactly."""
    deepspeed_job("deepspeed_zero3.yaml")
    output = tmp_path / "run"
    summary = run_trainer(lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "2", "--validation_prompt",
                                    "a dog runs", "--validation_steps", "2", *TINY_VALIDATION_FLAGS), main=trainer_main(LORA))
    assert summary["parity"] == {"max_abs_difference": 0.0, "exact": True}
    _assert_real_lora(lora_weights(output))
    _assert_lora_loads_in_diffusers(tiny_model_2b, output)


@needs_deepspeed
@pytest.mark.skipif(not _cpu_adam_built(), reason="DeepSpeed's CPU Adam op is not compiled yet (about 2 minutes, once): "
                    "python -c 'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()'")
def test_deepspeed_zero3_as_shipped_with_cpu_adam_resumes(tiny_model_2b, tmp_path, monkeypatch, deepspeed_job):
    """deepspeed_zero3.yaml exactly as shipped, its optimizer turned into DeepSpeed's CPU Adam."""
    import accelerate.accelerator

    deepspeed_job("deepspeed_zero3.yaml", cpu_adam=True)
    made, convert = [], accelerate.accelerator.map_pytorch_optim_to_deepspeed
    monkeypatch.setattr(accelerate.accelerator, "map_pytorch_optim_to_deepspeed",
                        lambda optimizer: made.append(convert(optimizer)) or made[-1])
    flags = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--optimizer", "adamw"]
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    run_trainer(lora_argv(tiny_model_2b, ASSETS, first, *flags), main=trainer_main(LORA))
    run_trainer(lora_argv(tiny_model_2b, ASSETS, resumed, *flags, "--resume_from_checkpoint", first / "checkpoint-1"),
                main=trainer_main(LORA))
    _assert_identical(lora_weights(resumed), lora_weights(first))
    _assert_real_lora(lora_weights(resumed))
    assert [type(o).__name__ for o in made] == ["DeepSpeedCPUAdam"] * 2


@needs_deepspeed
@pytest.mark.parametrize("flags", [["--optimizer", "prodigy"], ["--optimizer", "adamw", "--use_8bit"]])
def test_an_optimizer_deepspeed_would_swap_for_cpu_adam_is_refused(capsys, tiny_model_2b, tmp_path, deepspeed_job,
                                                                    flags):
    """With the optimizer offloaded (as shipped), accelerate replaces the trainer's optimizer by DeepSpeed's CPU Adam:
    prodigy would run as Adam at lr 1, 8-bit states in full precision. Refused in one line, before any model loads."""
    deepspeed_job("deepspeed.yaml", cpu_adam=True)  # as shipped: nothing patched (the run stops before CPU Adam)
    with pytest.raises(SystemExit) as exit_info:
        run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "run", "--max_train_steps", "1", *flags),
                    main=trainer_main(LORA))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --optimizer {' '.join(flags[1:])} under DeepSpeed"), lines
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_fsdp_on_two_processes_resumes_lora_and_full_exactly(tiny_model_2b, tmp_path):
    """fsdp.yaml (FSDP2, FULL_SHARD, one unit per CogVideoXBlock) on two CPU processes: LoRA and full fine-tuning
    train, checkpoint, resume from step 2 to the same weights, and validate on both ranks in step."""
    env = dict(os.environ, **launch_env(CONFIGS / "fsdp.yaml", "--num_processes", "2", "--mixed_precision", "no"))
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    runs = []  # four runs in the same two processes: imports are paid once
    flags = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--train_batch_size", "1"]
    for trainer in (LORA, SFT):
        script = ROOT / "training" / f"{trainer}.py"
        first, second = tmp_path / f"{trainer}-first", tmp_path / f"{trainer}-resumed"
        runs += [*(["--then"] if runs else []), script, *lora_argv(tiny_model_2b, ASSETS, first, *flags),
                 "--then", script, *lora_argv(tiny_model_2b, ASSETS, second, *flags, "--resume_from_checkpoint",
                                              first / "checkpoint-2", "--validation_prompt", "a dog runs",
                                              *TINY_VALIDATION_FLAGS)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", ROOT / "tests" / "fsdp_on_cpu.py",
               *runs]
    process = subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks
        raise
    assert process.returncode == 0, stderr[-3000:]
    assert stderr.count("resumed from") == 2
    first, second = tmp_path / f"{LORA}-first", tmp_path / f"{LORA}-resumed"
    assert (first / "checkpoint-2" / "optimizer_full_state.bin").is_file()
    _assert_identical(lora_weights(second), lora_weights(first))
    _assert_real_lora(lora_weights(second))
    assert json.loads((second / "summary.json").read_text())["parity"]["exact"] is True
    first, second = tmp_path / f"{SFT}-first", tmp_path / f"{SFT}-resumed"
    _assert_identical(transformer_weights(second), transformer_weights(first))
    _assert_complete_transformer(transformer_weights(second), tiny_model_2b)
    assert json.loads((second / "summary.json").read_text())["parity"]["exact"] is True


def _waiting_worker(rank, port):
    """Rank 0 'validates' for 4 s; collectives time out after 2 s (like --nccl_timeout)."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from training.backend import WaitingRoom

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    training_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=2))
    waiting_room = WaitingRoom(num_processes=2)

    if rank == 0:
        time.sleep(4)
    waiting_room.wait()  # what validation does on every rank
    dist.all_reduce(torch.ones(1), group=training_group)  # the next training collective: in time

    # The same without the waiting room: the waiting rank's collective times out.
    if rank == 0:
        time.sleep(4)
    else:
        with pytest.raises(RuntimeError, match="(?i)timed out|timeout"):
            dist.all_reduce(torch.ones(1), group=training_group)
    # A group with a timed-out operation aborts the process when torch tears it down at exit: leave at once.
    os._exit(0)


def test_ranks_wait_for_a_validation_longer_than_the_collective_timeout():
    import torch.multiprocessing as mp

    mp.start_processes(_waiting_worker, args=(free_port(),), nprocs=2, start_method="spawn", join=True)
