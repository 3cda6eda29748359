"""Resume checkpoints: written to a temporary folder, then renamed, so `latest` never picks a
half-written one. The user's artifact (LoRA or transformer) is written separately by the mode.

A checkpoint holds the engine's model and optimizer state (written and read by the backend: `backend.py` knows
the layout of each engine), the LR schedule and grad scaler as JSON, every rank's RNG as safetensors/JSON, and
`training_state.json` (step, epoch, position in the epoch), written last; with --ema_decay, the average of the
weights (`ema.safetensors`, fp32). Resuming reads only safetensors, JSON and
`torch.load(weights_only=True)` files: no pickle runs.
"""

import json
import os
import re
import shutil
from pathlib import Path

from .errors import TrainingError
from .files import share_like_umask


STATE_FILE = "training_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


def set_aside_checkpoints(output_dir, from_step):
    """Rename the complete checkpoints of steps >= from_step to checkpoint-N-diverged (which `latest` and the total
    limit ignore); returns their new paths."""
    moved = []
    for step, path in complete_checkpoints(output_dir):
        if step >= from_step:
            target = path.with_name(f"{path.name}-diverged")
            if target.exists():
                shutil.rmtree(target)
            os.replace(path, target)
            moved.append(target)
    return moved


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


def agreed_resume_path(backend, output_dir, resume_from_checkpoint):
    """`resolve_resume_path` on every process, which must all find the same checkpoint: each process looks up
    "latest" in the --output_dir it sees, and machines that do not share it would resume different steps (or one
    would start afresh) and train on, out of step, with nothing said. A collective."""
    path = resolve_resume_path(output_dir, resume_from_checkpoint)
    steps = backend.gather_ints(-1 if path is None else int(read_state(path)["global_step"]))
    if len(set(steps)) > 1:
        found = ", ".join(f"rank {rank}: {f'step {step}' if step >= 0 else 'none'}" for rank, step in enumerate(steps))
        raise TrainingError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: the processes found different checkpoints in "
            f"{output_dir} ({found}). Every machine must see the same --output_dir (a shared file system), or copy "
            "the checkpoint folder to each machine before resuming."
        )
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
    if torch.cuda.is_available():  # by GPU index, for the GPUs this process sees (a resume may see fewer or more)
        for index in range(torch.cuda.device_count()):
            if f"cuda_{index}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda_{index}"], index)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def _write_resume_state(backend, folder, lr_scheduler):
    from safetensors.torch import save_file

    rank = backend.process_index
    tensors, plain = _rng_state()
    save_file(tensors, str(folder / f"rng_state_{rank}.safetensors"))
    (folder / f"rng_state_{rank}.json").write_text(json.dumps(plain))
    if backend.is_main_process:
        (folder / "lr_scheduler.json").write_text(json.dumps(lr_scheduler.state_dict(), default=_tensor_to_json))
        if backend.grad_scaler is not None:
            (folder / "grad_scaler.json").write_text(json.dumps(backend.grad_scaler.state_dict()))


def refresh_host_copies(optimizer):
    """torchao's CPUOffloadOptimizer copies each large weight to the CPU once, when it is built, then steps that copy
    and copies it back: after a resume has loaded the checkpoint's weights, the copies must follow them, or the first
    step would bring back the weights the run started from."""
    import torch

    from .optim import offloaded_optimizer

    offloaded = offloaded_optimizer(optimizer)
    if offloaded is not None:
        with torch.no_grad():
            for weight, host_copy in offloaded.param_d2h_map.items():
                host_copy.copy_(weight.detach())


def load_checkpoint(backend, folder, transformer, optimizer, lr_scheduler, mode, pipeline_class, ema=None):
    """Restore what save_checkpoint wrote; the mode reads its own weights, `ema` (ema.EMA, --ema_decay) its
    average. Every rank calls this."""
    from safetensors.torch import load_file

    folder = Path(folder)
    backend.check_checkpoint_layout(folder)
    backend.load_engine_state(folder, transformer, optimizer, mode, pipeline_class)
    refresh_host_copies(optimizer)
    if ema is not None:
        ema.load(folder)
    scaler_file = folder / "grad_scaler.json"
    if backend.grad_scaler is not None and scaler_file.is_file():
        backend.grad_scaler.load_state_dict(json.loads(scaler_file.read_text()))
    lr_scheduler.load_state_dict(json.loads((folder / "lr_scheduler.json").read_text(), object_hook=_tensor_from_json))
    rank = backend.process_index
    _set_rng_state(load_file(str(folder / f"rng_state_{rank}.safetensors")),
                   json.loads((folder / f"rng_state_{rank}.json").read_text()))


def save_checkpoint(backend, output_dir, step, state, lr_scheduler, model, optimizer, save_model, total_limit=None,
                    ema=None):
    """Model, optimizer, RNG, schedule and loop `state`, atomically. Every rank calls this. `save_model(folder)`
    writes the mode's artifact (gathering sharded weights) where the engine does not save the model itself; `ema`
    (ema.EMA, --ema_decay): its average too (every rank holds the same one; the main process writes it)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    if backend.is_main_process and partial.exists():
        shutil.rmtree(partial)
    backend.wait_for_everyone()
    backend.save_engine_state(partial, model, optimizer, save_model)
    _write_resume_state(backend, partial, lr_scheduler)
    if ema is not None and backend.is_main_process:
        ema.save(partial)
    backend.wait_for_everyone()  # every rank's RNG file is in before the folder is renamed
    if backend.is_main_process:
        share_like_umask(partial)
    simulate_crash("checkpoint", step)
    if backend.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit is not None:
            for _, old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    backend.wait_for_everyone()
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
