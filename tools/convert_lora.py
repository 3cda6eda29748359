"""Convert a CogVideoX LoRA between the diffusers/PEFT form, ComfyUI's native form and CogVideoX-Fun's form.

Reads any of: this toolkit's, the original cogvideox-factory's and finetrainers' `pytorch_lora_weights.safetensors`
(diffusers/PEFT keys), a PEFT `adapter_model.safetensors`, ComfyUI's native `diffusion_model.` form and the
`lora_unet_` forms (CogVideoX-Fun's, ComfyUI's); with or without alpha. Writes the other form: diffusers input gives
a ComfyUI file, anything else a diffusers file. Strength 1.0 in ComfyUI and weight 1.0 in diffusers then apply the
same update. A tensor that maps to no CogVideoX transformer module (a text-encoder LoRA, another model's) stops the
conversion with the list, unless --skip_unmapped.

    python tools/convert_lora.py my-run/pytorch_lora_weights.safetensors ComfyUI/models/loras/my_style.safetensors
    python tools/convert_lora.py my_style.safetensors converted/            # -> converted/pytorch_lora_weights.safetensors
    python tools/convert_lora.py original.safetensors out.safetensors --alpha 64   # files that do not store alpha
    python tools/convert_lora.py my-run/pytorch_lora_weights.safetensors fun_lora.safetensors --to fun  # VideoX-Fun
"""

import argparse
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="a .safetensors LoRA file")
    parser.add_argument("output", help="the file to write (or a folder: pytorch_lora_weights.safetensors / "
                        "pytorch_lora_weights_comfyui.safetensors in it)")
    parser.add_argument("--to", choices=["comfyui", "diffusers", "fun"], default=None,
                        help="the form to write (default: the other one of diffusers and comfyui); fun: the "
                        "lora_unet__ form VideoX-Fun's merge_lora reads")
    parser.add_argument("--alpha", type=float, default=None,
                        help="the LoRA alpha it was trained with, for files that store none (the original's, "
                        "finetrainers'): the update is scaled by alpha/rank. Without it such a file keeps scale 1, "
                        "as diffusers loads it.")
    parser.add_argument("--skip_unmapped", action="store_true",
                        help="write what maps and list the rest, instead of stopping")
    return parser


def convert(input_path, output_path, to=None, alpha=None, skip_unmapped=False, log=print):
    """Returns the written path. Raises UnmappedKeys (unless skip_unmapped) before writing anything."""
    import training  # noqa: F401  (quiet library notices)
    from training.lora_formats import (
        COMFYUI_WEIGHT_NAME,
        FUN_WEIGHT_NAME,
        UnmappedKeys,
        diffusers_layers,
        fun_state_dict,
        read_lora_file,
        save_comfyui,
        save_comfyui_state,
    )

    adapters, unmapped, form = read_lora_file(input_path, alpha=alpha)
    to = to or ("comfyui" if form == "diffusers" else "diffusers")
    if unmapped and not skip_unmapped:
        raise UnmappedKeys(unmapped)
    if not adapters:
        raise ValueError(f"{input_path}: no CogVideoX transformer LoRA in it")
    output_path = Path(output_path)
    if output_path.suffix != ".safetensors":
        output_path = output_path / {"comfyui": COMFYUI_WEIGHT_NAME, "fun": FUN_WEIGHT_NAME}.get(
            to, "pytorch_lora_weights.safetensors")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if to == "comfyui":
        save_comfyui(adapters, output_path)
    elif to == "fun":
        save_comfyui_state(fun_state_dict(adapters), output_path)
    else:
        from diffusers import CogVideoXPipeline

        layers, metadata = diffusers_layers(adapters)
        CogVideoXPipeline.save_lora_weights(output_path.parent, transformer_lora_layers=layers,
                                            transformer_lora_adapter_metadata=metadata, weight_name=output_path.name)
    ranks = sorted({a.rank for a in adapters.values()})
    no_alpha = sum(a.alpha is None for a in adapters.values())
    log(f"{form} -> {to}: {len(adapters)} modules, rank {'/'.join(map(str, ranks))}"
        f"{f', {no_alpha} without alpha (scale 1)' if no_alpha else ''} -> {output_path}")
    if unmapped:
        log(f"skipped {len(unmapped)} tensor(s) with no CogVideoX transformer module: {', '.join(unmapped[:10])}"
            f"{' ...' if len(unmapped) > 10 else ''}")
    return output_path


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not Path(args.input).is_file():
        print(f"error: {args.input} is not a file", file=sys.stderr)
        return 2
    from safetensors import SafetensorError

    try:
        convert(args.input, args.output, to=args.to, alpha=args.alpha, skip_unmapped=args.skip_unmapped)
    except SafetensorError as error:
        print(f"error: {args.input}: not a safetensors file ({error})", file=sys.stderr)
        return 2
    except ValueError as error:  # UnmappedKeys, an unknown form
        hint = " (--skip_unmapped writes the rest)" if type(error).__name__ == "UnmappedKeys" else ""
        print(f"error: {args.input}: {error}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
