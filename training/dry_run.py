"""--dry_run: what a training run would do, printed and returned, with nothing loaded but configs.

The memory figures come from `memory_estimate.estimate_phases`, which runs the real training step on fake tensors.
"""

import json
import math
from pathlib import Path

from .ema import record as ema_record
from .modes import count_parameters
from .report import adapter_record, caption_record
from .timesteps import recipe


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
    # Every bucket a sample can train in (where a bucket config's keep_prob draws them again every epoch, some have no
    # sample in the first epoch), with the samples it holds in the first epoch.
    buckets = dict.fromkeys(data.dataset.landing_counts(), 0)
    for key in data.sampler.keys_at(0):
        if key is not None:
            buckets[key] += 1
    vae_config, text_encoder_config = component_configs(flags.model)
    phases = estimate_phases(flags.data, flags.buckets, flags.training, flags.optimizer, flags.lora, flags.validation,
                             flags.memory, flags.parallelism, transformer_config, vae_config, text_encoder_config,
                             job.conditioning, job.mode, backend.weight_dtype, data.dataset.landing_counts(),
                             data.batch_sizes,
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
        "batches_per_epoch_per_process": schedule.batches_per_epoch(0),
        "optimizer_steps_per_epoch": math.ceil(schedule.batches_per_epoch(0) / flags.training.gradient_accumulation_steps),
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
        # What the run trains with, as the model card and summary.json will record it.
        "recipe": {**recipe(flags.training), **caption_record(flags.data), **ema_record(flags.training),
                   **(adapter_record(flags.lora) if job.mode.name == "lora" else {})},
    }
    if flags.memory.blocks_to_swap or job.swap_peaks:  # (auto may find that no swap is needed)
        plan["block_swap"] = _swap_plan(job)
    if getattr(data.dataset, "redraws", False):  # buckets drawn again every epoch: the figures above are epoch 0's
        plan["bucket_draws"] = {
            "samples_sitting_out_per_epoch": [data.sampler.sitting_out(epoch) for epoch in range(schedule.epochs)],
            "batches_per_process_per_epoch": list(schedule.epoch_batches),
        }
    if backend.is_main_process:
        print_plan(plan, flags.data.skip_bad_samples)
        path = Path(flags.training.output_dir) / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=1), encoding="utf-8")
        print(f"  (the same, as JSON: {path})")
    return plan


def _swap_plan(job):
    """--blocks_to_swap: the count (and how auto chose it), the bytes it moves and the time that takes at an assumed
    host-to-device bandwidth."""
    from .block_swap import frozen_block_bytes, swap_plan

    flags = job.flags
    block_bytes = frozen_block_bytes(job.settings.transformer_config, job.mode, flags.training, flags.lora,
                                     flags.memory, job.backend.weight_dtype)
    plan = swap_plan(flags.memory.blocks_to_swap, block_bytes, flags.training.gradient_accumulation_steps,
                     flags.validation.num_inference_steps if flags.validation.validation_prompt else None)
    plan["of_blocks"] = job.settings.transformer_config["num_layers"]
    if job.swap_peaks:
        plan["chosen_by"] = f"auto: the smallest count whose estimated peak fits --max_memory_gb {flags.memory.max_memory_gb:g}"
        plan["estimated_peak_gib_by_count"] = {n: round(v / 2**30, 3) for n, v in sorted(job.swap_peaks.items())}
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
        elif key == "bucket_draws":
            out, batches = value["samples_sitting_out_per_epoch"], value["batches_per_process_per_epoch"]
            print(f"  {key}: again every epoch (keep_prob); buckets and batches above are epoch 0's")
            print(f"    samples sitting out an epoch (every draw passed them on; they train in other epochs): "
                  f"{min(out)}-{max(out)}, mean {sum(out) / len(out):.1f}; epoch 0: {out[0]}")
            print(f"    batches per process per epoch: {min(batches)}-{max(batches)}")
        elif key == "block_swap":
            print(f"  blocks_to_swap: {value['blocks_to_swap']} of {value['of_blocks']} transformer blocks"
                  + (f" ({value['chosen_by']}; estimated peak GiB by count: {value['estimated_peak_gib_by_count']})"
                     if "chosen_by" in value else ""))
            print(f"    moves {value['bytes_moved_per_step'] / 1e9:.3g} GB host-to-device per optimizer step: at an "
                  f"ASSUMED {value['assumed_host_to_device_gb_s']:g} GB/s (PCIe 4.0 x16; not measured here) at most "
                  f"{value['added_seconds_per_step_at_most']:.3g} s more per step, less where the copies hide behind "
                  "compute")
            if "bytes_moved_per_validation_video" in value:
                print(f"    and {value['bytes_moved_per_validation_video'] / 1e9:.3g} GB per validation video (at most "
                      f"{value['added_seconds_per_validation_video_at_most']:.3g} s more)")
        elif key == "samples_unusable":
            stop = "" if skip_bad_samples or not value else " (the run would stop: fix them or pass --skip_bad_samples)"
            print(f"  {key}: {len(value)}{stop}")
            for line in value:
                print(f"    {line}")
        else:
            print(f"  {key}: {value}")
    print("  peak_memory_gib: per process, for the largest bucket, simulated with the real training code on "
          "fake tensors; CUDA context, kernel workspaces and allocator cache come on top (docs/memory.md)")
