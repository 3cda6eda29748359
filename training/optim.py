"""Optimizers and learning-rate schedules from the flags ([optimizer], [memory]'s offload flags, [training]'s
schedule).

`--use_cpu_offload_optimizer` wraps the chosen optimizer in torchao's CPUOffloadOptimizer: each
large tensor's optimizer state and step live on the CPU, gradients are copied there during the
backward pass, and updated weights are copied back. Because the copies happen inside backward,
clipping must act on the CPU copies: `clip_gradients` does that (the original ran this optimizer
without clipping, accumulation or an LR schedule; here all three work, see args._offload_problems).
"""

import logging

import torch

from .optional_libraries import use_bitsandbytes, use_torchao


logger = logging.getLogger("cogvideox_factory")
CAME_BETA3 = 0.9999  # CAME's third beta when --beta3 is not given


def optimizer_class_and_kwargs(optimizer, learning_rate):
    """(optimizer class, keyword arguments besides the parameters) for the [optimizer] flags, at `learning_rate`."""
    lr = learning_rate
    betas = (optimizer.beta1, optimizer.beta2)
    common = dict(lr=lr, eps=optimizer.epsilon, weight_decay=optimizer.weight_decay)
    if optimizer.optimizer in ("adam", "adamw"):
        decoupled = optimizer.optimizer == "adamw"
        if optimizer.use_8bit and not optimizer.use_torchao:
            bnb = use_bitsandbytes()
            cls = bnb.optim.AdamW8bit if decoupled else bnb.optim.Adam8bit
        elif optimizer.use_torchao and (optimizer.use_8bit or optimizer.use_4bit):
            use_torchao()  # hidden until an option needs it
            import torchao.optim as ao

            if not decoupled:
                logger.warning("torchao has only AdamW low-bit optimizers; using AdamW for --optimizer adam")
            cls = ao.AdamW8bit if optimizer.use_8bit else ao.AdamW4bit
        else:
            cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        return cls, dict(betas=betas, **common)
    if optimizer.optimizer == "prodigy":
        import prodigyopt

        if lr <= 0.1:
            logger.warning("Prodigy usually wants --learning_rate around 1.0 (got %s)", lr)
        return prodigyopt.Prodigy, dict(
            betas=betas,
            beta3=optimizer.beta3,
            decouple=optimizer.prodigy_decouple,
            use_bias_correction=optimizer.prodigy_use_bias_correction,
            safeguard_warmup=optimizer.prodigy_safeguard_warmup,
            **common,
        )
    if optimizer.optimizer == "came":
        import came_pytorch

        # CAME's eps is a pair, it needs three betas (the original crashed without --beta3), and the lr must be
        # passed explicitly (its default is None).
        beta3 = CAME_BETA3 if optimizer.beta3 is None else optimizer.beta3
        return came_pytorch.CAME, dict(
            lr=lr, eps=(1e-30, 1e-16), betas=(optimizer.beta1, optimizer.beta2, beta3),
            weight_decay=optimizer.weight_decay,
        )
    raise ValueError(f"unknown optimizer {optimizer.optimizer}")


def build_optimizer(optimizer, memory, parameters, learning_rate):
    """The optimizer for the [optimizer] flags at `learning_rate` (--learning_rate, or scaled by --scale_lr), wrapped
    for --use_cpu_offload_optimizer / --offload_gradients ([memory]) where asked. `parameters`: the parameters, or
    parameter groups (dicts; a group's own "lr" overrides `learning_rate`, as LoRA+ asks)."""
    cls, kwargs = optimizer_class_and_kwargs(optimizer, learning_rate)
    parameters = list(parameters)
    groups = parameters if parameters and isinstance(parameters[0], dict) else [{"params": parameters}]
    if memory.use_cpu_offload_optimizer:
        use_torchao()  # hidden until an option needs it
        from torchao.optim import CPUOffloadOptimizer

        offloaded = CPUOffloadOptimizer(groups, optimizer_class=cls, offload_gradients=memory.offload_gradients,
                                        **kwargs)
        for needed in ("queue", "param_d2h_map", "d_param_groups"):  # what clip_gradients relies on
            if not hasattr(offloaded, needed):
                raise RuntimeError(f"this torchao's CPUOffloadOptimizer has no {needed}; install torchao 0.10 to 0.18")
        return offloaded
    return cls(groups, **kwargs)


def offloaded_optimizer(optimizer):
    """The CPUOffloadOptimizer inside `optimizer` (accelerate may wrap it), or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if type(inner).__name__ == "CPUOffloadOptimizer" else None


def offload_runtime_problems(memory, backend):
    """Checks of --use_cpu_offload_optimizer ([memory]) that need the launched configuration (processes, DeepSpeed,
    precision)."""
    if not memory.use_cpu_offload_optimizer:
        return []
    problems = []
    if backend.num_processes > 1 or backend.kind == "deepspeed":
        problems.append("--use_cpu_offload_optimizer works with one process only; for several GPUs use "
                        "accelerate_configs/deepspeed.yaml (ZeRO-2 with CPU optimizer offload)")
    if backend.weight_dtype == torch.float16:
        problems.append("--use_cpu_offload_optimizer with fp16 (from the accelerate config): use bf16")
    return problems


def clip_gradients(accelerator, optimizer, parameters, max_norm):
    """Clip the gradients the optimizer will use to `max_norm` in total; returns the norm before clipping."""
    offloaded = offloaded_optimizer(optimizer)
    if offloaded is None:
        return accelerator.clip_grad_norm_(parameters, max_norm)
    return _clip_offloaded(offloaded, max_norm)


@torch.no_grad()
def _clip_offloaded(optimizer, max_norm):
    """The CPU copies of large gradients (made during backward) and the small on-device ones, clipped together."""
    for copied in optimizer.queue.values():
        copied.synchronize()  # the device-to-host copy of that gradient has finished
    host = [optimizer.param_d2h_map[p].grad for p in optimizer.queue]
    device = [p.grad for group in optimizer.d_param_groups for p in group["params"] if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64)
    for grads in (host, device):
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
            squares += norms.double().pow(2).sum().cpu()
    total = squares.sqrt().float()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if host:
        torch._foreach_mul_(host, scale)
    if device:
        torch._foreach_mul_(device, scale.to(device[0].device))
    return total


def build_lr_scheduler(training, optimizer, max_train_steps):
    """The LR schedule of [training] (--lr_scheduler, --lr_warmup_steps, ...) for the torch `optimizer`."""
    from diffusers.optimization import get_scheduler

    # The schedule advances once per optimizer step, on every process alike.
    return get_scheduler(
        training.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=training.lr_warmup_steps,
        num_training_steps=max_train_steps,
        num_cycles=training.lr_num_cycles,
        power=training.lr_power,
    )
