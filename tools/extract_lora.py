"""Extract a LoRA from a full fine-tune: each Linear/Conv's change (tuned - base) as a low-rank product, by SVD.

Reads one weight of each model at a time (memory: about one layer), on the CPU or a GPU (--device cuda: much faster
for 5B models). Writes both forms into --output (pytorch_lora_weights.safetensors for diffusers,
pytorch_lora_weights_comfyui.safetensors for ComfyUI), alpha = rank in each module (weight 1.0 applies the change as
extracted), and prints per module the rank, the share of the change's energy kept and the relative error.

    python tools/extract_lora.py --base THUDM/CogVideoX-5b --tuned my-sft/transformer --rank 64 --output my-lora
    python tools/extract_lora.py --base THUDM/CogVideoX-5b --tuned my-sft/transformer --energy 0.9 --output my-lora
"""

import argparse
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.lora_math import add_rank_arguments, parse_rank_flags  # noqa: E402
from training.errors import UsageError, exit_on_usage_error  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="The model that was fine-tuned: a pipeline (Hub id or folder).")
    parser.add_argument("--tuned", required=True, help="The full fine-tune's transformer folder (<run>/transformer).")
    parser.add_argument("--output", required=True, help="The folder to write the LoRA into.")
    add_rank_arguments(parser)
    parser.add_argument("--device", default="cpu", help="Where the SVDs run: cpu, cuda, cuda:1, ...")
    return parser


def extract(base, tuned, rank=None, energy=None, device="cpu"):
    """({module: Adapter}, [(module, rank, energy kept)], [changed tensors a LoRA cannot hold])."""
    import torch
    from tqdm.auto import tqdm

    from tools.lora_math import as_adapter, lora_modules, svd, truncate

    if set(base.keys()) != set(tuned.keys()) or any(base.shape(k) != tuned.shape(k) for k in base.keys()):
        raise UsageError(f"{tuned.folder} does not fit {base.folder}: their weights differ in names or shapes "
                         "(a fine-tune of another CogVideoX model?)")
    modules = lora_modules(base.keys())
    adapters, rows = {}, []
    for module in tqdm(modules, desc="extracting", unit="module"):
        key = f"{module}.weight"
        delta = (tuned.get(key).to(device, torch.float32) - base.get(key).to(device, torch.float32))
        if not delta.any():
            continue
        u, s, vh = svd(delta.flatten(1))
        up, down, kept = truncate(u, s, vh, rank, energy)
        adapters[module] = as_adapter(up.cpu(), down.cpu(), tuple(delta.shape))
        rows.append((module, down.shape[0], kept))
    held = {f"{module}.weight" for module in modules}
    left = [k for k in base.keys() if k not in held and not torch.equal(base.get(k), tuned.get(k))]
    return adapters, rows, left


@exit_on_usage_error
def main(argv=None):
    args = parse_rank_flags(build_parser(), argv)
    from tools.lora_math import TransformerWeights, report, write_lora

    base, tuned = TransformerWeights(args.base), TransformerWeights(args.tuned)
    adapters, rows, left = extract(base, tuned, args.rank, args.energy, args.device)
    if not adapters:
        raise UsageError(f"{args.tuned}: no Linear or Conv weight differs from {args.base}: nothing to extract")
    report(rows)
    if left:
        print(f"not in the LoRA: {len(left)} changed tensor(s) a LoRA cannot hold (biases, norms, embeddings): "
              f"{', '.join(left[:6])}{' ...' if len(left) > 6 else ''}")
    for path in write_lora(adapters, args.output, args.save_dtype):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
