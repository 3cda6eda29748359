"""Which parameters train and how the result is saved: one small class per training mode.

`LoRA` adds peft adapters to the transformer and writes `pytorch_lora_weights.safetensors`
in the diffusers format, with the adapter's rank/alpha/targets in the file's metadata, so
`pipe.load_lora_weights(...)` at weight 1.0 reproduces exactly what training validated, and
the same adapter for ComfyUI's native CogVideoX beside it (lora_formats.py).
`Full` trains every transformer weight and writes `transformer/` with `save_pretrained`.

Both keep trainable weights in `--master_weight_dtype` (fp32 by default) while the frozen
ones and the compute use the mixed-precision dtype: in bf16 a weight cannot take an update
smaller than about 1/256 of itself, so at fine-tuning learning rates most updates of a
bf16-stored weight round away to nothing.
"""

import contextlib
import functools
import json
from pathlib import Path

import torch

from .args import UsageError
from .files import share_like_umask
from .lora_formats import (
    COMFYUI_WEIGHT_NAME,
    comfyui_adapter_state,
    comfyui_problems,
    peft_adapters,
    save_comfyui,
    save_comfyui_state,
)


def plain_name(name):
    """A parameter's name without the wrappers' prefixes (FSDP1, activation checkpointing, torch.compile)."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_FOLDER = "adapter"  # loha, lokr: peft's adapter_config.json + adapter_model.safetensors (diffusers loads neither)
PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the weights, so PeftModel.from_pretrained reads it
ADAPTER_NAME = "cogvideox-lora"
TRANSFORMER_FOLDER = "transformer"
MASTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _to_master_dtype(parameters, master_weight_dtype):
    dtype = MASTER_DTYPES[master_weight_dtype]
    for parameter in parameters:
        parameter.data = parameter.data.to(dtype)


# What diffusers' loader needs to rebuild the adapter (it calls LoraConfig(**metadata) unfiltered, and diffusers 0.34 to
# 0.39 read rank_pattern and alpha_pattern from it): fields every peft release since 0.6 has, so a LoRA loads with older
# peft and diffusers too. peft's whole LoraConfig.to_dict() has ~40 keys, newer ones among them, which an older peft
# refuses with a TypeError.
ADAPTER_METADATA_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")


def adapter_metadata(transformer):
    config = transformer.peft_config["default"]
    metadata = {key: getattr(config, key) for key in ADAPTER_METADATA_KEYS}
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set in peft
    metadata["rank_pattern"], metadata["alpha_pattern"] = dict(config.rank_pattern), dict(config.alpha_pattern)
    if config.use_dora:  # only then: a plain LoRA's metadata stays readable by a peft without DoRA
        metadata["use_dora"] = True
    return metadata


@contextlib.contextmanager
def _drawn_from_seed(seed, device):
    """Random draws inside come from `seed` (the CPU's, and `device`'s if it is a GPU); the global random streams
    are as they were afterwards. Only that GPU is touched: fork_rng's default visits every visible GPU."""
    gpus = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            for gpu in gpus:
                with torch.cuda.device(gpu):
                    torch.cuda.manual_seed(seed)
        yield


class LoRA:
    """A peft adapter of --lora_type (lora, dora, loha, lokr) on the frozen transformer."""

    name = "lora"
    adapter_type = "lora"  # --lora_type, set by prepare: which files save writes
    base_weights_train = False

    def check_args(self, model, lora, memory, transformer_config):
        """Problems (one line each) of the [lora] flags, and of a --transformer_config ([model]) with a LoRA."""
        problems = []
        if lora.lora_alpha <= 0:
            problems.append(f"--lora_alpha must be positive (got {lora.lora_alpha})")
        if not [m for m in lora.lora_target_modules.split(",") if m.strip()]:
            problems.append("--lora_target_modules is empty")
        if model.transformer_config:
            problems.append("--transformer_config is for full fine-tuning (the *_sft trainers): a LoRA needs the "
                            "pipeline's own trained transformer as its base")
        if lora.loraplus_lr_ratio is not None and lora.loraplus_lr_ratio <= 0:
            problems.append(f"--loraplus_lr_ratio must be positive (got {lora.loraplus_lr_ratio}); 16 is the LoRA+ "
                            "paper's suggestion")
        if lora.lora_type in ("loha", "lokr") and lora.loraplus_lr_ratio is not None:
            problems.append(f"--loraplus_lr_ratio is for --lora_type lora or dora (it speeds up LoRA's B matrix); "
                            f"{lora.lora_type} has no such matrix")
        if lora.conv_rank is not None and (lora.conv_rank < 1 or lora.init_lora):
            problems.append(f"--conv_rank {lora.conv_rank}: a positive rank, and not with --init_lora (the file's "
                            "ranks are used)")
        if lora.lokr_factor != -1 and (lora.lora_type != "lokr" or lora.lokr_factor < 1):
            problems.append(f"--lokr_factor {lora.lokr_factor}: a positive factor, with --lora_type lokr only")
        if lora.lora_type == "dora" and memory.quantize_base != "none":
            problems.append(f"--lora_type dora with --quantize_base {memory.quantize_base} is not supported: DoRA's "
                            "ComfyUI file needs the base weights unquantized; use --lora_type lora, or no "
                            "--quantize_base")
        if lora.init_lora and lora.lora_type != "lora":
            problems.append(f"--init_lora starts a plain LoRA; it cannot start --lora_type {lora.lora_type}")
        elif lora.init_lora:
            try:
                init_lora_shape(lora.init_lora)
            except UsageError as error:
                problems.append(str(error))
        return problems

    def load_dtype(self, training, compute_dtype):
        """The dtype to load the transformer in: the frozen base computes in the mixed-precision dtype."""
        return compute_dtype

    def prepare(self, transformer, training, lora):
        """Freeze the base model and add trainable adapters ([lora]; [training]: --seed, --master_weight_dtype)."""
        self.adapter_type = lora.lora_type
        transformer.requires_grad_(False)
        if lora.init_lora:
            initial, shape = read_init_lora(lora.init_lora)
            _check_init_lora_fits(transformer, lora.init_lora, initial)
        else:
            target_modules = [m.strip() for m in lora.lora_target_modules.split(",") if m.strip()]
            shape = dict(r=lora.rank, lora_alpha=lora.lora_alpha, target_modules=target_modules,
                         rank_pattern=_conv_ranks(transformer, target_modules, lora.conv_rank))
        # The adapter's random start (lora_A) comes from --seed alone, the same on every rank: a sharded model (FSDP,
        # ZeRO-3) keeps each rank's shard of that rank's own copy, and by now the ranks' random streams differ
        # (seeded per rank, each encodes its own share of raw videos). The training streams are left as they were.
        with _drawn_from_seed(training.seed, next(transformer.parameters()).device):
            transformer.add_adapter(peft_config(lora.lora_type, shape, lora.lokr_factor))
        # Every adapted module must have a place in the ComfyUI file too: say so now, not after the GPU hours.
        problems = comfyui_problems(list(_adapted_modules(transformer)))
        if problems:
            raise UsageError(problems)
        _to_master_dtype(self.trainable_parameters(transformer), training.master_weight_dtype)
        if lora.init_lora and not next(transformer.parameters()).is_meta:  # the memory estimate's has no values
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(transformer, initial, adapter_name="default")

    def parameter_groups(self, transformer, lora, learning_rate):
        """The optimizer's parameter groups: one at `learning_rate`, or with --loraplus_lr_ratio R ([lora]) the B
        (up) matrices in a second group at R x `learning_rate` (LoRA+: B starts at zero and learns too slowly at A's
        rate)."""
        if lora.loraplus_lr_ratio is None:
            return [{"params": self.trainable_parameters(transformer)}]
        trained = [(name, p) for name, p in transformer.named_parameters() if p.requires_grad]
        up = [p for name, p in trained if ".lora_B." in plain_name(name)]
        down = [p for name, p in trained if ".lora_B." not in plain_name(name)]
        return [{"params": down, "lr": learning_rate},
                {"params": up, "lr": learning_rate * lora.loraplus_lr_ratio}]

    def trainable_parameters(self, transformer):
        return [p for p in transformer.parameters() if p.requires_grad]

    saves_frozen_weights = False  # the artifact is the adapter only

    def save(self, transformer, directory, pipeline_class, dtype=None, state_dict=None, suffix=""):
        """Write the adapter in diffusers format (keys prefixed `transformer.`), with r, lora_alpha and the target
        modules in the file's metadata; in `dtype` if given (the final artifact), else in the trained weights' own
        dtype (checkpoints: exact resume).

        `state_dict`: the weights gathered from a sharded model (ZeRO-3, FSDP), whose own tensors are only shards, or
        other weights of the same names (the EMA). `suffix` goes before `.safetensors` in both files' names."""
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(transformer, state_dict=state_dict)
        if state_dict is not None:

            expected = {plain_name(k) for k in get_peft_model_state_dict(transformer)}
            empty = [k for k, v in layers.items() if v.numel() == 0]
            if set(layers) != set(expected) or empty:
                raise RuntimeError(f"gathered LoRA does not match the model ({len(layers)} of {len(expected)} tensors, "
                                   f"{len(empty)} empty)")
        if dtype is not None:
            layers = {k: v.detach().to("cpu", dtype) for k, v in layers.items()}
        weights_file, comfyui_file = self.artifact_paths(directory, suffix)
        if self.adapter_type in ("lora", "dora"):
            metadata = adapter_metadata(transformer)
            pipeline_class.save_lora_weights(directory, transformer_lora_layers=layers, weight_name=weights_file.name,
                                             transformer_lora_adapter_metadata=metadata)
        else:
            _save_peft_folder(transformer.peft_config["default"], layers, weights_file)
        # The same adapter for ComfyUI's native CogVideoX: other module names, alpha as a tensor.
        if self.adapter_type == "lora":
            save_comfyui(peft_adapters(layers, metadata), comfyui_file)
        else:
            adapted = _adapted_modules(transformer)
            scales = {name: module.scaling["default"] for name, module in adapted.items()}
            bases = ({name: module.get_base_layer().weight for name, module in adapted.items()}
                     if self.adapter_type == "dora" else None)
            save_comfyui_state(comfyui_adapter_state(layers, scales, bases), comfyui_file)
        share_like_umask(weights_file)
        share_like_umask(comfyui_file)

    def load(self, transformer, directory, pipeline_class):
        """Load adapter weights saved by `save` into a transformer prepared by `prepare` (resume)."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(transformer, self._saved(directory, pipeline_class), adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"{directory}: LoRA weights do not match the model (unexpected keys {unexpected[:3]})")

    def read(self, transformer, directory, pipeline_class):
        """The adapter saved by `save`, keyed by the model's own parameter names (resume under FSDP, where torch
        spreads it over the shards): the inverse of the renaming get_peft_model_state_dict did when saving."""

        names = {}
        for name, _ in transformer.named_parameters():
            name = plain_name(name)
            if ".default" in name:  # peft's adapter name: an adapter weight
                names[name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = name
        state = self._saved(directory, pipeline_class)
        if set(state) != set(names):
            unknown = sorted(set(state) ^ set(names))
            raise RuntimeError(f"{directory}: LoRA weights do not match the model (e.g. {unknown[:3]})")
        return {names[k]: v for k, v in state.items()}

    def _saved(self, directory, pipeline_class):
        """The adapter `save` wrote to `directory`, keyed as peft names it."""
        if self.adapter_type in ("lora", "dora"):
            return _saved_adapter(directory, pipeline_class)
        return read_peft_folder(self.artifact_paths(directory)[0])[1]

    def inference_components(self, directory, dtype):
        return {}  # the base pipeline, then apply_to_pipeline loads the adapter

    def apply_to_pipeline(self, pipe, directory):
        """Load the saved artifact into a fresh inference pipeline, as a user would."""
        from safetensors import safe_open

        if self.adapter_type in ("loha", "lokr"):
            load_peft_folder(pipe.transformer, self.artifact_paths(directory)[0], ADAPTER_NAME)
            return pipe
        pipe.load_lora_weights(directory, weight_name=LORA_WEIGHT_NAME, adapter_name=ADAPTER_NAME)
        pipe.set_adapters([ADAPTER_NAME], [1.0])
        # diffusers only warns about keys it cannot place: check every saved tensor arrived.
        with safe_open(Path(directory) / LORA_WEIGHT_NAME, "pt") as f:
            saved = len(list(f.keys()))
        loaded = [p for n, p in pipe.transformer.named_parameters() if f".{ADAPTER_NAME}." in n and p.device.type != "meta"]
        if len(loaded) != saved:
            raise RuntimeError(f"{directory}: only {len(loaded)} of {saved} saved LoRA tensors load into the pipeline")
        return pipe

    def artifact_paths(self, output_dir, suffix=""):
        """[the diffusers file (lora, dora) or the peft adapter folder (loha, lokr), the ComfyUI file]."""
        comfyui = Path(output_dir) / COMFYUI_WEIGHT_NAME.replace(".safetensors", f"{suffix}.safetensors")
        if self.adapter_type in ("loha", "lokr"):
            return [Path(output_dir) / f"{PEFT_FOLDER}{suffix}", comfyui]
        return [Path(output_dir) / LORA_WEIGHT_NAME.replace(".safetensors", f"{suffix}.safetensors"), comfyui]


class Full:
    name = "sft"
    base_weights_train = True

    def check_args(self, model, lora, memory, transformer_config):
        """--quantize_base ([memory]) is for LoRA."""
        if memory.quantize_base != "none":
            return [f"--quantize_base {memory.quantize_base} is for LoRA: a full fine-tune trains the base weights "
                    "themselves"]
        return []

    def load_dtype(self, training, compute_dtype):
        """Every weight trains: load straight into the master dtype, so an fp16 or fp32 checkpoint (CogVideoX-2b's
        is fp16) is not rounded to bf16 before training starts."""
        return MASTER_DTYPES[training.master_weight_dtype]

    def prepare(self, transformer, training, lora):
        """Every weight trains, in --master_weight_dtype ([training]); `lora` is not read."""
        transformer.requires_grad_(True)
        _to_master_dtype(transformer.parameters(), training.master_weight_dtype)

    def trainable_parameters(self, transformer):
        return [p for p in transformer.parameters() if p.requires_grad]

    def parameter_groups(self, transformer, lora, learning_rate):
        """One group: every weight at `learning_rate` (`lora` is not read)."""
        return [{"params": self.trainable_parameters(transformer)}]

    saves_frozen_weights = True  # every weight (none is frozen)

    def save(self, transformer, directory, pipeline_class, dtype=None, state_dict=None, suffix=""):
        """`transformer/` in diffusers format (sharded safetensors); `dtype` casts a copy of each tensor.

        `state_dict`: the weights gathered from a sharded model (ZeRO-3, FSDP), whose own tensors are only shards, or
        other weights of the same names (the EMA). `suffix`: the folder is `transformer<suffix>/`."""
        state = state_dict
        if state_dict is not None:

            missing = {plain_name(k) for k in transformer.state_dict()} - set(state_dict)
            empty = [k for k, v in state_dict.items() if v.numel() == 0]
            if missing or empty:
                raise RuntimeError(f"gathered transformer is incomplete ({len(missing)} missing, {len(empty)} empty)")
        if dtype is not None:
            source = transformer.state_dict() if state_dict is None else state_dict
            state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in source.items()}
        folder = Path(directory) / f"{TRANSFORMER_FOLDER}{suffix}"
        if state is None:
            transformer.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
        else:  # diffusers' save_pretrained takes no state_dict (it would silently save the model's own tensors)
            _save_pretrained_state(transformer, folder, state)
        share_like_umask(folder)

    def load(self, transformer, directory, pipeline_class):
        """Weights from a checkpoint's `transformer/`, one shard at a time (no second model in memory)."""
        from safetensors.torch import load_file

        folder = Path(directory) / TRANSFORMER_FOLDER
        expected, loaded = set(transformer.state_dict()), set()
        for shard in _weight_files(folder):
            tensors = load_file(folder / shard)
            transformer.load_state_dict(tensors, strict=False)
            loaded |= set(tensors)
        if expected - loaded:
            raise RuntimeError(f"{folder}: {len(expected - loaded)} weights missing, e.g. {sorted(expected - loaded)[0]}")

    def read(self, transformer, directory, pipeline_class):
        """Every weight of a checkpoint's `transformer/` as one state dict (resume under FSDP: the main process reads
        it, torch spreads it over the shards)."""
        from safetensors.torch import load_file


        folder = Path(directory) / TRANSFORMER_FOLDER
        state = {}
        for shard in _weight_files(folder):
            state.update(load_file(folder / shard))
        expected = {plain_name(name) for name in transformer.state_dict()}
        if expected - set(state):
            raise RuntimeError(f"{folder}: {len(expected - set(state))} weights missing, e.g. {sorted(expected - set(state))[0]}")
        return state

    def inference_components(self, directory, dtype):
        from diffusers import CogVideoXTransformer3DModel

        return {"transformer": CogVideoXTransformer3DModel.from_pretrained(Path(directory) / TRANSFORMER_FOLDER, torch_dtype=dtype)}

    def apply_to_pipeline(self, pipe, directory):
        return pipe

    def artifact_paths(self, output_dir, suffix=""):
        return [Path(output_dir) / f"{TRANSFORMER_FOLDER}{suffix}"]


MODES = {"lora": LoRA, "sft": Full}


def adapter_engine_problems(lora, backend):
    """DoRA's ComfyUI file needs the whole base weights at saving, which no rank holds under FSDP or ZeRO-3."""
    if lora.lora_type == "dora" and backend.weights_sharded:
        return ["--lora_type dora under sharded weights (FSDP, DeepSpeed ZeRO-3) is not supported: saving its ComfyUI "
                "file needs the whole base weights; use DDP or DeepSpeed ZeRO-1/2, or --lora_type lora"]
    return []


def peft_config(lora_type, shape, lokr_factor=-1):
    """peft's config of a --lora_type adapter of `shape` (r, lora_alpha, target_modules[, rank/alpha patterns])."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if lora_type in ("lora", "dora"):
        return LoraConfig(init_lora_weights=True, use_dora=lora_type == "dora", **shape)
    common = dict(r=shape["r"], alpha=shape["lora_alpha"], target_modules=shape["target_modules"], init_weights=True,
                  rank_pattern=shape.get("rank_pattern", {}))
    if lora_type == "loha":
        return LoHaConfig(**common)
    return LoKrConfig(decompose_factor=lokr_factor, **common)


def _conv_ranks(transformer, target_modules, conv_rank):
    """peft's rank_pattern giving --conv_rank to the targeted convolutions ({} without it). Full names, so that peft's
    rule for patterns (the name ends with the key) picks exactly those modules."""
    if conv_rank is None:
        return {}
    return {name: conv_rank for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Conv2d) and any(name == t or name.endswith("." + t) for t in target_modules)}


def _adapted_modules(transformer):
    """{module name: peft layer} of every module carrying the adapter."""
    return {plain_name(name): module for name, module in transformer.named_modules()
            if "default" in getattr(module, "scaling", {})}


def _save_peft_folder(config, layers, folder):
    """A peft adapter folder (what PeftModel.save_pretrained writes): adapter_config.json, adapter_model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({PEFT_PREFIX + k: v.contiguous() for k, v in layers.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def peft_folder_of(path):
    """The peft adapter folder of a LoHa or LoKr run (`path` itself or its adapter/), or None."""
    for folder in (Path(path), Path(path) / PEFT_FOLDER):
        if (folder / "adapter_config.json").is_file():
            return folder
    return None


def read_peft_folder(folder):
    """(peft config, weights keyed as get_peft_model_state_dict names them) of a folder `_save_peft_folder` wrote."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(folder))
    state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    return config, {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}


def load_peft_folder(transformer, folder, adapter_name):
    """Add the adapter of a peft folder to `transformer` under `adapter_name`; every saved tensor must land."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    config, state = read_peft_folder(folder)
    inject_adapter_in_model(config, transformer, adapter_name=adapter_name)
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{folder}: adapter weights do not match the model (e.g. {result.unexpected_keys[:3]})")
    return transformer


@functools.lru_cache(maxsize=None)
def init_lora_shape(path):
    """--init_lora's adapter shape (LoraConfig keyword arguments; do not change it), its file read once per process
    for the checks and the records (prepare reads the weights themselves with read_init_lora)."""
    return read_init_lora(path)[1]


def read_init_lora(path):
    """(peft state dict, LoraConfig keyword arguments) of --init_lora's file, in any form lora_formats reads; its
    rank, alpha and modules as a consumer would load them (a file without alpha: scale 1). One UsageError line when
    the file is missing, unreadable or holds tensors no CogVideoX module takes."""
    from .lora_formats import diffusers_layers, read_lora_file

    if not Path(path).is_file():
        raise UsageError(f"--init_lora {path}: no such file (give a .safetensors LoRA file)")
    try:
        adapters, unmapped, _ = read_lora_file(path)
    except Exception as error:  # safetensors' and our own reasons: one line either way
        raise UsageError(f"--init_lora {path}: not a LoRA file this toolkit reads ({error})") from None
    if any("lora_magnitude_vector" in key or "dora_scale" in key for key in unmapped):
        raise UsageError(f"--init_lora {path}: a DoRA; --init_lora starts from a plain LoRA")
    if unmapped or not adapters:
        raise UsageError(f"--init_lora {path}: {len(unmapped)} tensor(s) fit no CogVideoX transformer module "
                         f"(e.g. {(unmapped or ['none at all'])[0]}): not a CogVideoX LoRA")
    layers, metadata = diffusers_layers(adapters)
    shape = {key: metadata[key] for key in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")}
    return layers, shape


def _check_init_lora_fits(transformer, path, layers):
    """One UsageError line if a module of --init_lora's LoRA is missing from `transformer` or has another size."""
    for key, tensor in layers.items():
        module_name, _, leaf = key.removesuffix(".weight").rpartition(".")
        try:
            weight = transformer.get_submodule(module_name).weight
        except AttributeError:
            raise UsageError(f"--init_lora {path}: this model has no {module_name} (a LoRA for a deeper or another "
                             "CogVideoX model?)") from None
        # lora_A: rank x in (x kernel); lora_B: out x rank (x 1 x 1): the sides the base weight must share.
        fits = (tensor.shape[1:] == weight.shape[1:] if leaf == "lora_A"
                else tensor.shape[0] == weight.shape[0])
        if not fits:
            raise UsageError(f"--init_lora {path}: {key} has shape {tuple(tensor.shape)}, which does not fit this "
                             f"model's {module_name} ({tuple(weight.shape)}): the LoRA was trained for another model")


def _saved_adapter(directory, pipeline_class):
    """The adapter a LoRA `save` wrote, keyed as peft names it (without the `transformer.` prefix)."""
    state = pipeline_class.lora_state_dict(directory, weight_name=LORA_WEIGHT_NAME)
    if isinstance(state, tuple):  # some diffusers versions return (state_dict, metadata)
        state = state[0]
    prefix = "transformer."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _weight_files(folder):
    """The safetensors files of a saved transformer/ (one, or the shards its index lists)."""
    index = Path(folder) / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["diffusion_pytorch_model.safetensors"]


def _save_pretrained_state(model, folder, state):
    """What `model.save_pretrained(folder)` writes (config, safetensors shards of at most 5GB, index), from `state`."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("diffusion_pytorch_model*.safetensors*"):
        old.unlink()
    model.save_config(folder)
    split = split_torch_state_dict_into_shards(
        state, max_shard_size="5GB", filename_pattern="diffusion_pytorch_model{suffix}.safetensors"
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name].contiguous() for name in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def cast_frozen(transformer, dtype):
    """Frozen weights in the compute dtype; trainable ones stay in the master dtype."""
    for parameter in transformer.parameters():
        # Only 16/32-bit floats: FP8-stored (--quantize_base fp8) and 4-bit packed weights keep their format.
        if not parameter.requires_grad and parameter.dtype in (torch.float32, torch.float16, torch.bfloat16):
            parameter.data = parameter.data.to(dtype)


def count_parameters(parameters):
    return sum(p.numel() for p in parameters)
