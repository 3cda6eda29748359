"""--blocks_to_swap N: the frozen weights of N transformer blocks live in host memory (pinned, on a GPU machine) and
come to the accelerator one block at a time, just before the block runs; they leave right after it.

The design (after musubi-tuner's and diffusion-pipe's offloaders, written for this trainer):

- Which blocks: N of `transformer.transformer_blocks`, evenly spread (as --gradient_checkpointing_ratio spreads its
  blocks), so the copy of the next swapped block runs while an unswapped one computes.
- What moves: each swapped block's frozen parameters (`.data` is pointed at the host copy or at the device copy; the
  parameter objects stay, so autograd, peft and the optimizer see the same tensors). Trainable weights (the LoRA
  layers peft puts inside the blocks: lora_A, lora_B) never move. The frozen weights do not change, so "out" is only
  dropping the device copy: nothing is copied back.
- When: a block's forward pre-hook makes it resident (waiting, on the compute stream, for the copy issued earlier on
  a side stream) and issues the copy of the next swapped block; its forward hook drops it. In backward, an identity
  autograd function on the block's outputs runs first (the start of the block's backward: it is brought back, before
  gradient checkpointing recomputes it, and the next block below is prefetched), and one on its inputs runs last (its
  end: the block is dropped). At most two swapped blocks are resident at once: the one at work and the one coming.
- Where the copies run: `CudaTransfers` (a side stream, an event per block that the compute stream waits on, pinned
  host memory, record_stream so the caching allocator does not hand the memory out while the compute stream reads
  it) on a GPU; elsewhere `Transfers`, plain copies in order (CPU-to-CPU: the same mechanism, so a CPU run trains
  exactly what a run without the swap trains, and the memory estimate sees each device copy come and go).
- `Module.to()` leaves swapped weights where they are (so moving the model, e.g. a validation pipeline's `.to(device)`
  or --enable_model_cpu_offload's moves, does not bring them all back).
"""


import torch


SWAP_ATTRIBUTE = "block_swap"  # where the transformer keeps its BlockSwap
# The host-to-device bandwidth the --dry_run's slowdown figure assumes (PCIe 4.0 x16 in practice; not measured).
ASSUMED_HOST_TO_DEVICE_GB_S = 25.0


def swapped_indices(blocks, count):
    """Which of `blocks` blocks are swapped: `count` of them, evenly spread (all when count >= blocks)."""
    count = min(count, blocks)
    return sorted({i * blocks // count for i in range(count)}) if count else []


def swappable_weights(block):
    """(module, name) of the block's frozen parameters: not trainable, and not a LoRA layer's (whatever their state)."""
    return [(module, name) for module_name, module in block.named_modules()
            for name, parameter in module.named_parameters(recurse=False)
            if not parameter.requires_grad and "lora_" not in module_name]


class Transfers:
    """Copies in program order on `device` (a CPU, or the memory estimate's fake tensors): a device copy is a new
    tensor, so what a block holds while resident is allocated and freed as on a GPU."""

    def __init__(self, device):
        self.device = torch.device(device)

    def host(self, tensor):
        return tensor if tensor.device.type in ("cpu", "meta") else tensor.to("cpu")  # meta: the estimate's, until faked

    def copy_in(self, homes):
        """(device copies of `homes`, a ticket to wait on)."""
        return [torch.empty_like(home, device=self.device).copy_(home) for home in homes], None

    def wait(self, ticket, copies):
        """Before the compute uses `copies`."""


class CudaTransfers(Transfers):
    """Copies from pinned host memory on a side stream; the compute stream waits on each block's event."""

    def __init__(self, device):
        super().__init__(device)
        self.stream = torch.cuda.Stream(device=self.device)

    def host(self, tensor):
        return tensor.to("cpu").pin_memory()

    def copy_in(self, homes):
        with torch.cuda.stream(self.stream):  # allocated from, and copied on, the side stream
            copies = [home.to(self.device, non_blocking=True, copy=True) for home in homes]
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def wait(self, ticket, copies):
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(ticket)
        for copy in copies:  # freed later: not reused by the side stream before the compute stream is done with it
            copy.record_stream(compute)


def _in_backward():
    """Whether autograd's engine is running a backward on this thread (gradient checkpointing recomputes there)."""
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """The swap of `count` of `blocks`' frozen weights through `transfers` (see the module docstring)."""

    def __init__(self, blocks, count, transfers):
        self.blocks = list(blocks)
        self.transfers = transfers
        self.swapped = swapped_indices(len(self.blocks), count)
        self.weights = {i: swappable_weights(self.blocks[i]) for i in self.swapped}
        self.homes = {}
        self.take_homes()
        self.resident = {}  # index -> [copies, ticket, waited]
        self.most_resident = 0  # the high-water mark of resident swapped blocks
        self.copies = 0  # blocks copied in so far
        self.block_bytes = max((sum(h.numel() * h.element_size() for h in homes) for homes in self.homes.values()),
                               default=0)
        self._callback_task = None
        self.handles = []
        for index, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post_hook(index)))
        for index in self.swapped:
            _keep_on_host_when_moved(self.blocks[index], self.weights[index])

    def take_homes(self):
        """Take the swapped weights' present data as their host copies (the memory estimate calls this again after
        giving the model fake weights)."""
        for index in self.swapped:
            homes = []
            for module, name in self.weights[index]:
                parameter = module._parameters[name]
                parameter.data = self.transfers.host(parameter.data)
                homes.append(parameter.data)
            self.homes[index] = homes

    def on_host(self):
        """The parameters whose data is a host copy now (of the swapped blocks not resident): no accelerator memory."""
        return [module._parameters[name] for index in self.swapped if index not in self.resident
                for module, name in self.weights[index]]

    # --------------------------------------------------------------------- residency
    def _prefetch(self, index):
        if index is not None and index not in self.resident:
            copies, ticket = self.transfers.copy_in(self.homes[index])
            self.resident[index] = [copies, ticket, False]
            self.copies += 1
            self.most_resident = max(self.most_resident, len(self.resident))

    def _use(self, index):
        """Block `index`'s weights on the device, for the compute stream, from now on."""
        self._prefetch(index)  # not issued ahead (the first block of a pass): issued now
        entry = self.resident[index]
        copies, ticket, waited = entry
        if not waited:
            self.transfers.wait(ticket, copies)
            entry[2] = True
        for (module, name), copy in zip(self.weights[index], copies):
            module._parameters[name].data = copy

    def _release(self, index):
        if self.resident.pop(index, None) is None:
            return
        for (module, name), home in zip(self.weights[index], self.homes[index]):
            module._parameters[name].data = home

    def release_all(self, but=None):
        for index in list(self.resident):
            if index != but:
                self._release(index)

    def _next(self, index, step):
        """The next swapped block after `index` going `step` (+1 forward, -1 backward), or None."""
        later = [i for i in self.swapped if (i - index) * step > 0]
        return (min(later) if step > 0 else max(later)) if later else None

    # --------------------------------------------------------------------- hooks
    def _pre_hook(self, index):
        def before(block, args, kwargs):
            if _in_backward():  # gradient checkpointing recomputes the block: its backward has brought it
                if index in self.weights:
                    self._use(index)
                return None
            if index == 0:  # a new pass: nothing of the last one stays (but its first block, if already coming)
                self.release_all(but=self.swapped[0] if self.swapped else None)
            if index in self.weights:
                self._use(index)
            upcoming = self._next(index, +1)
            if upcoming is None and not torch.is_grad_enabled() and self.swapped:
                upcoming = self.swapped[0]  # inference: the next call (denoising step) starts there
            self._prefetch(upcoming)
            if not torch.is_grad_enabled():
                return None
            return _wrap_inputs(self, index, args, kwargs)
        return before

    def _post_hook(self, index):
        def after(block, args, output):
            if _in_backward():
                return None
            grad = torch.is_grad_enabled()
            if grad:
                output = _wrap_outputs(self, index, output)
            # The highest swapped block is the first the backward needs: kept when one follows.
            keep = grad and self.swapped and index == self.swapped[-1] and _requires_grad(output)
            if index in self.weights and not keep:
                self._release(index)
            return output if grad else None
        return after

    def _backward_starts(self, index):
        if self._callback_task != torch._C._current_graph_task_id():
            self._callback_task = torch._C._current_graph_task_id()
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        if index in self.weights:
            self._use(index)  # back on the device for its backward (and the recomputation before it)
        self._prefetch(self._next(index, -1))

    def _backward_ends(self, index):
        self._release(index)

    def _backward_done(self):
        self._callback_task = None
        self.release_all()


def _requires_grad(output):
    tensors = output if isinstance(output, tuple) else (output,)
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _Boundary(torch.autograd.Function):
    """Identity on a block's tensors; its backward tells the swap that the block's backward starts (on the outputs)
    or has ended (on the inputs: every gradient through the block has been computed)."""

    @staticmethod
    def forward(ctx, swap, index, starts, *tensors):
        ctx.swap, ctx.index, ctx.starts = swap, index, starts
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.starts:
            ctx.swap._backward_starts(ctx.index)
        else:
            ctx.swap._backward_ends(ctx.index)
        return (None, None, None, *grads)


def _wrap(swap, index, starts, values):
    """`values` (a list) with the tensors that require grad passed through one _Boundary."""
    at = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.requires_grad]
    if not at:
        return values
    wrapped = _Boundary.apply(swap, index, starts, *(values[i] for i in at))
    values = list(values)
    for i, tensor in zip(at, wrapped):
        values[i] = tensor
    return values


def _wrap_inputs(swap, index, args, kwargs):
    names = list(kwargs)
    values = _wrap(swap, index, False, list(args) + [kwargs[n] for n in names])
    return tuple(values[:len(args)]), dict(zip(names, values[len(args):]))


def _wrap_outputs(swap, index, output):
    if isinstance(output, tuple):
        return tuple(_wrap(swap, index, True, list(output)))
    return _wrap(swap, index, True, [output])[0]


def _keep_on_host_when_moved(block, weights):
    """`Module.to()` (and .cuda(), .half(), ...) of the block, or of anything holding it, leaves these weights alone."""
    apply = block._apply

    def apply_to_the_rest(fn, recurse=True):
        held = [(module, name, module._parameters[name]) for module, name in weights]
        for module, name, _ in held:
            module._parameters[name] = None  # Module._apply skips a None
        try:
            return apply(fn, recurse)
        finally:
            for module, name, parameter in held:
                module._parameters[name] = parameter

    block._apply = apply_to_the_rest


def install(transformer, count, device):
    """Swap `count` of the transformer's blocks through `device` (a GPU: side stream and pinned memory). Returns the
    BlockSwap, also kept as `transformer.block_swap`."""
    device = torch.device(device)
    transfers = CudaTransfers(device) if device.type == "cuda" else Transfers(device)
    swap = BlockSwap(transformer.transformer_blocks, count, transfers)
    object.__setattr__(transformer, SWAP_ATTRIBUTE, swap)
    return swap


def of(module):
    """The BlockSwap of a transformer (or None)."""
    return getattr(module, SWAP_ATTRIBUTE, None)


def device_tensors(module):
    """`module`'s parameters and buffers that occupy accelerator memory: all but the swapped weights' host copies."""
    swap = of(module)
    host = {id(p) for p in swap.on_host()} if swap is not None else set()
    return [t for t in [*module.parameters(), *module.buffers()] if id(t) not in host]


# ------------------------------------------------------------------------------------------- plans and checks


def copies_per_micro_batch(count):
    """Blocks copied in per training micro-batch: each swapped block forward and backward, but the highest swapped
    block, kept from its forward for the backward that starts there."""
    return 2 * count - 1 if count else 0


def swap_plan(count, block_bytes, micro_batches_per_step, inference_steps=None, bandwidth_gb_s=ASSUMED_HOST_TO_DEVICE_GB_S):
    """What the --dry_run prints: bytes moved per optimizer step (and per validation video), and the time they take
    at the ASSUMED host-to-device bandwidth: the most the swap adds (less where copies hide behind compute)."""
    per_step = copies_per_micro_batch(count) * block_bytes * micro_batches_per_step
    plan = {
        "blocks_to_swap": count,
        "bytes_per_swapped_block": block_bytes,
        "bytes_moved_per_step": per_step,
        "assumed_host_to_device_gb_s": bandwidth_gb_s,
        "added_seconds_per_step_at_most": round(per_step / (bandwidth_gb_s * 1e9), 3),
    }
    if inference_steps:
        per_video = count * block_bytes * inference_steps
        plan["bytes_moved_per_validation_video"] = per_video
        plan["added_seconds_per_validation_video_at_most"] = round(per_video / (bandwidth_gb_s * 1e9), 3)
    return plan


def flag_problems(memory, parallelism, mode):
    """--blocks_to_swap ([memory]) against the other flags, one line each (before anything loads)."""
    count = memory.blocks_to_swap
    if count == 0:
        return []
    problems = []
    if count != "auto" and count < 0:
        problems.append(f"--blocks_to_swap must be 0 or more, or auto (got {count})")
    if count == "auto" and memory.max_memory_gb is None:
        problems.append("--blocks_to_swap auto needs --max_memory_gb N: the accelerator memory (GiB) to fit in")
    if mode.saves_frozen_weights:
        problems.append("--blocks_to_swap moves frozen weights, and full fine-tuning trains every weight: use a LoRA "
                        "trainer, or for full fine-tuning --use_cpu_offload_optimizer / a DeepSpeed config")
    if memory.quantize_base == "nf4":  # bitsandbytes' packed weights and their quantization state stay put
        problems.append("--blocks_to_swap with --quantize_base nf4: use one of them (fp8 swaps, at half the bytes)")
    if parallelism.regional_compile:
        problems.append("--blocks_to_swap with --regional_compile: the swap's hooks run around each block; use one")
    return problems


def runtime_problems(memory, backend):
    """--blocks_to_swap against the launched configuration."""
    if not memory.blocks_to_swap:
        return []
    if backend.num_processes > 1 or backend.kind != "plain":
        return ["--blocks_to_swap works with one process (no DeepSpeed or FSDP) for now"]
    if backend.compiles_whole_model:
        return ["--blocks_to_swap with an accelerate config that compiles the whole model (dynamo_backend): the "
                "swap's hooks change weights between blocks; use uncompiled_1.yaml"]
    return []


def frozen_block_bytes(transformer_config, mode, training, lora, memory, weight_dtype):
    """Bytes of one block's frozen weights as training stores them: a block of the model on the meta device, its
    base stored as --quantize_base says ([memory]), the mode's trainable layers added, the rest in the compute
    dtype."""
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    from .models import prepare_frozen_base
    from .modes import cast_frozen

    with init_empty_weights():
        transformer = CogVideoXTransformer3DModel.from_config({**transformer_config, "num_layers": 1})
    prepare_frozen_base(transformer, memory.quantize_base, weight_dtype)
    mode.prepare(transformer, training, lora)
    cast_frozen(transformer, weight_dtype)
    block = transformer.transformer_blocks[0]
    return sum(module._parameters[name].numel() * module._parameters[name].element_size()
               for module, name in swappable_weights(block))
