"""Command-line flags of the trainers, and their validation.

Every flag of the original cogvideox-factory is here with its name and default, so
existing shell scripts keep working. `parse_args` parses and then validates everything
that can be checked without loading a model (paths, columns, buckets against the
model's configuration), raising `UsageError` with one line per problem.
"""

import argparse
import os
import sys
import typing
from pathlib import Path

from .errors import TrainingError, UsageError, exit_on_usage_error  # noqa: F401 - where the flags' users find them


DEFAULT_HEIGHT_BUCKETS = [256, 320, 384, 480, 512, 576, 720, 768, 960, 1024, 1280, 1536]
DEFAULT_WIDTH_BUCKETS = [256, 320, 384, 480, 512, 576, 720, 768, 960, 1024, 1280, 1536]
DEFAULT_FRAME_BUCKETS = [49]
DEFAULT_LORA_TARGET_MODULES = "to_k,to_q,to_v,to_out.0"


def _batch_size(value) -> typing.Union[int, str]:  # a number or "auto"
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a whole number nor auto") from None


def _count_or_auto(value) -> typing.Union[int, str]:  # a number or "auto"
    return _batch_size(value)


def _lowercase(value) -> str:
    return value.lower()


def _probability(value) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a probability between 0 and 1")
    return number


class FlagHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with every flag's default (but a switch's, which is off, and an unset value's); the description as
    written."""

    def _get_default_metavar_for_optional(self, action):
        """What a value is (N, X, PATH, TEXT) rather than the flag's own name again, in capitals."""
        if action.type in (_batch_size, _count_or_auto):
            return "N|auto"
        if action.type is int:
            return "N"
        if action.type in (float, _probability):
            return "X"
        if any(word in action.dest for word in ("path", "dir", "file", "root", "config", "meta", "checkpoint")):
            return "PATH"
        return "TEXT"

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default in (None, False, [], argparse.SUPPRESS) or "default" in text.lower() or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})".lstrip()


def add_model_arguments(group):
    """[model] The pipeline to fine-tune, and optionally a transformer of another size."""
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id (e.g. THUDM/CogVideoX-5b) or local folder of a diffusers CogVideoX pipeline.",
    )
    group.add_argument(
        "--transformer_config", type=str, default=None,
        help="JSON or YAML of CogVideoXTransformer3DModel arguments: train a transformer of this size (full "
        "fine-tuning) instead of the pipeline's; the VAE, T5 and scheduler still come from the pipeline.",
    )
    group.add_argument(
        "--transformer_ckpt_path", type=str, default=None,
        help="With --transformer_config: weights to start from (a .safetensors file or a diffusers transformer "
        "folder); tensors it lacks (or of another shape) are initialised at random and reported.",
    )
    group.add_argument("--revision", type=str, default=None, help="Revision of the model on the Hub.")
    group.add_argument("--variant", type=str, default=None, help="Variant of the weight files, e.g. fp16.")
    group.add_argument(
        "--cache_dir", type=str, default=None, help="Where downloaded models are stored (default: the HF cache)."
    )


def add_dataset_arguments(parser, caption_column_default="text", groups=None):
    """[data], [buckets] and --pin_memory ([memory]): shared with prepare_dataset.py, which passes its parser alone
    (`groups`: the trainer's section groups)."""
    for_prepare = groups is None
    if for_prepare:
        groups = {"data": parser.add_argument_group("Data"), "buckets": parser.add_argument_group("Buckets")}
        groups["memory"] = groups["data"]
    data, buckets = groups["data"], groups["buckets"]
    data.add_argument(
        "--data_root", "--train_data_dir",
        type=str,
        default=None,
        help="Folder of the data set. Video paths in the lists/CSV (and in --train_data_meta) are relative to it. "
        "--train_data_dir is CogVideoX-Fun's name for it.",
    )
    data.add_argument(
        "--dataset_file",
        type=str,
        default=None,
        help="CSV file with a caption column and a video column (paths relative to --data_root, "
        "or to the CSV's own folder when --data_root is not given).",
    )
    data.add_argument(
        "--video_column",
        type=str,
        default="video",
        help="CSV column of video paths, or the name of a file in --data_root with one video path per line.",
    )
    data.add_argument(
        "--caption_column",
        type=str,
        default=caption_column_default,
        help="CSV column of captions, or the name of a file in --data_root with one caption per line.",
    )
    data.add_argument(
        "--control_column", type=str, default=None, metavar="PATH",
        # prepare_dataset.py reads it only to refuse it (no control latents are prepared): not in its --help
        help=argparse.SUPPRESS if for_prepare else
        "CogVideoX-Fun Control models: a file in --data_root with one control video (pose, depth, edges) per "
        "line, beside --video_column's clips in the same order (or a column of --dataset_file). Each has its clip's "
        "size and frames. --train_data_meta gives them as each entry's control_file_path.",
    )
    data.add_argument("--id_token", type=str, default=None, help="Trigger word prepended to every caption.")
    data.add_argument(
        "--dataset_config", type=str, default=None,
        help="TOML listing several data sources ([[datasets]] with folder, data_root, dataset_file or meta), each with "
        "num_repeats and its own id_token, mixed in one run (see assets/dataset.md).",
    )
    data.add_argument(
        "--train_data_meta", type=str, default=None,
        help="CogVideoX-Fun's metadata: a JSON list of {file_path, text, type: video|image}, or a .csv with those "
        "columns; paths relative to --data_root, or to the metadata file's folder.",
    )
    data.add_argument(
        "--caption_extension", type=str, default=".txt",
        help="In a folder of media without caption/video lists: each clip's caption is the file of the same name "
        "with this extension beside it (clip.mp4 + clip.txt).",
    )
    data.add_argument(
        "--skip_bad_samples",
        action="store_true",
        help="Go on without unusable samples (unreadable, too short, empty caption), listing them in "
        "skipped_samples.jsonl in the output folder. Without it such samples stop the run before any model loads.",
    )
    data.add_argument(
        "--random_flip", type=_probability, default=None, help="Probability of flipping a clip horizontally."
    )
    data.add_argument(
        "--video_reshape_mode",
        type=str,
        default=None,
        choices=["center", "random", "none"],
        help="How a clip is fitted to its resolution bucket: not given = stretch to the bucket; center/random "
        "= resize keeping aspect ratio, then crop (centre or random offset); none: the original's name for random, kept "
        "for its scripts.",
    )
    data.add_argument("--skip_frames_start", type=int, default=0, help="Frames dropped from the start of each clip.")
    data.add_argument("--skip_frames_end", type=int, default=0, help="Frames dropped from the end of each clip.")
    data.add_argument(
        "--dataloader_num_workers", type=int, default=0,
        help="Processes loading and decoding samples beside training (0: in the training process).",
    )
    groups["memory"].add_argument(
        "--pin_memory", action="store_true",
        help="Load batches into pinned CPU memory, so copies to the GPU do not block.",
    )
    add_bucket_arguments(buckets)


def add_caption_arguments(data):
    """[data] How training varies each sample's caption (the trainer's alone: prepare_dataset.py embeds captions as
    they are, and stores the empty prompt's embedding for --caption_dropout_rate)."""
    data.add_argument(
        "--caption_dropout_rate", type=float, default=0.0,
        help="Probability that a sample trains with the empty prompt instead of its caption, drawn per sample and "
        "epoch from --seed. Teaches the unconditional prediction that classifier-free guidance uses at inference "
        "(CogVideoX was trained with 0.1). Works with --load_tensors (prepare_dataset.py stores the empty prompt's "
        "embedding); image-to-video keeps the image.",
    )
    data.add_argument(
        "--caption_shuffle", action="store_true",
        help="Shuffle each caption's comma-separated tags, anew every epoch, after the first --keep_tokens (the "
        "--id_token trigger word stays in front). Raw clips only: prepared data holds embedded captions.",
    )
    data.add_argument(
        "--keep_tokens", type=int, default=0,
        help="With --caption_shuffle: how many leading tags keep their place (not counting --id_token).",
    )


def add_bucket_arguments(buckets):
    """[buckets] The original's bucket flags, a bucket config (--bucket_config), or CogVideoX-Fun's sampling flags
    (same names and meaning: training/buckets.py FunBuckets, assets/dataset.md)."""
    buckets.add_argument(
        "--height_buckets", nargs="+", type=int, default=list(DEFAULT_HEIGHT_BUCKETS),
        help="Heights of the resolution buckets; each clip trains at the bucket nearest its own size.",
    )
    buckets.add_argument(
        "--width_buckets", nargs="+", type=int, default=list(DEFAULT_WIDTH_BUCKETS),
        help="Widths of the resolution buckets (every height x width pair is a bucket).",
    )
    buckets.add_argument(
        "--frame_buckets",
        nargs="+",
        type=int,
        default=list(DEFAULT_FRAME_BUCKETS),
        help="Frame counts to train on. CogVideoX 1.0: 4k+1 (e.g. 49). CogVideoX 1.5: the latent frame count "
        "(F-1)/4+1 must be a multiple of patch_size_t, i.e. 8k-3 (e.g. 53, 77, 85).",
    )
    buckets.add_argument("--max_num_frames", type=int, default=49, help="Most frames taken from one clip.")
    buckets.add_argument(
        "--bucket_config", type=str, default=None,
        help="YAML bucket config (Open-Sora/Ascend-port format): resolutions (480p, 720p, ... or \"HxW\") -> frame "
        "counts -> [keep_prob, batch_size]; replaces --height_buckets/--width_buckets/--frame_buckets and gives each "
        "bucket its own batch size (see assets/dataset.md).",
    )
    buckets.add_argument("--enable_bucket", action="store_true",
                         help="Aspect-ratio buckets of the sample size's area instead of square centre crops.")
    buckets.add_argument("--video_sample_size", type=int, default=None, help="Side of video samples (Fun: 512).")
    buckets.add_argument("--image_sample_size", type=int, default=None, help="Side of image samples (Fun: 512).")
    buckets.add_argument("--token_sample_size", type=int, default=None,
                         help="Side whose square x --video_sample_n_frames is the token budget (Fun: 512).")
    buckets.add_argument("--video_sample_n_frames", type=int, default=None, help="Frames per video sample (Fun: 17).")
    buckets.add_argument("--video_sample_stride", type=int, default=None, help="Take every N-th frame (Fun: 4).")
    buckets.add_argument("--random_hw_adapt", action="store_true",
                         help="A side drawn per batch: the full size with probability 0.75, else a smaller one "
                         "(assets/dataset.md).")
    buckets.add_argument("--training_with_video_token_length", action="store_true",
                         help="With --random_hw_adapt: a video batch's side drawn from --video_sample_size to "
                         "--image_sample_size (steps of 128), with the frames of the token budget there.")
    buckets.add_argument("--random_frame_crop", action="store_true",
                         help="A batch keeps its frame count with probability 0.9, else takes a shorter 4k+1.")
    buckets.add_argument("--video_repeat", type=int, default=0, help="Videos appear this many times per epoch (0: once).")


def add_training_arguments(group):
    """[training] The run: output, precision, length, learning rate and its schedule."""
    group.add_argument(
        "--output_dir", type=str, default="cogvideox-sft",
        help="Folder of the run: checkpoints, the LoRA or transformer/, config.toml, logs, validation videos "
        "(cogvideox-lora for the LoRA trainers, cogvideox-sft for the full fine-tuning ones).",
    )
    group.add_argument(
        "--seed", type=int, default=None,
        help="Seed of everything random (data order, noise, LoRA initialisation); runs with one seed repeat "
        "exactly.",
    )
    group.add_argument(
        "--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
        help="Compute precision (default: the accelerate config's). bf16 suits CogVideoX-5b and 1.5, fp16 2b.",
    )
    group.add_argument(
        "--master_weight_dtype",
        type=str,
        default="fp32",
        choices=["fp32", "bf16"],
        help="Storage of the trained weights (compute follows --mixed_precision). fp32 keeps small updates; bf16 "
        "(the original's full fine-tuning) halves their memory but rounds most fine-tuning updates away.",
    )
    group.add_argument(
        "--save_dtype",
        type=str,
        default=None,
        choices=["fp32", "fp16", "bf16"],
        help="Precision of the final LoRA file or transformer/ (default: the --mixed_precision dtype, as the original: "
        "a bf16 run writes a bf16 LoRA, half the size of fp32). Checkpoints keep the trained weights' own precision.",
    )
    group.add_argument(
        "--train_batch_size", type=_batch_size, default=4,
        help="Samples per batch and process; auto (with --max_memory_gb) picks, per bucket, the largest batch the "
        "memory estimate puts under that limit. With --bucket_config each bucket has its own.",
    )
    group.add_argument(
        "--num_train_epochs", type=int, default=1,
        help="Passes over the data (ignored when --max_train_steps is given).",
    )
    group.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    group.add_argument(
        "--gradient_accumulation_steps", type=int, default=1,
        help="Micro-batches summed into one optimizer step.",
    )
    group.add_argument(
        "--learning_rate", type=float, default=1e-4,
        help="Peak learning rate (LoRA: 1e-4 to 1e-3; full fine-tuning: about 1e-5).",
    )
    group.add_argument(
        "--scale_lr", action="store_true", help="Multiply the lr by accumulation × batch size × processes."
    )
    group.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule after the warmup.",
    )
    group.add_argument("--lr_warmup_steps", type=int, default=500, help="Steps of linear warmup from 0 to --learning_rate.")
    group.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of cosine_with_restarts.")
    group.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    group.add_argument(
        "--timestep_sampling", type=str, default="uniform", choices=["uniform", "logit_normal", "mode", "stratified"],
        help="How training timesteps are drawn: uniform (the original's), logit_normal or mode (SD3's densities, "
        "weighted towards the middle of the schedule), stratified (one per stratum of the batch: a batch covers the "
        "range evenly).",
    )
    group.add_argument("--logit_mean", type=float, default=None,
                       help="logit_normal: mean of the normal whose sigmoid is the timestep fraction (default 0).")
    group.add_argument("--logit_std", type=float, default=None,
                       help="logit_normal: its standard deviation (default 1; larger spreads towards the ends).")
    group.add_argument("--mode_scale", type=float, default=None,
                       help="mode: SD3's scale (default 1.29; 0 is uniform, larger favours the middle).")
    group.add_argument("--min_timestep", type=int, default=0,
                       help="Lowest timestep trained (0 = least noise): with --max_timestep a range, e.g. 0 to 500 for "
                       "detail, 500 to 1000 for motion and layout.")
    group.add_argument("--max_timestep", type=int, default=None,
                       help="Timesteps drawn lie below it (default: the schedule's 1000 steps).")
    group.add_argument(
        "--loss_weighting", type=str, default="cogvideox", choices=["cogvideox", "min_snr", "none"],
        help="Per-sample loss weight: cogvideox (the original's 1/(1-alpha_bar), the plain v-prediction loss), "
        "min_snr (Min-SNR-gamma: low-noise timesteps capped at --snr_gamma), none (the x0 error unweighted).",
    )
    group.add_argument("--snr_gamma", type=float, default=None, help="min_snr: the cap gamma (default 5).")
    add_ema_arguments(group)
    group.add_argument("--noised_image_dropout", type=float, default=0.05,
                       help="Probability that a sample trains without its image condition (first-frame latents "
                       "zeroed), drawn per sample.")
    group.add_argument("--ignore_learned_positional_embeddings", action="store_true",
                       help="Train at shapes other than the model's learned one (CogVideoX-5b-I2V: 49x480x720) by "
                       "dropping its learned positional embeddings; inference needs the same change.")
    add_fun_training_arguments(group)


def add_fun_training_arguments(group):
    """[training] CogVideoX-Fun's training mode, and its full fine-tune's trained modules."""
    group.add_argument(
        "--train_mode", type=str, default="normal", choices=["normal", "inpaint", "i2v"],
        help="CogVideoX-Fun's training mode (text-to-video trainers): normal trains text-to-video; inpaint (i2v is "
        "the same in Fun's code) trains a CogVideoX-Fun InP model (2 x latent channels + 1 input channels) on its "
        "inpaint latents: a random mask of each clip (first frame kept, first and last kept, spans, boxes), the "
        "masked clip encoded by the VAE, beside the noisy latents (docs/image-to-video.md).",
    )
    group.add_argument(
        "--trainable_modules", nargs="+", type=str, default=None,
        help="CogVideoX-Fun's train.py: parameters whose name contains one of these strings train. Full "
        "fine-tuning here trains every transformer weight, so only a list that takes them all (Fun's \".\") is "
        "accepted.",
    )


def add_ema_arguments(group):
    """[training] The moving average of the trained weights (training/ema.py)."""
    group.add_argument(
        "--ema_decay", type=float, default=None,
        help="Keep an exponential moving average (EMA) of the trained weights, with this decay d (0 < d < 1; e.g. "
        "0.999 for long runs, 0.99 for a few hundred steps): ema = d*ema + (1-d)*weights after every "
        "--ema_update_every-th step, from the weights the run starts from. Saved beside the weights "
        "(pytorch_lora_weights_ema.safetensors, transformer_ema/); the held-out loss is logged for both.",
    )
    group.add_argument("--ema_update_every", type=int, default=1,
                       help="With --ema_decay: update the average every N optimizer steps (the same d each time).")
    group.add_argument("--ema_on_cpu", action="store_true",
                       help="With --ema_decay: keep the average (fp32, 4 bytes per trained weight) in CPU memory "
                       "instead of the accelerator's.")
    group.add_argument("--validate_ema", action="store_true",
                       help="With --ema_decay: each validation also makes videos from the EMA weights "
                       "(validation_ema_step<N>_*).")


def add_optimizer_arguments(group):
    """[optimizer] The optimizer and its settings."""
    group.add_argument(
        "--optimizer", type=_lowercase, default="adam", choices=["adam", "adamw", "prodigy", "came"],
        help="Optimizer (upper or lower case).",
    )
    group.add_argument(
        "--use_8bit", action="store_true",
        help="8-bit optimizer states (bitsandbytes; with --use_torchao: torchao's): about a quarter of the memory.",
    )
    group.add_argument("--use_4bit", action="store_true", help="With --use_torchao: 4-bit optimizer states.")
    group.add_argument(
        "--use_torchao", action="store_true",
        help="Low-bit optimizer states from torchao instead of bitsandbytes.",
    )
    group.add_argument("--beta1", "--adam_beta1", type=float, default=0.9,
                       help="Adam's first-moment decay (--adam_beta1: CogVideoX-Fun's name, see --weight_decay).")
    group.add_argument("--beta2", "--adam_beta2", type=float, default=0.95,
                       help="Adam's second-moment decay (--adam_beta2: CogVideoX-Fun's name, see --weight_decay).")
    group.add_argument(
        "--beta3", type=float, default=None,
        help="Prodigy's and CAME's third coefficient (default: each optimizer's own).",
    )
    group.add_argument("--prodigy_decouple", action="store_true", help="Prodigy: decoupled weight decay (AdamW style).")
    group.add_argument(
        "--weight_decay", "--adam_weight_decay", type=float, default=1e-04,
        help="Weight decay. --adam_weight_decay, --adam_epsilon, --adam_beta1 and --adam_beta2 are CogVideoX-Fun's "
        "names of --weight_decay, --epsilon, --beta1 and --beta2, the settings of its AdamW: given without "
        "--optimizer, any of them also chooses --optimizer adamw (decoupled weight decay, as Fun's torch.optim.AdamW).",
    )
    group.add_argument("--epsilon", "--adam_epsilon", type=float, default=1e-8,
                       help="Optimizer epsilon (--adam_epsilon: CogVideoX-Fun's name, see --weight_decay).")
    group.add_argument(
        "--max_grad_norm", type=float, default=1.0,
        help="Gradients are clipped to this norm before each step.",
    )
    group.add_argument("--prodigy_use_bias_correction", action="store_true", help="Prodigy: Adam's bias correction.")
    group.add_argument(
        "--prodigy_safeguard_warmup", action="store_true",
        help="Prodigy: keep the step size from growing during the warmup.",
    )


def add_lora_arguments(group):
    """[lora] The LoRA adapter (LoRA trainers)."""
    group.add_argument("--rank", type=int, default=64, help="LoRA rank.")
    group.add_argument("--lora_alpha", "--network_alpha", type=int, default=64,
                       help="LoRA alpha; the update is scaled by alpha/rank (--network_alpha: CogVideoX-Fun's name).")
    group.add_argument(
        "--lora_target_modules", "--target_name",
        type=str,
        default=DEFAULT_LORA_TARGET_MODULES,
        help="Comma-separated module names of the transformer that get LoRA layers: a name matches a module whose "
        "full name is it or ends with .name (peft's rule; --target_name: CogVideoX-Fun's name, the same rule as its "
        "--use_peft_lora: e.g. ff.0 matches nothing, CogVideoX's feed-forward layers are ff.net.0.proj and ff.net.2).",
    )
    group.add_argument(
        "--use_peft_lora", action="store_true",
        help="CogVideoX-Fun's switch for peft's LoRA layers: accepted, and changes nothing (the adapter here is "
        "always peft's).",
    )
    group.add_argument(
        "--lora_type", choices=("lora", "dora", "loha", "lokr"), default="lora",
        help="The adapter: lora; dora (LoRA with a learned magnitude per output, DoRA); loha (Hadamard product of "
             "two low-rank pairs); lokr (Kronecker product, see --lokr_factor). lora and dora are saved in the "
             "diffusers form, loha and lokr as a peft adapter folder (adapter/); every type also as a ComfyUI file.",
    )
    group.add_argument(
        "--conv_rank", type=int, default=None,
        help="Rank of the adapter on convolution layers among --lora_target_modules (CogVideoX 1.0's "
             "patch_embed.proj; 1.5 has none), as LyCORIS' conv_dim; default: --rank.",
    )
    group.add_argument(
        "--lokr_factor", type=int, default=-1,
        help="--lora_type lokr: the size of the Kronecker product's first factor (peft's decompose_factor; -1: as "
             "square as the layer allows).",
    )
    group.add_argument(
        "--init_lora", type=str, default=None,
        help="Start from this LoRA file instead of a fresh adapter (diffusers/peft form, ComfyUI form, "
             "CogVideoX-Fun's or the original's file): its rank, alpha and adapted modules replace --rank, "
             "--lora_alpha and --lora_target_modules; a resumed checkpoint still takes precedence.",
    )
    group.add_argument(
        "--loraplus_lr_ratio", type=float, default=None,
        help="LoRA+: train each B (up) matrix at this many times the learning rate (the LoRA+ paper suggests 16; "
             "default: the same rate for A and B).",
    )


def add_validation_arguments(group):
    """[validation] Validation videos during and after training, and the held-out evaluation loss."""
    group.add_argument("--validation_prompt", type=str, default=None, help="Prompts joined by the separator.")
    group.add_argument(
        "--validation_images", type=str, default=None,
        help="Image paths joined by the separator, one per validation prompt: the first frame (the image-to-video "
        "trainers, and CogVideoX-Fun InP models with --train_mode inpaint).",
    )
    group.add_argument(
        "--validation_end_images", type=str, default=None, metavar="PATHS",
        help="CogVideoX-Fun InP models (--train_mode inpaint): the last frame of each validation video, one image per "
        "prompt joined by the separator (default: no end frame).",
    )
    group.add_argument(
        "--validation_control_videos", type=str, default=None, metavar="PATHS",
        help="CogVideoX-Fun Control models: one control video per validation prompt, joined by the separator; "
        "each gives the validation video's frames.",
    )
    group.add_argument(
        "--validation_prompts", type=str, nargs="+", default=None, metavar="TEXT",
        help="CogVideoX-Fun's form of --validation_prompt: each prompt a word of its own "
        "(--validation_prompts \"a cat\" \"a dog\").",
    )
    group.add_argument(
        "--validation_paths", type=str, nargs="+", default=None, metavar="PATH",
        help="CogVideoX-Fun's validation inputs, one per prompt: the first frames of an InP run (--train_mode "
        "inpaint; as --validation_images), the control videos of a Control run (as --validation_control_videos).",
    )
    group.add_argument(
        "--validation_prompt_separator", type=str, default=":::",
        help="Separator between the prompts of --validation_prompt (and between the validation images of the "
        "image-to-video trainers).",
    )
    group.add_argument("--num_validation_videos", type=int, default=1, help="Videos generated per validation prompt.")
    group.add_argument("--validation_epochs", type=int, default=None, help="Validate every N epochs.")
    group.add_argument("--validation_steps", type=int, default=None, help="Validate every N optimizer steps.")
    group.add_argument(
        "--guidance_scale", type=float, default=6.0,
        help="Classifier-free guidance scale of validation videos.",
    )
    group.add_argument(
        "--use_dynamic_cfg", action="store_true",
        help="Validation with CogVideoX's dynamic guidance schedule.",
    )
    group.add_argument("--enable_model_cpu_offload", action="store_true", help="CPU offload for validation pipelines.")
    group.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps of validation videos.")
    group.add_argument(
        "--validation_num_frames",
        type=int,
        default=None,
        help="Frames of validation videos (default: the largest frame bucket).",
    )
    group.add_argument("--height", type=int, default=480, help="Height of validation videos.")
    group.add_argument("--width", type=int, default=720, help="Width of validation videos.")
    group.add_argument("--fps", type=int, default=8, help="Frame rate of exported validation videos.")
    group.add_argument("--enable_slicing", action="store_true", help="VAE slicing.")
    group.add_argument("--enable_tiling", action="store_true", help="VAE tiling.")
    group.add_argument(
        "--eval_split",
        type=float,
        default=0.0,
        help="Fraction of the samples held out of training (chosen by --seed) to measure an evaluation loss on.",
    )
    group.add_argument(
        "--eval_video_column",
        type=str,
        default=None,
        help="A separate held-out list instead of --eval_split: a file in --data_root with one video per line (with "
        "--eval_caption_column), a column of --eval_dataset_file, or, with --load_tensors, a list of prepared "
        "entries (lines like those of the prepared videos.txt).",
    )
    group.add_argument("--eval_caption_column", type=str, default=None, help="Captions of the held-out list.")
    group.add_argument("--eval_dataset_file", type=str, default=None, help="A held-out CSV (same columns as training).")
    group.add_argument(
        "--eval_steps", type=int, default=None, help="Evaluate every N optimizer steps (default: --checkpointing_steps)."
    )
    group.add_argument(
        "--eval_timesteps",
        nargs="+",
        type=int,
        default=[100, 300, 500, 700, 900],
        help="Diffusion timesteps the evaluation loss averages over. Noise is fixed per sample and timestep, so "
        "the number is comparable from one evaluation to the next.",
    )


def add_checkpointing_arguments(group):
    """[checkpointing] Resumable checkpoints."""
    group.add_argument(
        "--checkpointing_steps", type=int, default=500,
        help="Write a resumable checkpoint every N optimizer steps.",
    )
    group.add_argument(
        "--checkpoints_total_limit", type=int, default=None,
        help="Keep at most this many checkpoints, deleting the oldest (default: keep all).",
    )
    group.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help='A checkpoint folder, or "latest" in --output_dir.'
    )


def add_memory_arguments(group):
    """[memory] Levers that trade speed for accelerator memory."""
    group.add_argument(
        "--gradient_checkpointing", action="store_true",
        help="Recompute each transformer block's activations in backward instead of keeping them: much less "
        "memory, about a third more time per step.",
    )
    group.add_argument(
        "--gradient_checkpointing_ratio", type=float, default=1.0,
        help="With --gradient_checkpointing: the share of transformer blocks checkpointed, evenly spread (1.0: all). "
        "Lower keeps more activations (more memory) and recomputes less (faster); --dry_run shows the memory.",
    )
    group.add_argument(
        "--offload_activations",
        action="store_true",
        help="Keep the tensors the backward pass needs in pinned CPU memory instead of on the GPU (with "
        "--gradient_checkpointing: each block's inputs, e.g. about 4.6 GB (4.3 GiB) for CogVideoX-5b at 49x480x720). Costs "
        "one copy to the CPU and back per step.",
    )
    group.add_argument(
        "--quantize_base",
        type=str,
        default="none",
        choices=["none", "fp8", "nf4"],
        help="LoRA only: how the frozen base transformer is stored. fp8: FP8 (e4m3) weights, each layer cast to the "
        "compute dtype while it runs (diffusers layerwise casting; about half the memory of bf16). nf4: 4-bit NF4 "
        "(QLoRA, bitsandbytes; CUDA only; about a quarter). Load the base the same way at inference (docs/memory.md).",
    )
    group.add_argument(
        "--max_memory_gb", type=float, default=None,
        help="Accelerator memory (GiB) each process may use, for the values given as auto (batch sizes; with a LoRA, "
        "the swapped blocks).",
    )
    group.add_argument(
        "--blocks_to_swap", type=_count_or_auto, default=0,
        help="LoRA only: keep the frozen weights of N transformer blocks (evenly spread) in pinned CPU memory and copy "
        "each to the GPU just before it runs (on a side stream, overlapping compute), forward and backward: saves "
        "about N blocks' weights, costs their copies each step (--dry_run shows both). auto (with --max_memory_gb): "
        "the smallest N whose estimated training and validation peaks fit.",
    )
    group.add_argument(
        "--use_cpu_offload_optimizer", action="store_true",
        help="Keep optimizer states (and with --offload_gradients the gradients) in CPU memory and step there "
        "(torchao CPUOffloadOptimizer; CUDA only).",
    )
    group.add_argument(
        "--offload_gradients", action="store_true",
        help="With --use_cpu_offload_optimizer: move gradients to the CPU as they are made.",
    )
    group.add_argument(
        "--low_vram", action="store_true",
        help="Keep the training VAE and text encoder in CPU memory and move each to the accelerator only while it "
        "encodes (CogVideoX-Fun's --low_vram): frees their memory for the transformer, costs their copies each step. "
        "Validation pipelines: --enable_model_cpu_offload.",
    )
    group.add_argument(
        "--vae_mini_batch", type=int, default=None,
        help="Clips the VAE encodes at once (CogVideoX-Fun's --vae_mini_batch): 1 encodes one clip at a time (as "
        "--enable_slicing); a number at least the batch size encodes the whole batch at once (the default).",
    )


def add_parallelism_arguments(group):
    """[parallelism] Sequence parallelism, attention kernels, compilation, FP8 matmuls, processes."""
    group.add_argument(
        "--enable_sequence_parallelism", action="store_true",
        help="Split each sample's video tokens over --sequence_parallel_shards processes (Ulysses: attention "
        "exchanges heads with an all-to-all; text tokens stay with every process). For clips whose activations do "
        "not fit one GPU. Processes = data-parallel groups x shards.",
    )
    group.add_argument(
        "--sequence_parallel_shards", type=int, default=None,
        help="Processes per sample with --enable_sequence_parallelism (default: all of them). Must divide the number "
        "of processes, the attention heads and every bucket's video tokens (checked before anything loads).",
    )
    group.add_argument(
        "--attention_backend", type=str, default=None,
        help="Attention kernel through diffusers' dispatcher: native (PyTorch SDPA), _native_flash, "
        "_native_efficient, _native_cudnn, _native_math, flash (flash-attn 2), _flash_3 (flash-attn 3), flash_hub, "
        "_flash_3_hub. Default: diffusers' CogVideoX attention as shipped.",
    )
    group.add_argument(
        "--fp8_training", action="store_true",
        help="Matmuls of the transformer blocks' linear layers in FP8 (torchao float8 training; weights keep their "
        "dtype). GPUs with compute capability 8.9+ (Ada, Hopper).",
    )
    group.add_argument(
        "--regional_compile", action="store_true",
        help="torch.compile each transformer block (compile time of one block, not of the model). An accelerate "
        "config that compiles the whole model (dynamo_backend) is the other way; use one.",
    )
    group.add_argument("--compile_mode", type=str, default=None,
                       choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                       help="torch.compile mode for --regional_compile.")
    group.add_argument(
        "--allow_tf32", action="store_true",
        help="TF32 matmuls on Ampere and newer GPUs (faster fp32, slightly less precise).",
    )
    group.add_argument("--nccl_timeout", type=int, default=600, help="Seconds before a collective times out.")


def add_logging_arguments(group):
    """[logging] Trackers and the Hugging Face Hub."""
    group.add_argument(
        "--report_to", type=str, default=None, choices=["tensorboard", "wandb", "comet_ml", "all", "none"],
        help="Where the losses go (default: none; tensorboard, wandb, comet_ml or all).",
    )
    group.add_argument(
        "--tracker_name", type=str, default=None,
        help="Run name in the trackers (default: cogvideox-lora or cogvideox-sft).",
    )
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, under --output_dir.")
    group.add_argument(
        "--push_to_hub", action="store_true",
        help="Upload the result (and its model card and config.toml) to the Hugging Face Hub at the end.",
    )
    group.add_argument(
        "--hub_model_id", type=str, default=None,
        help="Hub repository to push to (default: the --output_dir folder name).",
    )
    group.add_argument(
        "--hub_token", type=str, default=None,
        help="A Hub token; prefer `hf auth login`, which keeps it off the command line. Never written to any file.",
    )


# Flags only some trainers have (for "lora": these and every flag of the [lora] section, `only_for`): the others
# hide them from --help, and refuse them (REFUSED_ELSEWHERE) or name them as ignored (`ignored_flags`) when given a
# value other than the default; every trainer's sections still hold them (training/sections.py), at their defaults.
ONLY_FOR = {
    "lora": ("quantize_base", "blocks_to_swap"),
    "sft": ("transformer_config", "transformer_ckpt_path", "trainable_modules"),
    "image-to-video": ("noised_image_dropout", "ignore_learned_positional_embeddings"),
}
ONLY_FOR_WORDS = {"lora": "the LoRA trainers", "sft": "the full fine-tuning trainers",
                  "image-to-video": "the image-to-video trainers"}

TRAINER_DESCRIPTION = """\
{task} {what} of CogVideoX: writes {writes}.

The defaults below are the original cogvideox-factory's (batch 4, fp32, no gradient checkpointing: far past 80 GB
for CogVideoX-5b). Start from the sweep {sweep} (DRY_RUN=1 prints its command), and check a run
with --dry_run first:

    accelerate launch --config_file accelerate_configs/uncompiled_1.yaml training/{script}.py \\
        --pretrained_model_name_or_path {model} --data_root data \\
        --caption_column prompts.txt --video_column videos.txt --dry_run ...
"""


def only_for(sections):
    """{"lora" | "sft" | "image-to-video": the flags only those trainers have}: ONLY_FOR, and for "lora" every flag
    of the [lora] section. `sections`: {dest: section} of a trainer's parser (run_config.trainer_sections)."""
    lora = {dest for dest, section in sections.items() if section == "lora"}
    return {key: set(dests) | (lora if key == "lora" else set()) for key, dests in ONLY_FOR.items()}


def hidden_flags(sections, conditioning=None, mode=None):
    """The flags the trainer of `conditioning` ("text-to-video", "image-to-video") and `mode` ("lora", "sft") does
    not have (none when either is not given: every flag, as docs/flags.md lists them)."""
    if conditioning is None or mode is None:
        return set()
    others = [{"lora": "sft", "sft": "lora"}.get(mode), *(["image-to-video"] if conditioning == "text-to-video" else [])]
    owned = only_for(sections)
    return {dest for key in others if key for dest in owned[key]}


# Of those, the flags the checks refuse on the other trainers (conditioning.py, modes.py, settings.py, block_swap.py);
# the rest would be ignored there, and ignored_flags says so.
REFUSED_ELSEWHERE = {"validation_images", "ignore_learned_positional_embeddings", "transformer_config",
                     "transformer_ckpt_path", "quantize_base", "blocks_to_swap"}


def ignored_flags(args, conditioning, mode):
    """One note line naming the flags of other trainers that `args` sets (on the command line or in a --config
    file's section this trainer does not have, e.g. [lora] for a full fine-tune), which this trainer ignores; []
    when none."""
    from .run_config import trainer_sections

    parser = build_parser()
    defaults, sections = {a.dest: a.default for a in parser._actions}, trainer_sections(parser)
    ignored = sorted(dest for dest in hidden_flags(sections, conditioning, mode) - REFUSED_ELSEWHERE
                     if getattr(args, dest) != defaults[dest])
    if not ignored:
        return []
    owners = sorted({ONLY_FOR_WORDS[key] for key, dests in only_for(sections).items() if set(ignored) & dests})
    return [f"note: this {conditioning} {mode} trainer ignores "
            f"{', '.join(f'--{dest} (--config: [{sections[dest]}] {dest})' for dest in ignored)}: "
            f"{'it is' if len(ignored) == 1 else 'they are'} for {' and '.join(owners)}"]


def trainer_description(conditioning, mode):
    """--help's description of one trainer: what it trains and writes, and where to start."""
    script = f"cogvideox_{conditioning.replace('-', '_')}_{mode}"
    i2v = conditioning == "image-to-video"
    return TRAINER_DESCRIPTION.format(
        task=conditioning.capitalize(), what="LoRA fine-tuning" if mode == "lora" else "full fine-tuning",
        writes="a LoRA to --output_dir (pytorch_lora_weights.safetensors for diffusers, and a ComfyUI file)"
        if mode == "lora" else "the whole transformer to --output_dir/transformer/",
        sweep=f"train_{conditioning.replace('-', '_')}_{mode}.sh", script=script,
        model="THUDM/CogVideoX-5b-I2V" if i2v else "THUDM/CogVideoX-5b")


def build_parser(description=None, conditioning=None, mode=None):
    """Every trainer flag, with the original cogvideox-factory's names and defaults, in config.toml's sections (an
    argument group per section: `--help` lists them so); --dry_run and --load_tensors up front. With `conditioning`
    and `mode`: that trainer's parser, its description, and --help without the flags it does not have."""
    from .run_config import TRAINER_SECTIONS, add_config_arguments, section_group, trainer_sections

    if description is None:
        description = trainer_description(conditioning, mode) if conditioning and mode else "CogVideoX fine-tuning"
    parser = argparse.ArgumentParser(
        description=description, formatter_class=FlagHelpFormatter, add_help=False,
        usage="%(prog)s [--dry_run] [--load_tensors] [--config run.toml] --pretrained_model_name_or_path PATH [flags]")
    start = parser.add_argument_group("Start here")
    start.add_argument("-h", "--help", action="help", help="Show this help and exit.")
    start.add_argument(
        "--dry_run", action="store_true",
        help="Check everything, print the plan (samples per bucket, unusable samples, steps, parameters, estimated "
        "memory peaks) and exit without loading any weights ([training] in a --config file).",
    )
    start.add_argument(
        "--load_tensors", action="store_true",
        help="Train from latents and embeddings written by training/prepare_dataset.py (--data_root is its "
        "--output_dir); the VAE and text encoder are then not loaded for training ([data] in a --config file).",
    )
    groups = {name: section_group(parser, name) for name in TRAINER_SECTIONS}
    add_model_arguments(groups["model"])
    add_dataset_arguments(parser, groups=groups)
    add_caption_arguments(groups["data"])
    add_training_arguments(groups["training"])
    add_optimizer_arguments(groups["optimizer"])
    add_lora_arguments(groups["lora"])
    add_validation_arguments(groups["validation"])
    add_checkpointing_arguments(groups["checkpointing"])
    add_memory_arguments(groups["memory"])
    add_parallelism_arguments(groups["parallelism"])
    add_logging_arguments(groups["logging"])
    add_config_arguments(parser)
    hidden = hidden_flags(trainer_sections(parser), conditioning, mode)
    for action in parser._actions:
        if action.dest in hidden:
            action.help = argparse.SUPPRESS  # still parsed: settings name the trainers that have it
    if mode == "lora":
        parser.set_defaults(output_dir="cogvideox-lora")  # the original's cogvideox-sft, for a LoRA too
    return parser


# ----------------------------------------------------------------------------------------------
# Validation helpers shared by the trainers and prepare_dataset.py
# ----------------------------------------------------------------------------------------------


def read_transformer_config(path):
    """--transformer_config: {argument: value} of CogVideoXTransformer3DModel from a JSON or YAML file; UsageError
    naming an unreadable file or arguments the class does not take."""
    import inspect
    import json

    import yaml
    from diffusers import CogVideoXTransformer3DModel

    try:
        text = Path(path).read_text(encoding="utf-8")
        config = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except OSError as error:
        raise UsageError(f"--transformer_config {path}: cannot read it ({error.strerror})") from error
    except (ValueError, yaml.YAMLError) as error:
        raise UsageError(f"--transformer_config {path}: not valid JSON/YAML ({str(error).splitlines()[0]})") from error
    if not isinstance(config, dict):
        raise UsageError(f"--transformer_config {path}: expected a mapping of CogVideoXTransformer3DModel arguments")
    known = set(inspect.signature(CogVideoXTransformer3DModel.__init__).parameters) - {"self"}
    unknown = sorted(key for key in config if key not in known and not key.startswith("_"))
    if unknown:
        raise UsageError(f"--transformer_config {path}: CogVideoXTransformer3DModel takes no {', '.join(unknown)}")
    defaults = {name: p.default for name, p in inspect.signature(CogVideoXTransformer3DModel.__init__).parameters.items()
                if name in known}
    return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")},
            "_class_name": "CogVideoXTransformer3DModel"}


def load_transformer_config(pretrained):
    """The transformer's config.json (a small download at most), or --transformer_config; UsageError if it is not a
    CogVideoX pipeline. `pretrained`: a models.Pretrained."""
    from diffusers import CogVideoXTransformer3DModel

    if pretrained.transformer_config:
        return read_transformer_config(pretrained.transformer_config)
    path = pretrained.path
    unreachable = _hub_unreachable(pretrained)
    if unreachable:  # not half a minute of huggingface_hub's retries before saying so
        raise UsageError(f"--pretrained_model_name_or_path {path}: {unreachable}")
    try:
        config = CogVideoXTransformer3DModel.load_config(
            path, subfolder="transformer", revision=pretrained.revision, cache_dir=pretrained.cache_dir
        )
    except Exception as error:
        raise UsageError(f"--pretrained_model_name_or_path {path}: {_model_not_found(path, error, pretrained.cache_dir)}"
                         ) from error
    if config.get("_class_name") not in (None, "CogVideoXTransformer3DModel"):
        raise UsageError(
            f"--pretrained_model_name_or_path {path}: its transformer is a {config.get('_class_name')}, "
            "not a CogVideoXTransformer3DModel."
        )
    return config


def _hub_unreachable(pretrained):
    """The sentence `_model_not_found` would end with after huggingface_hub's retries (about 25 s), when the model is a
    Hub id missing from the cache and the Hub's host has no address (no network); else None. Not asked behind a
    proxy (HTTPS_PROXY and the like), where the host may have no address here and still be reached."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    path = str(pretrained.path)
    if constants.HF_HUB_OFFLINE or Path(path).expanduser().exists() or any(
            os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                              "all_proxy")):
        return None
    try:
        cached = try_to_load_from_cache(path, "transformer/config.json", cache_dir=pretrained.cache_dir,
                                        revision=pretrained.revision)
    except HFValidationError:
        return None  # not a Hub id: load_config says why
    if isinstance(cached, str):
        return None
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return _model_not_found(path, LocalEntryNotFoundError(f"{host}: no address"), pretrained.cache_dir)
    return None


def _model_not_found(path, error, cache_dir):
    """Why no transformer config came from `path`, in one sentence with what to do: no such folder, not a pipeline,
    not in the Hugging Face cache while offline (HF_HUB_OFFLINE=1) or with the Hub out of reach, or no such model on
    the Hub. diffusers reports all of them as an OSError; the cause is in the chain of exceptions."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    causes, cause = [], error
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    local = Path(path).expanduser()
    try:
        validate_repo_id(str(path))
        hub_id = not local.exists()
    except HFValidationError:
        hub_id = False
    if not hub_id:
        if not local.exists():
            return "no such folder (a local path; a Hub id looks like THUDM/CogVideoX-5b)"
        return (f"no CogVideoX transformer config found there ({type(error).__name__}): give a diffusers CogVideoX "
                "pipeline folder (model_index.json, transformer/, vae/, ...) or a Hub id, e.g. THUDM/CogVideoX-5b")
    cache = cache_dir or constants.HF_HUB_CACHE
    where = f" --cache-dir {cache_dir}" if cache_dir else ", with the same HF_HOME"
    download = f"download it once (hf download {path}{where}), or give the pipeline's local folder"
    if any(isinstance(c, GatedRepoError) for c in causes):
        return "a gated model on the Hub: accept its terms on huggingface.co and log in (hf auth login)"
    if any(isinstance(c, (RepositoryNotFoundError, RevisionNotFoundError)) for c in causes):
        return "no such model (or revision) on the Hugging Face Hub: check the id (e.g. THUDM/CogVideoX-5b); a " \
               "private one needs hf auth login"
    if any(isinstance(c, LocalEntryNotFoundError) for c in causes):
        if constants.HF_HUB_OFFLINE:
            return (f"not in the Hugging Face cache ({cache}), and HF_HUB_OFFLINE=1 forbids downloading it: "
                    f"{download.replace('once (', 'once without HF_HUB_OFFLINE (')}")
        return (f"not in the Hugging Face cache ({cache}), and the Hub could not be reached (no network? a proxy?): "
                f"{download}")
    return (f"no CogVideoX transformer config found on the Hub ({type(error).__name__}): give a diffusers CogVideoX "
            "pipeline's Hub id, e.g. THUDM/CogVideoX-5b, or its local folder")


def frame_rule_problem(num_frames, transformer_config, temporal_compression=4):
    """None if the model accepts `num_frames`, else a sentence naming the nearest valid counts."""
    patch_size_t = transformer_config.get("patch_size_t") or 1
    if (num_frames - 1) % temporal_compression == 0:
        latent_frames = (num_frames - 1) // temporal_compression + 1
        if latent_frames % patch_size_t == 0:
            return None
    step = temporal_compression * patch_size_t
    first = temporal_compression * (patch_size_t - 1) + 1  # smallest valid count: 1 latent group
    lower = first + max((num_frames - first) // step, 0) * step
    candidates = sorted({c for c in (lower, lower + step) if c >= first})
    rule = "4k+1" if patch_size_t == 1 else f"(F-1)/4+1 a multiple of patch_size_t={patch_size_t}, i.e. 8k-3"
    return f"{num_frames} frames do not suit this model ({rule}); nearest valid: {' or '.join(map(str, candidates))}"


def size_limit_problem(height, width, transformer_config, spatial_scale=8):
    """None if the model's positions cover height x width pixels, else a sentence. CogVideoX 1.5's rotary table (a
    "slice" of a fixed grid) covers sample_height x sample_width latents at most: beyond, the first step would crash
    on a size mismatch. CogVideoX 1.0 rescales its rotary grid and 2b computes sin-cos positions for any size."""
    if not (transformer_config.get("patch_size_t") and transformer_config.get("use_rotary_positional_embeddings")):
        return None
    most_h, most_w = transformer_config["sample_height"] * spatial_scale, transformer_config["sample_width"] * spatial_scale
    if height <= most_h and width <= most_w:
        return None
    return f"{height}x{width} is larger than this model's position grid ({most_h}x{most_w} pixels at most)"


def check_output_dir(path, problems):
    path = Path(path)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        problems.append(f"--output_dir {path}: cannot create it ({probe} is a file, not a folder)")
    elif not os.access(probe, os.W_OK):
        problems.append(f"--output_dir {path}: cannot write there ({probe} is not writable)")


def _missing_module(name):
    import importlib.util

    from .optional_libraries import HIDDEN, missing

    return missing(name) if name in HIDDEN else importlib.util.find_spec(name) is None


def optimizer_problems(flags):
    """The optimizer flags with each other, the memory levers and this machine (flags: sections.RunFlags)."""
    problems = []
    if flags.optimizer.use_8bit and flags.optimizer.use_4bit:
        problems.append("--use_8bit and --use_4bit exclude each other")
    if flags.optimizer.use_4bit and not flags.optimizer.use_torchao:
        problems.append("--use_4bit needs --use_torchao (4-bit AdamW comes from torchao)")
    if (flags.optimizer.use_8bit or flags.optimizer.use_4bit) and flags.optimizer.optimizer not in ("adam", "adamw"):
        problems.append(f"--use_8bit/--use_4bit work with --optimizer adam or adamw, not {flags.optimizer.optimizer}")
    needed = {
        "prodigy": ("prodigyopt", flags.optimizer.optimizer == "prodigy"),
        "came": ("came_pytorch", flags.optimizer.optimizer == "came"),
        "--use_8bit": ("bitsandbytes", flags.optimizer.use_8bit and not flags.optimizer.use_torchao),
        "--use_torchao": ("torchao", flags.optimizer.use_torchao and (flags.optimizer.use_8bit or flags.optimizer.use_4bit)),
    }
    for what, (module, wanted) in needed.items():
        if wanted and _missing_module(module):
            problems.append(f"{what} needs the {module} package: pip install {module.replace('_', '-')}")
    problems.extend(_offload_problems(flags))
    if flags.memory.quantize_base == "nf4":
        if _missing_module("bitsandbytes"):
            problems.append("--quantize_base nf4 needs the bitsandbytes package: pip install bitsandbytes")
        if not _cuda_available():
            problems.append("--quantize_base nf4 needs a CUDA GPU (bitsandbytes 4-bit layers); on CPU use --quantize_base fp8")
    return problems


def _cuda_available():
    import torch

    return torch.cuda.is_available()


def _offload_problems(flags):
    """torchao's CPUOffloadOptimizer: which flag combinations it can honour."""
    if not flags.memory.use_cpu_offload_optimizer:
        return ["--offload_gradients needs --use_cpu_offload_optimizer"] if flags.memory.offload_gradients else []
    problems = []
    if _missing_module("torchao"):
        problems.append("--use_cpu_offload_optimizer needs the torchao package: pip install torchao")
    if not _cuda_available():
        problems.append("--use_cpu_offload_optimizer needs a CUDA GPU (without one the optimizer runs on the CPU anyway)")
    if flags.optimizer.optimizer == "prodigy":
        problems.append("--use_cpu_offload_optimizer runs one optimizer per tensor, which changes Prodigy's global step "
                        "size estimate; use adamw, adam or came")
    if flags.memory.offload_gradients and flags.training.gradient_accumulation_steps > 1:
        problems.append("--offload_gradients frees each gradient once copied to the CPU, so micro-batches cannot add "
                        "up: use --gradient_accumulation_steps 1 (raise --train_batch_size) or drop --offload_gradients")
    if flags.training.mixed_precision == "fp16":
        problems.append("--use_cpu_offload_optimizer with fp16: the loss scaler cannot unscale gradients already on the "
                        "CPU; use --mixed_precision bf16")
    return problems


def parse_args(argv=None, description=None, conditioning=None, mode=None):
    """Parse only, with --config's values under the command line's (validation needs to know the trainer variant:
    see settings.validate_training_args). `conditioning` and `mode` name the trainer (its --help)."""
    from .run_config import parse_with_config, trainer_sections

    parser = build_parser(description, conditioning, mode)
    argv = list(sys.argv[1:] if argv is None else argv)
    if fun_adamw(argv):
        parser.set_defaults(optimizer="adamw")  # a --config file's optimizer still comes first
    return parse_with_config(parser, argv, trainer_sections(parser), resolve=lambda args: take_fun_validation_lists(
        args, argv, image_to_video=conditioning == "image-to-video"))


def take_fun_validation_lists(args, argv, image_to_video=False):
    """CogVideoX-Fun's --validation_prompts and --validation_paths (a word per item) written into this trainer's
    flags (items joined by --validation_prompt_separator): the prompts, and the paths as Fun's validation reads them,
    the first frames of an InP run (--train_mode inpaint or i2v; the image-to-video trainers' first frames too), else
    the control videos of a Control run (where the data gives none, the conditioning's check says so). Where one form
    comes from the command line `argv` and the other from a --config file, the command line's wins."""
    on_command_line = flags_given(argv)
    separator, problems = args.validation_prompt_separator, []
    first_frames = image_to_video or args.train_mode in ("inpaint", "i2v")
    path_flag = "validation_images" if first_frames else "validation_control_videos"
    for fun_flag, flag in (("validation_prompts", "validation_prompt"), ("validation_paths", path_flag)):
        items = getattr(args, fun_flag)
        if not items:
            continue
        fun_given, ours_given = f"--{fun_flag}" in on_command_line, f"--{flag}" in on_command_line
        if getattr(args, flag) and ours_given and not fun_given:
            setattr(args, fun_flag, None)  # the command line's --flag over a --config file's Fun list
            continue
        if getattr(args, flag) and not (fun_given and not ours_given):
            problems.append(f"--{fun_flag} (CogVideoX-Fun's) and --{flag} give the same thing: use one")
        elif any(separator in item for item in items):
            problems.append(f"--{fun_flag}: an entry contains the separator {separator!r}; choose another with "
                            "--validation_prompt_separator")
        else:
            setattr(args, flag, separator.join(items))
            setattr(args, fun_flag, None)  # said once: the run's saved config gives the joined flag
    if problems:
        raise UsageError(problems)
    return args


# CogVideoX-Fun's names of the optimizer settings: its scripts build torch.optim.AdamW from them.
FUN_ADAMW_FLAGS = ("--adam_weight_decay", "--adam_epsilon", "--adam_beta1", "--adam_beta2")


def fun_adamw(argv):
    """Whether the command line names the optimizer's settings as CogVideoX-Fun does (--adam_weight_decay, ...: its
    AdamW's) and gives no --optimizer: then the optimizer is AdamW (Fun's weight decay is AdamW's decoupled one)."""
    words = flags_given(argv)
    return any(flag in words for flag in FUN_ADAMW_FLAGS) and "--optimizer" not in words


def flags_given(argv):
    """The flags a command line names (`--flag value` and `--flag=value` alike)."""
    return {str(word).split("=", 1)[0] for word in argv}
