"""Memory figures per phase: accelerator memory on CUDA, peak resident memory on CPU."""

import gc
import os
import resource
import sys

import torch


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_stats(device):
    """GiB figures; on CPU only the process's peak RSS (it cannot be reset)."""
    gib = 1024**3
    if torch.device(device).type == "cuda":
        return {
            "memory_allocated": round(torch.cuda.memory_allocated(device) / gib, 3),
            "max_memory_allocated": round(torch.cuda.max_memory_allocated(device) / gib, 3),
            "max_memory_reserved": round(torch.cuda.max_memory_reserved(device) / gib, 3),
        }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_rss": round(peak * scale / gib, 3)}


def format_stats(phase, stats):
    return f"memory {phase}: " + ", ".join(f"{k}={v} GiB" for k, v in stats.items())


TRACK_ALLOCATIONS = "COGVIDEOX_FACTORY_TRACK_ALLOCATIONS"


def start_allocation_tracking(transformer, optimizer, context):
    """With COGVIDEOX_FACTORY_TRACK_ALLOCATIONS=1, count the bytes of every live tensor from here on (any device,
    no allocator cache; slow) -- the same counter the --dry_run estimate uses, so the two can be compared."""
    if os.environ.get(TRACK_ALLOCATIONS) != "1":
        return None
    from .memory_estimate import AllocationTracker

    tracker = AllocationTracker()
    modules = [m for m in (transformer, context.vae, context.text_encoder) if m is not None]
    tracker.track([list(m.parameters()) + list(m.buffers()) for m in modules], optimizer.state_dict()["state"])
    tracker.__enter__()
    return tracker
