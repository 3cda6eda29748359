"""Peak accelerator memory per phase of full-size CogVideoX training, estimated on any machine (no GPU, no weights).

The same estimate `--dry_run` prints (training/memory_estimate.py: the real training code run on fake tensors), for
the published configs in benchmark_training.MODELS, at their training size, with validation at that size too.

    python benchmarks/estimate_memory.py --model 5b --mode lora -- --rank 64 --gradient_checkpointing
    python benchmarks/estimate_memory.py --table readme          # the estimate table of docs/memory.md (a few minutes)
"""

import argparse
import shlex
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# THUDM's text_encoder/config.json (T5 v1.1 XXL encoder), shared by every CogVideoX model.
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
)

# Every row: (model, mode, trainer flags). Validation at the training size with slicing and tiling, as the
# original's sweep scripts ran it; batch 1 unless stated.
GC = ["--gradient_checkpointing"]
README_TABLE = [
    ("2b", "lora", ["--rank", "64", *GC]),
    ("5b", "lora", ["--rank", "64", *GC]),
    ("5b", "lora", ["--rank", "64", *GC, "--quantize_base", "fp8"]),
    ("5b", "lora", ["--rank", "64", *GC, "--offload_activations"]),
    ("5b", "lora", ["--rank", "64", *GC, "--quantize_base", "nf4"]),
    ("5b", "lora", ["--rank", "64", *GC, "--quantize_base", "nf4", "--offload_activations"]),
    ("5b", "lora", ["--rank", "256", *GC]),
    ("5b", "lora", ["--rank", "64", *GC, "--train_batch_size", "4"]),
    ("5b", "lora", ["--rank", "64"]),
    ("5b-i2v", "lora", ["--rank", "64", *GC]),
    ("1.5-5b", "lora", ["--rank", "64", *GC]),
    ("2b", "sft", [*GC]),
    ("5b", "sft", [*GC]),
    ("5b", "sft", [*GC, "--master_weight_dtype", "bf16"]),
    ("5b", "sft", [*GC, "--use_8bit"]),
    ("5b", "sft", [*GC, "--use_cpu_offload_optimizer"]),
]


def trainer_flags(spec, mode, flags):
    """The trainer's flag sections (sections.RunFlags) of this row: the benchmark's data and validation, then
    `flags`."""
    from training.args import parse_args
    from training.sections import run_flags

    frames, height, width = spec.train_video
    argv = ["--pretrained_model_name_or_path", spec.model_id, "--load_tensors", "--mixed_precision", "bf16",
            "--optimizer", "adamw", "--train_batch_size", "1", "--validation_prompt", "a panda",
            "--height", str(height), "--width", str(width), "--validation_num_frames", str(frames),
            "--frame_buckets", str(frames), "--enable_slicing", "--enable_tiling", *flags]
    if spec.conditioning == "image-to-video":
        argv += ["--validation_images", "first_frame.png"]
    return run_flags(parse_args(argv))


def estimate(model, mode, flags, scale="full", autocast="cuda"):
    """{"training": bytes, "validation": bytes, "final_test": bytes, ...} for one configuration, on a GPU (CUDA
    autocast's rules) unless `autocast` says "cpu"."""
    import torch
    from transformers import T5Config

    from benchmarks.benchmark_training import model_spec
    from training.conditioning import CONDITIONINGS
    from training.memory_estimate import estimate_phases
    from training.modes import MODES

    spec = model_spec(model, scale, flags)
    sections = trainer_flags(spec, mode, flags)
    text_encoder = T5_XXL if scale == "full" else dict(T5_XXL, d_model=spec.transformer["text_embed_dim"], d_kv=8,
                                                        d_ff=64, num_heads=2, num_layers=1, vocab_size=1000)
    return estimate_phases(sections.data, sections.buckets, sections.training, sections.optimizer, sections.lora,
                           sections.validation, sections.memory, sections.parallelism, spec.transformer, spec.vae,
                           T5Config(**text_encoder), CONDITIONINGS[spec.conditioning](), MODES[mode](), torch.bfloat16,
                           {tuple(spec.train_video): sections.training.train_batch_size}, autocast=autocast)


def command(model, mode, flags):
    return shlex.join(["python", "benchmarks/estimate_memory.py", "--model", model, "--mode", mode, "--", *flags])


def markdown_row(model, mode, flags, phases):
    gib = {k: f"{phases[k] / 2**30:.1f}" for k in ("training", "validation", "final_test")}
    options = " ".join(flags) or "-"
    return (f"| {model} | {mode} | {phases['bucket']} | {phases['batch_size']} | {options} | {gib['training']} | "
            f"{gib['validation']} | {gib['final_test']} | `{command(model, mode, flags)}` |")


HEADER = ("| model | mode | frames x h x w | batch | options | training (GiB) | validation (GiB) | final test (GiB) | "
          "command |\n|---|---|---|---|---|---|---|---|---|")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["2b", "5b", "5b-i2v", "1.5-5b"], default="5b")
    parser.add_argument("--mode", choices=["lora", "sft"], default="lora")
    parser.add_argument("--table", choices=["readme"], default=None, help="Every row of the README's estimate table.")
    parser.add_argument("--scale", choices=["full", "tiny"], default="full", help="tiny: shrunk configs (tests).")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="Trainer flags, after --.")
    options = parser.parse_args(argv)
    flags = [f for f in options.trainer_flags if f != "--"]
    rows = README_TABLE if options.table else [(options.model, options.mode, flags)]
    print(HEADER)
    for model, mode, row_flags in rows:
        started = time.perf_counter()
        phases = estimate(model, mode, row_flags, options.scale)
        print(markdown_row(model, mode, row_flags, phases), flush=True)
        print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
