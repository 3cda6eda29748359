"""Merge LoRAs into a base transformer: each LoRA's update, times its weight, added to the weights it adapts.

The result is a plain transformer (no peft at inference, one file for tools that take one checkpoint), saved as a
diffusers `transformer/` folder in --output (load it with `tools/infer.py --transformer_path OUTPUT/transformer`)
and, with --comfyui, as one ComfyUI-native file `OUTPUT/transformer_comfyui.safetensors` for Load Diffusion Model.
Reads every LoRA form convert_lora.py reads, and the trainer's DoRA file and LoHa/LoKr run folders (merged by peft, at
the weight as peft's adapter scale); a weight follows the path after a colon (default 1.0). With no --lora, --comfyui
writes the base itself in ComfyUI's names (what its Load Diffusion Model node reads).

    python tools/merge_lora.py --base THUDM/CogVideoX-5b --lora my-run --output merged
    python tools/merge_lora.py --base THUDM/CogVideoX-5b --lora style.safetensors:0.8 --lora subject.safetensors:1 \\
        --output merged --comfyui
    python tools/merge_lora.py --base THUDM/CogVideoX-5b --output cogvideox-5b-comfyui --comfyui   # the base alone
"""

import argparse
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.errors import UsageError, exit_on_usage_error  # noqa: E402


COMFYUI_MODEL_NAME = "transformer_comfyui.safetensors"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="The model the LoRAs were trained on (Hub id or folder).")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="A LoRA file (or a run's folder) and its weight, e.g. style.safetensors:0.8; repeat "
                        "for more. 1.0 is the strength it was trained at. None: with --comfyui, the base alone.")
    parser.add_argument("--output", required=True, help="The folder to write transformer/ into.")
    parser.add_argument("--alpha", type=float, default=None,
                        help="The alpha for files that store none (the original's, finetrainers'); default scale 1.")
    parser.add_argument("--comfyui", action="store_true",
                        help=f"Also write {COMFYUI_MODEL_NAME}: the merged transformer with ComfyUI's native names.")
    parser.add_argument("--save_dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="Precision of the saved transformer (default: the base's own).")
    return parser


def merge(transformer, loras):
    """Add weight x update of each (adapters, weight) in `loras` to the transformer's weights, in float32."""
    import torch
    from tqdm.auto import tqdm

    modules = dict(transformer.named_modules())
    work = [(modules[name], adapter, weight) for adapters, weight in loras for name, adapter in adapters.items()]
    with torch.no_grad():
        for module, adapter, weight in tqdm(work, desc="merging", unit="module"):
            delta = adapter.delta(strength=weight).reshape(module.weight.shape)
            module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))


def peft_adapter_of(path):
    """("dora", file) for a DoRA in the diffusers form (the trainer's --lora_type dora), ("peft", folder) for a LoHa or
    LoKr run (its adapter/ folder: peft's own form), or None for every other LoRA form (read by lora_math)."""
    from safetensors import safe_open

    from tools.lora_math import DIFFUSERS_WEIGHT_NAME
    from training.modes import peft_folder_of

    path = Path(path)
    folder = peft_folder_of(path) if path.is_dir() else None
    if folder is not None:
        return "peft", folder
    file = path / DIFFUSERS_WEIGHT_NAME if path.is_dir() else path
    try:
        with safe_open(str(file), "pt") as weights:
            if any(key.endswith("lora_magnitude_vector") for key in weights.keys()):
                return "dora", file
    except Exception:  # not safetensors, missing: lora_math.read_lora says which in one line
        return None
    return None


def merge_with_peft(transformer, kind, path, weight, index):
    """Fold a DoRA, LoHa or LoKr into `transformer` with peft's own merge, at `weight` x its trained scale, and leave
    plain layers behind (DoRA's update is not a sum: it rescales each output row, so it cannot join merge())."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from training.modes import load_peft_folder

    name = f"merged-{index}"
    try:
        if kind == "peft":
            load_peft_folder(transformer, path, name)
        else:  # as a pipeline loads it: with the file's metadata (alpha, use_dora), which a bare path does not give
            from diffusers import CogVideoXPipeline

            state, metadata = CogVideoXPipeline.lora_state_dict(str(path), return_lora_metadata=True)
            transformer.load_lora_adapter(state, adapter_name=name, prefix="transformer", metadata=metadata)
    except (RuntimeError, ValueError, KeyError) as error:
        raise UsageError(f"{path} does not fit this model: {str(error).splitlines()[0][:300]}") from error
    modules = dict(transformer.named_modules())
    layers = [(module_name, module) for module_name, module in modules.items() if isinstance(module, BaseTunerLayer)]
    if not layers:
        raise UsageError(f"{path}: no module of this model took an adapter from it")
    for module_name, layer in layers:
        layer.set_scale(name, weight)
        layer.merge(adapter_names=[name])
        parent, _, child = module_name.rpartition(".")
        setattr(modules[parent] if parent else transformer, child, layer.get_base_layer())
    if hasattr(transformer, "peft_config"):  # diffusers' record of the adapters it loaded: none is left
        transformer.peft_config.pop(name, None)
        if not transformer.peft_config:
            del transformer.peft_config
            transformer._hf_peft_config_loaded = False


def comfyui_state(transformer):
    """The transformer's tensors with ComfyUI's native names. A sincos model (CogVideoX-2b) also gets its position
    table, a buffer diffusers does not save: ComfyUI takes a file without `patch_embed.pos_embedding` for a rotary
    model (comfy/model_detection.py), and with it uses the table as is, which is diffusers' sincos at the model's
    sample size (720x480, 49 frames for 2b), in float32 as ComfyUI holds it (diffusers computes it in float64)."""
    from training.lora_formats import native_transformer_state

    state = transformer.state_dict()
    table = getattr(transformer.patch_embed, "pos_embedding", None)
    if table is not None and "patch_embed.pos_embedding" not in state:
        state["patch_embed.pos_embedding"] = table.float()
    return native_transformer_state(state)


@exit_on_usage_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.lora and not args.comfyui:
        raise UsageError("no --lora to merge: give one or more (--lora PATH[:WEIGHT]), or --comfyui alone to write "
                         "the base in ComfyUI's names")
    import training  # noqa: F401  (quiet library notices)
    from tools.lora_math import DTYPES, TransformerWeights, check_fits, read_lora, weighted

    weights = TransformerWeights(args.base)
    loras, by_peft = [], []
    for spec in args.lora:
        path, weight = weighted(spec)
        found = peft_adapter_of(path)
        if found is not None:
            by_peft.append((*found, weight))
            continue
        adapters = read_lora(path, alpha=args.alpha)
        check_fits(adapters, weights, path)
        loras.append((adapters, weight))

    from diffusers import CogVideoXTransformer3DModel

    dtype = DTYPES[args.save_dtype] if args.save_dtype else weights.dtype()
    transformer = CogVideoXTransformer3DModel.from_pretrained(weights.folder, torch_dtype=dtype)
    merge(transformer, loras)
    for index, (kind, path, weight) in enumerate(by_peft):
        merge_with_peft(transformer, kind, path, weight, index)
    output = Path(args.output)
    if args.lora:  # the base alone is already a diffusers folder
        transformer.save_pretrained(output / "transformer")
        print(f"wrote {output / 'transformer'} ({len(args.lora)} LoRA(s) merged)")
    if args.comfyui:
        from safetensors.torch import save_file

        output.mkdir(parents=True, exist_ok=True)
        save_file(comfyui_state(transformer), str(output / COMFYUI_MODEL_NAME))
        print(f"wrote {output / COMFYUI_MODEL_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
