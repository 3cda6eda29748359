"""Combine LoRAs into one: the weighted sum of their updates, as one LoRA whose rank is the sum of theirs.

Each module's up matrices (scaled by weight x alpha/rank) and down matrices are stacked, so loading the result at
1.0 applies exactly what loading each LoRA at its weight applies. --rank or --energy then resizes it by SVD (as
resize_lora.py does, the error per module printed). Writes both forms into --output. Reads every LoRA form
convert_lora.py reads; a weight follows the path after a colon (default 1.0).

    python tools/combine_loras.py style.safetensors:0.7 subject-run:1.0 --output style-and-subject
    python tools/combine_loras.py a.safetensors:1 b.safetensors:0.5 --output ab --rank 64
"""

import argparse
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.lora_math import DTYPES, parse_rank_flags  # noqa: E402
from training.errors import UsageError, exit_on_usage_error  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("loras", nargs="+", metavar="PATH[:WEIGHT]",
                        help="LoRA files (or runs' folders), each with its weight, e.g. style.safetensors:0.7.")
    parser.add_argument("--output", required=True, help="The folder to write the combined LoRA into.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help="Resize the combined LoRA to this rank (default: keep the sum).")
    size.add_argument("--energy", type=float,
                      help="Resize it per module to the fewest ranks keeping this share (0-1] of the update's energy.")
    parser.add_argument("--alpha", type=float, default=None,
                        help="The alpha for files that store none (the original's, finetrainers'); default scale 1.")
    parser.add_argument("--save_dtype", choices=sorted(DTYPES), default="fp32", help="Precision of the written LoRA.")
    return parser


def combine(loras):
    """{module: Adapter} whose update is the sum of weight x update over (path, adapters, weight) in `loras`."""
    import torch
    from tqdm.auto import tqdm

    from training.lora_formats import Adapter

    parts = {}
    for path, adapters, weight in tqdm(loras, desc="combining", unit="LoRA"):
        for module, adapter in adapters.items():
            scale = weight * (adapter.alpha / adapter.rank if adapter.alpha is not None else 1.0)
            shape = (adapter.up.shape[0], *adapter.down.shape[1:])
            if module in parts and parts[module][0] != shape:
                raise UsageError(f"{path} does not fit the LoRAs before it: {module} is {shape} in it, "
                                 f"{parts[module][0]} in them (LoRAs of different CogVideoX models?)")
            parts.setdefault(module, (shape, [], []))
            parts[module][1].append(adapter.up.float() * scale)
            parts[module][2].append(adapter.down.float())
    combined = {}
    for module, (_, ups, downs) in sorted(parts.items()):
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        combined[module] = Adapter(down, up, float(down.shape[0]))
    return combined


@exit_on_usage_error
def main(argv=None):
    args = parse_rank_flags(build_parser(), argv)
    from tools.lora_math import read_lora, report, weighted, write_lora

    loras = [(path, read_lora(path, alpha=args.alpha), weight) for path, weight in map(weighted, args.loras)]
    adapters = combine(loras)
    if args.rank is not None or args.energy is not None:
        from tools.resize_lora import resize

        adapters, rows = resize(adapters, args.rank, args.energy)
        report(rows)
    ranks = sorted({adapter.rank for adapter in adapters.values()})
    print(f"{len(loras)} LoRA(s) -> {len(adapters)} modules, rank {'/'.join(map(str, ranks))}")
    for path in write_lora(adapters, args.output, args.save_dtype):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
