"""Resume checkpoints: written to a temporary folder, then renamed, so `latest` never picks a
half-written one. The user's artifact (LoRA or transformer) is written separately by the mode.
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


def save_checkpoint(accelerator, output_dir, step, state, total_limit=None):
    """accelerate state (model hooks, optimizer, scheduler, RNG) plus our loop state, atomically."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
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
