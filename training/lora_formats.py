"""A CogVideoX LoRA in the forms the programs people generate with read.

    diffusers / PEFT   `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`; rank and alpha in the
                       file's metadata. What training writes, what `pipe.load_lora_weights` reads (the original's and
                       finetrainers' files are this form, without alpha).
    ComfyUI native     `diffusion_model.<native module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, with the
                       module names of ComfyUI's own CogVideoX network (comfy/ldm/cogvideo/model.py), which its LoRA
                       loader maps as they are (comfy/lora.py: model_lora_keys_unet).
    `lora_unet_`       the same tensors with the module name's dots as underscores: CogVideoX-Fun writes
                       `lora_unet__<diffusers module>` (double underscore), ComfyUI also reads `lora_unet_<native>`.

Both programs add strength x (alpha / rank) x up @ down to a weight; a file without alpha gets scale 1 in both
(diffusers then sets alpha = rank). So a LoRA converted here applies the same update in either program at strength
1.0. A LoRA is held as {diffusers module name: Adapter(down, up, alpha or None)}.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch


COMFYUI_PREFIX = "diffusion_model."
COMFYUI_WEIGHT_NAME = "pytorch_lora_weights_comfyui.safetensors"  # beside diffusers' pytorch_lora_weights.safetensors

# Every Linear / Conv of diffusers' CogVideoXTransformer3DModel (1.0 and 1.5, text- and image-to-video) with its name
# in ComfyUI's native network; {i} is a block index. LayerNorms take no LoRA in peft.
MODULES = (
    ("patch_embed.proj", "patch_embed.proj"),  # Conv2d in 1.0, Linear in 1.5: the same layout in both programs
    ("patch_embed.text_proj", "patch_embed.text_proj"),
    ("time_embedding.linear_1", "time_embedding_linear_1"),
    ("time_embedding.linear_2", "time_embedding_linear_2"),
    ("ofs_embedding.linear_1", "ofs_embedding_linear_1"),  # 1.5 image-to-video
    ("ofs_embedding.linear_2", "ofs_embedding_linear_2"),
    ("transformer_blocks.{i}.norm1.linear", "blocks.{i}.norm1.linear"),
    ("transformer_blocks.{i}.attn1.to_q", "blocks.{i}.q"),
    ("transformer_blocks.{i}.attn1.to_k", "blocks.{i}.k"),
    ("transformer_blocks.{i}.attn1.to_v", "blocks.{i}.v"),
    ("transformer_blocks.{i}.attn1.to_out.0", "blocks.{i}.attn_out"),
    ("transformer_blocks.{i}.norm2.linear", "blocks.{i}.norm2.linear"),
    ("transformer_blocks.{i}.ff.net.0.proj", "blocks.{i}.ff_proj"),
    ("transformer_blocks.{i}.ff.net.2", "blocks.{i}.ff_out"),
    ("norm_out.linear", "norm_out.linear"),
    ("proj_out", "proj_out"),
)


def _pattern(template, separator):
    escaped = re.escape(template.replace(".", separator)).replace(re.escape("{i}"), r"(\d+)")
    return re.compile(escaped + "$")


def _renamer(source, target, separator=".", table=MODULES):
    """name -> name, from column `source` to column `target` of `table` (None: no counterpart)."""
    table = [(_pattern(row[source], separator), row[target]) for row in table]

    def rename(name):
        for pattern, template in table:
            match = pattern.match(name)
            if match:
                return template.replace("{i}", match.group(1)) if match.groups() else template
        return None

    return rename


native_module = _renamer(0, 1)  # "transformer_blocks.3.attn1.to_q" -> "blocks.3.q"
diffusers_module = _renamer(1, 0)
_from_underscored_diffusers = _renamer(0, 0, "_")  # "transformer_blocks_3_attn1_to_q" -> dotted
_from_underscored_native = _renamer(1, 0, "_")  # "blocks_3_q" -> "transformer_blocks.3.attn1.to_q"


@dataclass
class Adapter:
    down: torch.Tensor  # lora_A: rank x in (x kernel)
    up: torch.Tensor  # lora_B: out x rank (x 1 x 1)
    alpha: float = None  # None: scale 1, as both loaders read a file without alpha

    @property
    def rank(self):
        return self.down.shape[0]

    def delta(self, strength=1.0):
        """The weight change both loaders apply: strength x alpha/rank x up @ down, shaped like the weight."""
        scale = strength * (self.alpha / self.rank if self.alpha is not None else 1.0)
        shape = (self.up.shape[0], *self.down.shape[1:])
        return (self.up.flatten(1).float() @ self.down.flatten(1).float()).reshape(shape) * scale


class UnmappedKeys(ValueError):
    def __init__(self, keys):
        self.keys = sorted(keys)
        shown = ", ".join(self.keys[:5]) + (f" and {len(self.keys) - 5} more" if len(self.keys) > 5 else "")
        super().__init__(f"{len(self.keys)} tensor(s) have no CogVideoX transformer module to go to: {shown}")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_lora_file(path, alpha=None):
    """(adapters, unmapped keys, form) of a LoRA file in any of the forms above. `alpha`: the alpha to assume where
    the file stores none (the original's files were trained with --lora_alpha but do not say so)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata() or {}
    return read_lora(state, metadata, alpha=alpha)


def read_lora(state, metadata=None, alpha=None):
    form = detect_form(state)
    if form == "diffusers":
        adapters, unmapped = _read_peft(state, _diffusers_alphas(metadata or {}))
    else:
        adapters, unmapped = _read_down_up(state)
    if alpha is not None:
        for adapter in adapters.values():
            if adapter.alpha is None:
                adapter.alpha = float(alpha)
    return adapters, unmapped, form


def detect_form(state):
    if any(".lora_A." in key or ".lora_B." in key for key in state):
        return "diffusers"
    if any(key.startswith("lora_unet_") for key in state):
        return "lora_unet"
    if any(key.startswith(COMFYUI_PREFIX) for key in state):
        return "comfyui"
    raise ValueError("not a LoRA this tool knows: no lora_A/lora_B, lora_down/lora_up or lora_unet_ keys")


def _diffusers_alphas(metadata):
    """module -> alpha from diffusers' `lora_adapter_metadata` (lora_alpha, alpha_pattern); {} when it has none."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    config = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    if "lora_alpha" not in config:
        return {}
    return {"*": float(config["lora_alpha"]), **{k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()}}


def _alpha_for(module, alphas):
    for pattern, value in alphas.items():  # peft's rule for patterns: the name ends with the key
        if pattern != "*" and re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return alphas.get("*")


_PEFT_KEY = re.compile(r"^(?:transformer\.|base_model\.model\.|diffusion_model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


def _read_peft(state, alphas):
    parts, unmapped = {}, []
    for key, tensor in state.items():
        match = _PEFT_KEY.match(key)
        module = match and match.group(1)
        if not module or native_module(module) is None:
            unmapped.append(key)
            continue
        parts.setdefault(module, {})["down" if match.group(2) == "A" else "up"] = tensor
    return _pair(parts, unmapped, lambda module: _alpha_for(module, alphas))


_DOWN_UP_KEY = re.compile(r"^(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _read_down_up(state):
    """`diffusion_model.<native>.lora_down.weight`, `lora_unet_<native underscored>` or CogVideoX-Fun's
    `lora_unet__<diffusers underscored>`, each with an optional `.alpha`."""
    parts, alphas, unmapped = {}, {}, []
    for key, tensor in state.items():
        match = _DOWN_UP_KEY.match(key)
        module = match and _module_of(match.group(1))
        if module is None:
            unmapped.append(key)
            continue
        if match.group(2) == "alpha":
            alphas[module] = float(tensor.item())
        else:
            parts.setdefault(module, {})["down" if match.group(2).startswith("lora_down") else "up"] = tensor
    return _pair(parts, unmapped, alphas.get)


def _module_of(stem):
    if stem.startswith(COMFYUI_PREFIX):
        return diffusers_module(stem[len(COMFYUI_PREFIX):])
    if stem.startswith("lora_unet__"):
        return _from_underscored_diffusers(stem[len("lora_unet__"):])
    if stem.startswith("lora_unet_"):
        stem = stem[len("lora_unet_"):]
        return _from_underscored_native(stem) or _from_underscored_diffusers(stem)
    return None


def _pair(parts, unmapped, alpha_of):
    adapters = {}
    for module, pair in parts.items():
        if set(pair) != {"down", "up"}:
            unmapped.append(f"{module} (only lora_{'down' if 'down' in pair else 'up'})")
            continue
        adapters[module] = Adapter(pair["down"], pair["up"], alpha_of(module))
    return dict(sorted(adapters.items())), unmapped


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _down_up_state(adapters, key_of):
    """`<key_of(module)>.lora_down.weight` / `.lora_up.weight` / `.alpha`: alpha stored wherever it is known, so the
    reader's strength 1.0 applies alpha/rank (without it both ComfyUI and Fun scale by 1)."""
    state = {}
    for module, adapter in adapters.items():
        key = key_of(module)
        state[f"{key}.lora_down.weight"] = adapter.down.contiguous()
        state[f"{key}.lora_up.weight"] = adapter.up.contiguous()
        if adapter.alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(float(adapter.alpha))
    return state


def comfyui_state_dict(adapters):
    """ComfyUI's native form: its own CogVideoX network's module names."""
    return _down_up_state(adapters, lambda module: COMFYUI_PREFIX + native_module(module))


def save_comfyui(adapters, path, metadata=None):
    save_comfyui_state(comfyui_state_dict(adapters), path, metadata)


FUN_WEIGHT_NAME = "pytorch_lora_weights_fun.safetensors"  # beside the diffusers file, for CogVideoX-Fun runs


def save_fun_copy(weights_file):
    """Write the diffusers LoRA `weights_file` again in CogVideoX-Fun's form beside it (FUN_WEIGHT_NAME); its path."""
    adapters, _, _ = read_lora_file(weights_file)
    path = Path(weights_file).with_name(FUN_WEIGHT_NAME)
    save_comfyui_state(fun_state_dict(adapters), path)
    return path


def fun_state_dict(adapters):
    """CogVideoX-Fun's form (its LoRA training writes it, its merge_lora reads it): `lora_unet__<diffusers module,
    dots as underscores>`, which merge_lora resolves to the module by trying the underscores as dots."""
    return _down_up_state(adapters, lambda module: "lora_unet__" + module.replace(".", "_"))


# Every peft tensor of a DoRA, LoHa or LoKr adapter, by its leaf name (get_peft_model_state_dict's key ends so).
PEFT_LEAVES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "hada_w1_a", "hada_w1_b", "hada_w2_a",
               "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _split_leaf(key):
    for leaf in PEFT_LEAVES:
        if key.endswith("." + leaf):
            return key[: -len(leaf) - 1], leaf
    raise UnmappedKeys([key])


def comfyui_adapter_state(layers, scales, base_weights=None):
    """ComfyUI's native tensors (comfy/weight_adapter: lora.py, loha.py, lokr.py) for a peft DoRA, LoHa or LoKr
    adapter: `layers` as get_peft_model_state_dict gives them, `scales` {module: peft's scaling}, `base_weights`
    {module: the frozen weight} for DoRA. Each module's file entry makes ComfyUI add what peft adds at strength 1.0.

    LoHa: the hada_ tensors as peft holds them, alpha = scale x rank (ComfyUI scales by alpha / rank).
    LoKr: the scale folded into lokr_w1 (w1_a @ w1_b multiplied out), no alpha: ComfyUI then scales by 1.
    DoRA: lora_down/lora_up/alpha and dora_scale of shape (out, 1) (a 1-D one broadcasts wrongly in ComfyUI for
    non-square weights). peft rescales each output row of W + dW to its magnitude m: m / |W + dW| x (W + dW);
    ComfyUI's output-axis DoRA divides by the base row's norm |W| instead, so the file stores m x |W| / |W + dW|."""
    modules = {}
    for key, tensor in layers.items():
        module, leaf = _split_leaf(key)
        modules.setdefault(module, {})[leaf] = tensor
    state = {}
    for module, parts in modules.items():
        native = native_module(module)
        if native is None:
            raise UnmappedKeys([module])
        prefix, scale = COMFYUI_PREFIX + native, float(scales[module])
        if "hada_w1_a" in parts:
            state.update({f"{prefix}.{leaf}": parts[leaf].contiguous() for leaf in parts})
            state[f"{prefix}.alpha"] = torch.tensor(scale * parts["hada_w1_b"].shape[0])
        elif "lokr_w1" in parts or "lokr_w1_a" in parts:
            w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
            state[f"{prefix}.lokr_w1"] = (w1.float() * scale).to(parts.get("lokr_w2", parts.get("lokr_w2_a")).dtype)
            state.update({f"{prefix}.{leaf}": parts[leaf].contiguous() for leaf in parts if leaf.startswith("lokr_w2")
                          or leaf == "lokr_t2"})
        else:
            down, up = parts["lora_A.weight"], parts["lora_B.weight"]
            state[f"{prefix}.lora_down.weight"] = down.contiguous()
            state[f"{prefix}.lora_up.weight"] = up.contiguous()
            state[f"{prefix}.alpha"] = torch.tensor(scale * down.shape[0])
            if "lora_magnitude_vector" in parts:
                state[f"{prefix}.dora_scale"] = _comfyui_dora_scale(parts["lora_magnitude_vector"],
                                                                    base_weights[module], down, up, scale)
    return state


def _comfyui_dora_scale(magnitude, base, down, up, scale):
    """ComfyUI's dora_scale (out, 1) for peft's magnitude m: m x |W| / |W + scale x up @ down| per output row."""
    weight = base.detach().float().cpu().flatten(1)
    adapted = weight + scale * (up.float().cpu().flatten(1) @ down.float().cpu().flatten(1))
    ratio = weight.norm(dim=1) / adapted.norm(dim=1)
    return (magnitude.float().cpu() * ratio).reshape(-1, 1).to(magnitude.dtype).contiguous()


def save_comfyui_state(state, path, metadata=None):
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})


def peft_adapters(layers, metadata):
    """Adapters from a PEFT state dict (`<module>.lora_A.weight`, as get_peft_model_state_dict gives it) and the
    adapter metadata training stores (r, lora_alpha, alpha_pattern)."""
    alphas = {"*": float(metadata["lora_alpha"]), **{k: float(v) for k, v in metadata.get("alpha_pattern", {}).items()}}
    adapters, unmapped = _read_peft(layers, alphas)
    if unmapped:
        raise UnmappedKeys(unmapped)
    return adapters


def diffusers_layers(adapters):
    """(transformer_lora_layers, adapter metadata) for a pipeline's save_lora_weights. A module without alpha gets
    alpha = rank: scale 1, as a file without alpha loads."""
    layers, ranks, alphas = {}, {}, {}
    for module, adapter in adapters.items():
        layers[f"{module}.lora_A.weight"] = adapter.down.contiguous()
        layers[f"{module}.lora_B.weight"] = adapter.up.contiguous()
        ranks[module] = adapter.rank
        alphas[module] = adapter.alpha if adapter.alpha is not None else float(adapter.rank)
    rank, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    metadata = {
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": sorted(ranks),
        # Full names, anchored by peft's own rule (the name ends with the key), so no other module matches.
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
    }
    return layers, metadata


def _most_common(values):
    values = list(values)
    return max(set(values), key=values.count)


def comfyui_problems(module_names):
    """One line naming the adapted modules that ComfyUI's native network has no counterpart for, or []."""
    missing = sorted(name for name in module_names if native_module(name) is None)
    if not missing:
        return []
    return [f"--lora_target_modules adapts {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}, which "
            "ComfyUI's native CogVideoX network has no counterpart for, so the ComfyUI LoRA could not hold it; "
            "choose among the attention (to_q, to_k, to_v, to_out.0), feed-forward (ff.net.0.proj, ff.net.2), "
            "norm linears (norm1.linear, norm2.linear, norm_out.linear), embeddings and proj_out"]


# ----------------------------------------------------------------------------------------------
# A whole transformer in ComfyUI's native names (tools/merge_lora.py --comfyui)
# ----------------------------------------------------------------------------------------------

# Weights that take no LoRA and are named differently in ComfyUI's network (as scripts/check_comfyui_lora.py renames
# them to build ComfyUI's own network by hand).
OTHER_MODULES = (
    ("transformer_blocks.{i}.norm1.norm", "blocks.{i}.norm1.norm"),
    ("transformer_blocks.{i}.norm2.norm", "blocks.{i}.norm2.norm"),
    ("transformer_blocks.{i}.attn1.norm_q", "blocks.{i}.norm_q"),
    ("transformer_blocks.{i}.attn1.norm_k", "blocks.{i}.norm_k"),
    ("norm_final", "norm_final"),
    ("norm_out.norm", "norm_out.norm"),
    ("patch_embed.pos_embedding", "patch_embed.pos_embedding"),
)


def native_transformer_state(state):
    """A diffusers CogVideoX transformer's state dict with ComfyUI's native names (no prefix: ComfyUI's diffusion
    model loader finds the prefix itself). A weight with no place there raises KeyError."""
    rename_other = _renamer(0, 1, table=OTHER_MODULES)
    native = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        target = native_module(module) or rename_other(module)
        if target is not None:
            native[f"{target}.{leaf}"] = tensor.contiguous()
        elif rename_other(key) is not None:  # a buffer: the key is the name
            native[rename_other(key)] = tensor.contiguous()
        else:
            raise KeyError(f"{key}: no place in ComfyUI's CogVideoX network")
    return native
