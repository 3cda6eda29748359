"""What the LoRA tools (extract, merge, resize, combine) share: reading a LoRA or a transformer's weights with one
clear line for bad input, the low-rank factorisation of an update, and writing a LoRA in both forms.

A LoRA is held as training/lora_formats.py holds it: {diffusers module name: Adapter(down, up, alpha)}. Every LoRA
these tools write has alpha = rank for each module (scale 1), so its update is exactly up @ down.
"""

import math
from pathlib import Path

import torch

from training.errors import UsageError
from training.lora_formats import (
    COMFYUI_WEIGHT_NAME,
    Adapter,
    UnmappedKeys,
    diffusers_layers,
    native_module,
    read_lora_file,
    save_comfyui,
)


DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def lora_file(path):
    """The LoRA file a path names: the file itself, or a run's folder with pytorch_lora_weights.safetensors."""
    path = Path(path)
    if path.is_dir():
        from training.modes import peft_folder_of

        if peft_folder_of(path) is not None:
            raise UsageError(f"{path}: a LoHa or LoKr run (peft's adapter folder): of the LoRA tools only "
                             "merge_lora.py takes it")
        if not (path / DIFFUSERS_WEIGHT_NAME).is_file():
            raise UsageError(f"{path}: a folder without {DIFFUSERS_WEIGHT_NAME} (give the LoRA file itself)")
        return path / DIFFUSERS_WEIGHT_NAME
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    return path


def read_lora(path, alpha=None):
    """{module: Adapter} of a CogVideoX LoRA in any form lora_formats reads; anything else is one UsageError line."""
    from safetensors import SafetensorError

    path = lora_file(path)
    try:
        adapters, unmapped, _ = read_lora_file(path, alpha=alpha)
    except SafetensorError as error:
        raise UsageError(f"{path}: not a safetensors file ({error})") from error
    except ValueError as error:  # no LoRA keys at all
        raise UsageError(f"{path}: not a CogVideoX LoRA ({error})") from error
    if any(key.endswith("lora_magnitude_vector") for key in unmapped):
        raise UsageError(f"{path}: a DoRA (its magnitudes are not a LoRA's low-rank product): of the LoRA tools only "
                         "merge_lora.py takes it")
    if unmapped:
        raise UsageError(f"{path}: not a CogVideoX transformer LoRA ({UnmappedKeys(unmapped)})")
    if not adapters:
        raise UsageError(f"{path}: not a CogVideoX transformer LoRA (no adapted module in it)")
    return adapters


def weighted(spec):
    """'A.safetensors:0.5' -> ('A.safetensors', 0.5); without ':<number>' the weight is 1.0."""
    path, _, weight = spec.rpartition(":")
    try:
        return (path, float(weight)) if path else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def transformer_folder(model):
    """The folder with a transformer's config and weights: MODEL/transformer of a pipeline (local or a Hub id), or
    MODEL itself when it is a transformer folder (a full fine-tune's <run>/transformer)."""
    path = Path(model)
    for folder in (path / "transformer", path):
        if (folder / "config.json").is_file():
            return folder
    if path.exists():
        raise UsageError(f"{model}: neither a pipeline folder (with transformer/) nor a transformer folder "
                         "(config.json and diffusion_pytorch_model*.safetensors)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["transformer/*"])) / "transformer"
    except Exception as error:  # not a Hub id, no network, gated
        raise UsageError(f"{model}: not a local folder, and not a model on the Hub ({type(error).__name__})") from error


class TransformerWeights:
    """A transformer folder's tensors, read one at a time (a sharded checkpoint's index is followed)."""

    def __init__(self, model):
        import json

        from safetensors import safe_open

        self.folder = transformer_folder(model)
        index = sorted(self.folder.glob("diffusion_pytorch_model*.safetensors.index.json"))
        files = sorted(self.folder.glob("diffusion_pytorch_model*.safetensors"))
        if not files:
            raise UsageError(f"{self.folder}: no diffusion_pytorch_model*.safetensors in it")
        names = json.loads(index[0].read_text())["weight_map"].values() if index else [f.name for f in files]
        self._files = {name: safe_open(str(self.folder / name), "pt") for name in sorted(set(names))}
        self._where = {key: handle for handle in self._files.values() for key in handle.keys()}

    def __contains__(self, key):
        return key in self._where

    def keys(self):
        return sorted(self._where)

    def shape(self, key):
        return tuple(self._where[key].get_slice(key).get_shape())

    def get(self, key):
        return self._where[key].get_tensor(key)

    def dtype(self):
        return self.get(self.keys()[0]).dtype


def check_fits(adapters, weights, path):
    """One UsageError line when a LoRA adapts a module the model lacks, or one of another shape."""
    for module, adapter in adapters.items():
        key = f"{module}.weight"
        if key not in weights:
            raise UsageError(f"{path} does not fit {weights.folder}: the model has no {module}")
        shape = (adapter.up.shape[0], *adapter.down.shape[1:])
        if math.prod(shape) != math.prod(weights.shape(key)) or shape[0] != weights.shape(key)[0]:
            raise UsageError(f"{path} does not fit {weights.folder}: {module} is {tuple(weights.shape(key))} in the "
                             f"model, {shape} in the LoRA (a LoRA of another CogVideoX model?)")


# ----------------------------------------------------------------------------------------------
# Low rank
# ----------------------------------------------------------------------------------------------


def svd(matrix):
    """u, s, vh of a 2-D float32 matrix."""
    return torch.linalg.svd(matrix.float(), full_matrices=False)


def svd_of_product(up, down):
    """u, s, vh of up @ down (out x r times r x in) without forming it: QR of each factor, SVD of an r x r core."""
    q_up, r_up = torch.linalg.qr(up.float())
    q_down, r_down = torch.linalg.qr(down.float().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u, s, vh @ q_down.T


def truncate(u, s, vh, rank=None, energy=None):
    """(up, down, energy kept) of the best rank-r approximation: r = `rank`, or the fewest singular values whose
    squares sum to the share `energy` of all. The error it makes is sqrt(1 - energy kept) of the update's norm."""
    power = s.double() ** 2
    total = power.sum()
    if energy is not None:
        share = power.cumsum(0) / total if total > 0 else torch.ones_like(power)
        r = min(int((share < energy - 1e-12).sum()) + 1, len(s))
    else:
        r = min(rank, len(s))
    kept = float(power[:r].sum() / total) if total > 0 else 1.0
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r], kept


def as_adapter(up, down, like_shape):
    """An Adapter (alpha = rank: scale 1) whose up @ down has the weight's shape (a Conv2d's down keeps the kernel)."""
    rank = down.shape[0]
    up = up.reshape(like_shape[0], rank, *([1] * (len(like_shape) - 2)))
    down = down.reshape(rank, *like_shape[1:])
    return Adapter(down.contiguous(), up.contiguous(), float(rank))


def resized(adapter, rank=None, energy=None):
    """(adapter of lower rank, energy kept) from the SVD of one adapter's update."""
    scale = adapter.alpha / adapter.rank if adapter.alpha is not None else 1.0
    u, s, vh = svd_of_product(adapter.up.flatten(1).float() * scale, adapter.down.flatten(1).float())
    up, down, kept = truncate(u, s, vh, rank, energy)
    return as_adapter(up, down, (adapter.up.shape[0], *adapter.down.shape[1:])), kept


# ----------------------------------------------------------------------------------------------
# Writing and reporting
# ----------------------------------------------------------------------------------------------


def write_lora(adapters, output_dir, dtype="fp32"):
    """Both forms into output_dir: pytorch_lora_weights.safetensors (diffusers, rank and alpha in its metadata) and
    pytorch_lora_weights_comfyui.safetensors (ComfyUI native, alpha per module). Returns the two paths."""
    from diffusers import CogVideoXPipeline

    cast = {m: Adapter(a.down.to(DTYPES[dtype]), a.up.to(DTYPES[dtype]), a.alpha) for m, a in adapters.items()}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    layers, metadata = diffusers_layers(cast)
    CogVideoXPipeline.save_lora_weights(output_dir, transformer_lora_layers=layers,
                                        transformer_lora_adapter_metadata=metadata, weight_name=DIFFUSERS_WEIGHT_NAME)
    save_comfyui(cast, output_dir / COMFYUI_WEIGHT_NAME)
    return output_dir / DIFFUSERS_WEIGHT_NAME, output_dir / COMFYUI_WEIGHT_NAME


def report(rows, log=print):
    """rows: [(module, rank, energy kept)]; prints one line per module (rank, energy kept, relative error) and a
    summary. The relative error is |update - LoRA| / |update| (Frobenius norms)."""
    log(f"{'module':<44} {'rank':>5} {'energy':>8} {'error':>8}")
    for module, rank, kept in rows:
        log(f"{module:<44} {rank:>5} {kept:>8.4f} {math.sqrt(max(0.0, 1 - kept)):>8.4f}")
    if rows:
        worst, ranks = min(rows, key=lambda row: row[2]), sorted({rank for _, rank, _ in rows})
        log(f"{len(rows)} modules, rank {ranks[0]}{f'-{ranks[-1]}' if len(ranks) > 1 else ''}; least energy kept "
            f"{worst[2]:.4f} ({worst[0]}), largest error {math.sqrt(max(0.0, 1 - worst[2])):.4f}")


def add_rank_arguments(parser):
    """--rank / --energy (one of them), and --save_dtype."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="The LoRA's rank, the same for every module.")
    group.add_argument("--energy", type=float,
                       help="Instead of --rank: per module, the fewest ranks that keep this share (0-1] of the "
                       "update's energy (sum of squared singular values); the error is then sqrt(1 - energy).")
    parser.add_argument("--save_dtype", choices=sorted(DTYPES), default="fp32",
                        help="Precision of the written LoRA (bf16 halves the file; fp32 keeps the SVD exact).")


def parse_rank_flags(parser, argv):
    """The parsed flags of a tool with add_rank_arguments; a --rank or --energy out of range is one UsageError line,
    before anything is read."""
    from training.errors import UsageError

    args = parser.parse_args(argv)
    if args.rank is not None and args.rank < 1:
        raise UsageError(f"--rank {args.rank}: give 1 or more")
    if args.energy is not None and not 0 < args.energy <= 1:
        raise UsageError(f"--energy {args.energy}: give a share in (0, 1], e.g. 0.9")
    import training  # noqa: F401  (quiet library notices)

    return args


def lora_modules(keys):
    """The modules of a transformer's weight names that a LoRA can hold (Linear/Conv weights lora_formats maps)."""
    return [key[: -len(".weight")] for key in keys if key.endswith(".weight") and native_module(key[: -len(".weight")])]
