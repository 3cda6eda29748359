"""The training step: its only definition. The trainer's loop, the benchmark and the --dry_run memory estimate
(which runs it on fake tensors) all call `train_step`, so a figure measured or predicted is the step that trains.

- `Context`: run-wide values the loss needs besides the batch (scheduler, encoders, VAE scaling, dtypes) and the flag
  sections the step reads, made by `build_context` from the sections and the configs.
- `prepare_transformer`: the loaded transformer made trainable, in the order that matters (see there).
- `build_trainer`: prepare, place, optimizer and LR schedule, handed to the backend: a `Trainer`.
- `compute_loss`: one micro-batch's diffusion loss.
- `train_step`: one optimizer step over an accumulation group.
"""

import contextlib
from dataclasses import dataclass

import torch

from .models import prepare_frozen_base, rotary_embeddings, sample_latents, vae_scale_factor_spatial
from .modes import cast_frozen
from .optim import build_lr_scheduler, build_optimizer
from .timesteps import draw_timesteps, loss_weights


@dataclass
class Context:
    """Run-wide values derived from the flags and the model's configs, and the flag sections the step reads: [training]
    (--noised_image_dropout, the LR schedule, --seed, the timestep and loss-weight recipe: timesteps.py), [optimizer],
    [lora], [memory] and [parallelism] (how `build_trainer` prepares the transformer and builds the optimizer;
    --max_grad_norm)."""

    training: object  # sections.TrainingFlags
    optimizer: object  # sections.OptimizerFlags
    lora: object  # sections.LoraFlags
    memory: object  # sections.MemoryFlags
    parallelism: object  # sections.ParallelismFlags
    device: torch.device
    weight_dtype: torch.dtype  # compute dtype: frozen weights, activations, prompt embeddings
    transformer_config: dict
    vae_scaling_factor: float
    vae_invert_scale_latents: bool
    vae_spatial_scale: int
    scheduler: object  # the training noise schedule (CogVideoXDPMScheduler)
    data_source: object  # RawClips or PreparedEntries: how a batch becomes latents and embeddings
    tokenizer: object = None
    text_encoder: object = None
    vae: object = None
    # Where tensors saved for backward live during the transformer's forward (--offload_activations: CPU).
    saved_tensors: object = contextlib.nullcontext
    # --enable_sequence_parallelism: this process's shard group (attention.SequenceShards), else None.
    sequence_shards: object = None


def build_context(training, optimizer, lora, memory, parallelism, transformer_config, vae_config, scheduler, device,
                  weight_dtype, data_source, encoders=None, save_on_cpu=None, sequence_shards=None):
    """The Context, holding the sections given. `encoders`: {"tokenizer", "text_encoder", "vae"} as loaded (or
    simulated); `save_on_cpu`: how --offload_activations moves saved tensors (default torch's save_on_cpu, pinned on
    CUDA); `sequence_shards`: the backend's shard group (or the memory estimate's simulated one)."""
    context = Context(
        training=training,
        optimizer=optimizer,
        lora=lora,
        memory=memory,
        parallelism=parallelism,
        device=torch.device(device),
        weight_dtype=weight_dtype,
        transformer_config=dict(transformer_config),
        vae_scaling_factor=vae_config["scaling_factor"],
        vae_invert_scale_latents=bool(vae_config.get("invert_scale_latents", False)),
        vae_spatial_scale=vae_scale_factor_spatial(vae_config),
        scheduler=scheduler,
        data_source=data_source,
        sequence_shards=sequence_shards,
        **(encoders or {}),
    )
    if memory.offload_activations:
        pin = context.device.type == "cuda"
        context.saved_tensors = save_on_cpu or (lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin))
    return context


def prepare_transformer(transformer, training, lora, memory, parallelism, conditioning, mode, weight_dtype,
                        sequence_shards=None, device="cpu"):
    """The loaded transformer made ready to train, in place: adapted to the conditioning, our attention where
    --attention_backend or sequence parallelism asks for it, FP8 matmuls (--fp8_training), its frozen base stored as
    --quantize_base says (before LoRA layers exist: they keep their precision), the mode's trainable part added, the
    frozen part cast to the compute dtype, gradient checkpointing on, --blocks_to_swap's blocks swapped through
    `device` (their frozen weights to host memory: moving the model to `device` afterwards leaves them there)."""
    conditioning.adapt_transformer(transformer, training)
    if sequence_shards is not None or parallelism.attention_backend:
        from .attention import install

        install(transformer, sequence_shards, parallelism.attention_backend)
    if parallelism.fp8_training:
        from .compute import use_fp8_matmuls

        use_fp8_matmuls(transformer, mode.base_weights_train)  # before LoRA layers wrap the base layers
    prepare_frozen_base(transformer, memory.quantize_base, weight_dtype)
    mode.prepare(transformer, training, lora)
    cast_frozen(transformer, weight_dtype)
    if memory.gradient_checkpointing:
        ratio = memory.gradient_checkpointing_ratio
        transformer.enable_gradient_checkpointing(
            None if ratio >= 1 else selective_checkpointing(transformer.transformer_blocks, ratio))
    if memory.blocks_to_swap:
        from . import block_swap

        block_swap.install(transformer, memory.blocks_to_swap, device)
    return transformer


def selective_checkpointing(blocks, ratio):
    """A gradient_checkpointing_func for diffusers' enable_gradient_checkpointing that checkpoints `ratio` of the
    blocks (evenly spread: 0.5 of 42 is every other block) and runs the others plainly, keeping their activations."""
    import torch.utils.checkpoint

    count = round(ratio * len(blocks))
    chosen = {i * len(blocks) // count for i in range(count)} if count else set()
    # Marked on the block, not remembered by identity: FSDP1 (and activation-checkpoint wrappers) replace each block
    # with a wrapper that the transformer then calls, and they look attributes up on the module they wrap.
    for index, block in enumerate(blocks):
        block.selectively_checkpointed = index in chosen

    def checkpoint_some(block, *inputs):
        if getattr(block, "selectively_checkpointed", False):
            return torch.utils.checkpoint.checkpoint(block.__call__, *inputs, use_reentrant=False)
        return block(*inputs)

    checkpoint_some.checkpointed = len(chosen)
    return checkpoint_some


@dataclass
class Trainer:
    """What a training step works on. `transformer` and `optimizer` are the backend's prepared (wrapped) ones."""

    transformer: object
    optimizer: object
    lr_scheduler: object
    parameters: list  # the trained ones
    context: Context
    conditioning: object
    mode: object
    backend: object


def build_trainer(transformer, context, conditioning, mode, backend, max_train_steps, learning_rate=None):
    """From a loaded transformer: prepare it, put it on the device, build the optimizer (at `learning_rate`, e.g.
    scaled by --scale_lr; default --learning_rate) and the LR schedule, and hand them to the backend. The flags are
    the context's sections."""
    prepare_transformer(transformer, context.training, context.lora, context.memory, context.parallelism, conditioning,
                        mode, context.weight_dtype, context.sequence_shards, backend.device)
    transformer.to(backend.device)
    if context.parallelism.regional_compile:  # not in prepare_transformer: the memory estimate runs eagerly
        from .compute import compile_blocks

        compile_blocks(transformer, context.parallelism.compile_mode)
    learning_rate = context.training.learning_rate if learning_rate is None else learning_rate
    optimizer = build_optimizer(context.optimizer, context.memory,
                                mode.parameter_groups(transformer, context.lora, learning_rate), learning_rate)
    lr_scheduler = build_lr_scheduler(context.training, optimizer, max_train_steps)
    transformer, optimizer = backend.prepare(transformer, optimizer)
    backend.register_mode(mode, lambda: conditioning.pipeline_class)
    return Trainer(transformer, optimizer, lr_scheduler, mode.trainable_parameters(transformer), context,
                   conditioning, mode, backend)


def compute_loss(transformer, batch, context, conditioning, timestep=None):
    """Diffusion loss of one micro-batch: v-prediction, scored in x0 space.

    Timesteps are drawn and weighted as the [training] recipe says (timesteps.py: --timestep_sampling,
    --min_timestep/--max_timestep, --loss_weighting), or all equal to `timestep` and weighted 1/(1 - alpha_bar)
    (held-out evaluation: the same figure whatever the recipe, so runs with different recipes compare)."""
    device, dtype = context.device, context.weight_dtype
    scheduler = context.scheduler
    distribution, prompt_embeds = context.data_source.encode(batch, context)
    latents = sample_latents(distribution.float(), context.vae_scaling_factor)  # fp32 [B, F, C, H, W]
    batch_size, latent_frames, _, latent_height, latent_width = latents.shape

    # Noise is mixed in fp32: in bf16, alpha_bar near 1 rounds to exactly 1 (no noise at the smallest t).
    noise = torch.randn_like(latents)
    if timestep is None:
        timesteps = draw_timesteps(context.training, batch_size, scheduler.config.num_train_timesteps, device)
    else:
        timesteps = torch.full((batch_size,), timestep, device=device, dtype=torch.long)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    model_input = conditioning.model_input(noisy.to(dtype), batch, context)
    rotary = rotary_embeddings(context.transformer_config, latent_frames, latent_height, latent_width, device)

    with context.saved_tensors():
        prediction = transformer(
            hidden_states=model_input,
            encoder_hidden_states=prompt_embeds,
            timestep=timesteps,
            image_rotary_emb=rotary,
            return_dict=False,
            **conditioning.transformer_kwargs(noisy, context),
        )[0]
    predicted_x0 = scheduler.get_velocity(prediction.float(), noisy, timesteps)
    weighting = context.training.loss_weighting if timestep is None else "cogvideox"
    weights = loss_weights(weighting, context.training.snr_gamma, scheduler, timesteps, device).view(-1, 1, 1, 1, 1)
    per_sample = (weights * (predicted_x0 - latents) ** 2).reshape(batch_size, -1).mean(dim=1)
    return per_sample.mean()


@dataclass
class StepOutcome:
    loss: torch.Tensor  # mean over the group's micro-batches and over processes, on the device (.item() syncs)
    grad_norm: object  # total gradient norm before clipping (None where the engine clips itself)


def train_step(trainer, micro_batches, group_size, loss_fn=compute_loss, after_backward=None):
    """One optimizer step over an accumulation group of `group_size` micro-batches (taken from `micro_batches` one
    at a time): forward and loss, backward of loss / group_size (gradients are synchronised across processes on the
    group's last micro-batch only), clipping to --max_grad_norm, optimizer step, LR schedule step.

    `loss_fn` and `after_backward` (called after each backward) let the benchmark measure inside the step."""
    backend, context = trainer.backend, trainer.context
    total = torch.zeros((), device=context.device)
    taken = 0
    for batch in micro_batches:
        taken += 1
        ends_group = taken == group_size
        with backend.accumulating(trainer.transformer, ends_group):
            loss = loss_fn(trainer.transformer, batch, context, trainer.conditioning)
            backend.backward(loss / group_size, ends_group)
        if after_backward is not None:
            after_backward()
        total += loss.detach()
    if taken != group_size:
        raise RuntimeError(f"an accumulation group of {group_size} micro-batches got {taken}")
    grad_norm = backend.clip_gradients(trainer.optimizer, trainer.parameters, context.optimizer.max_grad_norm)
    trainer.optimizer.step()
    # fp16's loss scaler skips a step that overflowed (accelerate's and DeepSpeed's optimizer wrappers say so; the
    # estimate's simulated optimizer is neither): the schedule follows the steps taken, as a prepared scheduler does
    if not getattr(trainer.optimizer, "step_was_skipped", False):
        trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    # Mean over ranks: every rank sees the same loss, so a NaN stops all of them together.
    return StepOutcome(loss=backend.reduce_mean(total / taken), grad_norm=grad_norm)
