"""Optimizers and learning-rate schedules from the flags."""

import logging


logger = logging.getLogger("cogvideox_factory")


def build_optimizer(args, parameters):
    import torch

    groups = [{"params": parameters, "lr": args.learning_rate}]
    betas = (args.beta1, args.beta2)
    if args.optimizer in ("adam", "adamw"):
        decoupled = args.optimizer == "adamw"
        if args.use_8bit and not args.use_torchao:
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit if decoupled else bnb.optim.Adam8bit
        elif args.use_torchao and (args.use_8bit or args.use_4bit):
            import torchao.optim as ao

            if not decoupled:
                logger.warning("torchao has only AdamW low-bit optimizers; using AdamW for --optimizer adam")
            cls = ao.AdamW8bit if args.use_8bit else ao.AdamW4bit
        else:
            cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        return cls(groups, betas=betas, eps=args.epsilon, weight_decay=args.weight_decay)
    if args.optimizer == "prodigy":
        import prodigyopt

        if args.learning_rate <= 0.1:
            logger.warning("Prodigy usually wants --learning_rate around 1.0 (got %s)", args.learning_rate)
        return prodigyopt.Prodigy(
            groups,
            betas=betas,
            beta3=args.beta3,
            eps=args.epsilon,
            weight_decay=args.weight_decay,
            decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
        )
    if args.optimizer == "came":
        import came_pytorch

        return came_pytorch.CAME(
            groups, lr=args.learning_rate, eps=(1e-30, 1e-16), betas=(args.beta1, args.beta2, args.beta3),
            weight_decay=args.weight_decay,
        )
    raise ValueError(f"unknown optimizer {args.optimizer}")


def build_lr_scheduler(args, optimizer, max_train_steps):
    from diffusers.optimization import get_scheduler

    # The schedule advances once per optimizer step, on every process alike.
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
