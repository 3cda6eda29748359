"""The ComfyUI LoRA every LoRA run writes, and tools/convert_lora.py.

ComfyUI is not installed here: the tests apply its rules as its source states them (ComfyUI with native CogVideoX,
read for this: comfy/ldm/cogvideo/model.py for the network's weights and call order, comfy/lora.py
model_lora_keys_unet + load_lora for which file keys patch which weight, comfy/weight_adapter/lora.py for the
arithmetic). scripts/check_comfyui_lora.py runs the same comparison inside a real ComfyUI checkout.
"""

import json
import re

import pytest
import torch
from conftest import ASSETS, lora_argv, run_trainer, tiny_pipeline, trainer_main


ALL_TARGETS = ("to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,norm1.linear,norm2.linear,norm_out.linear,proj_out,"
               "proj,text_proj,linear_1,linear_2")


# ---------------------------------------------------------------------------------------------- ComfyUI's rules


def comfyui_weights(config):
    """name -> shape of every weight of ComfyUI's native CogVideoXTransformer3DModel built for this config, under
    the `diffusion_model.` prefix its BaseModel gives it (comfy/ldm/cogvideo/model.py, __init__ of each class)."""
    dim, head = config["num_attention_heads"] * config["attention_head_dim"], config["attention_head_dim"]
    time, p, pt = config["time_embed_dim"], config["patch_size"], config["patch_size_t"]
    shapes = {
        "patch_embed.proj": (dim, config["in_channels"], p, p) if pt is None else (dim, config["in_channels"] * p * p * pt),
        "patch_embed.text_proj": (dim, config["text_embed_dim"]),
        "time_embedding_linear_1": (time, dim),
        "time_embedding_linear_2": (time, time),
        "norm_final": (dim,),
        "norm_out.linear": (2 * dim, time),
        "norm_out.norm": (dim,),
        "proj_out": (p * p * (pt or 1) * config["out_channels"], dim),
    }
    if config.get("ofs_embed_dim"):
        ofs = config["ofs_embed_dim"]
        shapes.update({"ofs_embedding_linear_1": (ofs, ofs), "ofs_embedding_linear_2": (ofs, ofs)})
    for i in range(config["num_layers"]):
        block = f"blocks.{i}."
        shapes.update({block + "norm1.linear": (6 * dim, time), block + "norm1.norm": (dim,),
                       block + "norm2.linear": (6 * dim, time), block + "norm2.norm": (dim,),
                       block + "norm_q": (head,), block + "norm_k": (head,),
                       block + "ff_proj": (4 * dim, dim), block + "ff_out": (dim, 4 * dim)})
        shapes.update({block + name: (dim, dim) for name in ("q", "k", "v", "attn_out")})
    return {f"diffusion_model.{name}.weight": shape for name, shape in shapes.items()}


def comfyui_call_order(config):
    """The order ComfyUI's forward calls its linear layers (CogVideoXTransformer3DModel._forward, CogVideoXBlock)."""
    order = ["time_embedding_linear_1", "time_embedding_linear_2"]
    if config.get("ofs_embed_dim"):
        order += ["ofs_embedding_linear_1", "ofs_embedding_linear_2"]
    order += ["patch_embed.text_proj", "patch_embed.proj"]
    for i in range(config["num_layers"]):
        order += [f"blocks.{i}.{name}" for name in ("norm1.linear", "q", "k", "v", "attn_out", "norm2.linear",
                                                     "ff_proj", "ff_out")]
    return order + ["norm_out.linear", "proj_out"]


def comfyui_patches(lora, model_keys, strength=1.0):
    """{model weight: the change} as ComfyUI's LoRA loader makes it. Key map (model_lora_keys_unet): every model
    key `diffusion_model.X.weight` is reachable as `diffusion_model.X` and `lora_unet_<X with _>`. load_lora finds
    `<name>.lora_up.weight` / `.lora_down.weight` / `.alpha`; LoRAAdapter.calculate_weight adds
    strength * (alpha / down.shape[0], or 1 without alpha) * mm(up.flatten(1), down.flatten(1)).reshape(weight)."""
    key_map = {}
    for key in model_keys:
        stem = key[: -len(".weight")]
        key_map[stem] = key
        key_map["lora_unet_" + stem[len("diffusion_model."):].replace(".", "_")] = key
    patches, loaded = {}, set()
    for name, weight_key in key_map.items():
        up, down, alpha = (f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha")
        if up not in lora:
            continue
        scale = lora[alpha].item() / lora[down].shape[0] if alpha in lora else 1.0
        patches[weight_key] = (strength * scale * torch.mm(lora[up].flatten(1).float(), lora[down].flatten(1).float()))
        loaded |= {up, down} | ({alpha} if alpha in lora else set())
    return patches, set(lora) - loaded


def diffusers_changes(model, lora_dir, weight_name="pytorch_lora_weights.safetensors"):
    """{diffusers weight: the change} that load_lora_weights at weight 1.0 makes (fused into the weights)."""
    pipe = tiny_pipeline(model)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(lora_dir), weight_name=weight_name, adapter_name="run")
    pipe.set_adapters(["run"], [1.0])
    pipe.fuse_lora(lora_scale=1.0, components=["transformer"])
    pipe.unload_lora_weights()
    return {k: v - base[k] for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, base[k])}


def diffusers_call_order(transformer):
    """The diffusers transformer's linear layers in the order one forward calls them."""
    order = []
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: order.append(name))
             for name, module in transformer.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    config = transformer.config
    frames, height, width = 2 * (config.patch_size_t or 1), 4, 4
    if config.use_learned_positional_embeddings:  # 5b-I2V: its learned table's size only
        frames = (config.sample_frames - 1) // config.temporal_compression_ratio + 1
        height, width = config.sample_height, config.sample_width
    with torch.no_grad():
        transformer(hidden_states=torch.randn(1, frames, config.in_channels, height, width),
                    encoder_hidden_states=torch.randn(1, config.max_text_seq_length, config.text_embed_dim),
                    timestep=torch.tensor([10]), ofs=torch.tensor([2.0]) if config.ofs_embed_dim else None,
                    image_rotary_emb=_rotary(config, frames, height, width)
                    if config.use_rotary_positional_embeddings else None)
    for hook in hooks:
        hook.remove()
    return order


def _rotary(config, frames, height, width):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    grid = (height // config.patch_size, width // config.patch_size)
    return get_3d_rotary_pos_embed(config.attention_head_dim, ((0, 0), grid), grid, frames // (config.patch_size_t or 1),
                                   device="cpu")


# ---------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def every_module_lora(tiny_models, tmp_path_factory):
    """LoRAs on every linear layer a user can target, one per model family: CogVideoX 1.0 text-to-video (Conv2d patch
    embedding), 5b-I2V (rotary and learned positions, image channels), 1.5 text-to-video (temporal patches) and 1.5
    image-to-video (temporal patches, ofs embedding). Each is trained when a test first asks for it (2 steps)."""
    recipes = {"2b": ("cogvideox_text_to_video_lora", []),
               "5b-i2v": ("cogvideox_image_to_video_lora", ["--frame_buckets", "5", "--ignore_learned_positional_embeddings"]),
               "1.5": ("cogvideox_text_to_video_lora", ["--frame_buckets", "5"]),
               "1.5-i2v": ("cogvideox_image_to_video_lora", ["--frame_buckets", "5"])}

    class Runs(dict):
        def __missing__(self, variant):
            trainer, extra = recipes[variant]
            output = tmp_path_factory.mktemp(f"comfyui-{variant}")
            model = tiny_models(variant)
            run_trainer(lora_argv(model, ASSETS, output, "--max_train_steps", "2", "--lora_target_modules", ALL_TARGETS,
                                  "--lora_alpha", "12", *extra), main=trainer_main(trainer))
            self[variant] = (model, output)
            return self[variant]

    return Runs()


@pytest.mark.parametrize("variant", ["2b", "5b-i2v", "1.5", "1.5-i2v"])
def test_comfyui_lora_changes_each_weight_as_the_diffusers_lora_does(every_module_lora, variant):
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import load_file

    from training.lora_formats import native_module

    model, output = every_module_lora[variant]
    transformer = CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer")
    config = dict(transformer.config)
    native = comfyui_weights(config)
    # The native network's names for the diffusers layers, in forward order, are ComfyUI's own forward order.
    mapped_order = [native_module(name) for name in diffusers_call_order(transformer)]
    assert mapped_order == comfyui_call_order(config)

    lora = load_file(output / "pytorch_lora_weights_comfyui.safetensors")
    patches, not_loaded = comfyui_patches(lora, native)
    assert not_loaded == set()  # ComfyUI would warn "lora key not loaded" for each
    expected = diffusers_changes(model, output)
    linear_weights = [k for k in transformer.state_dict() if k.endswith(".weight") and native_module(k[:-7])]
    assert set(expected) == set(linear_weights)  # every linear layer trained: all targetable modules covered
    assert len(patches) == len(expected)
    for weight_key, change in expected.items():
        native_key = f"diffusion_model.{native_module(weight_key[:-len('.weight')])}.weight"
        assert native_key in patches, native_key
        assert tuple(native[native_key]) == tuple(change.shape), native_key
        assert patches[native_key].numel() == change.numel(), native_key  # else ComfyUI fails to reshape it
        torch.testing.assert_close(patches[native_key].reshape(change.shape), change, rtol=1e-5, atol=1e-6)
        assert change.abs().max() > 0


def test_every_lora_file_has_its_comfyui_twin(trained_lora):
    from safetensors.torch import load_file

    output = trained_lora["output"]
    for folder in [output, *sorted(output.glob("checkpoint-*"))]:
        comfy = load_file(folder / "pytorch_lora_weights_comfyui.safetensors")
        diffusers = load_file(folder / "pytorch_lora_weights.safetensors")
        assert len(comfy) == len(diffusers) // 2 * 3  # down, up, alpha per adapted module
        assert {v.item() for k, v in comfy.items() if k.endswith(".alpha")} == {8.0}  # --lora_alpha 8
        assert all(k.startswith("diffusion_model.blocks.") for k in comfy)


def test_load_lora_weights_without_a_file_name_still_picks_the_diffusers_file(trained_lora, caplog):
    pipe = tiny_pipeline(trained_lora["model"])
    pipe.load_lora_weights(str(trained_lora["output"]), adapter_name="run")  # as the original's README did
    assert len([n for n, _ in pipe.transformer.named_parameters() if ".run." in n]) == 2 * 4  # to_q/k/v/out.0


def test_a_target_with_no_comfyui_counterpart_stops_before_training(monkeypatch, tiny_model_2b, tmp_path, capsys):
    import training.lora_formats as formats

    real = formats.native_module
    monkeypatch.setattr(formats, "native_module", lambda name: None if name == "proj_out" else real(name))
    with pytest.raises(SystemExit) as stop:
        run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "out", "--max_train_steps", "1",
                              "--lora_target_modules", "to_q,proj_out"))
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert re.search(r"error: --lora_target_modules adapts proj_out, which ComfyUI's native CogVideoX", error)
    assert not list((tmp_path / "out").glob("*.safetensors")) and not list((tmp_path / "out").glob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------- the converter


def convert(*argv):
    from tools.convert_lora import main

    return main([str(a) for a in argv])


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def adapter_config(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["lora_adapter_metadata"])


def test_round_trips_are_exact(every_module_lora, tmp_path):
    model, output = every_module_lora["2b"]
    original = output / "pytorch_lora_weights.safetensors"
    assert convert(original, tmp_path / "comfy.safetensors") == 0
    assert convert(tmp_path / "comfy.safetensors", tmp_path / "back") == 0
    back = tmp_path / "back" / "pytorch_lora_weights.safetensors"
    a, b = tensors(original), tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: adapter_config(back)[k] for k in ("transformer.r", "transformer.lora_alpha")} == \
        {"transformer.r": 4, "transformer.lora_alpha": 12}
    # What the converter wrote is what training wrote for ComfyUI, and diffusers applies the round trip identically.
    c, d = tensors(tmp_path / "comfy.safetensors"), tensors(output / "pytorch_lora_weights_comfyui.safetensors")
    assert c.keys() == d.keys() and all(torch.equal(c[k], d[k]) for k in c)
    before, after = diffusers_changes(model, output), diffusers_changes(model, back.parent)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert convert(back, tmp_path / "comfy2.safetensors") == 0
    e = tensors(tmp_path / "comfy2.safetensors")
    assert e.keys() == c.keys() and all(torch.equal(e[k], c[k]) for k in c)


def test_reads_cogvideox_fun_and_lora_unet_forms(every_module_lora, tmp_path):
    from safetensors.torch import save_file

    from training.lora_formats import native_module

    _, output = every_module_lora["2b"]
    comfy = tensors(output / "pytorch_lora_weights_comfyui.safetensors")
    diffusers_names = {native_module(m): m for m in _diffusers_modules(output)}
    forms = {
        # CogVideoX-Fun: "lora_unet" + "." + diffusers name, dots to underscores
        "fun": {k.replace("diffusion_model." + n, "lora_unet__" + diffusers_names[n].replace(".", "_")): v
                for n in diffusers_names for k, v in comfy.items() if k.startswith(f"diffusion_model.{n}.")},
        # ComfyUI's own lora_unet_ spelling of the native names
        "lora_unet": {k.replace("diffusion_model." + n, "lora_unet_" + n.replace(".", "_")): v
                      for n in diffusers_names for k, v in comfy.items() if k.startswith(f"diffusion_model.{n}.")},
    }
    reference = tensors(output / "pytorch_lora_weights.safetensors")
    for name, state in forms.items():
        assert len(state) == len(comfy)
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        assert convert(tmp_path / f"{name}.safetensors", tmp_path / name) == 0
        converted = tensors(tmp_path / name / "pytorch_lora_weights.safetensors")
        assert converted.keys() == reference.keys() and all(torch.equal(converted[k], reference[k]) for k in reference)
        assert adapter_config(tmp_path / name / "pytorch_lora_weights.safetensors")["transformer.lora_alpha"] == 12


def _diffusers_modules(output):
    return {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors(output / "pytorch_lora_weights.safetensors")}


def test_a_file_without_alpha_keeps_scale_one_unless_told(every_module_lora, tmp_path, capsys):
    from safetensors.torch import save_file

    _, output = every_module_lora["2b"]
    save_file(tensors(output / "pytorch_lora_weights.safetensors"), str(tmp_path / "original.safetensors"))  # no metadata
    assert convert(tmp_path / "original.safetensors", tmp_path / "plain.safetensors") == 0
    assert not [k for k in tensors(tmp_path / "plain.safetensors") if k.endswith(".alpha")]  # ComfyUI: scale 1
    assert "without alpha (scale 1)" in capsys.readouterr().out
    assert convert(tmp_path / "original.safetensors", tmp_path / "scaled.safetensors", "--alpha", "64") == 0
    alphas = {v.item() for k, v in tensors(tmp_path / "scaled.safetensors").items() if k.endswith(".alpha")}
    assert alphas == {64.0}


def test_unmapped_tensors_are_reported_not_dropped(every_module_lora, tmp_path, capsys):
    from safetensors.torch import save_file

    _, output = every_module_lora["2b"]
    state = tensors(output / "pytorch_lora_weights_comfyui.safetensors")
    state["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    save_file(state, str(tmp_path / "mixed.safetensors"))
    assert convert(tmp_path / "mixed.safetensors", tmp_path / "out") == 2
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert convert(tmp_path / "mixed.safetensors", tmp_path / "out", "--skip_unmapped") == 0
    assert "skipped 1 tensor(s)" in capsys.readouterr().out
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- merge_lora --comfyui
# ComfyUI's Load Diffusion Model (comfy.sd.load_diffusion_model -> comfy/model_detection.py, CogVideoX branch) reads
# the network's positions from the file: `patch_embed.pos_embedding` present -> learned positions (no rotary), absent
# -> rotary. Its learned path (comfy/ldm/cogvideo/model.py, CogVideoXPatchEmbed.forward) embeds text with text_proj,
# each latent frame with the Conv2d proj (patches in h, w order), and adds zeros to the text tokens and
# table[:, max_text_seq_length : max_text_seq_length + patches] to the image tokens.


def comfyui_patch_embed(file, text, latents, max_text_seq_length=226):
    """What ComfyUI's learned-positions patch embedding makes of (text, latents) with the file's tensors."""
    batch, frames, channels, height, width = latents.shape
    text = torch.nn.functional.linear(text, file["patch_embed.text_proj.weight"], file["patch_embed.text_proj.bias"])
    image = torch.nn.functional.conv2d(latents.reshape(-1, channels, height, width), file["patch_embed.proj.weight"],
                                       file["patch_embed.proj.bias"], stride=file["patch_embed.proj.weight"].shape[-1])
    image = image.view(batch, frames, *image.shape[1:]).flatten(3).transpose(2, 3).flatten(1, 2)
    table = file["patch_embed.pos_embedding"]
    positions = torch.cat([torch.zeros_like(text[:1]),
                           table[:, max_text_seq_length:max_text_seq_length + image.shape[1]]], dim=1)
    return torch.cat([text, image], dim=1) + positions


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_merged_comfyui_file_is_read_with_the_positions_the_model_has(tiny_models, variant, tmp_path):
    """merge_lora --comfyui's single file: ComfyUI's loader detects rotary positions for 5b and, for 2b's sincos
    positions, finds the table diffusers computes (a buffer diffusers does not save), so its patch embedding at the
    model's sample size is diffusers' own."""
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import load_file

    from tools.lora_math import write_lora
    from tools.merge_lora import main
    from training.lora_formats import Adapter

    model = tiny_models(variant)
    transformer = CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer")
    config = transformer.config
    dim = config.num_attention_heads * config.attention_head_dim
    write_lora({"proj_out": Adapter(torch.randn(2, dim), torch.randn(transformer.proj_out.out_features, 2), 2.0)},
               tmp_path / "lora")
    assert main(["--base", model, "--lora", str(tmp_path / "lora"), "--output", str(tmp_path / "merged"),
                 "--comfyui"]) == 0
    file = load_file(tmp_path / "merged" / "transformer_comfyui.safetensors")
    learned = "patch_embed.pos_embedding" in file  # ComfyUI's detection rule
    assert (not learned) == config.use_rotary_positional_embeddings
    if not learned:
        return
    assert file["patch_embed.pos_embedding"].dtype == torch.float32  # as ComfyUI's network holds it
    frames = (config.sample_frames - 1) // config.temporal_compression_ratio + 1
    latents = torch.randn(1, frames, config.in_channels, config.sample_height, config.sample_width)
    text = torch.randn(1, config.max_text_seq_length, config.text_embed_dim)
    with torch.no_grad():
        expected = transformer.patch_embed(text, latents)
        ours = comfyui_patch_embed(file, text, latents, config.max_text_seq_length)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
