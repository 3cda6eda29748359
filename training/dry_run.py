"""--dry_run: what a training run would do, printed and returned, with nothing loaded but configs.

The memory figures come from `memory_estimate.estimate_phases`, which runs the real training step on fake tensors.
"""

import json
import math
from pathlib import Path

from .modes import count_parameters


PLAN_FILE = "dry_run_plan.json"


def dry_run_plan(job):
    """The plan of a `core.TrainingRun` that has its data but no models: samples, buckets, steps, parameters and
    peak memory per phase (the flags: the run's sections, `job.flags`)."""
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    from .batch_size import component_configs
    from .memory_estimate import estimate_phases, machine_autocast

    flags, data, schedule, backend = job.flags, job.data, job.schedule, job.backend
    transformer_config = job.settings.transformer_config
    with init_empty_weights():
        transformer = CogVideoXTransformer3DModel.from_config(transformer_config)
    job.mode.prepare(transformer, flags.training, flags.lora)
    buckets = {}
    for key in data.dataset.bucket_keys:
        buckets[key] = buckets.get(key, 0) + 1
    vae_config, text_encoder_config = component_configs(flags.model)
    phases = estimate_phases(flags.data, flags.buckets, flags.training, flags.optimizer, flags.lora, flags.validation,
                             flags.memory, flags.parallelism, transformer_config, vae_config, text_encoder_config,
                             job.conditioning, job.mode, backend.weight_dtype, buckets, data.batch_sizes,
                             each_bucket=True, known_peaks=data.simulated_peaks)
    per_bucket = phases.pop("training_per_bucket")
    plan = {
        "samples_for_training": len(data.dataset),
        "samples_held_out": len(data.eval_dataset) if data.eval_dataset else 0,
        "samples_unusable": [f"entry {s.index + 1} ({s.video_path}): {s.reason}" for s in data.skipped],
        "buckets": {name: n for name, n in ((_name(b), n) for b, n in sorted(buckets.items()))},
        # Per bucket: samples (repeats included), batch size, batches per epoch (all processes), training peak.
        "bucket_plan": {_name(b): {"samples": n, "batch_size": data.batch_sizes[b],
                                   "batches_per_epoch": math.ceil(n / data.batch_sizes[b]),
                                   "peak_training_gib": round(per_bucket[_name(b)] / 2**30, 3)}
                        for b, n in sorted(buckets.items())},
        "batches_per_epoch_per_process": schedule.batches_per_epoch,
        "optimizer_steps_per_epoch": schedule.steps_per_epoch,
        "optimizer_steps": schedule.max_train_steps,
        "epochs": schedule.epochs,
        "processes": backend.num_processes,
        # With --enable_sequence_parallelism the training peak is one process of a shard group of this size.
        "sequence_parallel_shards": (backend.sequence_shards.size if backend.sequence_shards
                                     else flags.parallelism.sequence_parallel_shards
                                     if flags.parallelism.enable_sequence_parallelism else None),
        "transformer_parameters": count_parameters(transformer.parameters()),
        "trainable_parameters": count_parameters(job.mode.trainable_parameters(transformer)),
        # Whose autocast rules the estimate followed: the GPU's (norms in fp32) where there is one, else the CPU's.
        "memory_estimated_for": {"cuda": "a GPU (CUDA autocast)", "cpu": "the CPU (CPU autocast)"}[machine_autocast()],
        "peak_memory_gib": {k: (round(v / 2**30, 3) if k in ("training", "validation", "final_test") else v)
                            for k, v in phases.items()},
        "peak_memory_bytes": phases,
    }
    if backend.is_main_process:
        print_plan(plan, flags.data.skip_bad_samples)
        path = Path(flags.training.output_dir) / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=1), encoding="utf-8")
        print(f"  (the same, as JSON: {path})")
    return plan


def _name(bucket):
    return "x".join(map(str, bucket))


def print_plan(plan, skip_bad_samples):
    print("dry run: nothing will be trained")
    for key, value in plan.items():
        if key == "peak_memory_bytes":
            continue
        if key == "bucket_plan":
            print(f"  {key}:")
            print(f"    {'bucket (FxHxW)':>16} {'samples':>8} {'batch':>6} {'batches/epoch':>14} {'training GiB':>13}")
            for name, row in value.items():
                print(f"    {name:>16} {row['samples']:>8} {row['batch_size']:>6} {row['batches_per_epoch']:>14} "
                      f"{row['peak_training_gib']:>13.3f}")
        elif key == "samples_unusable":
            stop = "" if skip_bad_samples or not value else " (the run would stop: fix them or pass --skip_bad_samples)"
            print(f"  {key}: {len(value)}{stop}")
            for line in value:
                print(f"    {line}")
        else:
            print(f"  {key}: {value}")
    print("  peak_memory_gib: per process, for the largest bucket, simulated with the real training code on "
          "fake tensors; CUDA context, kernel workspaces and allocator cache come on top (docs/memory.md)")
