"""Average a run's saved checkpoints after training: a uniform mean, or an EMA, of the trained weights over a range of
steps (the LoRA's factors, or every weight of a full fine-tune's transformer/).

--ema_decay D weights the checkpoints as a per-step EMA would, holding each checkpoint's weights until the next:
from the first checkpoint's weights, each following checkpoint g steps later gives avg = D^g * avg + (1 - D^g) * w.
(Training's --ema_decay averages every step exactly; this needs only the checkpoints a run kept.) Without it each
checkpoint counts the same.

    python tools/average_checkpoints.py my-run --from_step 1000 --to_step 3000 --output my-run/averaged
    python tools/average_checkpoints.py my-run --ema_decay 0.999 --output my-run/ema-posthoc

Writes pytorch_lora_weights.safetensors and pytorch_lora_weights_comfyui.safetensors (a LoRA run), or transformer/
(a full fine-tune), into --output.
"""

import argparse
import shutil
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.errors import UsageError, exit_on_usage_error  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the run's --output_dir (its checkpoint-N folders)")
    parser.add_argument("--output", required=True, help="folder to write the average into")
    parser.add_argument("--from_step", type=int, default=None, help="first checkpoint step to include (default: all)")
    parser.add_argument("--to_step", type=int, default=None, help="last checkpoint step to include (default: all)")
    parser.add_argument("--ema_decay", type=float, default=None,
                        help="EMA weighting with this per-step decay (0 < D < 1) instead of a uniform mean")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="precision written")
    return parser


def chosen_checkpoints(run, from_step=None, to_step=None):
    """[(step, folder)] of the run's complete checkpoints in the range, oldest first."""
    from training.checkpoint import complete_checkpoints

    if not Path(run).is_dir():
        raise UsageError(f"{run}: no such folder")
    found = [(step, path) for step, path in complete_checkpoints(run)
             if (from_step is None or step >= from_step) and (to_step is None or step <= to_step)]
    if not found:
        raise UsageError(f"{run}: no complete checkpoint in steps {from_step or 'first'}..{to_step or 'last'}")
    return found


def checkpoint_weights(folder):
    """{name: tensor} of a checkpoint's trained weights (its LoRA file, or transformer/) and its kind."""
    from safetensors.torch import load_file

    from training.modes import LORA_WEIGHT_NAME, _weight_files

    if (folder / LORA_WEIGHT_NAME).is_file():
        return load_file(folder / LORA_WEIGHT_NAME), "lora"
    if (folder / "transformer").is_dir():
        state = {}
        for shard in _weight_files(folder / "transformer"):
            state.update(load_file(folder / "transformer" / shard))
        return state, "transformer"
    raise UsageError(f"{folder}: neither {LORA_WEIGHT_NAME} nor transformer/ in it")


def average(checkpoints, ema_decay=None):
    """(float64 average {name: tensor}, kind) over [(step, folder)], one checkpoint in memory at a time."""
    total, kind, previous = None, None, None
    for index, (step, folder) in enumerate(checkpoints):
        weights, this_kind = checkpoint_weights(folder)
        if total is None:
            total, kind = {k: v.double() for k, v in weights.items()}, this_kind
        else:
            if this_kind != kind or weights.keys() != total.keys():
                raise UsageError(f"{folder}: its weights do not match the earlier checkpoints'")
            # Uniform: the running mean; EMA: the weight of the new checkpoint after g steps.
            keep = ema_decay ** (step - previous) if ema_decay is not None else index / (index + 1)
            for name, value in weights.items():
                total[name].mul_(keep).add_(value.double(), alpha=1 - keep)
        previous = step
    return total, kind


def write(state, kind, first_folder, output, dtype):
    import torch
    from safetensors.torch import save_file

    cast = {k: v.to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype])).contiguous()
            for k, v in state.items()}
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if kind == "lora":
        from safetensors import safe_open

        from tools.lora_math import write_lora
        from training.lora_formats import read_lora

        with safe_open(str(first_folder / "pytorch_lora_weights.safetensors"), "pt") as f:
            metadata = f.metadata() or {}  # the adapter's rank and alpha
        adapters, _, _ = read_lora(cast, metadata)
        return list(write_lora(adapters, output, dtype))
    folder = output / "transformer"
    folder.mkdir(exist_ok=True)
    shutil.copy(first_folder / "transformer" / "config.json", folder / "config.json")
    save_file(cast, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return [folder]


@exit_on_usage_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise UsageError(f"--ema_decay must lie between 0 and 1, both excluded (got {args.ema_decay:g})")
    import training  # noqa: F401  (quiet library notices)

    checkpoints = chosen_checkpoints(args.run, args.from_step, args.to_step)
    state, kind = average(checkpoints, args.ema_decay)
    written = write(state, kind, checkpoints[0][1], args.output, args.dtype)
    how = f"EMA (decay {args.ema_decay:g} per step)" if args.ema_decay is not None else "uniform mean"
    print(f"{how} of {len(checkpoints)} checkpoint(s), steps {checkpoints[0][0]}..{checkpoints[-1][0]}: "
          + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
