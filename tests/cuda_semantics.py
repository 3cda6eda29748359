"""CUDA's rules on a machine without CUDA: the layer the GPU-only paths run through in CI.

- `fake_cuda()`: torch's FakeTensorMode makes `cuda` tensors (shapes, dtypes and devices, no data) on the CPU build,
  under CUDA autocast (`torch.set_autocast_enabled("cuda", True)`: CUDA's dispatch rules, e.g. LayerNorm in fp32,
  not CPU autocast's). Fake tensors are more lenient than CUDA in one place that matters, so `DeviceRule` enforces
  it: stack/cat refuse tensors of two devices (fake tensors accept a CPU 0-dim tensor there). Autograd on fake CUDA
  tensors aborts the process on a CPU build, so the context runs without gradients: trained weights get synthetic
  gradients of their own dtype and device (`synthetic_gradients`) to drive optimizers and checkpoints.
- `fake_cuda(loading=True)`: models are loaded and moved inside as on a GPU (the trainer's `from_pretrained` with
  `device_map` on the GPU, bitsandbytes quantizing at its `.to("cuda")`, peft moving new adapters to the base layer's
  device): safetensors files are read as real CPU tensors, `Tensor.to` moves them to fake CUDA, and a parameter class
  over a fake tensor (`nn.Parameter`, bitsandbytes' `Params4bit`) is a fake tensor of that class, whose data `.to()`
  and `Module.to` replace as they do a real parameter's (`fake_parameters`).
- Attention kernels that exist only on CUDA (flash, flash 3, their hub versions) are replaced by fakes that enforce
  the real kernels' rules: q, k and v of one 16-bit dtype, on CUDA, head dims the kernel supports (`fake_flash`).
- `fp8_kernel_on_cuda_rules(monkeypatch)`: torch's FP8 matmul on real CPU tensors, each call checked first against
  the CUDA kernel's rules (layouts, sides that are multiples of 16), which the CPU kernel does not enforce.
- `fp16_loss_scaling_on_cpu(monkeypatch, ...)`: fp16 mixed precision as accelerate runs it on CUDA (a loss scaler),
  on the CPU, where accelerate runs it without one.
- `cuda_streams_on_cpu(monkeypatch)`: real CPU tensors, with CUDA's streams, events and pinned memory stubbed, for
  code whose numbers must be compared (torchao's CPUOffloadOptimizer, pinned copies): its logic runs as on a GPU,
  its tensors stay on the CPU.
"""

import contextlib
import functools

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
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


class _NoCudaHere(FakeTensorMode):
    """FakeTensorMode as it is where CUDA cannot start: torch asks `torch.cuda.is_available()`, which fake_cuda says
    yes to. So `torch.tensor(..., device="cuda")` is made on the CPU and moved, and a real CPU tensor moved to CUDA is
    not copied for real to fold it as a constant (both fail on a CPU build)."""

    avoid_device_init = True


@contextlib.contextmanager
def fake_cuda(autocast_dtype=torch.bfloat16, devices=1, loading=False):
    """Fake CUDA tensors under CUDA autocast in `autocast_dtype` (None: no autocast). Yields the FakeTensorMode;
    `torch.empty(..., device="cuda")` inside makes a fake CUDA tensor, and real CPU tensors passed in are
    treated as constants. `loading`: models may be loaded and moved to the GPU inside (module docstring).

    Autocast's cast cache is off: it keeps the cast of an fp32 weight that requires grad (a LoRA layer in an fp32
    master dtype) with an autograd edge, whose CUDA metadata aborts the process on a CPU build. The cache only saves
    casting such a weight again; the casts, their dtypes and devices are the same without it."""
    patches = _Patches()
    _cuda_stubs(patches, devices)
    patches(torch.Tensor, "pin_memory", lambda self, device=None: self)
    patches(torch.Tensor, "__getitem__", _getitem)
    patches(torch.Tensor, "__setitem__", _setitem)
    patches(torch.Tensor, "contiguous", _contiguous)
    patches(torch.Tensor, "copy_", _copy)
    mode = (_NoCudaHere if loading else FakeTensorMode)(allow_non_fake_inputs=True)
    if loading:  # after FakeTensorMode is made: it imports torch._dynamo, which checks torch's own functions
        fake_parameters(patches)
    autocast_before = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
                       torch.is_autocast_cache_enabled())
    try:
        with torch.no_grad(), mode, DeviceRule():
            torch.set_autocast_cache_enabled(False)
            if autocast_dtype is not None:
                torch.set_autocast_enabled("cuda", True)
                torch.set_autocast_dtype("cuda", autocast_dtype)
            yield mode
    finally:
        torch.set_autocast_enabled("cuda", autocast_before[0])
        torch.set_autocast_dtype("cuda", autocast_before[1])
        torch.set_autocast_cache_enabled(autocast_before[2])
        patches.restore()


# ----------------------------------------------------------------------------------------------- loading models
_fake_classes = {}


@functools.cache
def _fake_tensor_state():
    """The attributes a FakeTensor keeps in its __dict__ (its device, mode, memos)."""
    with unset_fake_temporarily():
        meta = torch.empty(0, device="meta")
    return frozenset(vars(FakeTensor.__new__(FakeTensor, FakeTensorMode(), meta, "cpu"))) | {"_debug_trace"}


def fake_parameter_class(cls):
    """A FakeTensor that is also a `cls` (nn.Parameter, bitsandbytes' Params4bit): `isinstance`, the class's name (some
    libraries go by it) and its methods are `cls`'s, its tensor is fake. Made as `cls` makes it (its `__new__`, given
    the attributes `cls` takes: a fake tensor's own are left out), and setting its `.data` moves it to the device of the
    new data, as with a real parameter (torch keeps a fake tensor's device beside its meta tensor)."""
    if cls not in _fake_classes:

        def new(fake_cls, *args, **kwargs):
            own = {k: v for k, v in kwargs.items() if k not in _fake_tensor_state()}
            return cls.__new__(cls, *args, **own)

        def set_data(self, new_data):
            torch._C.TensorBase.data.__set__(self, new_data)
            self.fake_device = new_data.device

        _fake_classes[cls] = type(cls.__name__, (FakeTensor, cls), {
            "__new__": new, "__qualname__": cls.__qualname__, "__module__": __name__,
            "data": property(torch._C.TensorBase.data.__get__, set_data)})
    return _fake_classes[cls]


def fake_parameters(patch):
    """What loading and moving models needs on fake CUDA tensors; `patch(obj, name, value)`.

    - safetensors reads files as real CPU tensors (under fake mode it cannot make them at all);
    - `Tensor.to(cuda)` of a CPU or CUDA tensor goes through aten (its Python binding takes a CUDA device guard), or
      returns the tensor where it is on CUDA in that dtype already, as `to` does;
    - `Tensor._make_subclass(cls, fake)` (how Params4bit, and nn.Parameter of a plain tensor, wrap data) and
      `nn.Parameter(fake)` (a FakeTensor with a flag, whose type is FakeTensor: `type(param)(data)` fails, as accelerate
      calls it) give a `fake_parameter_class(cls)`;
    - `Module._apply` swaps a fake parameter for a new one of type Parameter (a Params4bit would lose its class and its
      quant_state); for these it sets the data, as it does a real parameter's."""
    import safetensors.torch

    load_file = safetensors.torch.load_file
    patch(safetensors.torch, "load_file", lambda *args, **kwargs: _real(load_file, *args, **kwargs))
    to = torch.Tensor.to

    def to_cuda_through_aten(self, *args, copy=False, **kwargs):
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if device is None or device.type != "cuda" or self.device.type not in ("cpu", "cuda"):
            return to(self, *args, copy=copy, **kwargs)  # (a move to CUDA below copies anyway)
        same_gpu = self.device.type == "cuda" and (device.index or 0) == (self.device.index or 0)
        if same_gpu and (dtype is None or dtype == self.dtype) and memory_format is None and not copy:
            return self  # already there, as `to` answers
        return torch.ops.aten._to_copy.default(self, dtype=dtype or self.dtype, device=device,
                                               non_blocking=non_blocking,
                                               memory_format=memory_format or torch.preserve_format)

    patch(torch.Tensor, "to", to_cuda_through_aten)
    make_subclass = torch.Tensor._make_subclass

    def make_fake_subclass(cls, data, requires_grad=False, **kwargs):
        if not isinstance(data, FakeTensor) or issubclass(cls, FakeTensor) or kwargs:
            return make_subclass(cls, data, requires_grad, **kwargs)
        with unset_fake_temporarily():
            meta = torch.empty_strided(data.shape, data.stride(), dtype=data.dtype, device="meta")
        self = FakeTensor.__new__(fake_parameter_class(cls), data.fake_mode, meta, data.fake_device,
                                  requires_grad=requires_grad)
        self.data = data  # its storage, as _make_subclass shares it
        return self

    patch(torch.Tensor, "_make_subclass", staticmethod(make_fake_subclass))
    parameter = torch.nn.Parameter.__new__

    def new_parameter(cls, data=None, requires_grad=True):
        if isinstance(data, FakeTensor) and not issubclass(cls, FakeTensor):
            return make_fake_subclass(cls, data, requires_grad)
        return parameter(cls, data, requires_grad)

    patch(torch.nn.Parameter, "__new__", new_parameter)
    swap_tensors = torch.utils.swap_tensors

    def swap_or_set_data(t1, t2):
        if type(t1) in _fake_classes.values():
            t1.data = t2
        else:
            swap_tensors(t1, t2)

    patch(torch.utils, "swap_tensors", swap_or_set_data)


def _real(function, *args, **kwargs):
    with unset_fake_temporarily():
        return function(*args, **kwargs)


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


def fp8_kernel_on_cuda_rules(monkeypatch):
    """torch._scaled_mm (the FP8 matmul torchao's Float8Linear calls) on real CPU tensors, each call first checked
    the way torch checks a CUDA call's inputs: its own shape function, run on fake CUDA tensors of the same shapes,
    strides and dtypes (2-D FP8 operands, the first row-major and the second column-major, inner and output sides
    multiples of 16, fp32 scales); the kernel's other limits (e.g. which FP8 dtype pairs it multiplies) are not
    modelled. The CPU kernel takes any layout and side. Returns the list of calls, as ((rows, inner), (inner,
    columns), output dtype)."""
    cpu_kernel, calls = torch._scaled_mm, []

    def on_cuda_rules(a, b, **kwargs):
        def like_on_cuda(t):
            if not isinstance(t, torch.Tensor):
                return t
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")

        with FakeTensorMode():
            cpu_kernel(like_on_cuda(a), like_on_cuda(b), **{k: like_on_cuda(v) for k, v in kwargs.items()})
        calls.append((tuple(a.shape), tuple(b.shape), kwargs.get("out_dtype")))
        return cpu_kernel(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", on_cuda_rules)
    return calls


def fp16_loss_scaling_on_cpu(monkeypatch, init_scale, growth_interval):
    """accelerate's CUDA branch of fp16 mixed precision on the CPU: a GradScaler (scaled backward, gradients unscaled
    before clipping, steps skipped on overflow, the scale backed off and grown) and native autocast (the CPU's fp16
    autocast standing in for CUDA's); on a CPU accelerate uses neither. Returns the list of scalers made, one per
    Accelerator."""
    import accelerate

    init, scalers = accelerate.Accelerator.__init__, []

    def with_loss_scaling(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16":
            self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
            self.native_amp = True
            scalers.append(self.scaler)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", with_loss_scaling)
    return scalers


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
    from training.optional_libraries import use_torchao

    use_torchao()  # `import training` hides it
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


_SETITEM = torch.Tensor.__setitem__


def _setitem(self, index, value):
    """Assignment to a slice of a CUDA tensor through aten (as `_getitem`): a copy into the view. Other tensors, and
    indexing with tensors (no view), go the usual way."""
    if self.device.type != "cuda" or any(isinstance(i, (torch.Tensor, list))
                                         for i in (index if isinstance(index, tuple) else (index,))):
        return _SETITEM(self, index, value)
    view = _getitem(self, index)
    if isinstance(value, torch.Tensor):
        torch.ops.aten.copy_.default(view, value)
    else:
        torch.ops.aten.fill_.Scalar(view, value)


_COPY = torch.Tensor.copy_


def _copy(self, source, non_blocking=False):
    """Tensor.copy_ into a CUDA tensor through aten (its Python binding takes a device guard too)."""
    if self.device.type != "cuda":
        return _COPY(self, source, non_blocking)
    return torch.ops.aten.copy_.default(self, source, non_blocking)


def _contiguous(self, memory_format=torch.contiguous_format):
    """Tensor.contiguous through aten (its Python binding takes a device guard too)."""
    if self.is_contiguous(memory_format=memory_format):
        return self
    return torch.ops.aten.clone.default(self, memory_format=memory_format)
