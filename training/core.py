"""The one training core behind every trainer.

`run(argv, conditioning, mode)` reads top to bottom: check every flag -> start the processes -> data (headers
only) -> models and optimizer -> resume -> the loop -> save the artifact -> final test. What differs between the
trainers is passed in: `conditioning` (what the model sees: text-to-video or image-to-video) and `mode` (what
trains and how it is saved: LoRA or full). The pieces live in their own modules, and nothing here asks which
conditioning, mode, data source or distributed engine it got:

    settings.py     the flags checked against the model; values derived from them (RunSettings)
    backend.py      accelerate, DeepSpeed, FSDP: the backend answers, the loop asks
    data_source.py  raw clips or prepared entries, datasets and loaders
    step.py         the training step (also run by the benchmark and the memory estimate)
    validation.py   held-out evaluation, validation videos, the final test and its parity check
    checkpoint.py   resume checkpoints
    ema.py          the moving average of the trained weights (--ema_decay)
"""

import dataclasses
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import memory
from .args import TrainingError, UsageError, build_parser, exit_on_usage_error, ignored_flags, parse_args
from .backend import build_backend
from .batch_size import choose_batch_sizes, choose_blocks_to_swap
from .block_swap import runtime_problems as swap_runtime_problems
from .conditioning import CONDITIONINGS
from .data_source import build_training_data
from .dry_run import dry_run_plan
from .ema import EMA
from .ema import engine_problems as ema_engine_problems
from .ema import record as ema_record
from .lora_formats import save_fun_copy
from .models import (
    Pretrained,
    load_text_encoder,
    load_tokenizer,
    load_training_scheduler,
    load_transformer,
    load_vae,
    read_config,
)
from .modes import MODES, adapter_engine_problems, count_parameters
from .optim import offload_runtime_problems
from .report import (
    LOSS_PLOT,
    MODEL_CARD,
    LossHistory,
    LossPlotInBackground,
    adapter_record,
    caption_record,
    plot_losses,
    sat_out_record,
    write_model_card,
)
from .run_config import RUN_CONFIG, public_values, write_trainer_config
from .sections import RunFlags, run_flags
from .settings import validate_training_args
from .startup import StartupClock
from .step import build_context, build_trainer, train_step
from .timesteps import recipe
from .validation import Validation, evaluate


logger = logging.getLogger("cogvideox_factory")


@dataclass(frozen=True)
class Schedule:
    """How long the run is. One step is one optimizer step (after gradient accumulation). Epochs differ in length
    where the buckets are drawn again every epoch (a bucket config's keep_prob: some samples sit an epoch out)."""

    epoch_batches: tuple  # this process's micro-batches in each whole epoch of the run
    max_train_steps: int

    @classmethod
    def of(cls, training, sampler):
        accumulation, batches, steps = training.gradient_accumulation_steps, [], 0
        while steps < training.max_train_steps if training.max_train_steps else len(batches) < training.num_train_epochs:
            batches.append(sampler.batches_in(len(batches)))
            steps += math.ceil(batches[-1] / accumulation)
        return cls(tuple(batches), training.max_train_steps or steps)

    @property
    def epochs(self):
        return len(self.epoch_batches)

    def batches_per_epoch(self, epoch):
        return self.epoch_batches[epoch]


@dataclass
class TrainingState:
    """Where the run is: what a checkpoint stores (training_state.json) and a resume restores."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already trained

    def for_checkpoint(self, schedule):
        if self.batches_in_epoch == schedule.batches_per_epoch(self.epoch):  # epoch finished: resume at the next one
            return {"global_step": self.global_step, "epoch": self.epoch + 1, "batches_in_epoch": 0}
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}


@dataclass
class TrainingRun:
    """Everything one run holds, built in dependency order by `run`."""

    flags: RunFlags  # the flags, section by section: each piece below is handed the sections it reads
    settings: object  # RunSettings
    conditioning: object
    mode: object
    backend: object
    data: object  # TrainingData
    schedule: Schedule
    trainer: object = None  # step.Trainer
    ema: EMA = None  # --ema_decay: the average of the trained weights
    validation: Validation = None
    state: TrainingState = field(default_factory=TrainingState)
    last_loss: float = None
    eval_losses: dict = field(default_factory=dict)
    eval_losses_ema: dict = field(default_factory=dict)  # the EMA weights' held-out loss
    history: LossHistory = field(default_factory=LossHistory)  # for the loss plot; kept in checkpoints
    loss_plot: LossPlotInBackground = field(default_factory=LossPlotInBackground)  # redrawn at checkpoints
    progress: object = None
    step_started: float = 0.0
    startup: StartupClock = field(default_factory=StartupClock)
    swap_peaks: dict = None  # --blocks_to_swap auto: {count: estimated peak bytes} of the counts simulated


def run(argv, conditioning, mode):
    """Parse, validate, train, save, test. Returns a summary dict (also written as summary.json)."""
    startup = StartupClock()
    args = parse_args(argv, conditioning=conditioning.name, mode=mode.name)  # the trainer's own flags and --help
    flags = run_flags(args)
    conditioning = conditioning.for_flags(flags.training, flags.data)  # CogVideoX-Fun's inpaint or control latents
    settings = validate_training_args(flags, conditioning, mode)  # 1. every check that needs no weights
    backend = start_processes(flags)  # 2. accelerate / DeepSpeed / FSDP, logging, seeds
    if backend.is_main_process:  # another trainer's flags (e.g. a config's [lora] in a full fine-tune): said, unused
        for note in ignored_flags(args, conditioning.name, mode.name):
            logger.warning(note)
    data = build_training_data(flags.model, flags.data, flags.buckets, flags.training, flags.validation, flags.memory,
                               flags.parallelism, settings.data_source, conditioning, settings.transformer_config, backend,
                               choose_sizes=lambda counts, sizes: choose_batch_sizes(
                                   flags.model, flags.data, flags.training, flags.optimizer, flags.lora,
                                   flags.validation, flags.memory, flags.parallelism, settings.transformer_config,
                                   conditioning, mode, backend.weight_dtype, counts, sizes))
    swap_peaks = None
    if flags.memory.blocks_to_swap == "auto":  # the smallest count the estimate fits under --max_memory_gb
        flags, swap_peaks = with_blocks_to_swap(flags, settings, conditioning, mode, backend, data)
    startup.mark("flags, processes and data scan")
    job = TrainingRun(flags, settings, conditioning, mode, backend, data, Schedule.of(flags.training, data.sampler),
                      startup=startup, swap_peaks=swap_peaks)
    if flags.training.dry_run:  # 3. bad data has stopped the run above, before any model loads
        plan = dry_run_plan(job)
        backend.end()
        return {"dry_run": plan}
    if backend.is_main_process:  # what this run is: --config <output_dir>/config.toml runs it again
        write_trainer_config(args, build_parser(conditioning=conditioning.name, mode=mode.name), Path(flags.training.output_dir) / RUN_CONFIG)
        if flags.logging.hub_token:
            logger.warning("--hub_token is kept out of every file and tracker of this run; `hf auth login` stores a "
                           "token once, for every tool, and keeps it off command lines")
    job.trainer = build_models_and_optimizer(job)  # 4.
    job.ema = EMA.build(flags.training, backend, job.trainer.transformer)  # from the weights training starts from
    job.state, job.history = resume(job)  # 5.
    startup.mark("models, optimizer and resume")
    job.validation = Validation(flags.model, flags.training, flags.validation, flags.memory,
                                settings.validation_num_frames, conditioning, backend)
    start_logging_run(job)
    tracker = memory.start_allocation_tracking(job.trainer.transformer, job.trainer.optimizer, job.trainer.context)
    train(job)  # 6.
    summary = {"global_step": job.state.global_step, "final_loss": job.last_loss,
               "skipped_samples": len(data.skipped), "eval_loss": job.eval_losses, "buckets": bucket_summary(job),
               **sat_out_record(data, job.state.epoch),
               "startup_seconds": startup.phases, "recipe": recipe(flags.training)}
    summary["captions"] = caption_record(flags.data)  # --caption_dropout_rate, --caption_shuffle
    if job.mode.name == "lora":
        summary["adapter"] = adapter_record(flags.lora)  # rank, alpha, --init_lora, --loraplus_lr_ratio
    if job.ema is not None:
        summary["ema"] = {**ema_record(flags.training), "decay": job.ema.decay, "update_every": job.ema.update_every,
                          "eval_loss": job.eval_losses_ema}
    if tracker is not None:  # COGVIDEOX_FACTORY_TRACK_ALLOCATIONS=1
        tracker.__exit__(None, None, None)
        summary["tracked_training_peak_bytes"] = tracker.peak
    save_and_test(job, summary)  # 7.
    backend.end()
    return summary


def with_blocks_to_swap(flags, settings, conditioning, mode, backend, data):
    """(`flags` with --blocks_to_swap auto replaced by the count chosen, {count: simulated peak bytes}); see
    batch_size.choose_blocks_to_swap."""
    count, peaks = choose_blocks_to_swap(flags.model, flags.data, flags.buckets, flags.training, flags.optimizer,
                                     flags.lora, flags.validation, flags.memory, flags.parallelism,
                                     settings.transformer_config, conditioning, mode, backend.weight_dtype,
                                     data.dataset.landing_counts(), data.batch_sizes)  # as the --dry_run estimates
    return dataclasses.replace(flags, memory=dataclasses.replace(flags.memory, blocks_to_swap=count)), peaks


def bucket_summary(job):
    """{"FxHxW": {"samples_trained": n, "batch_size": b}}: what each bucket trained over the whole run (all
    processes, resumed steps included; a process's padding batches count, as they train)."""
    sampler, state = job.data.sampler, job.state
    counts = {}
    for epoch in range(state.epoch + 1):
        batches = state.batches_in_epoch if epoch == state.epoch else job.schedule.batches_per_epoch(epoch)
        for bucket, n in sampler.samples_trained(epoch, batches).items():
            counts[bucket] = counts.get(bucket, 0) + n
    return {"x".join(map(str, bucket)): {"samples_trained": counts.get(bucket, 0), "batch_size": size}
            for bucket, size in sorted(sampler.batch_sizes.items())}


def start_processes(flags):
    from accelerate.utils import set_seed

    backend = build_backend(flags.training, flags.optimizer, flags.parallelism, flags.logging)
    problems = (offload_runtime_problems(flags.memory, backend) + backend.optimizer_problems(flags.optimizer)
                + ema_engine_problems(flags.training, backend)
                + adapter_engine_problems(flags.lora, backend) + swap_runtime_problems(flags.memory, backend))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and backend.num_processes == 1:  # e.g. torchrun on a machine without GPUs, no ACCELERATE_USE_CPU
        problems.append(f"started as {launched} processes (WORLD_SIZE={launched}), but each runs alone, so they would "
                        "all train the same samples and write the same files: on a machine without GPUs set "
                        "ACCELERATE_USE_CPU=true, or start with accelerate launch")
    if flags.parallelism.regional_compile and backend.compiles_whole_model:
        problems.append("--regional_compile with an accelerate config that compiles the whole model (dynamo_backend, "
                        "e.g. compiled_1.yaml): use one of them (uncompiled_1.yaml with --regional_compile)")
    if problems:
        raise UsageError(problems)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO if backend.is_main_process else logging.WARNING)
    if flags.training.seed is not None:
        # Each data-parallel group its own noise (the processes of a shard group share theirs); rank 0 as alone.
        set_seed(flags.training.seed + backend.data_parallel_rank)
    if backend.is_main_process:
        Path(flags.training.output_dir).mkdir(parents=True, exist_ok=True)
    return backend


def build_models_and_optimizer(job):
    """Transformer and scheduler always; the encoders the data source and the conditioning need; then the step's
    Trainer: the mode's trainable part, the optimizer (at the --scale_lr learning rate) and the LR schedule."""
    flags, backend, source = job.flags, job.backend, job.settings.data_source
    weight_dtype, device = backend.weight_dtype, backend.device
    pipeline = Pretrained.of(flags.model)
    transformer = load_transformer(Pretrained.of(flags.model, flags.memory, flags.training),
                                   job.mode.load_dtype(flags.training, weight_dtype))
    vae_config = read_config(pipeline, "vae")  # its scaling factor; the VAE itself only where it encodes
    encoders = {}
    if source.needs_text_encoder:
        encoders["tokenizer"] = load_tokenizer(pipeline)
        encoders["text_encoder"] = load_text_encoder(pipeline, weight_dtype).to(device).requires_grad_(False).eval()
    if source.needs_vae or job.conditioning.needs_vae:
        slicing = flags.validation.enable_slicing or flags.memory.vae_mini_batch == 1  # one clip at a time
        encoders["vae"] = load_vae(pipeline, weight_dtype, slicing,
                                   flags.validation.enable_tiling).to(device).requires_grad_(False).eval()
    if flags.memory.low_vram:  # the encoders wait on the CPU between uses
        from .models import offload_between_uses

        offload_between_uses(encoders, device)
    scheduler = load_training_scheduler(pipeline, job.conditioning.training_scheduler)
    context = build_context(flags.training, flags.optimizer, flags.lora, flags.memory, flags.parallelism,
                            job.settings.transformer_config, vae_config, scheduler, device, weight_dtype, source,
                            encoders, sequence_shards=backend.sequence_shards)
    training = flags.training
    learning_rate = training.learning_rate
    if training.scale_lr:
        learning_rate *= training.gradient_accumulation_steps * job.data.mean_batch_size() * backend.data_parallel_size
    return build_trainer(transformer, context, job.conditioning, job.mode, backend, job.schedule.max_train_steps,
                         learning_rate)


def resume(job):
    """(state, loss history) to start from: those of the checkpoint --resume_from_checkpoint names, or fresh ones."""
    trainer, output_dir, wanted = job.trainer, job.flags.training.output_dir, job.flags.checkpointing.resume_from_checkpoint
    path = ckpt.agreed_resume_path(job.backend, output_dir, wanted)
    if path is None:
        if wanted:
            logger.info("no checkpoint in %s: starting a new run", output_dir)
        return TrainingState(), LossHistory()
    ckpt.load_checkpoint(job.backend, path, trainer.transformer, trainer.optimizer, trainer.lr_scheduler, job.mode,
                         job.conditioning.pipeline_class, ema=job.ema)
    saved = ckpt.read_state(path)
    history = LossHistory.from_json(saved.pop("loss_history", {}))  # checkpoints from before the plot have none
    state = TrainingState(**saved)
    logger.info("resumed from %s at step %d", path, state.global_step)
    return state, history


def start_logging_run(job):
    flags, backend, data = job.flags, job.backend, job.data
    backend.init_trackers(flags.logging.tracker_name or f"cogvideox-{job.mode.name}", _tracker_config(flags))
    logger.info(
        "training %s %s: %d samples, %d batches per epoch, %d steps, %d trainable parameters, batch %s x %d "
        "process(es)%s x %d accumulation", job.conditioning.name, job.mode.name, len(data.dataset),
        job.schedule.batches_per_epoch(0), job.schedule.max_train_steps, count_parameters(job.trainer.parameters),
        data.describe_batch_size(), backend.num_processes,
        f" ({backend.data_parallel_size} data-parallel group(s) of {backend.sequence_shards.size} sharing each sample)"
        if backend.sequence_shards else "", flags.training.gradient_accumulation_steps,
    )
    stepping = backend.stepping_optimizer(job.trainer.optimizer)
    logger.info("optimizer that steps: %s.%s", type(stepping).__module__, type(stepping).__name__)
    memory.reset_peak(backend.device)
    logger.info(memory.format_stats("before training", memory.memory_stats(backend.device)))


# ----------------------------------------------------------------------------------------------
# The loop: epochs -> accumulation groups (one optimizer step each) -> what follows a step
# ----------------------------------------------------------------------------------------------


def train(job):
    from tqdm.auto import tqdm

    state, schedule = job.state, job.schedule
    job.progress = tqdm(total=schedule.max_train_steps, initial=state.global_step, desc="steps",
                        disable=not job.backend.is_local_main_process)
    job.step_started = time.perf_counter()
    try:
        while state.epoch < schedule.epochs and state.global_step < schedule.max_train_steps:
            train_epoch(job)
            every = job.settings.validation_epochs
            if every and (state.epoch + 1) % every == 0 and job.validation.validated_at != state.global_step:
                validate(job, job.trainer.context, job.trainer.transformer, state.global_step)
            if state.global_step >= schedule.max_train_steps:
                break
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    finally:
        job.progress.close()  # end the bar's line, so an error stands on its own
    job.backend.wait_for_everyone()


def train_epoch(job):
    """From the state's position in its epoch to the epoch's end (or the last step)."""
    state, schedule, data = job.state, job.schedule, job.data
    job.trainer.transformer.train()
    data.sampler.set_epoch(state.epoch, start_batch=state.batches_in_epoch)
    if hasattr(data.dataset, "set_epoch"):
        data.dataset.set_epoch(state.epoch)
    batches = iter(data.loader)
    epoch_batches = schedule.batches_per_epoch(state.epoch)
    while state.batches_in_epoch < epoch_batches and state.global_step < schedule.max_train_steps:
        # A group of micro-batches per step; the epoch's last group may be shorter.
        group_size = min(job.flags.training.gradient_accumulation_steps, epoch_batches - state.batches_in_epoch)
        outcome = train_step(job.trainer, itertools.islice(batches, group_size), group_size)
        state.global_step += 1
        state.batches_in_epoch += group_size
        after_step(job, outcome.loss.item(), outcome.grad_norm)  # .item(): one host sync per step


def after_step(job, loss, grad_norm):
    """Stop on a non-finite loss; log; evaluate, checkpoint (and plot the losses) and validate when due."""
    state, trainer, backend = job.state, job.trainer, job.backend
    output_dir, checkpointing = job.flags.training.output_dir, job.flags.checkpointing
    step = state.global_step
    ckpt.simulate_crash("step", step)
    line = job.startup.finish("first step")
    if line:
        logger.info(line)
    if not math.isfinite(loss):
        # This loss came from the weights after step - 1: a checkpoint of them would diverge again on resume.
        raise diverged(job, f"loss became {loss} at step {step}", first_bad_checkpoint=step - 1)
    seconds = time.perf_counter() - job.step_started
    job.step_started = time.perf_counter()
    lr = float(trainer.lr_scheduler.get_last_lr()[0])  # a tensor under torchao optimizers
    job.last_loss = loss
    job.history.train.append([step, loss, lr])
    if job.ema is not None:
        job.ema.update(step)
    job.progress.update(1)
    job.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_step=f"{seconds:.2f}")
    backend.log({"loss": loss, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                 "s_per_step": seconds}, step=step)
    data = job.data
    # Held-out loss before the checkpoint, so the history a checkpoint keeps (the plot of a resumed run) has it.
    if data.eval_loader is not None and (step % job.settings.eval_every == 0 or step == job.schedule.max_train_steps):
        job.eval_losses[step] = evaluate(trainer.transformer, data.eval_loader, trainer.context, job.conditioning,
                                         backend, job.flags.validation.eval_timesteps, job.flags.training.seed)
        job.history.held_out.append([step, job.eval_losses[step]])
        backend.log({"eval_loss": job.eval_losses[step]}, step=step)
        logger.info("step %d: eval_loss %.5f (%d held-out samples)", step, job.eval_losses[step], len(data.eval_dataset))
        if job.ema is not None:  # the same figure for the average, its weights swapped in and back
            with job.ema.swapped_in():
                job.eval_losses_ema[step] = evaluate(trainer.transformer, data.eval_loader, trainer.context,
                                                     job.conditioning, backend, job.flags.validation.eval_timesteps,
                                                     job.flags.training.seed)
            backend.log({"eval_loss_ema": job.eval_losses_ema[step]}, step=step)
            logger.info("step %d: eval_loss_ema %.5f", step, job.eval_losses_ema[step])
    if step % checkpointing.checkpointing_steps == 0:
        if not backend.all_finite([*trainer.parameters, *optimizer_state_tensors(trainer.optimizer)]):
            raise diverged(job, f"weights or optimizer states became non-finite at step {step}", step)
        saved_state = {**state.for_checkpoint(job.schedule), "loss_history": job.history.to_json()}
        path = ckpt.save_checkpoint(
            backend, output_dir, step, saved_state, trainer.lr_scheduler,
            trainer.transformer, trainer.optimizer, total_limit=checkpointing.checkpoints_total_limit,
            save_model=lambda folder: backend.save_artifact(job.mode, trainer.transformer, folder,
                                                            job.conditioning.pipeline_class),
            ema=job.ema,
        )
        logger.info("saved checkpoint %s", path)
        if backend.is_main_process:  # drawn in a thread while the next steps train
            job.loss_plot.draw(job.history, Path(output_dir) / LOSS_PLOT)
    if job.settings.validation_steps and step % job.settings.validation_steps == 0:
        validate(job, trainer.context, trainer.transformer, step)


def validate(job, context, transformer, step):
    """Validation videos of the trained weights, then (--validate_ema) of their average."""
    job.validation.run(context, transformer, step)
    if job.ema is not None and job.flags.training.validate_ema:
        job.validation.run_ema(context, transformer, step, job.ema)


def diverged(job, what, first_bad_checkpoint):
    """The error that stops a diverged run. Checkpoints from step `first_bad_checkpoint` on are set aside (renamed
    checkpoint-N-diverged, kept for a look), so that --resume_from_checkpoint latest takes the last good one."""
    output_dir = job.flags.training.output_dir
    if job.backend.is_main_process:
        for set_aside in ckpt.set_aside_checkpoints(output_dir, first_bad_checkpoint):
            logger.warning("%s holds weights from the divergence: renamed %s", set_aside.name, set_aside)
    good = [path for step, path in ckpt.complete_checkpoints(output_dir) if step < first_bad_checkpoint]
    where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written before it"
    return TrainingError(f"{what}; stopping ({where}). Try a lower --learning_rate, bf16 instead of fp16, or "
                         "--max_grad_norm.")


def optimizer_state_tensors(optimizer):
    """The optimizer's floating-point state tensors (plain ones: quantized states of low-bit optimizers are skipped;
    step counters, which torch's Adam keeps on the CPU whatever the weights' device, are not weights)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    state = getattr(inner, "state", {})
    return [value for values in state.values() if isinstance(values, dict) for key, value in values.items()
            if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point()
            and not type(value).__module__.startswith("torchao.")]


# ----------------------------------------------------------------------------------------------
# After the loop
# ----------------------------------------------------------------------------------------------


def save_and_test(job, summary):
    """The artifact first (nothing lost if what follows runs out of memory), then a last validation with the
    in-memory model, then a final test that loads the artifact back from disk. The main process adds the test's
    figures to `summary` and writes it to summary.json."""
    backend, mode, validation = job.backend, job.mode, job.validation
    output_dir = Path(job.flags.training.output_dir)
    trainer, step = job.trainer, job.state.global_step
    save_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(job.flags.training.save_dtype)
    backend.save_artifact(mode, trainer.transformer, output_dir, job.conditioning.pipeline_class,
                          dtype=save_dtype or backend.weight_dtype)
    logger.info("saved %s", ", ".join(str(p) for p in mode.artifact_paths(output_dir)))
    if job.conditioning.fun and getattr(mode, "adapter_type", None) == "lora" and backend.is_main_process:
        # VideoX-Fun's own pipelines and ComfyUI nodes merge LoRAs with its merge_lora, which reads this form.
        logger.info("saved %s (VideoX-Fun's LoRA form)", save_fun_copy(mode.artifact_paths(output_dir)[0]))
    if job.ema is not None:
        paths = job.ema.save_artifact(backend, mode, trainer.transformer, output_dir, job.conditioning.pipeline_class,
                                      dtype=save_dtype or backend.weight_dtype)
        logger.info("saved the EMA: %s", ", ".join(str(p) for p in paths))
    final_validation = validation.has_cases and validation.validated_at != step
    if final_validation and backend.weights_sharded:
        # Sharded weights are only usable while the engine / FSDP is alive: validate before releasing anything.
        validate(job, trainer.context, trainer.transformer, step)
        final_validation = False
    model, context = backend.unwrap(trainer.transformer), trainer.context
    job.trainer = trainer = None  # optimizer, schedule and the prepared model's references go
    backend.release()
    memory.free_memory()
    if final_validation:  # every rank: the others wait for the main process
        validate(job, context, model, step)
    # Free everything training held (encoders and the EMA included) before the final test loads a fresh pipeline.
    model = context = job.ema = None
    memory.free_memory()
    if backend.is_main_process:
        summary["parity"] = validation.final_test(mode, backend.weight_dtype, step)
        summary["memory_after_testing"] = memory.memory_stats(backend.device)
        logger.info(memory.format_stats("after testing", summary["memory_after_testing"]))
        job.loss_plot.wait()
        plot_losses(job.history, output_dir / LOSS_PLOT)
        write_model_card(job)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if job.flags.logging.push_to_hub:
            push_to_hub(job.flags.logging, output_dir)


def _tracker_config(flags):
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(list(v) if isinstance(v, tuple) else v))
            for k, v in public_values(flags).items()}


# What --push_to_hub uploads: the artifact (LoRA in both forms, or transformer/; and their EMA), the card, and what the card shows.
HUB_FILES = ["*.safetensors", "transformer/*", "transformer_ema/*", MODEL_CARD, LOSS_PLOT, "*.mp4", "*.gif", "*_sheet.png", "summary.json",
             RUN_CONFIG]


def push_to_hub(logging_flags, output_dir):
    from huggingface_hub import create_repo, upload_folder

    repo_id = logging_flags.hub_model_id or Path(output_dir).name
    repo_id = create_repo(repo_id, exist_ok=True, token=logging_flags.hub_token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        token=logging_flags.hub_token,
        allow_patterns=HUB_FILES,
        ignore_patterns=["checkpoint-*", ".checkpoint-*", "logs/*"],
        commit_message="CogVideoX fine-tune",
    )
    logger.info("uploaded to https://huggingface.co/%s", repo_id)


def trainer_main(conditioning, mode):
    """The `main(argv)` of an entry point: e.g. trainer_main("image-to-video", "sft")."""

    @exit_on_usage_error
    def main(argv=None):
        return run(argv, conditioning=CONDITIONINGS[conditioning](), mode=MODES[mode]())

    main.__doc__ = f"CogVideoX {conditioning} {mode} training."
    return main
