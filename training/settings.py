"""Every trainer flag checked once, before anything expensive, against the model's rules; and the values the run
derives from the flags, kept apart from them (`RunSettings`): the parsed flags are never written to.

`validate_training_args(flags, conditioning, mode)` (flags: sections.RunFlags) raises one `UsageError` listing
every problem, one line each, or returns the `RunSettings`. `model_problems` is the part that needs only the transformer's config (the
benchmark, which has no data, uses it alone).
"""

from dataclasses import dataclass
from pathlib import Path

from . import block_swap
from .args import (
    UsageError,
    check_output_dir,
    frame_rule_problem,
    load_transformer_config,
    optimizer_problems,
    size_limit_problem,
)
from .buckets import validation_frames
from .compute import compute_problems
from .data_source import choose_data_source
from .ema import flag_problems as ema_flag_problems
from .models import Pretrained


@dataclass(frozen=True)
class RunSettings:
    transformer_config: dict  # the model's published transformer config
    data_source: object  # RawClips or PreparedEntries
    validation_num_frames: int  # --validation_num_frames, or the largest frame bucket (checked either way)
    validation_steps: int  # validate every N steps (None: not by steps)
    validation_epochs: int  # validate every N epochs (None: not by epochs)
    eval_every: int  # held-out evaluation every N steps


def validate_training_args(flags, conditioning, mode):
    """All checks that need no model weights; one UsageError with every problem, or the run's settings."""
    data_source = choose_data_source(flags.data)
    problems = _flag_problems(flags)
    problems.extend(block_swap.flag_problems(flags.memory, flags.parallelism, mode))
    data_source.check_args(flags.data, problems)
    transformer_config = None
    try:
        transformer_config = load_transformer_config(Pretrained.of(flags.model))
    except UsageError as error:
        problems.extend(error.problems)
    if transformer_config is not None:
        problems.extend(model_problems(flags, transformer_config, conditioning, mode, data_source))
        if flags.model.transformer_config:
            problems.extend(custom_transformer_problems(flags, transformer_config, conditioning))
    if flags.model.transformer_ckpt_path and not flags.model.transformer_config:
        problems.append("--transformer_ckpt_path goes with --transformer_config (the pipeline's own transformer "
                        "loads from --pretrained_model_name_or_path)")
    elif flags.model.transformer_ckpt_path and not Path(flags.model.transformer_ckpt_path).exists():
        problems.append(f"--transformer_ckpt_path {flags.model.transformer_ckpt_path}: no such file or folder")
    if problems:
        raise UsageError(problems)
    validation_epochs = flags.validation.validation_epochs
    if flags.validation.validation_prompt and flags.validation.validation_epochs is None and flags.validation.validation_steps is None:
        validation_epochs = 1  # the original crashed here; once per epoch is the sensible reading
    return RunSettings(
        transformer_config=transformer_config,
        data_source=data_source,
        validation_num_frames=validation_frames(flags.validation, flags.buckets),
        validation_steps=flags.validation.validation_steps,
        validation_epochs=validation_epochs,
        eval_every=flags.validation.eval_steps or flags.checkpointing.checkpointing_steps,
    )


def custom_transformer_problems(flags, transformer_config, conditioning):
    """A --transformer_config must fit the pipeline's VAE and T5 (their configs are read, not their weights)."""
    from .batch_size import component_configs

    try:
        vae_config, text_encoder_config = component_configs(flags.model)
    except Exception as error:  # no such pipeline: load_transformer_config's check does not run for a custom config
        return [f"--pretrained_model_name_or_path {flags.model.pretrained_model_name_or_path}: no CogVideoX VAE/T5 config "
                f"found there ({type(error).__name__}); the VAE, T5 and scheduler come from that pipeline"]
    latent = vae_config["latent_channels"]
    expected = {"text_embed_dim": text_encoder_config.d_model, "out_channels": latent,
                "in_channels": 2 * latent if conditioning.image_to_video else latent}
    return [f"--transformer_config {flags.model.transformer_config}: {name} is {transformer_config.get(name)}, but the "
            f"pipeline's {'T5 gives' if name == 'text_embed_dim' else 'VAE and this trainer need'} {value}"
            for name, value in expected.items() if transformer_config.get(name) != value]


def model_problems(flags, transformer_config, conditioning, mode, data_source):
    """Problems of these flags with this model: frame counts and sizes, validation size, conditioning and mode."""
    problems = []
    data_source.check_model_args(flags.data, flags.buckets, transformer_config, problems)
    if flags.validation.validation_num_frames is not None:
        problem = frame_rule_problem(flags.validation.validation_num_frames, transformer_config)
        if problem:
            problems.append(f"--validation_num_frames: {problem}")
    elif flags.validation.validation_prompt:
        # Not given: validation videos take the largest frame bucket, which must suit the model too (with
        # --load_tensors the buckets are not checked, and the default 49 does not suit CogVideoX 1.5).
        problem = frame_rule_problem(validation_frames(flags.validation, flags.buckets),
                                     transformer_config)
        if problem:
            problems.append(f"validation videos default to the largest --frame_buckets value: {problem}; pass "
                            "--validation_num_frames")
    if flags.validation.validation_prompt:
        problem = size_limit_problem(flags.validation.height, flags.validation.width, transformer_config)
        if problem:
            problems.append(f"--height {flags.validation.height} --width {flags.validation.width} (validation videos): {problem}")
    problems.extend(optimizer_problems(flags))
    problems.extend(conditioning.check_args(flags.model, flags.buckets, flags.training,
                                            flags.validation, transformer_config, data_source))
    problems.extend(mode.check_args(flags.model, flags.lora, flags.memory,
                                    transformer_config))
    problems.extend(fun_problems(flags, transformer_config, mode))
    return problems


def fun_problems(flags, transformer_config, mode):
    """CogVideoX-Fun's flags whose meaning this trainer cannot follow as given (one line each)."""
    problems = []
    mini_batch, batch = flags.memory.vae_mini_batch, flags.training.train_batch_size
    if mini_batch is not None and mini_batch < 1:
        problems.append(f"--vae_mini_batch must be at least 1 (got {mini_batch})")
    elif mini_batch is not None and mini_batch > 1 and (batch == "auto" or flags.buckets.bucket_config
                                                        or mini_batch < batch):
        problems.append(f"--vae_mini_batch {mini_batch}: the VAE here encodes one clip at a time (1) or the whole "
                        f"batch at once (a number at least --train_batch_size {batch}, and no per-bucket or auto "
                        "batch sizes); pass 1 or leave it out")
    if mode.name == "sft" and flags.training.trainable_modules:
        from .models import transformer_parameter_names

        names = transformer_parameter_names(transformer_config)
        frozen = [n for n in names if not any(part in n for part in flags.training.trainable_modules)]
        if frozen:
            problems.append(f"--trainable_modules {' '.join(flags.training.trainable_modules)} would leave "
                            f"{len(frozen)} of {len(names)} transformer weights frozen (e.g. {frozen[0]}); full "
                            "fine-tuning here trains them all: pass --trainable_modules . (CogVideoX-Fun's) or leave "
                            "it out, or train a LoRA")
    return problems


def _auto_batch_problems(flags):
    """--max_memory_gb and batch sizes of auto come together."""
    auto = flags.training.train_batch_size == "auto"
    if flags.buckets.bucket_config and not auto:
        from .buckets import read_bucket_config

        try:
            auto = any(batch == "auto" for frames in read_bucket_config(flags.buckets.bucket_config).values()
                       for _, batch in frames.values())
        except UsageError:
            return []  # check_buckets reports what is wrong with the file
    if auto and flags.memory.max_memory_gb is None:
        return ["a batch size of auto needs --max_memory_gb N: the accelerator memory (GiB) each process may use"]
    if auto and flags.memory.blocks_to_swap == "auto":
        return ["a batch size of auto with --blocks_to_swap auto: choose one of them by the estimate, give the other"]
    if flags.memory.max_memory_gb is not None and not auto and flags.memory.blocks_to_swap != "auto":
        return [f"--max_memory_gb {flags.memory.max_memory_gb:g} is only used to choose batch sizes of auto or "
                "--blocks_to_swap auto: pass --train_batch_size auto (or auto in --bucket_config), or drop it"]
    if flags.memory.max_memory_gb is not None and flags.memory.max_memory_gb <= 0:
        return [f"--max_memory_gb must be positive (got {flags.memory.max_memory_gb:g})"]
    return []


def _flag_problems(flags):
    """Checks of the flags on their own (counts, ranges, files, combinations)."""
    problems = []
    counts = {"train_batch_size": flags.training.train_batch_size,
              "gradient_accumulation_steps": flags.training.gradient_accumulation_steps,
              "num_train_epochs": flags.training.num_train_epochs,
              "checkpointing_steps": flags.checkpointing.checkpointing_steps, "rank": flags.lora.rank,
              "num_validation_videos": flags.validation.num_validation_videos,
              "num_inference_steps": flags.validation.num_inference_steps}
    for name, value in counts.items():
        if value != "auto" and value < 1:
            problems.append(f"--{name} must be at least 1 (got {value})")
    optional_counts = {"max_train_steps": flags.training.max_train_steps,
                       "validation_epochs": flags.validation.validation_epochs,
                       "validation_steps": flags.validation.validation_steps,
                       "checkpoints_total_limit": flags.checkpointing.checkpoints_total_limit,
                       "eval_steps": flags.validation.eval_steps}
    for name, value in optional_counts.items():
        if value is not None and value < 1:
            problems.append(f"--{name} must be at least 1 when given (got {value})")
    problems.extend(_eval_problems(flags))
    problems.extend(_auto_batch_problems(flags))
    if not 0 <= flags.memory.gradient_checkpointing_ratio <= 1:
        problems.append(f"--gradient_checkpointing_ratio must be from 0 to 1 (got {flags.memory.gradient_checkpointing_ratio:g})")
    elif flags.memory.gradient_checkpointing_ratio < 1 and not flags.memory.gradient_checkpointing:
        problems.append("--gradient_checkpointing_ratio chooses which blocks --gradient_checkpointing checkpoints: "
                        "pass --gradient_checkpointing too")
    problems.extend(_attention_problems(flags.parallelism))
    problems.extend(compute_problems(flags.memory, flags.parallelism))
    if flags.training.learning_rate <= 0:
        problems.append(f"--learning_rate must be positive (got {flags.training.learning_rate})")
    problems.extend(_timestep_problems(flags.training))
    problems.extend(ema_flag_problems(flags.training, flags.validation))
    if flags.data.dataloader_num_workers < 0:
        problems.append("--dataloader_num_workers must be 0 or more")
    problems.extend(_caption_problems(flags.data))
    for name, value in (("height", flags.validation.height), ("width", flags.validation.width)):
        if value % 16:
            problems.append(f"--{name} {value}: validation size must be a multiple of 16")
    if flags.validation.validation_prompt is not None and not flags.validation.validation_prompt.strip():
        problems.append("--validation_prompt is empty")
    if flags.checkpointing.resume_from_checkpoint and flags.checkpointing.resume_from_checkpoint != "latest":
        if not Path(flags.checkpointing.resume_from_checkpoint).is_dir() and not (
            Path(flags.training.output_dir) / flags.checkpointing.resume_from_checkpoint
        ).is_dir():
            problems.append(
                f"--resume_from_checkpoint {flags.checkpointing.resume_from_checkpoint}: no such checkpoint folder "
                f'(give a path, or "latest" to pick the newest in --output_dir)'
            )
    if flags.logging.report_to in ("wandb", "comet_ml"):  # the trackers requirements.txt does not or may not install
        import importlib

        try:
            importlib.import_module(flags.logging.report_to)
        except ImportError:
            problems.append(f"--report_to {flags.logging.report_to}: {flags.logging.report_to} is not installed (pip install {flags.logging.report_to})")
    check_output_dir(flags.training.output_dir, problems)
    return problems


def _caption_problems(data):
    """--caption_dropout_rate, --caption_shuffle and --keep_tokens on their own (with --load_tensors: data_source)."""
    problems = []
    if not 0 <= data.caption_dropout_rate < 1:
        problems.append(f"--caption_dropout_rate must be at least 0 and below 1 (got {data.caption_dropout_rate:g}); "
                        "0.1 is the usual choice")
    if data.keep_tokens < 0:
        problems.append(f"--keep_tokens must be 0 or more (got {data.keep_tokens})")
    elif data.keep_tokens and not data.caption_shuffle:
        problems.append(f"--keep_tokens {data.keep_tokens} keeps tags in place for --caption_shuffle: pass "
                        "--caption_shuffle too, or drop --keep_tokens")
    return problems


def _attention_problems(parallelism):
    """--attention_backend (a kernel with a backward pass, its package installed) and the sequence-parallel flags."""
    from .attention import TRAINING_BACKENDS

    problems = []
    if parallelism.sequence_parallel_shards is not None and not parallelism.enable_sequence_parallelism:
        problems.append("--sequence_parallel_shards needs --enable_sequence_parallelism")
    elif parallelism.sequence_parallel_shards is not None and parallelism.sequence_parallel_shards < 2:
        problems.append(f"--sequence_parallel_shards must be 2 or more (got {parallelism.sequence_parallel_shards}); "
                        "without sequence parallelism drop --enable_sequence_parallelism")
    backend = parallelism.attention_backend
    if backend is None:
        return problems
    if backend not in TRAINING_BACKENDS:
        return problems + [f"--attention_backend {backend}: not a kernel training can use (one with a backward "
                           f"pass): {', '.join(TRAINING_BACKENDS)}"]
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except (RuntimeError, ImportError) as error:
        problems.append(f"--attention_backend {backend}: {error}")
    return problems


def _timestep_problems(training):
    """--timestep_sampling, --min_timestep/--max_timestep, --loss_weighting and their options (training/timesteps.py)."""
    from .timesteps import MODE_SCALE_RANGE, NUM_TRAIN_TIMESTEPS, OPTION_OWNERS

    problems = []
    high = NUM_TRAIN_TIMESTEPS if training.max_timestep is None else training.max_timestep
    if not 0 <= training.min_timestep < high <= NUM_TRAIN_TIMESTEPS:
        problems.append(f"--min_timestep {training.min_timestep} --max_timestep {high}: need 0 <= min < max <= "
                        f"{NUM_TRAIN_TIMESTEPS} (the schedule's steps; timesteps are drawn from min to max - 1)")
    for name, (flag, value) in OPTION_OWNERS.items():
        if getattr(training, name) is not None and getattr(training, flag) != value:
            problems.append(f"--{name} is an option of --{flag} {value}: pass that too, or drop --{name}")
    if training.logit_std is not None and training.logit_std <= 0:
        problems.append(f"--logit_std must be positive (got {training.logit_std:g})")
    if training.mode_scale is not None and not MODE_SCALE_RANGE[0] <= training.mode_scale <= MODE_SCALE_RANGE[1]:
        problems.append(f"--mode_scale must lie from -1 to 1.75 (2/(pi-2)), where SD3's mode density is one "
                        f"(got {training.mode_scale:g}); 1.29 is SD3's")
    if training.snr_gamma is not None and training.snr_gamma <= 0:
        problems.append(f"--snr_gamma must be positive (got {training.snr_gamma:g}); 5 is the Min-SNR paper's")
    return problems


def _eval_problems(flags):
    problems = []
    if not 0.0 <= flags.validation.eval_split < 1.0:
        problems.append(f"--eval_split must be at least 0 and below 1 (got {flags.validation.eval_split})")
    separate_eval = bool(flags.validation.eval_video_column or flags.validation.eval_dataset_file)
    if separate_eval and flags.validation.eval_split:
        problems.append("--eval_split and a separate held-out list (--eval_video_column/--eval_dataset_file) exclude each other")
    if flags.validation.eval_dataset_file and not Path(flags.validation.eval_dataset_file).is_file():
        problems.append(f"--eval_dataset_file {flags.validation.eval_dataset_file}: no such file")
    if flags.validation.eval_video_column and not flags.validation.eval_dataset_file and flags.data.data_root:
        for flag, name in (("--eval_video_column", flags.validation.eval_video_column),
                           ("--eval_caption_column", flags.validation.eval_caption_column if not flags.data.load_tensors else None)):
            if name is None and flag == "--eval_caption_column":
                problems.append("--eval_video_column needs --eval_caption_column (a captions file in --data_root)")
            elif name is not None and not (Path(flags.data.data_root) / name).is_file():
                problems.append(f"{flag} {name}: no file {Path(flags.data.data_root) / name}")
    if any(not 0 <= t < 1000 for t in flags.validation.eval_timesteps):
        problems.append("--eval_timesteps must lie in 0..999")
    return problems
