"""Resize a LoRA to a lower rank: the best approximation of each module's update at that rank, by SVD.

Writes both forms into --output (pytorch_lora_weights.safetensors for diffusers, pytorch_lora_weights_comfyui.safetensors
for ComfyUI), alpha = rank in each module, and prints per module the rank, the share of the update's energy kept and
the relative error |update - resized| / |update|. Resizing to the LoRA's own rank is lossless; a module already at or
below the rank asked keeps its own. Reads every LoRA form convert_lora.py reads.

    python tools/resize_lora.py my-run/pytorch_lora_weights.safetensors --rank 32 --output my-lora-r32
    python tools/resize_lora.py ComfyUI/models/loras/style.safetensors --energy 0.95 --output style-small
"""

import argparse
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.lora_math import add_rank_arguments, parse_rank_flags  # noqa: E402
from training.errors import exit_on_usage_error  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lora", help="The LoRA file (any form convert_lora.py reads) or a run's folder.")
    parser.add_argument("--output", required=True, help="The folder to write the resized LoRA into.")
    add_rank_arguments(parser)
    parser.add_argument("--alpha", type=float, default=None,
                        help="The alpha for files that store none (the original's, finetrainers'); default scale 1.")
    return parser


def resize(adapters, rank=None, energy=None):
    """({module: Adapter}, [(module, rank, energy kept)])."""
    from tqdm.auto import tqdm

    from tools.lora_math import resized

    smaller, rows = {}, []
    for module, adapter in tqdm(adapters.items(), desc="resizing", unit="module"):
        smaller[module], kept = resized(adapter, rank, energy)
        rows.append((module, smaller[module].rank, kept))
    return smaller, rows


@exit_on_usage_error
def main(argv=None):
    args = parse_rank_flags(build_parser(), argv)
    from tools.lora_math import read_lora, report, write_lora

    adapters, rows = resize(read_lora(args.lora, alpha=args.alpha), args.rank, args.energy)
    report(rows)
    for path in write_lora(adapters, args.output, args.save_dtype):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
