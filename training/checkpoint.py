"""Resume checkpoints: written to a temporary folder, then renamed, so `latest` never picks a
half-written one. The user's artifact (LoRA or transformer) is written separately by the mode.

Resuming reads only safetensors, JSON and `torch.load(weights_only=True)` files (no pickle runs), DeepSpeed's own
files included: its checkpoint engine is pointed at `torch.load(weights_only=True)`, with the four DeepSpeed classes
those files hold allowed by name (`_deepspeed_weights_only`).

Who owns the model and optimizer state decides the layout (`engine_kind`):
- plain / DDP: accelerate's `save_state` (the model through the mode's hook) and `optimizer.bin`;
- DeepSpeed (ZeRO-1/2/3): the engine's partitioned files in `pytorch_model/` (frozen weights left out), plus the
  mode's artifact for the user;
- FSDP: the mode's artifact (gathered) and the full optimizer state, `optimizer_full_state.bin`, keyed by parameter
  name, both written by rank 0 and spread back over the ranks on resume.
Under ZeRO-3 and FSDP no rank holds the whole model: `gather_state_dict` collects it (every rank takes part) before
the mode writes it.
"""

import json
import os
import re
import shutil
from pathlib import Path


STATE_FILE = "training_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
DEEPSPEED_TAG = "pytorch_model"  # accelerate's folder name for the engine's files
FSDP_OPTIMIZER = "optimizer_full_state.bin"
_LAYOUT = {"deepspeed": DEEPSPEED_TAG, "fsdp": FSDP_OPTIMIZER, None: "optimizer.bin"}
_LAYOUT_NAMES = {"deepspeed": "under DeepSpeed", "fsdp": "under FSDP", None: "without DeepSpeed or FSDP"}


def simulate_crash(where, step):
    """Tests only: COGVIDEOX_FACTORY_CRASH_AT="step:K", "checkpoint:K" or "prepare:K" (after K written entries)
    SIGKILLs this process there."""
    if os.environ.get("COGVIDEOX_FACTORY_CRASH_AT") == f"{where}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def complete_checkpoints(output_dir):
    """[(step, path)] of finished checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume_path(output_dir, resume_from_checkpoint):
    """Path of the checkpoint to resume, or None ("latest" with no checkpoint starts fresh)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def read_state(path):
    return json.loads((Path(path) / STATE_FILE).read_text())


def _rng_state():
    import random

    import numpy as np
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), position, has_gauss, cached]}
    return tensors, plain


def _set_rng_state(tensors, plain):
    import random

    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def _write_resume_state(accelerator, folder, lr_scheduler):
    from safetensors.torch import save_file

    rank = accelerator.process_index
    tensors, plain = _rng_state()
    save_file(tensors, str(folder / f"rng_state_{rank}.safetensors"))
    (folder / f"rng_state_{rank}.json").write_text(json.dumps(plain))
    if accelerator.is_main_process:
        (folder / "lr_scheduler.json").write_text(json.dumps(lr_scheduler.state_dict(), default=_tensor_to_json))
        if accelerator.scaler is not None:
            (folder / "grad_scaler.json").write_text(json.dumps(accelerator.scaler.state_dict()))


def load_checkpoint(accelerator, folder, transformer, optimizer, lr_scheduler, load_model, read_model=None):
    """Restore what save_checkpoint wrote. `load_model(folder)` puts the mode's weights back into an unsharded model;
    under FSDP `read_model(folder)` returns them as a state dict (main process only) to spread over the shards.
    Every rank calls this."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    kind = engine_kind(accelerator)
    _check_layout(folder, kind)
    if kind == "deepspeed":
        _load_deepspeed(transformer, folder)
    elif kind == "fsdp":
        _load_fsdp(accelerator, folder, transformer, optimizer, read_model)
    else:
        load_model(folder)
        state = torch.load(folder / "optimizer.bin", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)
    scaler_file = folder / "grad_scaler.json"
    if kind != "deepspeed" and accelerator.scaler is not None and scaler_file.is_file():  # DeepSpeed keeps its own
        accelerator.scaler.load_state_dict(json.loads(scaler_file.read_text()))
    lr_scheduler.load_state_dict(json.loads((folder / "lr_scheduler.json").read_text(), object_hook=_tensor_from_json))
    rank = accelerator.process_index
    _set_rng_state(load_file(str(folder / f"rng_state_{rank}.safetensors")),
                   json.loads((folder / f"rng_state_{rank}.json").read_text()))


def save_checkpoint(accelerator, output_dir, step, state, lr_scheduler, total_limit=None, model=None, optimizer=None,
                    save_model=None):
    """Model, optimizer, RNG, schedule and loop state, atomically. Every rank calls this.

    Plain/DDP: accelerate's save_state (the model via the mode's hook). DeepSpeed and FSDP need the prepared `model`
    and `optimizer`, and `save_model(folder)`, which writes the mode's artifact (gathering sharded weights)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    kind = engine_kind(accelerator)
    if kind is None:
        accelerator.save_state(str(partial))
    else:
        if accelerator.is_main_process:
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        save_model(partial)
        if kind == "deepspeed":
            # Frozen weights left out (a LoRA checkpoint holds the adapter, not the 5B base); every rank writes its
            # own optimizer partition.
            model.save_checkpoint(str(partial), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        else:
            _save_fsdp_optimizer(accelerator, model, optimizer, partial)
    _write_resume_state(accelerator, partial, lr_scheduler)
    accelerator.wait_for_everyone()  # every rank's RNG file is in before the folder is renamed
    simulate_crash("checkpoint", step)
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit is not None:
            for _, old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _tensor_to_json(value):
    """Scalar tensors in a schedule's state (torchao optimizers keep lr as a tensor), exactly and with their dtype."""
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return {"__tensor__": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
    raise TypeError(f"cannot store {type(value).__name__} in lr_scheduler.json")


def _tensor_from_json(obj):
    import torch

    if "__tensor__" in obj:
        return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"]))
    return obj


# ----------------------------------------------------------------------------------------------
# DeepSpeed and FSDP
# ----------------------------------------------------------------------------------------------


def engine_kind(accelerator):
    """"deepspeed", "fsdp" or None (plain or DDP): who owns the model and optimizer state."""
    from accelerate.utils import DistributedType

    return {DistributedType.DEEPSPEED: "deepspeed", DistributedType.FSDP: "fsdp"}.get(accelerator.distributed_type)


def weights_sharded(accelerator):
    """True when no rank holds the whole transformer (ZeRO-3, FSDP): its forward passes and saving need every rank."""
    kind = engine_kind(accelerator)
    if kind == "deepspeed":
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return kind == "fsdp"


def plain_name(name):
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def gather_state_dict(accelerator, model, trainable_only):
    """The whole state dict of a ZeRO-3 / FSDP `model` (the prepared one) as CPU tensors on the main process ({} on
    the others), with the plain module's key names; only the weights that train with `trainable_only`.

    None when the weights are not sharded: every rank holds them, so the mode saves from the model itself.
    A collective: every rank must call it, in the same order."""
    if not weights_sharded(accelerator):
        return None
    if engine_kind(accelerator) == "deepspeed":
        # Gathered one module at a time onto rank 0's CPU (DeepSpeed's own consolidation, as accelerate uses).
        return model._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only) or {}
    from torch.distributed.tensor import DTensor

    parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad or not trainable_only]
    if trainable_only and all(isinstance(p, DTensor) for _, p in parameters):
        # FSDP2: all-gather just the trained weights (a LoRA), not the frozen base.
        state = {}
        for name, parameter in parameters:
            full = parameter.full_tensor()
            if accelerator.is_main_process:
                state[plain_name(name)] = full.detach().cpu()
        return state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if accelerator.device.type == "cpu":  # no copy was made to offload: the tensors are FSDP's reused buffers
        state = {k: v.clone() for k, v in state.items()}
    if trainable_only:
        keep = {plain_name(name) for name, _ in parameters}
        state = {k: v for k, v in state.items() if k in keep}
    return state


def _check_layout(folder, kind):
    if (folder / _LAYOUT[kind]).exists():
        return
    written = next((k for k, name in _LAYOUT.items() if (folder / name).exists()), "unknown")
    raise FileNotFoundError(
        f"{folder} was written {_LAYOUT_NAMES.get(written, 'by another kind of run')} and this run is "
        f"{_LAYOUT_NAMES[kind]}: resume it with the accelerate config it was written with (or start a new run "
        "from its weights)"
    )


def _deepspeed_safe_globals():
    """The classes DeepSpeed (checked with 0.19) pickles into its ZeRO-1/2/3 checkpoints besides tensors and plain
    containers: the loss scaler, the ZeRO stage enum and the fragment addresses of the flattened partitions. Plain
    data holders: the weights-only unpickler only sets their attributes, it runs none of their code. A DeepSpeed
    version that adds another class fails to resume with torch's message naming it (to add here), not silently."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _deepspeed_weights_only:
    """Within it, the engine's checkpoint loads are `torch.load(weights_only=True)` (DeepSpeed hard-codes
    weights_only=False) with only `_deepspeed_safe_globals` allowed: a file holding anything else fails to load
    instead of running code."""

    def __init__(self, engine):
        self.checkpoint_engine = engine.checkpoint_engine

    def __enter__(self):
        import torch

        allowed = _deepspeed_safe_globals()

        def load(path, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

        self.checkpoint_engine.load = load  # shadows the method on this instance only
        return self

    def __exit__(self, *exc):
        del self.checkpoint_engine.load


def _load_deepspeed(engine, folder):
    with _deepspeed_weights_only(engine):
        path, _ = engine.load_checkpoint(
            str(folder), tag=DEEPSPEED_TAG, load_module_strict=False,  # frozen weights were left out
            load_optimizer_states=True, load_lr_scheduler_states=False,  # the schedule is ours (lr_scheduler.json)
        )
    if path is None:
        raise FileNotFoundError(f"{folder / DEEPSPEED_TAG}: DeepSpeed found no checkpoint to load")


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer


def _save_fsdp_optimizer(accelerator, model, optimizer, folder):
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=options)  # collective
    if accelerator.is_main_process:
        torch.save(state, folder / FSDP_OPTIMIZER)


def _load_fsdp(accelerator, folder, model, optimizer, read_model):
    """Rank 0 reads the files; torch spreads each tensor over the shards (broadcast_from_rank0)."""
    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    main = accelerator.is_main_process
    weights = read_model(folder) if main else {}
    set_model_state_dict(
        model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    )
    state = torch.load(folder / FSDP_OPTIMIZER, map_location="cpu", weights_only=True) if main else {}
    set_optimizer_state_dict(
        model, _torch_optimizer(optimizer), state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
