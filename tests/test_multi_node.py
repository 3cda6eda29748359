"""Several processes and machines (DDP over gloo). Two launchers on this machine stand for two nodes (torchrun --nnodes 2, the launcher that
`accelerate launch --num_machines 2` runs on each node; one process each, gloo). They must train exactly what one
launcher with two processes trains, and resume together from a checkpoint they wrote. The data is the mixed folder
of tests/test_data_layouts.py (clips and stills, captions beside them, a batch size per bucket), so this is also the
bucket config's run on several processes."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, free_port, lora_weights
from test_data_layouts import expected_plan, folder_argv


pytestmark = pytest.mark.slow  # two launches of two processes


def launch(model, folder, machines, *runs):
    """One launcher per machine, all started at once, 2 processes in all; each run (output, *extra flags) in turn in
    the same processes (tests/launch_on_cpu.py runs them; without FSDP settings it only chains them). Their stderr."""
    port = free_port()
    trainer = ROOT / "training" / "cogvideox_text_to_video_lora.py"
    chained = []
    for output, *extra in runs:
        chained += [*(["--then"] if chained else []), trainer,
                    *folder_argv(model, folder, output, "--max_train_steps", "3", "--checkpointing_steps", "2",
                                 "--random_flip", "0.5", *extra)]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    launchers = [subprocess.Popen(
        [str(c) for c in [sys.executable, "-m", "torch.distributed.run", "--nnodes", machines, "--node_rank", rank,
                          "--nproc_per_node", 2 // machines, "--master_addr", "127.0.0.1", "--master_port", port,
                          ROOT / "tests" / "launch_on_cpu.py", *chained]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in range(machines)]
    outcomes = [launcher.communicate(timeout=300) for launcher in launchers]
    for launcher, (_, err) in zip(launchers, outcomes):
        assert launcher.returncode == 0, err[-3000:]
    return [err for _, err in outcomes]


def test_two_machines_train_what_one_machine_with_two_processes_trains(tiny_model_2b, mixed_folder, tmp_path):
    import json

    from safetensors.torch import load_file

    one, pair, resumed = tmp_path / "one", tmp_path / "pair", tmp_path / "resumed"
    launch(tiny_model_2b, mixed_folder, 1, [one])
    checkpoint = one / "checkpoint-2"
    # What resume reads: both ranks' RNG, the optimizer, the schedule, the loop position, the adapter.
    for name in ("rng_state_0.safetensors", "rng_state_1.safetensors", "optimizer.bin", "lr_scheduler.json",
                 "training_state.json", "pytorch_lora_weights.safetensors"):
        assert (checkpoint / name).is_file(), name
    rank_0, rank_1 = (load_file(checkpoint / f"rng_state_{rank}.safetensors")["torch"] for rank in (0, 1))
    assert not torch.equal(rank_0, rank_1)  # seeded per rank: the ranks draw different noise
    # The pair trains, then resumes from the checkpoint it wrote (into another folder): as if both had stopped.
    errs = launch(tiny_model_2b, mixed_folder, 2, [pair], [resumed, "--resume_from_checkpoint", pair / "checkpoint-2"])
    assert sum(err.count("saved checkpoint") for err in errs) == 1  # checkpoint-2, written once, by the main process
    assert any("resumed from" in err for err in errs)
    # The epoch's 6 batches, each at its bucket's size, shared out 3 and 3: every sample once.
    summary = json.loads((pair / "summary.json").read_text())
    assert {name: (row["samples_trained"], row["batch_size"]) for name, row in summary["buckets"].items()} == \
        expected_plan() and "x 2 process(es)" in errs[0]
    reference = lora_weights(one)
    assert all(torch.equal(lora_weights(pair)[k], v) for k, v in reference.items())
    assert all(torch.equal(lora_weights(resumed)[k], v) for k, v in reference.items())
