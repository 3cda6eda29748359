"""How close the --dry_run memory estimate comes to real runs, on tiny models on this machine's CPU.

For each configuration the trainer runs twice in this process: with --dry_run (the estimate: the training step on
fake tensors) and for real with COGVIDEOX_FACTORY_TRACK_ALLOCATIONS=1, which counts the same bytes with the same
allocation tracker over every batch of an epoch (summary.json's tracked_training_peak_bytes).

    python benchmarks/estimate_accuracy.py            # the table in docs/memory.md (a few minutes on 2 cores)

tests/test_memory_estimate.py keeps three of these rows within 3 % on every CI run.
"""

import argparse
import contextlib
import io
import os
import shlex
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `training` and `tools` importable
    sys.path.insert(0, str(ROOT))

CLIPS = ROOT / "assets" / "tests"
DATA = ["--height_buckets", "32", "48", "64", "--width_buckets", "32", "64", "96", "--frame_buckets", "5", "9",
        "--max_num_frames", "9"]
GC, BF16 = ["--gradient_checkpointing"], ["--mixed_precision", "bf16"]
LORA, FULL = "cogvideox_text_to_video_lora", "cogvideox_text_to_video_sft"

# (description, entry point, tiny model variant, prepared data?, flags)
ROWS = [
    ("text-to-video LoRA, raw videos, gradient checkpointing, fp32", LORA, "2b", False, GC),
    ("text-to-video full fine-tune, raw videos, gradient checkpointing, fp32", FULL, "2b", False, GC),
    ("image-to-video LoRA (5b-I2V-style), raw videos, gradient checkpointing", "cogvideox_image_to_video_lora",
     "5b-i2v", False, [*GC, "--ignore_learned_positional_embeddings"]),
    ("text-to-video LoRA on CogVideoX-1.5-style, raw videos, bf16", LORA, "1.5", False,
     [*BF16, "--frame_buckets", "5", "13", "--max_num_frames", "13"]),
    ("text-to-video LoRA, precomputed latents, gradient checkpointing, fp32", LORA, "2b", True, GC),
    ("text-to-video LoRA, precomputed latents, bf16", LORA, "2b", True, BF16),
    ("text-to-video LoRA, precomputed latents, bf16, FP8 base", LORA, "2b", True, [*BF16, "--quantize_base", "fp8"]),
]


def run(entry_point, argv):
    import importlib

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        return importlib.import_module(f"training.{entry_point}").main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def prepared_data(model, folder):
    from training.prepare_dataset import main as prepare

    output = Path(folder) / f"prepared-{Path(model).name}"
    if not (output / "manifest.json").exists():
        prepare([str(a) for a in ["--model_id", model, "--data_root", CLIPS, "--caption_column", "prompts.txt",
                                  "--video_column", "videos.txt", *DATA, "--max_sequence_length", "16",
                                  "--save_latents_and_embeddings", "--output_dir", output]])
    return output


def measure(entry_point, model, data_root, flags, folder):
    """(estimated, measured) training peak bytes."""
    argv = ["--pretrained_model_name_or_path", model, "--data_root", data_root, "--caption_column", "prompts.txt",
            "--video_column", "videos.txt", *DATA, "--train_batch_size", "2", "--rank", "4", "--lora_alpha", "8",
            "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--seed", "7", "--max_train_steps", "5",
            "--checkpointing_steps", "100", *flags]
    with contextlib.redirect_stdout(io.StringIO()):  # the dry run prints its plan; only the table goes to stdout
        estimated = run(entry_point, [*argv, "--output_dir", Path(folder) / "dry", "--dry_run"])["dry_run"]
    os.environ["COGVIDEOX_FACTORY_TRACK_ALLOCATIONS"] = "1"
    try:
        measured = run(entry_point, [*argv, "--output_dir", Path(folder) / "real"])["tracked_training_peak_bytes"]
    finally:
        del os.environ["COGVIDEOX_FACTORY_TRACK_ALLOCATIONS"]
    return estimated["peak_memory_bytes"]["training"], measured


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tools.build_tiny_model import VARIANTS, save_tiny_model

    command = shlex.join(["python", "benchmarks/estimate_accuracy.py"])
    lines = [f"Training peak, estimate / tracked real run (`{command}`):", "",
             "| run (tiny models) | estimate (MiB) | measured (MiB) | estimate / measured |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        models = {}
        for index, (description, entry_point, variant, prepared, flags) in enumerate(ROWS):
            if variant not in models:  # the seeds the test suite's tiny models use
                models[variant] = str(save_tiny_model(Path(folder) / f"tiny-{variant}", variant=variant,
                                                      seed=sorted(VARIANTS).index(variant)))
            data_root = prepared_data(models[variant], folder) if prepared else CLIPS
            if prepared:
                flags = [*flags, "--load_tensors"]
            estimated, measured = measure(entry_point, models[variant], data_root, flags, Path(folder) / str(index))
            lines.append(f"| {description} | {estimated / 2**20:.2f} | {measured / 2**20:.2f} | "
                         f"{estimated / measured:.3f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
