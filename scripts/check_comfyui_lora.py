"""Check by hand, in ComfyUI's own code, that what a run writes for ComfyUI applies what diffusers / peft apply.

Needs a ComfyUI checkout with native CogVideoX (comfy/ldm/cogvideo/model.py); the toolkit and its tests do not.

1. The run's `pytorch_lora_weights_comfyui.safetensors` (LoRA, DoRA, LoHa or LoKr: the run's type is read from its
   folder) goes through ComfyUI's LoRA loader (comfy.sd.load_lora_for_models, as its LoraLoaderModelOnly node calls
   it) at strength 1.0 onto the base transformer, renamed into ComfyUI's native CogVideoX network (built by ComfyUI's
   supported_models / model_base), and ModelPatcher patches the weights. The same run's adapter is loaded as a user
   loads it (`load_lora_weights` for LoRA and DoRA, the peft folder for LoHa and LoKr) and merged by peft at 1.0.
   Printed: every patched weight against its peft-merged twin, keys ComfyUI did not load, and one forward pass of
   both networks (same latents, timestep and text embeddings) with and without the adapter.
2. With --merged (a plain LoRA run): `tools/merge_lora.py --comfyui` folds the LoRA into the base and its single file
   is loaded as ComfyUI's Load Diffusion Model node loads one (comfy.sd.load_diffusion_model, which detects the
   network from the weights); every tensor of it is compared with the diffusers base + LoRA, and its forward pass
   with the patched network of step 1 and with diffusers.

    python scripts/check_comfyui_lora.py --comfyui ~/ComfyUI --model demo-output/tiny-cogvideox --lora_dir demo-output/lora
    python scripts/check_comfyui_lora.py --comfyui ~/ComfyUI --model MODEL --lora_dir RUN --merged
ComfyUI's imports may need packages of its requirements.txt: --pythonpath adds folders that hold them (searched
only once diffusers is imported). ComfyUI's own loader detects the network from the weights as the published models
have it (attention head dim 64, 16 latent channels), so --merged needs a model of that shape:
scripts/check_comfyui_runs.py builds tiny ones and their runs. Exit status 0 when every check holds.
"""

import argparse
import inspect
import json
import logging
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WEIGHT_TOLERANCE = 1e-5  # fp32: the same sums in another order


def import_comfyui(comfyui, pythonpath=()):
    """Put a ComfyUI checkout on the path (CPU, its arguments parsed from nothing) and import its loaders."""
    if str(comfyui) not in sys.path:
        sys.path[:0] = [str(comfyui)]
        sys.path.extend(str(p) for p in pythonpath)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    return comfy


def comfyui_network(config, image_to_video, state):
    """ComfyUI's native network built for this (possibly tiny) config, holding `state` (native names)."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    keys = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "flip_sin_to_cos",
            "freq_shift", "time_embed_dim", "ofs_embed_dim", "text_embed_dim", "num_layers", "sample_width",
            "sample_height", "sample_frames", "patch_size", "patch_size_t", "temporal_compression_ratio",
            "max_text_seq_length", "spatial_interpolation_scale", "temporal_interpolation_scale",
            "use_rotary_positional_embeddings", "use_learned_positional_embeddings", "patch_bias")
    unet_config = {"image_model": "cogvideox", **{k: config[k] for k in keys if k in config}}
    if not config["use_rotary_positional_embeddings"]:  # 2b's sincos table, read as ComfyUI's loader reads it
        unet_config["use_learned_positional_embeddings"] = True
    supported = (comfy.supported_models.CogVideoX_I2V if image_to_video else comfy.supported_models.CogVideoX_T2V)
    model_config = supported(unet_config)
    model_config.unet_config.update(unet_config)  # the tiny models' widths, not the published ones
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    model.load_model_weights(dict(state), "")
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def with_table(transformer):
    """The state dict with 2b's sincos table, a buffer diffusers does not save (tools/merge_lora.py writes it)."""
    state = transformer.state_dict()
    table = getattr(transformer.patch_embed, "pos_embedding", None)
    if table is not None:
        state.setdefault("patch_embed.pos_embedding", table)
    return state


def adapter_kind(run):
    """lora, dora, loha or lokr: what the run folder holds."""
    from safetensors import safe_open

    config = Path(run) / "adapter" / "adapter_config.json"
    if config.is_file():
        return json.loads(config.read_text())["peft_type"].lower()
    with safe_open(str(Path(run) / "pytorch_lora_weights.safetensors"), "pt") as f:
        return "dora" if any("lora_magnitude_vector" in key for key in f.keys()) else "lora"


def merged_weights(transformer):
    """{module name: weight} of every Linear / Conv of a transformer whose peft layers are merged."""
    import torch

    weights = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "get_base_layer"):
            weights[name] = module.get_base_layer().weight.detach()
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ".base_layer" not in name \
                and ".lora_" not in name and ".hada_" not in name and ".lokr_" not in name:
            weights[name] = module.weight.detach()
    return weights


def collect_not_loaded():
    """A logging handler that keeps ComfyUI's 'lora key not loaded' lines."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    return handler, messages


def check_adapter(pipe, run, kind, image_to_video):
    """Step 1. Returns (ok, patched ModelPatcher, inputs, diffusers forward with the adapter)."""
    import comfy.sd
    import comfy.utils
    import torch

    from training.lora_formats import COMFYUI_WEIGHT_NAME, native_module, native_transformer_state
    from training.modes import ADAPTER_NAME, LoRA

    base_weights = {k: v.clone() for k, v in merged_weights(pipe.transformer).items()}
    config, compare_forward = dict(pipe.transformer.config), True
    try:
        patcher = comfyui_network(config, image_to_video, native_transformer_state(with_table(pipe.transformer)))
    except RuntimeError as error:  # its sincos table splits the width 2/3 : 1/3, which a tiny width may not take
        print(f"[{kind}] ComfyUI cannot build its 2b network at this width ({error}): weights only, in its rotary "
              "network (the same weights and LoRA keys)")
        config, compare_forward = {**config, "use_rotary_positional_embeddings": True}, False
        patcher = comfyui_network(config, image_to_video, native_transformer_state(pipe.transformer.state_dict()))
    handler, messages = collect_not_loaded()
    lora = comfy.utils.load_torch_file(str(Path(run) / COMFYUI_WEIGHT_NAME))
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    logging.getLogger().removeHandler(handler)
    not_loaded = [m for m in messages if "not loaded" in m.lower()]
    inputs = forward_inputs(pipe.transformer.config, image_to_video)
    if compare_forward:
        native_before = native_forward(patcher.model.diffusion_model, inputs)
        diffusers_before = diffusers_forward(pipe, inputs)
    patched.patch_model(force_patch_weights=True)
    comfy_weights = patched.model.diffusion_model.state_dict()

    mode = LoRA()
    mode.adapter_type = kind
    mode.apply_to_pipeline(pipe, run)  # as a user loads it: diffusers for lora/dora, the peft folder for loha/lokr
    for module in pipe.transformer.modules():
        if ADAPTER_NAME in getattr(module, "scaling", {}):
            module.merge(adapter_names=[ADAPTER_NAME])
    fused = merged_weights(pipe.transformer)

    changed, worst, largest = 0, 0.0, 0.0
    for name, weight in fused.items():
        native = native_module(name)
        if native is None:
            continue
        comfy_weight = comfy_weights[f"{native}.weight"].float()
        worst = max(worst, (comfy_weight - weight.float()).abs().max().item())
        largest = max(largest, (weight.float() - base_weights[name].float()).abs().max().item())
        changed += not torch.equal(weight, base_weights[name])
    print(f"[{kind}] {Path(run) / COMFYUI_WEIGHT_NAME}")
    print(f"  ComfyUI keys not loaded: {not_loaded or 'none'}")
    print(f"  weights the adapter changes in peft: {changed}; patched by ComfyUI: {len(patched.patches)}")
    print(f"  max |ComfyUI patched - peft merged| over all linear weights: {worst:.3g} (largest change {largest:.3g})")
    ok = not not_loaded and changed == len(patched.patches) and worst < WEIGHT_TOLERANCE
    if not compare_forward:
        return ok, None, inputs, None, None
    native_after = native_forward(patched.model.diffusion_model, inputs)
    diffusers_after = diffusers_forward(pipe, inputs)
    # The networks themselves may differ (ComfyUI's sincos split for 2b, its rotary grid): the base row says.
    effect_native, effect_diffusers = native_after - native_before, diffusers_after - diffusers_before
    print(f"  forward without the adapter: |ComfyUI - diffusers| max {(native_before - diffusers_before).abs().max():.3g}")
    print(f"  forward, adapter at 1.0: |ComfyUI - diffusers| max {(native_after - diffusers_after).abs().max():.3g}; "
          f"the adapter's effect: ComfyUI {effect_native.abs().max():.3g}, diffusers {effect_diffusers.abs().max():.3g}, "
          f"|difference| max {(effect_native - effect_diffusers).abs().max():.3g}")
    return ok, patched, inputs, native_after, diffusers_after


def check_merged(model, run, pipe, patched_native_after, diffusers_after, inputs):
    """Step 2: merge_lora --comfyui's file through ComfyUI's own diffusion-model loader."""
    import comfy.sd

    from tools.merge_lora import COMFYUI_MODEL_NAME
    from tools.merge_lora import main as merge_main
    from training.lora_formats import native_transformer_state
    from training.modes import ADAPTER_NAME

    with tempfile.TemporaryDirectory() as output:
        merge_main(["--base", str(model), "--lora", str(run), "--output", output, "--comfyui"])
        try:
            loaded = comfy.sd.load_diffusion_model(str(Path(output) / COMFYUI_MODEL_NAME))  # as Load Diffusion Model
        except RuntimeError as error:  # e.g. a 2b table of another size than the published 2b's (226 + 60x90x13)
            print(f"[merged] ComfyUI's loader cannot load the file: {str(error).strip().splitlines()[-1]}")
            return False
        loaded.patch_model()  # the weights in memory before the file goes
    network = loaded.model.diffusion_model
    detected = loaded.model.model_config.unet_config
    theirs = dict(network.state_dict())
    # The pipeline holds base + LoRA merged by peft: its base layers' tensors, without the adapter's own.
    ours = native_transformer_state({k.replace(".base_layer.", "."): v for k, v in with_table(pipe.transformer).items()
                                     if f".{ADAPTER_NAME}" not in k})
    missing = sorted(set(theirs) - set(ours))
    unexpected = sorted(set(ours) - set(theirs))
    worst = max((theirs[k].float() - ours[k].float()).abs().max().item() for k in set(theirs) & set(ours))
    config = pipe.transformer.config
    defaults = {k: p.default for k, p in inspect.signature(type(network)).parameters.items()}
    detected = {**defaults, **detected}  # what the network was built with
    config_rows = {k: (detected.get(k), config.get(k)) for k in ("num_attention_heads", "attention_head_dim",
                   "num_layers", "in_channels", "out_channels", "time_embed_dim", "text_embed_dim", "patch_size",
                   "patch_size_t", "ofs_embed_dim", "use_rotary_positional_embeddings",
                   "use_learned_positional_embeddings", "patch_bias") if detected.get(k) != config.get(k)}
    after = native_forward(network, inputs)
    print(f"[merged] tools/merge_lora.py --comfyui {COMFYUI_MODEL_NAME}, loaded by comfy.sd.load_diffusion_model as "
          f"{type(loaded.model.model_config).__name__}")
    print(f"  config ComfyUI detected that differs from the model's (detected, model): {config_rows or 'none'}")
    print(f"  ComfyUI weights the file does not hold (left as ComfyUI initialises them): {missing or 'none'}; "
          f"file tensors ComfyUI's network has no place for: {unexpected or 'none'}")
    print(f"  max |ComfyUI loaded - diffusers base+LoRA| over {len(set(theirs) & set(ours))} tensors: {worst:.3g}")
    print(f"  forward: |merged in ComfyUI - base+LoRA patched in ComfyUI| max "
          f"{(after - patched_native_after).abs().max():.3g}; |merged in ComfyUI - diffusers base+LoRA| max "
          f"{(after - diffusers_after).abs().max():.3g}")
    # The same network as step 1's (5b, 1.5) or diffusers' own (2b, whose table ComfyUI uses as learned positions).
    same = min((after - patched_native_after).abs().max(), (after - diffusers_after).abs().max()) < 1e-4
    return not missing and not unexpected and worst < WEIGHT_TOLERANCE and same


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI checkout")
    parser.add_argument("--model", required=True, help="the base model (diffusers layout) the run trained on")
    parser.add_argument("--lora_dir", required=True, help="the run's --output_dir (or a checkpoint folder)")
    parser.add_argument("--merged", action="store_true",
                        help="also check tools/merge_lora.py --comfyui's file through ComfyUI's diffusion-model loader")
    parser.add_argument("--pythonpath", nargs="*", default=[], help="folders with ComfyUI's dependencies")
    args = parser.parse_args(argv)

    import torch
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel

    import training  # noqa: F401

    torch.manual_seed(0)
    transformer_config = CogVideoXTransformer3DModel.load_config(args.model, subfolder="transformer")
    image_to_video = transformer_config["in_channels"] == 2 * transformer_config["out_channels"]
    pipe = (CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline).from_pretrained(args.model)
    import_comfyui(args.comfyui, args.pythonpath)
    kind = adapter_kind(args.lora_dir)
    ok, patched, inputs, native_after, diffusers_after = check_adapter(pipe, args.lora_dir, kind, image_to_video)
    if args.merged and patched is not None:
        if kind != "lora":
            parser.error(f"--merged: tools/merge_lora.py merges plain LoRAs; {args.lora_dir} is a {kind} run")
        ok = check_merged(args.model, args.lora_dir, pipe, native_after, diffusers_after, inputs) and ok
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def forward_inputs(config, image_to_video):
    import torch

    generator = torch.Generator().manual_seed(1)
    frames = 2 * (config.patch_size_t or 1)
    height, width = 8, 8
    if config.use_learned_positional_embeddings:  # the one shape its table holds
        frames = (config.sample_frames - 1) // config.temporal_compression_ratio + 1
        height, width = config.sample_height, config.sample_width
    elif not config.use_rotary_positional_embeddings:  # 2b's sincos: ComfyUI reads its table as learned positions,
        frames, height, width = 1, config.sample_height, config.sample_width  # which hold the sample size's first frame
    latents = torch.randn(1, frames, config.in_channels, height, width, generator=generator)
    text = torch.randn(1, config.max_text_seq_length, config.text_embed_dim, generator=generator)
    return {"latents": latents, "text": text, "timestep": torch.tensor([500])}


@__import__("torch").no_grad()
def native_forward(network, inputs):
    return network(inputs["latents"].permute(0, 2, 1, 3, 4), inputs["timestep"], inputs["text"],
                   ofs=inputs["timestep"] * 0 + 2.0 if network.ofs_proj_dim else None).permute(0, 2, 1, 3, 4)


@__import__("torch").no_grad()
def diffusers_forward(pipe, inputs):
    import torch

    config = pipe.transformer.config
    _, frames, _, height, width = inputs["latents"].shape
    rotary = None
    if config.use_rotary_positional_embeddings:
        rotary = pipe._prepare_rotary_positional_embeddings(height * 8, width * 8, frames, torch.device("cpu"))
    ofs = torch.full((1,), 2.0) if config.ofs_embed_dim else None
    return pipe.transformer(hidden_states=inputs["latents"], encoder_hidden_states=inputs["text"],
                            timestep=inputs["timestep"], ofs=ofs, image_rotary_emb=rotary, return_dict=False)[0]


if __name__ == "__main__":
    sys.exit(main())
