"""Memory figures: accelerator memory per phase (CUDA), peak resident memory (CPU), and `AllocationTracker`, the
byte counter that both the --dry_run estimate (on fake tensors) and a tracked real run
(COGVIDEOX_FACTORY_TRACK_ALLOCATIONS=1) use, so their figures can be compared."""

import gc
import os
import resource
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


GIB = 2**30
# The CUDA caching allocator hands out blocks in multiples of 512 bytes.
ALLOCATION_GRANULARITY = 512


class AllocationTracker(TorchDispatchMode):
    """Bytes of live tensor storages, updated at every operator; `peak` is the high-water mark.

    Works on real, meta and fake tensors alike. A storage is counted once however many views
    share it, and uncounted when it is freed (a weak reference to the storage tells us).
    """

    def __init__(self, granularity=ALLOCATION_GRANULARITY):
        super().__init__()
        self.granularity = granularity
        self.live = {}
        self.current = 0
        self.peak = 0

    def track(self, *tensors):
        for tensor in tree_flatten(tensors)[0]:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor.untyped_storage())

    def _add(self, storage):
        key = id(storage)
        if key in self.live:
            return
        size = -(-storage.nbytes() // self.granularity) * self.granularity

        def freed(_, key=key):
            entry = self.live.pop(key, None)
            if entry is not None:
                self.current -= entry[1]

        self.live[key] = (weakref.ref(storage, freed), size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def untrack(self, *tensors):
        """Stop counting these tensors' storages (they moved off the accelerator)."""
        for tensor in tree_flatten(tensors)[0]:
            if isinstance(tensor, torch.Tensor):
                entry = self.live.pop(id(tensor.untyped_storage()), None)
                if entry is not None:
                    self.current -= entry[1]

    def reset_peak(self):
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out


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
    tracker = AllocationTracker()
    modules = [m for m in (transformer, context.vae, context.text_encoder) if m is not None]
    from .block_swap import device_tensors

    tracker.track([device_tensors(m) for m in modules], optimizer.state_dict()["state"])
    tracker.__enter__()
    return tracker
