"""Resume checkpoints: written to a temporary folder, then renamed, so `latest` never picks a
half-written one. The user's artifact (LoRA or transformer) is written separately by the mode.

Resuming reads only safetensors, JSON and `torch.load(weights_only=True)` files (no pickle runs), except under
DeepSpeed, whose engine restores its own files through accelerate.
"""

import json
import os
import re
import shutil
from pathlib import Path


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
        (folder / "lr_scheduler.json").write_text(json.dumps(lr_scheduler.state_dict()))
        if accelerator.scaler is not None:
            (folder / "grad_scaler.json").write_text(json.dumps(accelerator.scaler.state_dict()))


def load_checkpoint(accelerator, folder, transformer, optimizer, lr_scheduler, load_model):
    """Restore what save_checkpoint wrote. `load_model(folder)` puts the mode's weights back."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.load_state(str(folder))  # the engine restores its own partitioned states
    else:
        load_model(folder)
        state = torch.load(folder / "optimizer.bin", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)
        scaler_file = folder / "grad_scaler.json"
        if accelerator.scaler is not None and scaler_file.is_file():
            accelerator.scaler.load_state_dict(json.loads(scaler_file.read_text()))
    lr_scheduler.load_state_dict(json.loads((folder / "lr_scheduler.json").read_text()))
    rank = accelerator.process_index
    _set_rng_state(load_file(str(folder / f"rng_state_{rank}.safetensors")),
                   json.loads((folder / f"rng_state_{rank}.json").read_text()))


def save_checkpoint(accelerator, output_dir, step, state, lr_scheduler, total_limit=None):
    """accelerate state (model via the mode's hook, optimizer) plus RNG, schedule and loop state, atomically."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
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
