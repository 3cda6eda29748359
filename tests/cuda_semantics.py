"""CUDA's rules on a machine without CUDA: the layer the GPU-only paths run through in CI.

- `fake_cuda()`: torch's FakeTensorMode makes `cuda` tensors (shapes, dtypes and devices, no data) on the CPU build,
  under CUDA autocast (`torch.set_autocast_enabled("cuda", True)`: CUDA's dispatch rules, e.g. LayerNorm in fp32,
  not CPU autocast's). Fake tensors are more lenient than CUDA in one place that matters, so `DeviceRule` enforces
  it: stack/cat refuse tensors of two devices (fake tensors accept a CPU 0-dim tensor there). Autograd on fake CUDA
  tensors aborts the process on a CPU build, so the context runs without gradients: trained weights get synthetic
  gradients of their own dtype and device (`synthetic_gradients`) to drive optimizers and checkpoints.
- Attention kernels that exist only on CUDA (flash, flash 3, their hub versions) are replaced by fakes that enforce
  the real kernels' rules: q, k and v of one 16-bit dtype, on CUDA, head dims the kernel supports (`fake_flash`).
- `cuda_streams_on_cpu(monkeypatch)`: real CPU tensors, with CUDA's streams, events and pinned memory stubbed, for
  code whose numbers must be compared (torchao's CPUOffloadOptimizer, pinned copies): its logic runs as on a GPU,
  its tensors stay on the CPU.
"""

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode


class DeviceRule(TorchDispatchMode):
    """CUDA's rule that fake tensors do not enforce: stack and cat take tensors of one device only."""

    ops = {torch.ops.aten.stack.default, torch.ops.aten.cat.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops:
            devices = {t.device for t in args[0]}
            if len(devices) > 1:
                raise RuntimeError(f"{func}: expected all tensors to be on the same device, but found "
                                   f"{sorted(map(str, devices))} (CUDA refuses this)")
        return func(*args, **(kwargs or {}))


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _Event()

    def synchronize(self):
        pass


class _Event(_Stream):
    def record(self, stream=None):
        pass

    def query(self):
        return True


def _cuda_stubs(patch, devices, available=True):
    """torch.cuda's queries and stream API, as on a machine with `devices` GPUs. `patch(obj, name, value)`.
    available=False leaves torch.cuda.is_available() False (the process keeps to the CPU; only streams exist)."""
    if available:
        patch(torch.cuda, "is_available", lambda: True)
    patch(torch.cuda, "device_count", lambda: devices)
    patch(torch.cuda, "current_device", lambda: 0)
    patch(torch.cuda, "Stream", _Stream)
    patch(torch.cuda, "Event", _Event)
    patch(torch.cuda, "current_stream", lambda device=None: _Stream())
    patch(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    patch(torch.cuda, "synchronize", lambda device=None: None)
    patch(torch.Tensor, "record_stream", lambda self, stream: None)
    rng = CudaRandomStates(devices)
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all", "manual_seed",
                 "manual_seed_all"):
        patch(torch.cuda, name, getattr(rng, name))
    patch(torch.cuda, "device", rng.device)
    patch(torch.cuda, "random_states", rng)  # for tests to read


class CudaRandomStates:
    """Each GPU's random state, as torch.cuda keeps it: a byte tensor per device index, changed by manual_seed."""

    def __init__(self, devices):
        self.states = [torch.full((16,), index, dtype=torch.uint8) for index in range(devices)]
        self.current = 0

    def _index(self, device):
        if device is None or device == "cuda":
            return self.current
        return device if isinstance(device, int) else torch.device(device).index or 0

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()  # IndexError for a GPU that is not there, as torch

    def set_rng_state(self, new_state, device="cuda"):
        self.states[self._index(device)] = new_state.clone()

    def get_rng_state_all(self):
        return [state.clone() for state in self.states]

    def set_rng_state_all(self, new_states):
        for index, state in enumerate(new_states):
            self.set_rng_state(state, index)

    def manual_seed(self, seed):
        self.states[self.current] = torch.full((16,), seed % 256, dtype=torch.uint8)

    def manual_seed_all(self, seed):
        for index in range(len(self.states)):
            self.states[index] = torch.full((16,), seed % 256, dtype=torch.uint8)

    @contextlib.contextmanager
    def device(self, device):
        before, self.current = self.current, self._index(device)
        try:
            yield
        finally:
            self.current = before


class _Patches:
    def __init__(self):
        self.undo = []

    def __call__(self, obj, name, value):
        self.undo.append((obj, name, getattr(obj, name, None)))
        setattr(obj, name, value)

    def restore(self):
        for obj, name, value in reversed(self.undo):
            setattr(obj, name, value)


@contextlib.contextmanager
def fake_cuda(autocast_dtype=torch.bfloat16, devices=1):
    """Fake CUDA tensors under CUDA autocast in `autocast_dtype` (None: no autocast). Yields the FakeTensorMode;
    `torch.empty(..., device="cuda")` inside makes a fake CUDA tensor, and real CPU tensors passed in are
    treated as constants."""
    patches = _Patches()
    _cuda_stubs(patches, devices)
    patches(torch.Tensor, "pin_memory", lambda self, device=None: self)
    patches(torch.Tensor, "__getitem__", _getitem)
    patches(torch.Tensor, "contiguous", _contiguous)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    autocast_before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    try:
        with torch.no_grad(), mode, DeviceRule():
            if autocast_dtype is not None:
                torch.set_autocast_enabled("cuda", True)
                torch.set_autocast_dtype("cuda", autocast_dtype)
            yield mode
    finally:
        torch.set_autocast_enabled("cuda", autocast_before[0])
        torch.set_autocast_dtype("cuda", autocast_before[1])
        patches.restore()


def synthetic_gradients(parameters):
    """A gradient of each trainable parameter's dtype and device (backward cannot run on fake CUDA tensors)."""
    for p in parameters:
        if p.requires_grad:
            p.grad = torch.empty_like(p)


FLASH_BACKENDS = ("flash", "_flash_3", "flash_hub", "_flash_3_hub")


def fake_flash(calls):
    """flash-attention's rules (flash_attn_func and its hub builds): q, k, v on CUDA, of one dtype, fp16 or bf16,
    [batch, tokens, heads, head_dim] with head_dim a multiple of 8 up to 256. Appends each call's dtypes to `calls`."""

    def kernel(query, key, value, dropout_p=0.0, scale=None, is_causal=False, return_lse=False, **ignored):
        dtypes = {query.dtype, key.dtype, value.dtype}
        if len(dtypes) > 1 or not dtypes <= {torch.float16, torch.bfloat16}:
            raise RuntimeError(f"FlashAttention only support fp16 and bf16 data type, with q, k and v alike; got "
                               f"{query.dtype}, {key.dtype}, {value.dtype}")
        if {query.device.type, key.device.type, value.device.type} != {"cuda"}:
            raise RuntimeError("FlashAttention only supports CUDA tensors")
        if query.shape[-1] % 8 or query.shape[-1] > 256:
            raise RuntimeError(f"FlashAttention forward only supports head dimension at most 256, a multiple of 8; "
                               f"got {query.shape[-1]}")
        calls.append((query.dtype, key.dtype, value.dtype))
        out = torch.empty_like(query)
        return (out, torch.empty(query.shape[:3], device=query.device)) if return_lse else out

    return kernel


def install_fake_flash(monkeypatch, calls):
    """Every flash backend of diffusers' attention dispatcher replaced by `fake_flash(calls)`."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    for name in FLASH_BACKENDS:
        monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName(name), fake_flash(calls))
        monkeypatch.setitem(_AttentionBackendRegistry._supported_arg_names, AttentionBackendName(name),
                            {"query", "key", "value", "dropout_p", "scale", "is_causal", "return_lse"})


def cuda_streams_on_cpu(monkeypatch, devices=1, available=False):
    """CUDA's streams, events and pinned memory stubbed over real CPU tensors (see the module docstring); with
    available=True torch.cuda.is_available() says True as well. `pin_memory=True` allocations and `.pin_memory()`
    give ordinary CPU tensors, recorded in the returned set (by data pointer), so a test can ask which copies came
    from pinned memory."""
    _cuda_stubs(lambda obj, name, value: monkeypatch.setattr(obj, name, value, raising=False), devices, available)
    pinned = set()

    def pin(self, device=None):
        copy = self.clone()
        pinned.add(copy.data_ptr())
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, device=None: self.data_ptr() in pinned)
    for name in ("empty_like", "empty", "zeros", "zeros_like"):
        monkeypatch.setattr(torch, name, _pinnable(getattr(torch, name), pinned))
    return pinned


def offload_optimizer_on_cpu(monkeypatch):
    """torchao's CPUOffloadOptimizer, unchanged, keeping its "device" weights on the CPU: what it computes and copies
    is what it does on a GPU (its device-to-host copies become CPU-to-CPU copies), so runs can be compared bit for bit.
    The trainer's CUDA check is answered yes for it."""
    import torchao.optim.cpu_offload

    cuda_streams_on_cpu(monkeypatch)
    monkeypatch.setattr(torchao.optim.cpu_offload, "get_available_devices", lambda: ["cpu", "cuda"])
    monkeypatch.setattr("training.args._cuda_available", lambda: True)


def _pinnable(allocate, pinned):
    def allocate_maybe_pinned(*args, pin_memory=False, **kwargs):
        tensor = allocate(*args, **kwargs)
        if pin_memory:
            pinned.add(tensor.data_ptr())
        return tensor

    return allocate_maybe_pinned


def _getitem(self, index):
    """Tensor indexing through aten ops: Python's own indexing binding takes a device guard, which a CPU build of
    torch does not have for CUDA (fake CUDA tensors would fail there, not in any kernel)."""
    aten = torch.ops.aten
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.Tensor) or isinstance(i, list) for i in index):
        if len(index) == 1:
            return aten.index.Tensor(self, [torch.as_tensor(index[0], device=self.device)])
        raise NotImplementedError(f"fake CUDA indexing with {index}")
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (self.dim() - explicit) + index[at + 1:]
    out, dim = self, 0
    for i in index:
        if i is None:
            out = aten.unsqueeze.default(out, dim)
            dim += 1
        elif isinstance(i, int):
            out = aten.select.int(out, dim, i)
        elif isinstance(i, slice):
            if i != slice(None):
                out = aten.slice.Tensor(out, dim, i.start, i.stop, i.step or 1)
            dim += 1
        else:
            raise NotImplementedError(f"fake CUDA indexing with {i!r}")
    return out


def _contiguous(self, memory_format=torch.contiguous_format):
    """Tensor.contiguous through aten (its Python binding takes a device guard too)."""
    if self.is_contiguous(memory_format=memory_format):
        return self
    return torch.ops.aten.clone.default(self, memory_format=memory_format)
