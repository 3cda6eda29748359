"""Memory figures per phase: accelerator memory on CUDA, peak resident memory on CPU."""

import gc
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
