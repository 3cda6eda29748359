"""Everything distributed, behind one object: the training loop asks the backend, it never asks which engine runs.

`build_backend(training, optimizer, parallelism, logging)` (flag sections) makes the accelerate `Accelerator` and
wraps it in the class of the engine that owns the model and optimizer state (accelerate's `distributed_type`, from
the accelerate config):

- `Backend`: one process or DDP. Every rank holds the whole model; accelerate's `save_state` writes the optimizer
  (`optimizer.bin`) and the mode writes its weights through a save hook.
- `DeepSpeedBackend` (ZeRO-1/2/3): the engine steps, clips and reduces; batch size, accumulation and clipping are
  written into its config from the flags. Its checkpoint is the engine's partitioned files (`pytorch_model/`,
  frozen weights left out), loaded with `torch.load(weights_only=True)` only.
- `FSDPBackend` (FSDP2; FSDP1 where accelerate gives it): the full optimizer state, keyed by parameter name,
  is written by rank 0 (`optimizer_full_state.bin`) and spread back over the shards on resume.

What the loop may ask: where tensors go (`device`), who writes files (`is_main_process`), `prepare` (one placement
rule), `accumulating`/`backward`/`clip_gradients`/`reduce_mean` (the step), `weights_sharded` (whether forward
passes and saving need every rank), `unwrap`, `save_artifact` (gathering sharded weights first),
`save_engine_state`/`load_engine_state` (the engine's part of a checkpoint), and `wait_for_main` (the waiting
room: other ranks wait on a gloo group with a long timeout while the main process validates).
"""

import contextlib
from datetime import timedelta
from pathlib import Path

import torch

from .modes import plain_name


# Ranks waiting for the main process to finish validation wait on a gloo group with this timeout rather than in the
# next NCCL collective, which --nccl_timeout (10 minutes by default) would abort during a long validation.
VALIDATION_WAIT = timedelta(hours=24)

# The file or folder that tells which engine wrote a checkpoint, and how to say it.
CHECKPOINT_MARKERS = {"plain": "optimizer.bin", "deepspeed": "pytorch_model", "fsdp": "optimizer_full_state.bin"}
ENGINE_DESCRIPTIONS = {"plain": "without DeepSpeed or FSDP", "deepspeed": "under DeepSpeed", "fsdp": "under FSDP"}


def build_backend(training, optimizer, parallelism, logging):
    """The accelerator for these flag sections (and the accelerate config in the environment), as a backend:
    [training] (--output_dir, --mixed_precision; batch size and accumulation for DeepSpeed), [optimizer]
    (--max_grad_norm for DeepSpeed), [parallelism] (--nccl_timeout, sequence parallelism, --allow_tf32), [logging]."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.utils import DistributedType, ProjectConfiguration

    project = ProjectConfiguration(project_dir=training.output_dir,
                                   logging_dir=str(Path(training.output_dir) / logging.logging_dir))
    report_to = None if logging.report_to in (None, "none") else logging.report_to
    accelerator = Accelerator(
        mixed_precision=training.mixed_precision,
        log_with=report_to,
        project_config=project,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=parallelism.nccl_timeout)),
        ],
    )
    engine = {DistributedType.DEEPSPEED: DeepSpeedBackend, DistributedType.FSDP: FSDPBackend}
    backend = engine.get(accelerator.distributed_type, Backend)(accelerator)
    if isinstance(backend, DeepSpeedBackend):
        configure_deepspeed(accelerator, training, optimizer)
    backend.waiting_room = WaitingRoom(accelerator.num_processes)
    if parallelism.enable_sequence_parallelism:
        backend.sequence_shards = start_sequence_parallelism(parallelism, accelerator.num_processes, training.dry_run)
    if parallelism.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return backend


def start_sequence_parallelism(parallelism, num_processes, dry_run=False):
    """This process's shard group (training/attention.py), after the one check that needs the number of processes.
    `dry_run`: --dry_run, whose estimate simulates the group in one process."""
    from .args import UsageError
    from .attention import build_shard_groups

    shards = parallelism.sequence_parallel_shards or num_processes
    if dry_run and num_processes == 1:
        return None  # the estimate simulates one process of a shard group (--sequence_parallel_shards)
    if num_processes < 2 or num_processes % shards or shards < 2:
        raise UsageError(f"--enable_sequence_parallelism with {shards} shard(s) over {num_processes} process(es): "
                         "the shards must be 2 or more and divide the number of processes (accelerate launch "
                         "--num_processes N, N a multiple of --sequence_parallel_shards)")
    return build_shard_groups(shards)


class WaitingRoom:
    """Where ranks meet while the main process validates: a gloo group with a 24 h timeout (creating it is a
    collective: every rank, at the same point). A crash on the main process still ends the run at once: the
    launcher (torchrun / accelerate) stops every rank."""

    def __init__(self, num_processes):
        import torch.distributed as dist

        self.group = None
        if num_processes > 1 and dist.is_available() and dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=VALIDATION_WAIT)

    def wait(self):
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)


class Backend:
    """One process or DDP: every rank holds the whole model."""

    kind = "plain"
    weights_sharded = False  # True when no rank holds the whole transformer: forward passes and saving need every rank

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.waiting_room = None
        self.sequence_shards = None  # attention.SequenceShards with --enable_sequence_parallelism

    # ------------------------------------------------------------------ facts (accelerate's, read through)
    device = property(lambda self: self.accelerator.device)
    num_processes = property(lambda self: self.accelerator.num_processes)
    process_index = property(lambda self: self.accelerator.process_index)
    is_main_process = property(lambda self: self.accelerator.is_main_process)

    @property
    def compiles_whole_model(self):
        """Whether accelerate's config compiles the prepared model (dynamo_backend other than no)."""
        plugin = getattr(self.accelerator.state, "dynamo_plugin", None)
        return plugin is not None and str(plugin.backend).lower() not in ("no", "dynamobackend.no")

    @property
    def data_parallel_size(self):
        """Groups of processes that train different samples: all processes, or their shard groups."""
        return self.num_processes // (self.sequence_shards.size if self.sequence_shards else 1)

    @property
    def data_parallel_rank(self):
        """This process's data-parallel group: the processes of a shard group take the same batches and noise."""
        return self.process_index // (self.sequence_shards.size if self.sequence_shards else 1)

    is_local_main_process = property(lambda self: self.accelerator.is_local_main_process)

    @property
    def weight_dtype(self):
        """The compute dtype of frozen weights and activations: the mixed-precision dtype."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

    @property
    def grad_scaler(self):
        """fp16's loss scaler, whose state a checkpoint keeps (None without one, or when the engine keeps it)."""
        return self.accelerator.scaler

    def optimizer_problems(self, optimizer):
        """[optimizer] flags this engine would not honour (one line each)."""
        return []

    # ------------------------------------------------------------------ the step
    def prepare(self, transformer, optimizer):
        """Hand the model and optimizer to accelerate. The LR schedule is not passed: accelerate would step it once
        per process (the checkpoint keeps it). An offloaded optimizer keeps its states on the CPU, so accelerate must
        not move them (only then is a placement given: DeepSpeed refuses any)."""
        from .optim import offloaded_optimizer

        placement = None if offloaded_optimizer(optimizer) is None else [True, False]
        return self.accelerator.prepare(transformer, optimizer, device_placement=placement)

    def accumulating(self, model, sync):
        """Within it, gradients of a micro-batch that does not end its accumulation group stay on this rank."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def backward(self, loss, sync):
        self.accelerator.backward(loss)

    def clip_gradients(self, optimizer, parameters, max_norm):
        from .optim import clip_gradients

        return clip_gradients(self.accelerator, optimizer, parameters, max_norm)

    def reduce_mean(self, tensor):
        return self.accelerator.reduce(tensor, reduction="mean")

    def gather_ints(self, value):
        """`value` (an int) of every process, in rank order. A collective."""
        return [int(v) for v in self.accelerator.gather(torch.tensor([value], device=self.device)).tolist()]

    def all_finite(self, tensors):
        """Whether every value of `tensors` (this rank's: shards where sharded) is finite on every rank. A collective."""
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP2: this rank's shard
        # One flag per tensor, gathered on this rank's device: CUDA refuses to stack tensors of two devices, and
        # optimizers keep some state on the CPU (torchao's offloaded copies) beside the weights on the GPU.
        with torch.no_grad():
            flags = [torch.isfinite(t).all().to(self.device) for t in local if t.numel()]
            finite = torch.stack(flags).all() if flags else torch.tensor(True, device=self.device)
        return bool(self.reduce_mean(finite.to(torch.float32)).item() == 1.0)

    # ------------------------------------------------------------------ models and files
    def stepping_optimizer(self, optimizer):
        """The optimizer object that really steps, inside accelerate's and DeepSpeed's wrappers."""
        while getattr(optimizer, "optimizer", None) is not None and optimizer.optimizer is not optimizer:
            optimizer = optimizer.optimizer
        return optimizer

    def unwrap(self, model):
        """The plain transformer: no DDP/DeepSpeed wrapper and no torch.compile wrapper (whose `_orig_mod.` prefix
        would otherwise end up in every saved key)."""
        try:
            return self.accelerator.unwrap_model(model, keep_torch_compile=False)
        except TypeError:  # accelerate < 1.2 always strips the compile wrapper
            return self.accelerator.unwrap_model(model)

    def model_for_inference(self, model):
        """The module a validation pipeline runs."""
        return self.unwrap(model)

    def gather_state_dict(self, model, trainable_only):
        """The whole state dict as CPU tensors on the main process when the weights are sharded; None when every rank
        holds them (the mode then saves from the model itself). A collective where sharded."""
        return None

    def save_artifact(self, mode, model, directory, pipeline_class, dtype=None):
        """The mode's artifact (LoRA file or transformer/), written once, by the main process. Every rank calls this
        (sharded weights are gathered first)."""
        state = self.gather_state_dict(model, trainable_only=not mode.saves_frozen_weights)
        if self.is_main_process:
            mode.save(self.unwrap(model), directory, pipeline_class, dtype=dtype, state_dict=state)

    def register_mode(self, mode, pipeline_class_of):
        """accelerate's save_state writes optimizer and RNG; the mode saves the model its own way (LoRA only, not the
        base) through these hooks. `pipeline_class_of()` gives the pipeline class whose LoRA format is written, asked
        for when a hook runs: importing a diffusers pipeline imports every diffusers autoencoder, which the first
        step need not wait for."""

        def save_hook(models, weights, output_dir):
            if self.is_main_process:
                for model in models:
                    mode.save(self.unwrap(model), output_dir, pipeline_class_of())
            while weights:
                weights.pop()

        def load_hook(models, input_dir):
            while models:
                mode.load(self.unwrap(models.pop()), input_dir, pipeline_class_of())

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def save_engine_state(self, folder, model, optimizer, save_model):
        """Model and optimizer state into the (new) checkpoint folder. Every rank calls this."""
        self.accelerator.save_state(str(folder))

    def load_engine_state(self, folder, model, optimizer, mode, pipeline_class):
        mode.load(self.unwrap(model), folder, pipeline_class)
        saved = torch.load(Path(folder) / "optimizer.bin", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved)
        keep_saved_state_dtypes(self.stepping_optimizer(optimizer), saved)

    def check_checkpoint_layout(self, folder):
        """A checkpoint written under another engine cannot be resumed here: say which, before loading anything."""
        folder = Path(folder)
        if (folder / CHECKPOINT_MARKERS[self.kind]).exists():
            return
        written = next((k for k, name in CHECKPOINT_MARKERS.items() if (folder / name).exists()), None)
        raise FileNotFoundError(
            f"{folder} was written {ENGINE_DESCRIPTIONS.get(written, 'by another kind of run')} and this run is "
            f"{ENGINE_DESCRIPTIONS[self.kind]}: resume it with the accelerate config it was written with (or start a "
            "new run from its weights)"
        )

    # ------------------------------------------------------------------ trackers
    def init_trackers(self, name, config):
        if self.is_main_process:
            self.accelerator.init_trackers(name, config=config)

    @property
    def trackers(self):
        return self.accelerator.trackers

    def log(self, values, step):
        self.accelerator.log({k: v for k, v in values.items() if v is not None}, step=step)

    # ------------------------------------------------------------------ processes
    def wait_for_everyone(self):
        self.accelerator.wait_for_everyone()

    def wait_for_main(self):
        """Every rank meets here; the others may wait up to VALIDATION_WAIT while the main process validates."""
        if self.waiting_room is not None:
            self.waiting_room.wait()

    def release(self):
        """Drop the prepared model and optimizer references accelerate holds."""
        self.accelerator.free_memory()

    def end(self):
        self.accelerator.end_training()


# ----------------------------------------------------------------------------------------------
# DeepSpeed
# ----------------------------------------------------------------------------------------------


def configure_deepspeed(accelerator, training, optimizer):
    """DeepSpeed takes batch size, accumulation and clipping from its own config: fill them from the flags, which win
    over the accelerate config (where 1 or auto means "not set"; any other accumulation value that disagrees is an
    error rather than silently one or the other).

    The loop still decides where an accumulation group ends and scales the loss itself: DeepSpeed is told the
    boundary (`DeepSpeedBackend.backward`), so it reduces the gradients and steps there, clipping to --max_grad_norm."""
    from .args import UsageError

    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("gradient_accumulation_steps") not in (None, "auto", 1, training.gradient_accumulation_steps):
        raise UsageError(
            f"the DeepSpeed config sets gradient_accumulation_steps to {config['gradient_accumulation_steps']} and "
            f"--gradient_accumulation_steps is {training.gradient_accumulation_steps}: set it to auto (or 1) in the "
            "config and use the flag"
        )
    # DeepSpeed wants one micro-batch size; it only reports throughput with it (batches come from our sampler, and
    # buckets may each have their own size).
    micro_batch = training.train_batch_size if isinstance(training.train_batch_size, int) else 1
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = training.gradient_accumulation_steps
    config["gradient_clipping"] = optimizer.max_grad_norm
    config["train_batch_size"] = micro_batch * training.gradient_accumulation_steps * accelerator.num_processes
    # So accelerate's prepare() finds no mismatch to warn about; its backward() does not scale under DeepSpeed.
    accelerator.gradient_accumulation_steps = training.gradient_accumulation_steps
    # accelerate registers the config with transformers, which then builds every transformers model it loads under
    # ZeRO-3's zero.Init, partitioned: the frozen T5 would be split across ranks and unusable. Only the transformer
    # handed to prepare() belongs to DeepSpeed (zero3_init_flag is therefore not supported).
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


class EngineBackend(Backend):
    """DeepSpeed and FSDP own the model and optimizer state: a checkpoint holds the mode's artifact (gathered where
    sharded) and the engine's own files."""

    def register_mode(self, mode, pipeline_class_of):
        pass  # save_engine_state writes the model through the mode itself

    def save_engine_state(self, folder, model, optimizer, save_model):
        if self.is_main_process:
            Path(folder).mkdir(parents=True)
        self.wait_for_everyone()
        save_model(folder)
        self.save_engine_files(folder, model, optimizer)

    def save_engine_files(self, folder, model, optimizer):
        raise NotImplementedError


class DeepSpeedBackend(EngineBackend):
    kind = "deepspeed"
    checkpoint_tag = "pytorch_model"  # accelerate's folder name for the engine's files

    @property
    def weights_sharded(self):
        return self.accelerator.state.deepspeed_plugin.zero_stage == 3

    @property
    def grad_scaler(self):
        return None  # the engine keeps its own loss scaler, in its own checkpoint files

    def optimizer_problems(self, optimizer):
        """With the optimizer offloaded (offload_optimizer_device cpu/nvme), accelerate swaps the trainer's optimizer
        for DeepSpeed's CPU Adam, keeping the param groups: right for Adam and AdamW, silently wrong for anything else
        (prodigy would run as Adam at lr 1; 8-bit states would be full precision)."""
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if offload in (None, "none") or not config.get("zero_force_ds_cpu_optimizer", True):
            return []
        asked = (optimizer.optimizer + (" --use_8bit" if optimizer.use_8bit else "")
                 + (" --use_4bit" if optimizer.use_4bit else ""))
        if optimizer.optimizer in ("adam", "adamw") and not (optimizer.use_8bit or optimizer.use_4bit):
            return []
        return [f"--optimizer {asked} under DeepSpeed with the optimizer offloaded to {offload} would silently run as "
                "DeepSpeed's CPU Adam: use --optimizer adamw (or adam) without --use_8bit/--use_4bit, or a DeepSpeed "
                "config without offload_optimizer_device"]

    def backward(self, loss, sync):
        """The engine is told whether this micro-batch ends the accumulation group: it reduces the gradients and
        steps the optimizer (clipping first) there. The loss arrives already divided by the group size, so the
        engine must not divide it again by its configured steps (the last group of an epoch may be shorter)."""
        self.accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=sync, scale_wrt_gas=False)

    def gather_state_dict(self, model, trainable_only):
        if not self.weights_sharded:
            return None
        # Gathered one module at a time onto rank 0's CPU (DeepSpeed's own consolidation, as accelerate uses).
        return model._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only) or {}

    def save_engine_files(self, folder, model, optimizer):
        # Frozen weights left out (a LoRA checkpoint holds the adapter, not the 5B base); every rank writes its own
        # optimizer partition.
        model.save_checkpoint(str(folder), tag=self.checkpoint_tag, exclude_frozen_parameters=True)

    def load_engine_state(self, folder, model, optimizer, mode, pipeline_class):
        with _deepspeed_weights_only(model):
            path, _ = model.load_checkpoint(
                str(folder), tag=self.checkpoint_tag, load_module_strict=False,  # frozen weights were left out
                load_optimizer_states=True, load_lr_scheduler_states=False,  # the schedule is ours (lr_scheduler.json)
            )
        if path is None:
            raise FileNotFoundError(f"{Path(folder) / self.checkpoint_tag}: DeepSpeed found no checkpoint to load")


def keep_saved_state_dtypes(optimizer, saved):
    """torch's Optimizer.load_state_dict casts every floating-point state to its weight's dtype, but an optimizer may
    keep fp32 states for bf16 weights (CAME does): a resume would go on in bf16, no longer exact. Put back the saved
    tensor wherever its dtype was changed (on the device torch chose). Other formats (torchao's CPU-offload
    optimizer: one inner optimizer per tensor) are left as their own load_state_dict made them."""
    if not ("param_groups" in saved and "state" in saved and hasattr(optimizer, "state")):
        return
    saved_ids = [i for group in saved["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for saved_id, param in zip(saved_ids, params):
        restored = optimizer.state.get(param, {})
        for key, value in saved["state"].get(saved_id, {}).items():
            now = restored.get(key)
            if (type(value) is torch.Tensor and isinstance(now, torch.Tensor) and value.is_floating_point()
                    and now.dtype != value.dtype):
                restored[key] = value.to(device=now.device)


def _deepspeed_safe_globals():
    """The classes DeepSpeed (checked with 0.19) pickles into its ZeRO-1/2/3 checkpoints besides tensors and plain
    containers: the loss scaler, the ZeRO stage enum and the fragment addresses of the flattened partitions. Plain
    data holders: the weights-only unpickler only sets their attributes, it runs none of their code. A DeepSpeed
    version that adds another class fails to resume with torch's message naming it (to add here), not silently."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _deepspeed_weights_only:
    """Within it, the engine's checkpoint loads are `torch.load(weights_only=True)` (DeepSpeed hard-codes
    weights_only=False) with only `_deepspeed_safe_globals` allowed: a file holding anything else fails to load
    instead of running code."""

    def __init__(self, engine):
        self.checkpoint_engine = engine.checkpoint_engine

    def __enter__(self):
        allowed = _deepspeed_safe_globals()

        def load(path, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

        self.checkpoint_engine.load = load  # shadows the method on this instance only
        return self

    def __exit__(self, *exc):
        del self.checkpoint_engine.load


# ----------------------------------------------------------------------------------------------
# FSDP
# ----------------------------------------------------------------------------------------------


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer


class FSDPBackend(EngineBackend):
    kind = "fsdp"
    weights_sharded = True

    def model_for_inference(self, model):
        # FSDP1 gathers the top-level weights in its root wrapper; FSDP2 hooks the module itself.
        return self.unwrap(model) if self.accelerator.is_fsdp2 else model

    def gather_state_dict(self, model, trainable_only):
        from torch.distributed.tensor import DTensor

        parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad or not trainable_only]
        if trainable_only and all(isinstance(p, DTensor) for _, p in parameters):
            # FSDP2: all-gather just the trained weights (a LoRA), not the frozen base.
            state = {}
            for name, parameter in parameters:
                full = parameter.full_tensor()
                if self.is_main_process:
                    state[plain_name(name)] = full.detach().cpu()
            return state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.device.type == "cpu":  # no copy was made to offload: the tensors are FSDP's reused buffers
            state = {k: v.clone() for k, v in state.items()}
        if trainable_only:
            keep = {plain_name(name) for name, _ in parameters}
            state = {k: v for k, v in state.items() if k in keep}
        return state

    def save_engine_files(self, folder, model, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=options)  # collective
        if self.is_main_process:
            torch.save(state, Path(folder) / CHECKPOINT_MARKERS["fsdp"])

    def load_engine_state(self, folder, model, optimizer, mode, pipeline_class):
        """Rank 0 reads the files; torch spreads each tensor over the shards (broadcast_from_rank0)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        main = self.is_main_process
        weights = mode.read(self.unwrap(model), folder, pipeline_class) if main else {}
        set_model_state_dict(
            model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        )
        state = torch.load(Path(folder) / CHECKPOINT_MARKERS["fsdp"], map_location="cpu", weights_only=True) if main else {}
        set_optimizer_state_dict(
            model, _torch_optimizer(optimizer), state,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
