"""Precompute VAE latent distributions and T5 prompt embeddings for training with --load_tensors.

    python training/prepare_dataset.py --model_id THUDM/CogVideoX-5b --data_root data \\
        --caption_column prompts.txt --video_column videos.txt --output_dir data-prepared \\
        --height_buckets 480 --width_buckets 720 --frame_buckets 49 --save_latents_and_embeddings
    torchrun --nproc_per_node 8 training/prepare_dataset.py ...      # same, split over 8 processes

Every sample's file name is a hash of what it depends on (video file, caption, model,
bucket, frame sampling, dtype, ...), so running again reuses finished entries and a killed
run resumes where it stopped. Writes are atomic (temporary file, then rename). The video file
counts by its path, size and mtime, or with --hash_videos by the sha256 of its bytes.
"""

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


if __package__ in (None, ""):  # run as a script: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.checkpoint import simulate_crash  # noqa: E402
from training.buckets import check_buckets, reshape_mode  # noqa: E402
from training.layouts import check_data_source  # noqa: E402
from training.args import (  # noqa: E402
    FlagHelpFormatter,
    UsageError,
    add_dataset_arguments,
    check_output_dir,
    exit_on_usage_error,
    load_transformer_config,
)
from training.sections import section_classes, section_of  # noqa: E402


logger = logging.getLogger("cogvideox_factory")

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=FlagHelpFormatter)
    parser.add_argument("--model_id", type=str, default="THUDM/CogVideoX-2b", help="Hub id or local pipeline folder.")
    parser.add_argument("--revision", type=str, default=None, help="Revision of the model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the weight files, e.g. fp16.")
    parser.add_argument("--cache_dir", type=str, default=None,
                        help="Where downloaded models are stored (default: the HF cache).")
    add_dataset_arguments(parser, caption_column_default="caption")
    parser.add_argument("--save_image_latents", action="store_true", help="Also store the first frame (I2V; training encodes it at every step).")
    parser.add_argument("--output_dir", type=str, required=True,
                        help="The prepared folder: the trainer's --data_root with --load_tensors.")
    parser.add_argument("--max_sequence_length", type=int, default=226, help="T5 tokens; the model's max_text_seq_length.")
    parser.add_argument("--target_fps", type=int, default=8, help="Frame rate of the exported preprocessed clips.")
    parser.add_argument("--save_latents_and_embeddings", action="store_true", help="Encode with the VAE and T5.")
    parser.add_argument("--use_slicing", action="store_true", help="VAE slicing.")
    parser.add_argument("--use_tiling", action="store_true", help="VAE tiling.")
    parser.add_argument("--batch_size", type=int, default=1, help="Clips encoded together (one bucket per batch).")
    parser.add_argument("--num_decode_threads", type=int, default=0,
                        help="Threads scanning the videos (headers, stream check, --hash_videos) (0: 8).")
    parser.add_argument(
        "--hash_videos", action="store_true",
        help="Key each prepared entry by the sha256 of its video's bytes instead of the file's path, size and mtime: "
        "a replaced video is recomputed even if its size and mtime were kept (touch -r, cp -p), and a moved, renamed "
        "or copied data folder reuses every entry. Hashes are remembered in video_hashes.json in --output_dir; a file "
        "is read again only when its path, size, mtime, ctime or inode changed.",
    )
    parser.add_argument("--dtype", type=str, choices=sorted(DTYPES), default="fp32",
                        help="Precision of the VAE and T5 while encoding (and of the latents written).")
    parser.add_argument("--seed", type=int, default=42,
                        help="Seed of random crops and flips (--video_reshape_mode random, --random_flip).")
    parser.add_argument("--num_artifact_workers", type=int, default=4,
                        help="Kept for compatibility: one background thread writes the entries, in order.")
    parser.add_argument(
        "--save_videos", action="store_true",
        help="With --save_latents_and_embeddings, also write videos/<stem>.mp4, the clips as encoded (resized, cropped, "
        "sampled: to look at, or to train from without --load_tensors). Off by default: training with --load_tensors "
        "reads only latents/. Without --save_latents_and_embeddings the clips are the prepared data and always written.",
    )
    parser.add_argument("--dry_run", action="store_true", help="Print what would be encoded (and disk needed); exit.")
    from training.run_config import add_config_arguments

    add_config_arguments(parser)  # its settings: the [prepare] section
    return parser


# This script's flags, all one section ([prepare] in a --config file). Its data and bucket flags have the names and
# meaning of the trainer's [data] and [buckets] (add_dataset_arguments): the layout and bucket functions shared with
# the trainer (training/layouts.py, buckets.py) take this section where the trainer gives its [data] or [buckets].
PrepareFlags = section_classes(build_parser(), "prepare")["prepare"]


def pretrained_of(flags):
    """The pipeline --model_id names (--revision, --variant, --cache_dir), as the shared loaders take it
    (training/models.py, training/precomputed.py)."""
    from training.models import Pretrained

    return Pretrained(flags.model_id, flags.revision, flags.variant, flags.cache_dir)


def validate(flags):
    """Every usage problem at once (UsageError); returns the transformer's config."""
    problems = []
    if flags.batch_size < 1:
        problems.append(f"--batch_size must be at least 1 (got {flags.batch_size})")
    check_data_source(flags, problems)
    check_output_dir(flags.output_dir, problems)
    try:
        config = load_transformer_config(pretrained_of(flags))
    except UsageError as error:
        problems.extend(error.problems)
        config = None
    if config is not None:
        check_buckets(flags, config, problems, skip_frames_start=flags.skip_frames_start,
                      skip_frames_end=flags.skip_frames_end)
        if flags.max_sequence_length != config["max_text_seq_length"]:
            problems.append(
                f"--max_sequence_length {flags.max_sequence_length}: {flags.model_id} takes "
                f"{config['max_text_seq_length']} text tokens; pass --max_sequence_length {config['max_text_seq_length']}"
            )
    if problems:
        raise UsageError(problems)
    return config


def _file_fingerprint(path):
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def entry_key(item, settings):
    """Hash of everything an entry depends on: change any of it and the entry is recomputed.

    The video counts by its content hash when the scan took one (--hash_videos), else by path, size and mtime."""
    video = {"sha256": item.content_hash} if item.content_hash else _file_fingerprint(item.sample.video_path)
    payload = {
        "video": video,
        "caption": item.sample.caption,
        "bucket": list(item.bucket),
        "frame_indices": list(item.frame_indices),
        **settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def estimate_bytes(buckets, vae_config, transformer_config, flags):
    """Disk size of the entries for these buckets (latent moments, prompt embeddings, first frames)."""
    element = 2 if flags.dtype in ("fp16", "bf16") else 4
    spatial = 2 ** (len(vae_config["block_out_channels"]) - 1)
    channels = 2 * vae_config["latent_channels"]  # mean and log-variance
    total = 0
    for frames, height, width in buckets:
        latent = channels * ((frames - 1) // 4 + 1) * (height // spatial) * (width // spatial)
        image = 3 * height * width if flags.save_image_latents else 0  # the first frame's pixels
        text = flags.max_sequence_length * transformer_config["text_embed_dim"]
        total += (latent + image + text) * element
    return total


def check_free_space(output, needed):
    """Stop before encoding if the entries still to write cannot fit on the disk (with 10 % to spare)."""
    import shutil

    free = shutil.disk_usage(output).free
    if needed * 1.1 > free:
        raise UsageError(
            f"--output_dir {output}: the prepared data need about {needed / 2**30:.2f} GiB but only "
            f"{free / 2**30:.2f} GiB are free there; free space or choose another --output_dir"
        )


def print_prepare_plan(usable, skipped, to_encode, needed, flags):
    buckets = {}
    for item in usable:
        buckets[item.bucket] = buckets.get(item.bucket, 0) + 1
    print("dry run: nothing will be encoded")
    print(f"  usable samples: {len(usable)}; to encode: {to_encode}; already prepared: {len(usable) - to_encode}")
    print("  buckets: " + ", ".join(f"{f}x{h}x{w}: {n}" for (f, h, w), n in sorted(buckets.items())))
    print(f"  disk needed for new entries: {needed / 2**30:.3f} GiB")
    print(f"  unusable samples: {len(skipped)}" + (" (the run would stop: fix them or pass --skip_bad_samples)"
                                                  if skipped and not flags.skip_bad_samples else ""))
    for entry in skipped:
        print(f"    entry {entry.index + 1} ({entry.video_path}): {entry.reason}")


def _atomic_save(tensors, path, metadata):
    from safetensors.torch import save_file

    from training.files import share_like_umask

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    share_like_umask(temporary)
    os.replace(temporary, path)


def _export_clip(video, path, fps):
    from diffusers.utils import export_to_video

    frames = ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    export_to_video(list(frames), str(temporary), fps=fps)
    os.replace(temporary, path)


def _distributed():
    """(rank, world_size, device, waiting_room); starts a process group under torchrun/accelerate."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if world_size > 1 else 0
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # Ranks wait for each other here for as long as the work takes (rank 0 hashing every video, the slowest rank's
    # encodes): on a gloo group with a long timeout, not in an NCCL barrier, whose default 10 minutes would kill them.
    from training.backend import WaitingRoom

    return rank, world_size, device, WaitingRoom(world_size)


def prepare(flags):
    """Prepare every usable sample (this rank's share of them under torchrun); returns the output folder. `flags`: this
    script's section (PrepareFlags), as every function below takes it."""
    import torch

    transformer_config = validate(flags)
    rank, world_size, device, waiting_room = _distributed()
    torch.manual_seed(flags.seed + rank)
    output = Path(flags.output_dir)
    output.mkdir(parents=True, exist_ok=True)  # the scan's reports (data_notes.jsonl, skipped_samples.jsonl) go here

    # With --hash_videos, rank 0 hashes the videos first while the other ranks wait at a barrier in scan_samples.
    usable, skipped, buckets = scan_samples(flags, output, rank, waiting_room, transformer_config)
    plan = plan_encoding(flags, output, usable, transformer_config, rank, world_size)
    if flags.dry_run:
        if rank == 0:
            print_prepare_plan(usable, skipped, plan.to_encode, plan.needed_bytes, flags)
        return output
    if rank == 0:
        check_free_space(output, plan.needed_bytes)
    for sub in ("latents", "videos"):  # not for --dry_run, which writes nothing but the scan's reports
        (output / sub).mkdir(parents=True, exist_ok=True)
    logger.info("rank %d: %d sample(s) to encode, %d already prepared", rank, len(plan.mine), plan.already_prepared)
    if plan.mine:
        encode_samples(flags, output, usable, plan, rank, device)
    if rank == 0 and flags.save_latents_and_embeddings:
        save_empty_prompt(flags, output, plan, device)  # (a no-op when encode_samples stored it)
    waiting_room.wait()  # every rank's entries are written
    if rank == 0:
        write_lists_and_manifest(flags, output, usable, skipped, plan, transformer_config, buckets)
    waiting_room.wait()  # the lists and the manifest are written
    _end_distributed(world_size)
    return output


# ----------------------------------------------------------------------------------------------
# Step 1: scan the samples (buckets, content hashes, notes about the data, unusable samples)
# ----------------------------------------------------------------------------------------------


def scan_samples(flags, output, rank, waiting_room, transformer_config):
    """(usable, skipped, plan): the samples with their bucket (and, with --hash_videos, their video's sha256), the
    samples that cannot be used, and the bucket plan (training/buckets.py) that chose the buckets. Rank 0 writes data_notes.jsonl. Unusable samples stop the run (bad_sample_error,
    after rank 0 wrote skipped_samples.jsonl) unless --skip_bad_samples or --dry_run.

    With --hash_videos rank 0 scans first and saves video_hashes.json; the other ranks wait for it at a barrier and
    then find every hash remembered instead of reading every video again."""
    from training.buckets import bucket_plan
    from training.dataset import assign_buckets, bad_sample_error, write_skip_report
    from training.layouts import read_samples
    from training.precomputed import HASHES, ContentHashes

    samples = read_samples(flags, flags.video_repeat)
    if any(sample.control_path is not None for sample in samples):
        raise UsageError("the data gives control videos (--control_column, or control_file_path in --train_data_meta): "
                         "prepared data holds no control latents; train the CogVideoX-Fun Control model from the "
                         "clips with training/cogvideox_text_to_video_lora.py (no prepare step)")
    plan = bucket_plan(flags, transformer_config, batch_size=None, seed=flags.seed)
    hashes = None
    if flags.hash_videos:
        if rank != 0:
            waiting_room.wait()  # until rank 0 has hashed every video and saved the hashes
        hashes = ContentHashes(output / HASHES)
    usable, skipped = assign_buckets(samples, plan, flags.skip_frames_start, flags.skip_frames_end,
                                     num_threads=flags.num_decode_threads or 8, hashes=hashes)
    if hashes is not None and rank == 0:
        hashes.save()
        logger.info("hashed %d video file(s); %d unchanged since they were last hashed", hashes.hashed, hashes.reused)
        waiting_room.wait()  # let the other ranks scan
    _write_data_notes(usable, flags, output, rank)
    drawn = sum(bool(item.landings) for item in usable)
    if drawn and rank == 0:
        logger.warning("%d of %d clips can land in more than one bucket of --bucket_config (keep_prob below 1): "
                       "each is prepared once, in the bucket of the first epoch whose draw keeps it, and trains there "
                       "every epoch with --load_tensors (training on the clips draws again every epoch)",
                       drawn, len(usable))
    if skipped and not flags.skip_bad_samples and not flags.dry_run:
        if rank == 0:
            write_skip_report(skipped, output / "skipped_samples.jsonl")
        raise bad_sample_error(skipped, output / "skipped_samples.jsonl", what="encoding")
    return usable, skipped, plan


def _write_data_notes(usable, flags, output, rank):
    """Duplicates, upscaling and stretching among the usable samples, in data_notes.jsonl (rank 0)."""
    from training.dataset import data_notes, write_skip_report

    notes = data_notes(usable, reshape_mode(flags.video_reshape_mode, flags))
    if notes and rank == 0:
        write_skip_report(notes, output / "data_notes.jsonl")
        logger.warning("%d note(s) about the data (duplicates, upscaling, stretching), all in %s", len(notes),
                       output / "data_notes.jsonl")


# ----------------------------------------------------------------------------------------------
# Step 2: entry names and what is left to encode
# ----------------------------------------------------------------------------------------------


@dataclass
class EncodingPlan:
    settings: dict  # what every entry depends on besides its sample (part of each entry's key and the manifest)
    vae_config: dict
    stems: list  # file stem of each usable sample's entry (videos/<stem>.mp4, latents/<stem>.safetensors)
    mine: list  # positions in `usable` of the samples this rank encodes: its share, less those already prepared
    already_prepared: int  # of this rank's share
    to_encode: int  # samples not prepared yet, all ranks together
    needed_bytes: int  # disk the latents and embeddings still to write need (0 without --save_latents_and_embeddings)
    empty_prompt: str  # file (in the output folder) of the empty prompt's embedding, keyed like the entries


def plan_encoding(flags, output, usable, transformer_config, rank, world_size):
    """Each usable sample's entry stem and which entries are still missing or incomplete."""
    from training.precomputed import vae_fingerprint

    vae_config = vae_fingerprint(pretrained_of(flags))
    settings = cache_settings(flags, vae_config, transformer_config)
    stems = [entry_key(item, settings) for item in usable]
    prepared = [_is_prepared(output, stem, flags) for stem in stems]
    share = [i for i in range(len(usable)) if i % world_size == rank]
    mine = [i for i in share if not prepared[i]]
    to_encode = [usable[i].bucket for i in range(len(usable)) if not prepared[i]]
    needed = estimate_bytes(to_encode, vae_config, transformer_config, flags) if flags.save_latents_and_embeddings else 0
    return EncodingPlan(
        settings=settings, vae_config=vae_config, stems=stems, mine=mine, already_prepared=len(share) - len(mine),
        to_encode=len(to_encode), needed_bytes=needed, empty_prompt=empty_prompt_file(settings),
    )


TEXT_SETTINGS = ("model", "revision", "text_encoder_config", "text_embed_dim", "max_sequence_length", "dtype")


def empty_prompt_file(settings):
    """The empty prompt's embedding file, named by what it depends on (the text encoder, the sequence length, the
    precision), so a folder prepared again with another model gets its own."""
    payload = {"caption": "", **{key: settings[key] for key in TEXT_SETTINGS}}
    return f"empty_prompt-{hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]}.safetensors"


def cache_settings(flags, vae_config, transformer_config):
    """Everything besides the sample itself that decides an entry's content."""
    from training.precomputed import text_encoder_fingerprint

    mode = reshape_mode(flags.video_reshape_mode, flags)
    return {
        "model": flags.model_id,
        "revision": flags.revision,
        "vae_config": vae_config,
        "text_embed_dim": transformer_config["text_embed_dim"],
        "text_encoder_config": text_encoder_fingerprint(pretrained_of(flags)),
        "max_sequence_length": flags.max_sequence_length,
        "dtype": flags.dtype,
        "video_reshape_mode": mode,
        "random_flip": flags.random_flip,
        "image_latents": bool(flags.save_image_latents),
        "latents": bool(flags.save_latents_and_embeddings),
        # Only where it decides something (random crops or flips), so other caches keep their keys.
        **({"seed": flags.seed} if flags.random_flip or mode in ("random", "none") else {}),
    }


def _is_prepared(output, stem, flags):
    """The entry's clip exists (where it is written) and (with --save_latents_and_embeddings) its safetensors file is
    complete."""
    from training.precomputed import readable_entry

    latents_ready = not flags.save_latents_and_embeddings or readable_entry(output / "latents" / f"{stem}.safetensors")
    return latents_ready and (not _needs_clip(flags) or (output / "videos" / f"{stem}.mp4").is_file())


# ----------------------------------------------------------------------------------------------
# Step 3: encode this rank's remaining samples
# ----------------------------------------------------------------------------------------------


class Encoders(NamedTuple):
    tokenizer: object
    text_encoder: object
    vae: object


# Clips whose captions are embedded together (each distinct caption once, in T5 batches of up to T5_BATCH).
CAPTION_CHUNK = 16
T5_BATCH = 8
# Batches decoded ahead of the encoder, and entries waiting for the writer: bounds the memory the overlap costs.
PREFETCH_BATCHES = 2
WRITE_QUEUE = 4


def encode_samples(flags, output, usable, plan, rank, device):
    """Write the entries of the samples at `plan.mine`: each one's preprocessed clip and, with
    --save_latents_and_embeddings, its latent distributions and prompt embeddings.

    A pipeline of three stages that overlap: decoding and resizing (DataLoader workers, or a thread of this process
    with --dataloader_num_workers 0), encoding (VAE per batch of one bucket, T5 once per distinct caption, in
    batches), and writing (a background thread, in order). What each entry holds does not depend on the overlap."""
    import torch
    from tqdm.auto import tqdm

    dtype = getattr(torch, DTYPES[flags.dtype])
    encoders = _load_encoders(flags, dtype, device) if flags.save_latents_and_embeddings else None
    items, stems = [usable[i] for i in plan.mine], [plan.stems[i] for i in plan.mine]
    loader = _encoding_loader(flags, items, stems)
    entry_of = {item.sample.index: (stem, item) for item, stem in zip(items, stems)}
    captions = CaptionEmbeddings(encoders, flags.max_sequence_length, device, dtype,
                                 [item.sample.caption for item in items])
    # unit "clip": the bar shows clips/s (s/clip when slower) and the time left.
    progress = tqdm(total=len(items), desc=f"preparing (rank {rank})", unit="clip", disable=rank != 0)
    batches = _prefetched(loader, flags.dataloader_num_workers)
    with progress:  # closed (its line ended) before an error is printed
        with torch.no_grad(), EntryWriter(output, flags, progress) as writer, contextlib.closing(batches):
            for chunk in _chunks(batches, CAPTION_CHUNK):
                captions.encode([prompt for batch in chunk for prompt in batch["prompt"]])
                for batch in chunk:
                    tensors = _encode_batch(batch, encoders, captions, flags, dtype, device)
                    for j, sample_index in enumerate(batch["index"]):
                        stem, item = entry_of[sample_index]
                        writer.put(stem, item, batch["video"][j], tensors[j])
    if rank == 0 and encoders is not None:
        save_empty_prompt(flags, output, plan, device, encoders)


def save_empty_prompt(flags, output, plan, device, encoders=None):
    """The T5 embedding of the empty prompt "" (as the pipelines encode a negative prompt), stored once for training's
    --caption_dropout_rate, unless already there. Loads the tokenizer and T5 (not the VAE) when `encoders` is None."""
    import torch

    from training.models import encode_prompts, load_text_encoder, load_tokenizer
    from training.precomputed import readable_entry

    path = output / plan.empty_prompt
    if readable_entry(path):
        return
    dtype = getattr(torch, DTYPES[flags.dtype])
    if encoders is None:
        pretrained = pretrained_of(flags)
        encoders = Encoders(load_tokenizer(pretrained), load_text_encoder(pretrained, dtype).to(device).eval(), None)
    embeds = encode_prompts(encoders.tokenizer, encoders.text_encoder, [""], flags.max_sequence_length, device, dtype)
    _atomic_save({"prompt_embeds": embeds[0].cpu()}, path, {"caption": ""})


def _load_encoders(flags, dtype, device):
    from training.models import convolve_on_cpu_with_onednn, load_text_encoder, load_tokenizer, load_vae

    pretrained = pretrained_of(flags)
    tokenizer = load_tokenizer(pretrained)
    text_encoder = load_text_encoder(pretrained, dtype).to(device).eval()
    vae = load_vae(pretrained, dtype, flags.use_slicing, flags.use_tiling)
    vae = convolve_on_cpu_with_onednn(vae).to(device).eval()  # CPU prepare: twice as fast
    return Encoders(tokenizer, text_encoder, vae)


def _encoding_loader(flags, items, stems):
    """Batches of the preprocessed samples, one bucket per batch, in order."""
    import torch

    from training.dataset import BucketBatchSampler, VideoDataset, collate

    # Random crops and flips drawn from (--seed, the entry's key): the same however many processes share the work,
    # whatever was prepared before, and whatever else is in the list.
    dataset = VideoDataset(items, reshape_mode(flags.video_reshape_mode, flags), flags.random_flip,
                           image_to_video=flags.save_image_latents, seed=flags.seed,
                           random_keys=[int(stem, 16) for stem in stems])
    sampler = BucketBatchSampler(dataset.bucket_keys, flags.batch_size, shuffle=False)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=flags.dataloader_num_workers,
        pin_memory=flags.pin_memory and torch.cuda.is_available(),
    )


def _prefetched(loader, num_workers):
    """The loader's batches. Its workers already decode ahead; without workers, a thread of this process does (decord,
    PyAV and torch's resize release the GIL), PREFETCH_BATCHES ahead. An error there is raised here, in order."""
    if num_workers > 0:
        yield from loader
        return
    import queue
    import threading

    batches, stop, done = queue.Queue(maxsize=PREFETCH_BATCHES), threading.Event(), object()

    def produce():
        try:
            for batch in loader:
                while not stop.is_set():
                    try:
                        batches.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            result = done
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            result = error
        while not stop.is_set():
            try:
                batches.put(result, timeout=0.1)
                return
            except queue.Full:
                continue

    thread = threading.Thread(target=produce, name="prepare-decode", daemon=True)
    thread.start()
    try:
        while True:
            batch = batches.get()
            if batch is done:
                return
            if isinstance(batch, BaseException):
                raise batch
            yield batch
    finally:
        stop.set()  # the consumer stopped (done, or an error): let the producer end
        thread.join()


def _chunks(batches, size):
    """Lists of consecutive batches holding at least `size` samples (the last one fewer)."""
    chunk, count = [], 0
    for batch in batches:
        chunk.append(batch)
        count += len(batch["index"])
        if count >= size:
            yield chunk
            chunk, count = [], 0
    if chunk:
        yield chunk


class CaptionEmbeddings:
    """T5 embeddings of the captions, each distinct caption encoded once: `encode` embeds (in batches of T5_BATCH)
    those of a chunk not held yet; `take` hands one out and forgets it after its last use in this run."""

    def __init__(self, encoders, max_sequence_length, device, dtype, captions):
        from collections import Counter

        self.encoders, self.max_sequence_length, self.device, self.dtype = encoders, max_sequence_length, device, dtype
        self.remaining = Counter(captions)
        self.held = {}
        self.encoded = 0  # distinct captions encoded (tests count them)

    def encode(self, prompts):
        if self.encoders is None:
            return
        from training.models import encode_prompts

        missing = list(dict.fromkeys(p for p in prompts if p not in self.held))
        for start in range(0, len(missing), T5_BATCH):
            part = missing[start : start + T5_BATCH]
            embeds = encode_prompts(self.encoders.tokenizer, self.encoders.text_encoder, part,
                                    self.max_sequence_length, self.device, self.dtype).cpu()
            self.held.update(zip(part, embeds))
            self.encoded += len(part)

    def take(self, prompt):
        embeds = self.held[prompt]
        self.remaining[prompt] -= 1
        if self.remaining[prompt] <= 0:
            del self.held[prompt]
        return embeds


def _encode_batch(batch, encoders, captions, flags, dtype, device):
    """One dict of tensors to save per sample of the batch (empty without --save_latents_and_embeddings)."""
    from training.models import encode_video_distribution

    tensors = [{} for _ in batch["index"]]
    if not flags.save_latents_and_embeddings:
        return tensors
    video_dist = encode_video_distribution(encoders.vae, batch["video"], device).cpu()  # in the VAE's dtype
    for j, entry in enumerate(tensors):
        entry["video_latent_dist"] = video_dist[j]
        entry["prompt_embeds"] = captions.take(batch["prompt"][j])
        if flags.save_image_latents:
            # The pixels, not a latent: training noise-augments the frame, then encodes it, at every step.
            entry["first_frame"] = batch["image"][j].to(dtype)
    return tensors


def _needs_clip(flags):
    """videos/<stem>.mp4 is written without --save_latents_and_embeddings (the clips are then what training reads)
    and, with it, only with --save_videos (training with --load_tensors reads only latents/)."""
    return not flags.save_latents_and_embeddings or flags.save_videos


class EntryWriter:
    """Writes entries in a background thread, in the order given, so the encoder never waits for the disk or the
    clip export. `put` blocks while WRITE_QUEUE entries wait; an error in the writer is raised by the next `put` or
    at the end. Leaving the block (also on an error) writes what was queued: finished entries are kept."""

    def __init__(self, output, flags, progress):
        import queue

        self.output, self.flags, self.progress = output, flags, progress
        self.queue = queue.Queue(maxsize=WRITE_QUEUE)
        self.error = None
        self.written = 0

    def __enter__(self):
        import threading

        self.thread = threading.Thread(target=self._run, name="prepare-writer", daemon=True)
        self.thread.start()
        return self

    def put(self, stem, item, video, tensors):
        if self.error is not None:
            raise self.error
        self.queue.put((stem, item, video, tensors))

    def _run(self):
        while (entry := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep taking entries so that `put` never blocks; the error is raised there
            try:
                _write_entry(self.output, *entry, self.flags)
                self.written += 1
                simulate_crash("prepare", self.written)  # tests: killed here after `written` complete entries
                self.progress.update(1)
            except BaseException as error:  # noqa: BLE001 - raised in the main thread
                self.error = error

    def __exit__(self, exc_type, exc, traceback):
        self.queue.put(None)
        self.thread.join()
        if exc is None and self.error is not None:
            raise self.error
        return False


def _write_entry(output, stem, item, video, tensors, flags):
    """videos/<stem>.mp4 (when needed: `_needs_clip`), then (if there are tensors) latents/<stem>.safetensors; each
    written atomically."""
    if _needs_clip(flags):
        _export_clip(video, output / "videos" / f"{stem}.mp4", flags.target_fps)
    if tensors:
        metadata = {"caption": item.sample.caption, "bucket": json.dumps(list(item.bucket))}
        _atomic_save(tensors, output / "latents" / f"{stem}.safetensors", metadata)


# ----------------------------------------------------------------------------------------------
# Step 4 (rank 0): the lists, the manifest and the skip report
# ----------------------------------------------------------------------------------------------


def write_lists_and_manifest(flags, output, usable, skipped, plan, transformer_config, buckets):
    """prompts.txt and videos.txt (and with --save_latents_and_embeddings the manifest) listing every usable sample's
    entry; skipped_samples.jsonl when samples were skipped."""
    entries = manifest_entries(usable, plan.stems)
    (output / "prompts.txt").write_text("".join(e["caption"].replace("\n", " ") + "\n" for e in entries), encoding="utf-8")
    (output / "videos.txt").write_text("".join(e["video"] + "\n" for e in entries), encoding="utf-8")
    if flags.save_latents_and_embeddings:
        _write_manifest(output, entries, skipped, plan, transformer_config, flags, buckets)
    _report_skipped_samples(output, skipped)
    logger.info("prepared %d sample(s) in %s", len(entries), output)


def manifest_entries(usable, stems):
    return [
        {
            "index": item.sample.index,
            "caption": item.sample.caption,
            "source_video": str(item.sample.video_path),
            "video": f"videos/{stem}.mp4",
            "file": f"latents/{stem}.safetensors",
            "bucket": list(item.bucket),
            "repeats": item.sample.repeats,
            **({"video_sha256": item.content_hash} if item.content_hash else {}),
        }
        for item, stem in zip(usable, stems)
    ]


def _write_manifest(output, entries, skipped, plan, transformer_config, flags, buckets):
    """The manifest (atomically), which training with --load_tensors reads."""
    from training.precomputed import FORMAT, MANIFEST, component_digests

    manifest = {
        "format": FORMAT,
        "model": {
            "path": flags.model_id,
            "revision": flags.revision,
            "latent_channels": plan.vae_config["latent_channels"],
            "scaling_factor": plan.vae_config["scaling_factor"],
            "text_embed_dim": transformer_config["text_embed_dim"],
            # Which VAE and T5 weights made the entries (training with --load_tensors checks them).
            "weights": component_digests(pretrained_of(flags)),
        },
        "settings": plan.settings,
        "empty_prompt": plan.empty_prompt,  # for training's --caption_dropout_rate
        # With --bucket_config, each bucket's training batch size (training uses it unless given another config).
        "batch_sizes": {"x".join(map(str, e["bucket"])): buckets.batch_size(e["bucket"]) for e in entries}
        if flags.bucket_config else {},
        "entries": entries,
        "skipped": [{"entry": s.index + 1, "video": s.video_path, "reason": s.reason} for s in skipped],
    }
    temporary = output / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(temporary, output / MANIFEST)


def _report_skipped_samples(output, skipped):
    from training.dataset import write_skip_report

    (output / "skipped_samples.jsonl").unlink(missing_ok=True)  # a report from an earlier run would mislead
    if skipped:
        write_skip_report(skipped, output / "skipped_samples.jsonl")
        logger.warning("%d sample(s) skipped, listed with reasons in %s", len(skipped), output / "skipped_samples.jsonl")
        for entry in skipped[:5]:
            logger.warning("  skipped entry %d (%s): %s", entry.index + 1, entry.video_path, entry.reason)


def _end_distributed(world_size):
    if world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


@exit_on_usage_error
def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    from training.run_config import parse_with_config

    args = parse_with_config(build_parser(), argv, "prepare")
    prepare(section_of(PrepareFlags, args))


if __name__ == "__main__":
    main()
