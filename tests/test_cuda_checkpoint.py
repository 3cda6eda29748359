"""Checkpoint and resume of a GPU training state, through the CUDA layer (tests/cuda_semantics.py).

A one-GPU LoRA run is held on fake CUDA tensors: the base in bf16 and the adapter in its master dtype (fp32 or bf16)
on `cuda`, stepped once (synthetic gradients) by each optimizer the trainer offers whose step runs on fake tensors:
torch's Adam and AdamW (step counters on the CPU), torchao's AdamW8bit/AdamW4bit (large states quantized subclass
tensors, fp32 scales), bitsandbytes' AdamW8bit (uint8 states, fp32 absmax and maps, int step) and CAME (fp32
states whatever the weights' dtype). Prodigy is left out: its step reads a value computed on the GPU (its step size
estimate), which a fake tensor has not. torchao's CPUOffloadOptimizer is left out too: gradients reach its host
copies in hooks that only a backward pass fires (it is resumed with real CPU tensors in test_cuda_paths.py).

The project's own code writes and reads the checkpoint: training/checkpoint.py's save_checkpoint and
load_checkpoint over the plain backend (training/backend.py) and a real accelerate `Accelerator`, whose `save_state`
writes optimizer.bin and the CUDA random states and calls the LoRA mode's save hook. Only the backend's device
(cuda:0) and its all-reduce are those of a GPU process instead of accelerate's on this machine.

Fake tensors hold no bytes, so the files are made where bytes are written: `torch.save` and safetensors'
`save_file` receive each fake tensor as a real CPU tensor of its kind, dtype and shape, holding the bytes of the
tensor it was copied from, else deterministic numbers (`Ledger`). Reading is the mirror image: the files are read
into real CPU tensors, from which the project's loaders run under fake CUDA, and the ledger tells which bytes each
restored tensor holds. Host tensors stay real throughout, as in a GPU process (step counters, random states,
torchao's learning rate).
"""
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import reset_accelerate
from cuda_semantics import fake_cuda, synthetic_gradients
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode_stack


GPUS = 2  # the run uses GPU 0; the checkpoint keeps the random state of every GPU it sees
RANK = 256  # lora_A of to_q is 256 x 16: 4096 values, which torchao's low-bit optimizers quantize
SMALL_RANK = 4  # to_v's adapter stays below 4096 values: plain states beside the quantized ones


def _built_by_the_trainer(**optimizer_flags):
    """What training/optim.py builds for these [optimizer] flags (made on the host, before CUDA is faked:
    bitsandbytes loads its CUDA backend when torch says there is a GPU)."""
    from training.optim import optimizer_class_and_kwargs
    from training.sections import OptimizerFlags

    cls, kwargs = optimizer_class_and_kwargs(OptimizerFlags(**optimizer_flags), 1e-3)
    return lambda parameters: cls(parameters, **kwargs)


# Each optimizer the trainer offers but Prodigy, whose step reads a value computed on the GPU (its step size
# estimate), which a fake tensor does not have (its checkpoints resume exactly on the CPU: test_training).
OPTIMIZERS = {
    "adam": lambda: _built_by_the_trainer(optimizer="adam"),
    "adamw": lambda: _built_by_the_trainer(optimizer="adamw"),
    "torchao-8bit": lambda: _built_by_the_trainer(optimizer="adamw", use_torchao=True, use_8bit=True),
    "torchao-4bit": lambda: _built_by_the_trainer(optimizer="adamw", use_torchao=True, use_4bit=True),
    "bnb-8bit": lambda: _built_by_the_trainer(optimizer="adamw", use_8bit=True),  # bitsandbytes
    "came": lambda: _built_by_the_trainer(optimizer="came"),
}
MASTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- the ledger
_COPIES = {torch.ops.aten.clone.default, torch.ops.aten._to_copy.default, torch.ops.aten.detach.default,
           torch.ops.aten.alias.default}


def _is_real(tensor):
    if isinstance(tensor, FakeTensor):
        return False
    if hasattr(type(tensor), "__tensor_flatten__"):  # a wrapper subclass: real when what it wraps is
        return all(_is_real(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
    return True


def _kind(tensor):
    """A plain tensor (fake or real) or the subclass wrapping its data."""
    return type(tensor) if hasattr(type(tensor), "__tensor_flatten__") else torch.Tensor


def _inner(tensor):
    """{name: tensor} a wrapper subclass (torchao's quantized states) holds; {} for a plain tensor."""
    if hasattr(type(tensor), "__tensor_flatten__"):
        return {name: getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]}
    return {}


def _walk(obj, leaf, path=()):
    if isinstance(obj, torch.Tensor):
        return leaf(obj, path)
    if isinstance(obj, dict):
        return type(obj)((key, _walk(value, leaf, (*path, key))) for key, value in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_walk(value, leaf, (*path, i)) for i, value in enumerate(obj))
    return obj


def _on_the_host(args, kwargs):
    """Whether an op computes on real host tensors only (and makes no GPU tensor): a GPU process computes it."""
    device = kwargs.get("device")
    return (device is None or torch.device(device).type == "cpu") and all(
        _is_real(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))


def _written_arguments(func, args, kwargs):
    """The tensors an op writes into (`out=` and in-place arguments, lists of them for foreach ops)."""
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            yield from value if isinstance(value, (list, tuple)) else [value]


class Ledger(TorchDispatchMode):
    """Which bytes each fake tensor holds. Copies (clone, casts, a real tensor moved to the GPU, copy_ into a weight)
    are followed to their source; at a write each fake tensor becomes a real one (`materialized`), and `written`
    keeps, per file and key, the device it was on. Host tensors stay real, as in a GPU process: an op on real CPU
    tensors that makes no GPU tensor runs for real (step counters, torchao's learning rate, random states, a step
    counter read back and incremented), where FakeTensorMode alone would make fakes of them, without values."""

    def __init__(self):
        super().__init__()
        self.copied_from = {}  # id(fake) -> (fake, the tensor it holds the values of)
        self.real = {}  # id(fake) -> (fake, its bytes)
        self.written = {}  # file name -> {key path: the device the tensor written there was on}
        self.seed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _on_the_host(args, kwargs):
            with _disable_current_modes():
                return func(*args, **kwargs)
        # Real host tensors going to the GPU are made fake first (what they hold recorded): FakeTensorMode would
        # run a real copy to CUDA where all inputs are real (the copy a quantized state makes of what it wraps).
        args, kwargs = pytree.tree_map_only(torch.Tensor, self._fake, (args, kwargs))
        out = func(*args, **kwargs)
        for written in _written_arguments(func, args, kwargs):  # computed values now: no longer a copy
            self.copied_from.pop(id(written), None)
            self.real.pop(id(written), None)
        if func in _COPIES or func is torch.ops.aten.copy_.default:
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if (isinstance(out, torch.Tensor) and isinstance(source, torch.Tensor) and out.shape == source.shape
                    and _kind(out) == _kind(source)):  # a copy into a quantized state quantizes: not a copy
                self.copied_from[id(out)] = (out, source)
        return out

    def _fake(self, tensor):
        if not _is_real(tensor):
            return tensor
        mode = next(m for m in _get_current_dispatch_mode_stack() if isinstance(m, FakeTensorMode))
        with _disable_current_modes():
            if _inner(tensor):
                names, context = tensor.__tensor_flatten__()
                inner = {name: mode.from_tensor(getattr(tensor, name)) for name in names}
                fake = type(tensor).__tensor_unflatten__(inner, context, tensor.shape, tensor.stride())
            else:
                fake = mode.from_tensor(tensor)
        self.copied_from[id(fake)] = (fake, tensor)
        return fake

    def source(self, tensor):
        """The tensor whose values `tensor` holds: a real one (read from a file) or a fake one never copied."""
        while not _is_real(tensor) and id(tensor) in self.copied_from:
            tensor = self.copied_from[id(tensor)][1]
        return tensor

    def value(self, tensor):
        """The bytes `tensor` stands for (made on first asking; the same for every copy of it)."""
        if _is_real(tensor):
            return tensor
        if id(tensor) not in self.real:
            with _disable_current_modes():
                self.real[id(tensor)] = (tensor, self._made(tensor))
        return self.real[id(tensor)][1]

    def _made(self, tensor):
        if id(tensor) in self.copied_from:
            source = self.value(self.copied_from[id(tensor)][1])
            return source if _inner(source) else source.to(tensor.dtype)
        if _inner(tensor):
            names, context = tensor.__tensor_flatten__()
            inner = {name: self.value(getattr(tensor, name)) for name in names}
            return type(tensor).__tensor_unflatten__(inner, context, tensor.shape, tensor.stride())
        if tensor.constant is not None:
            return tensor.constant.clone()
        generator = torch.Generator().manual_seed(self.seed)
        self.seed += 1
        if tensor.dtype.is_floating_point:
            return torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
        top = 2 if tensor.dtype == torch.bool else 256
        return torch.randint(0, top, tensor.shape, generator=generator).to(tensor.dtype)

    def held(self, tensor):
        """A copy of the bytes `tensor` holds now."""
        value = self.value(self.source(tensor))
        with _disable_current_modes():
            return value if _inner(value) else value.clone()

    def materialized(self, obj, file):
        """`obj` with every tensor real, each recorded under `file` with the device it came from."""
        record = self.written.setdefault(file, {})

        def leaf(tensor, path):
            record[path] = tensor.device
            return self.value(tensor)

        return _walk(obj, leaf)

    def placed(self, obj, file):
        """What a file read back holds (real CPU tensors) with each tensor put back on the GPU it was written from
        (fake CUDA, holding those bytes): torch.load without map_location."""
        record = self.written.get(file, {})

        def leaf(tensor, path):
            device = record.get(path, tensor.device)
            return tensor.to(device) if device.type == "cuda" else tensor

        return _walk(obj, leaf)


def _file_name(f):
    from pathlib import Path

    return Path(str(getattr(f, "name", f))).name


def _byte_boundary(monkeypatch, ledger):
    """torch.save and safetensors' save_file write real tensors for fake ones; torch.load and load_file read real
    CPU tensors (a file read under FakeTensorMode would give fake tensors with none of its bytes)."""
    import safetensors.torch

    save, save_file, load, load_file = torch.save, safetensors.torch.save_file, torch.load, safetensors.torch.load_file

    def torch_save(obj, f, *args, **kwargs):
        real = ledger.materialized(obj, _file_name(f))
        with _disable_current_modes():
            return save(real, f, *args, **kwargs)

    def safetensors_save(tensors, filename, *args, **kwargs):
        real = ledger.materialized(tensors, _file_name(filename))
        with _disable_current_modes():
            return save_file(real, filename, *args, **kwargs)

    def torch_load(f, map_location=None, *args, **kwargs):
        with _disable_current_modes():
            obj = load(f, *args, map_location="cpu", **kwargs)
        return ledger.placed(obj, _file_name(f)) if map_location is None else obj

    def safetensors_load(filename, device="cpu"):
        with _disable_current_modes():
            return load_file(filename, device=device)

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_save)
    monkeypatch.setattr(torch, "load", torch_load)
    monkeypatch.setattr(safetensors.torch, "load_file", safetensors_load)


def _cpu_build_shims(monkeypatch):
    """What a CPU build of torch lacks for these paths, none of it a change of what they compute:
    - FakeTensorMode must not run a real copy to CUDA (`avoid_device_init`, which it derives from
      torch.cuda.is_available(), which fake_cuda answers yes): otherwise a real CPU tensor moved to the GPU (each
      optimizer state a resume loads, torchao's quantization maps) runs the CPU build's missing CUDA kernels;
    - `Tensor.copy_` through aten (its Python binding takes a device guard, which a CPU build has not for CUDA: the
      weights a checkpoint restores are copied in with it);
    - torchao's optimizer step runs its `single_param_adam` eagerly: torch.compile does not trace under a Python
      dispatch mode, and its CUDA kernels cannot be built here. The states it keeps are built outside it."""
    monkeypatch.setattr(FakeTensorMode, "avoid_device_init", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "copy_",
                        lambda self, src, non_blocking=False: torch.ops.aten.copy_.default(self, src, non_blocking))
    monkeypatch.setattr(torch, "compile", lambda model=None, **kwargs: model)


# ----------------------------------------------------------------------------------------------- the run
def _lora_transformer(master_dtype):
    """The tiny CogVideoX transformer (tools/build_tiny_model.py's 2b widths) with an adapter on to_q (rank 256) and
    to_v (rank 4): the base frozen in bf16, the adapter in the master dtype (training/modes.py), on the CPU."""
    from diffusers import CogVideoXTransformer3DModel
    from peft import LoraConfig

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4, text_embed_dim=32,
        num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=16,
        use_rotary_positional_embeddings=False,
    ).requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q", "to_v"],
                                       rank_pattern={"to_v": SMALL_RANK}, init_lora_weights=True))
    for parameter in transformer.parameters():
        parameter.data = parameter.data.to(master_dtype if parameter.requires_grad else torch.bfloat16)
    return transformer


def _gpu_backend():
    """training.backend.Backend over a real accelerate Accelerator, as on one GPU: accelerate's device is cuda:0,
    and the all-reduce of the finiteness flags is recorded (every rank says finite: a fake tensor has no value)."""
    from accelerate import Accelerator

    from training.backend import Backend

    class OnOneGpu(Backend):
        device = torch.device("cuda", 0)

        def reduce_mean(self, tensor):
            self.reduced.append(tensor)
            return SimpleNamespace(item=lambda: 1.0)

    reset_accelerate()
    backend = OnOneGpu(Accelerator(cpu=True))
    backend.reduced = []
    return backend


def _training_state(transformer, build_optimizer):
    """(backend, model, trained parameters by name, optimizer, LR schedule) of a run on the GPU, before its first
    step; inside fake_cuda, from a transformer loaded on the host. What training/step.py's build_trainer does: the
    model on the device, then the optimizer and the schedule, handed to accelerate (already placed), the mode's save
    hook registered."""
    from diffusers import CogVideoXPipeline
    from diffusers.optimization import get_scheduler

    from training.modes import LoRA

    transformer.to_empty(device="cuda")
    trained = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
    optimizer = build_optimizer([{"params": list(trained.values())}])
    schedule = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=1, num_training_steps=10)
    backend = _gpu_backend()
    model = backend.accelerator.prepare_model(transformer, device_placement=False)
    optimizer = backend.accelerator.prepare_optimizer(optimizer, device_placement=False)
    backend.register_mode(LoRA(), lambda: CogVideoXPipeline)
    return SimpleNamespace(backend=backend, model=model, trained=trained, optimizer=optimizer, schedule=schedule)


def _step(run):
    synthetic_gradients(run.trained.values())
    run.optimizer.step()
    run.schedule.step()


def _optimizer_states(run):
    """{(parameter name, state key): tensor} of the optimizer that steps (step counters aside: `_steps`)."""
    inner = run.optimizer.optimizer
    return {(name, key): value for name, p in run.trained.items() for key, value in inner.state.get(p, {}).items()
            if isinstance(value, torch.Tensor) and key != "step"}


def _steps(run):
    """Each trained weight's step counter: a CPU tensor (torch, torchao) or an int (bitsandbytes, CAME)."""
    inner = run.optimizer.optimizer
    return {name: inner.state[p]["step"] for name, p in run.trained.items()}


def _per_parameter(file_state):
    """optimizer.bin's state of one weight, with bitsandbytes' quantization states (kept in a nested dict for FSDP)
    among the others."""
    flat = {}
    for key, value in file_state.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def _checkpoint(run, output_dir, step):
    """What core.after_step does at a checkpoint: the finiteness check of weights and optimizer states, then
    save_checkpoint."""
    from diffusers import CogVideoXPipeline

    from training.checkpoint import save_checkpoint
    from training.core import optimizer_state_tensors
    from training.modes import LoRA

    backend = run.backend
    assert backend.all_finite([*run.trained.values(), *optimizer_state_tensors(run.optimizer)])
    return save_checkpoint(backend, output_dir, step, {"global_step": step}, run.schedule, run.model, run.optimizer,
                           save_model=lambda folder: backend.save_artifact(LoRA(), run.model, folder, CogVideoXPipeline))


def _same(a, b):
    """Equal bytes: plain tensors, or torchao's quantized states (codes, scale, map)."""
    if _inner(a) or _inner(b):
        return type(a) is type(b) and all(_same(x, y) for x, y in zip(_inner(a).values(), _inner(b).values()))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _where(tensor):
    """(kind, device, dtype) of a tensor, and of each tensor it wraps."""
    return (_kind(tensor).__name__, tensor.device.type, tensor.dtype,
            {name: (t.device.type, t.dtype) for name, t in _inner(tensor).items()})


def _step_count(step):
    """(count, where it is): torch's and torchao's counters are CPU tensors, bitsandbytes' and CAME's ints (on the
    CPU too, in their way); a counter on the GPU has no value here."""
    if not isinstance(step, torch.Tensor):
        return step, "cpu"
    return step.item() if _is_real(step) else None, step.device.type


def _checkpointed(folder, monkeypatch, optimizer_name, master):
    """A GPU run of `optimizer_name` with `master` adapter weights, stepped once and checkpointed at step 1 into
    `folder`: the run, its checkpoint, the ledger that wrote it, and the state it held."""
    _cpu_build_shims(monkeypatch)
    ledger = Ledger()
    _byte_boundary(monkeypatch, ledger)
    transformer, build_optimizer = _lora_transformer(MASTER_DTYPES[master]), OPTIMIZERS[optimizer_name]()
    with fake_cuda(None, devices=GPUS), ledger:
        gpus = torch.cuda.random_states
        run = _training_state(transformer, build_optimizer)
        _step(run)
        states, steps = _optimizer_states(run), _steps(run)
        path = _checkpoint(run, folder, 1)
    return SimpleNamespace(run=run, path=path, ledger=ledger, states=states, steps=steps,
                           where={key: _where(t) for key, t in states.items()},
                           gpu_rng=list(gpus.states))  # real host tensors (the stubs replace them, never write in them)


# ----------------------------------------------------------------------------------------------- the tests
@pytest.fixture(autouse=True)
def _fresh_accelerate():
    yield
    reset_accelerate()


RUNS = [(name, master) for name in OPTIMIZERS for master in MASTER_DTYPES]


@pytest.mark.parametrize("optimizer_name, master", RUNS)
def test_the_checkpoint_of_a_gpu_run_holds_its_state(tmp_path, monkeypatch, optimizer_name, master):
    """The files of a GPU run's checkpoint hold each optimizer state as it was on the GPU, of its kind (torchao's
    quantized subclasses, with their fp32 scales beside bf16 weights) and dtype; step counters at 1; the adapter in
    its own dtype (an exact resume); every GPU's random state by index. The finiteness check ran on the GPU state
    before the checkpoint was written."""
    from training.modes import LORA_WEIGHT_NAME

    saved = _checkpointed(tmp_path, monkeypatch, optimizer_name, master)
    run, ledger, folder = saved.run, saved.ledger, saved.path
    assert [t.device for t in run.backend.reduced] == [torch.device("cuda", 0)]
    # What a GPU run holds (the premise): weights and optimizer states on the GPU; torchao's large states quantized.
    assert {where[1] for where in saved.where.values()} == {"cuda"}
    assert {p.device.type for p in run.trained.values()} == {"cuda"}
    if optimizer_name.startswith("torchao"):
        assert {where[0] for (_, key), where in saved.where.items() if key == "exp_avg"} == {
            "OptimState8bit" if "8bit" in optimizer_name else "OptimState4bit", "Tensor"}

    optimizer_file = torch.load(folder / "optimizer.bin", map_location="cpu", weights_only=True)
    names = list(run.trained)
    for (name, key), tensor in saved.states.items():
        stored = _per_parameter(optimizer_file["state"][names.index(name)])[key]
        assert _where(stored)[0::2] == saved.where[(name, key)][0::2], (name, key)  # kind and dtypes, inner ones too
        assert _same(stored, ledger.value(tensor)), (name, key)
    for name, step in saved.steps.items():
        stored = optimizer_file["state"][names.index(name)]["step"]
        assert _step_count(step) == _step_count(stored) == (1, "cpu"), (name, step, stored)
        assert type(stored) is type(step) and getattr(stored, "dtype", None) == getattr(step, "dtype", None), name

    lora = _load_safetensors(folder / LORA_WEIGHT_NAME)
    for name, parameter in run.trained.items():
        key = "transformer." + name.replace(".default", "")
        assert lora[key].dtype == MASTER_DTYPES[master] and _same(lora[key], ledger.value(parameter)), key

    rng = _load_safetensors(folder / "rng_state_0.safetensors")
    assert sorted(rng) == ["cuda_0", "cuda_1", "torch"]
    for index in range(GPUS):
        assert torch.equal(rng[f"cuda_{index}"], saved.gpu_rng[index]), f"GPU {index}"
    assert json.loads((folder / "lr_scheduler.json").read_text())["last_epoch"] == 1


@pytest.mark.parametrize("optimizer_name, master", RUNS)
def test_a_gpu_run_resumes_its_checkpoint_on_the_gpu(tmp_path, monkeypatch, optimizer_name, master):
    """A new process (its GPU random states reseeded) resumes the checkpoint through load_checkpoint: every
    optimizer state back on the GPU with the checkpoint's bytes, of its kind and dtype (an fp32 state is not cast to
    bf16 weights' dtype), step counters on the CPU, the adapter's weights on the GPU in their dtype with the
    checkpoint's values, each GPU's random state restored by index, the schedule at step 1; and the restored state
    takes the next step on the GPU (its counters then at 2)."""
    from diffusers import CogVideoXPipeline

    from training.checkpoint import load_checkpoint
    from training.modes import LoRA

    saved = _checkpointed(tmp_path, monkeypatch, optimizer_name, master)
    ledger, master_dtype = saved.ledger, MASTER_DTYPES[master]
    transformer, build_optimizer = _lora_transformer(master_dtype), OPTIMIZERS[optimizer_name]()
    with fake_cuda(None, devices=GPUS), ledger:
        gpus = torch.cuda.random_states
        torch.cuda.manual_seed_all(1234)
        resumed = _training_state(transformer, build_optimizer)
        load_checkpoint(resumed.backend, saved.path, resumed.model, resumed.optimizer, resumed.schedule, LoRA(),
                        CogVideoXPipeline)

        states = _optimizer_states(resumed)
        assert {key: _where(t) for key, t in states.items()} == saved.where
        for key, tensor in states.items():
            assert _same(ledger.held(tensor), ledger.value(saved.states[key])), key
        for name, step in _steps(resumed).items():
            assert _step_count(step) == _step_count(saved.steps[name]) == (1, "cpu"), name
        for name, weight in resumed.trained.items():
            assert _where(weight) == ("Tensor", "cuda", master_dtype, {}), name
            assert _same(ledger.held(weight), ledger.value(saved.run.trained[name])), name
        for index, state in enumerate(gpus.states):
            assert torch.equal(ledger.held(state), saved.gpu_rng[index]), f"GPU {index}"
        assert resumed.schedule.last_epoch == 1
        # torchao refuses to step with a float learning rate
        assert isinstance(resumed.optimizer.param_groups[0]["lr"], torch.Tensor) == optimizer_name.startswith("torchao")

        _step(resumed)
        assert {_step_count(step) for step in _steps(resumed).values()} == {(2, "cpu")}


def _load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))
