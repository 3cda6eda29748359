"""Check by hand, in ComfyUI's own code, that a run's ComfyUI LoRA applies what diffusers applies.

Needs a ComfyUI checkout with native CogVideoX (comfy/ldm/cogvideo/model.py); the toolkit and its tests do not.
The base transformer is renamed into ComfyUI's native CogVideoX network (built by ComfyUI's supported_models /
model_base), the run's `pytorch_lora_weights_comfyui.safetensors` goes through ComfyUI's LoRA loader
(comfy.sd.load_lora_for_models, as its LoraLoaderModelOnly node calls it) at strength 1.0 and ModelPatcher patches
the weights. The same run's diffusers LoRA is loaded with `load_lora_weights` and fused at weight 1.0. Printed:
every patched weight against its diffusers twin, keys ComfyUI did not load, and one forward pass of both networks
(same latents, timestep and text embeddings) with and without the LoRA.

    python scripts/check_comfyui_lora.py --comfyui ~/ComfyUI --model tiny-cogvideox --lora_dir demo-output
ComfyUI's imports may need packages of its requirements.txt: --pythonpath adds folders that hold them (searched
only once diffusers is imported).
"""

import argparse
import logging
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

def comfyui_network(comfyui, config, image_to_video, state, pythonpath=()):
    sys.path[:0] = [str(comfyui), *pythonpath]
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    import torch

    comfy.options.enable_args_parsing()
    import comfy.model_patcher
    import comfy.supported_models

    keys = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "flip_sin_to_cos",
            "freq_shift", "time_embed_dim", "ofs_embed_dim", "text_embed_dim", "num_layers", "sample_width",
            "sample_height", "sample_frames", "patch_size", "patch_size_t", "temporal_compression_ratio",
            "max_text_seq_length", "spatial_interpolation_scale", "temporal_interpolation_scale",
            "use_rotary_positional_embeddings", "use_learned_positional_embeddings", "patch_bias")
    unet_config = {"image_model": "cogvideox", **{k: config[k] for k in keys if k in config}}
    supported = (comfy.supported_models.CogVideoX_I2V if image_to_video else comfy.supported_models.CogVideoX_T2V)
    model_config = supported(unet_config)
    model_config.unet_config.update(unet_config)  # the tiny models' widths, not the published ones
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    model.load_model_weights(dict(state), "")
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI checkout")
    parser.add_argument("--model", required=True, help="the base model (diffusers layout) the LoRA was trained on")
    parser.add_argument("--lora_dir", required=True, help="the run's --output_dir (or a checkpoint folder)")
    parser.add_argument("--pythonpath", nargs="*", default=[], help="folders with ComfyUI's dependencies")
    args = parser.parse_args(argv)

    import torch
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel

    import training  # noqa: F401
    from training.lora_formats import COMFYUI_WEIGHT_NAME, native_module, native_transformer_state

    torch.manual_seed(0)
    transformer_config = CogVideoXTransformer3DModel.load_config(args.model, subfolder="transformer")
    image_to_video = transformer_config["in_channels"] == 2 * transformer_config["out_channels"]
    pipe = (CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline).from_pretrained(args.model)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    patcher = comfyui_network(args.comfyui, dict(pipe.transformer.config), image_to_video, native_transformer_state(base),
                              args.pythonpath)

    import comfy.sd
    import comfy.utils

    not_loaded = []
    handler = logging.Handler()
    handler.emit = lambda record: not_loaded.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    lora = comfy.utils.load_torch_file(str(Path(args.lora_dir) / COMFYUI_WEIGHT_NAME))
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    logging.getLogger().removeHandler(handler)
    not_loaded = [m for m in not_loaded if "not loaded" in m.lower() or "NOT LOADED" in m]
    inputs = forward_inputs(pipe.transformer.config, image_to_video)
    native_before = native_forward(patcher.model.diffusion_model, inputs)
    diffusers_before = diffusers_forward(pipe, inputs)
    patched.patch_model(force_patch_weights=True)
    comfy_weights = patched.model.diffusion_model.state_dict()

    pipe.load_lora_weights(args.lora_dir, weight_name="pytorch_lora_weights.safetensors", adapter_name="run")
    pipe.set_adapters(["run"], [1.0])
    pipe.fuse_lora(lora_scale=1.0, components=["transformer"])
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()

    changed, worst = 0, 0.0
    for key, weight in fused.items():
        module, _, leaf = key.rpartition(".")
        native = native_module(module)
        if native is None or leaf != "weight":
            continue
        difference = (comfy_weights[f"{native}.weight"].float() - weight.float()).abs().max().item()
        worst = max(worst, difference)
        changed += not torch.equal(weight, base[key])
    print(f"ComfyUI keys not loaded: {not_loaded or 'none'}")
    print(f"weights changed by the LoRA in diffusers: {changed}; patched in ComfyUI: {len(patched.patches)}")
    print(f"largest |ComfyUI patched - diffusers fused| over all linear weights: {worst:.3g}")
    native_after = native_forward(patched.model.diffusion_model, inputs)
    diffusers_after = diffusers_forward(pipe, inputs)
    # The networks themselves may differ (ComfyUI's sincos split for 2b, its 5b-I2V positions): the base row says.
    print(f"forward without the LoRA: |ComfyUI - diffusers| max {(native_before - diffusers_before).abs().max():.3g}")
    print(f"forward, LoRA at 1.0: |ComfyUI - diffusers| max {(native_after - diffusers_after).abs().max():.3g}; "
          f"the LoRA's effect: ComfyUI {(native_after - native_before).abs().max():.3g}, "
          f"diffusers {(diffusers_after - diffusers_before).abs().max():.3g}")
    return 0 if not not_loaded and changed == len(patched.patches) and worst < 1e-5 else 1


def forward_inputs(config, image_to_video):
    import torch

    generator = torch.Generator().manual_seed(1)
    frames = 2 * (config.patch_size_t or 1)
    height, width = 8, 8
    if config.use_learned_positional_embeddings:  # the one shape its table holds
        frames = (config.sample_frames - 1) // config.temporal_compression_ratio + 1
        height, width = config.sample_height, config.sample_width
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
