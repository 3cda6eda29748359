"""Precompute VAE latent distributions and T5 prompt embeddings for training with --load_tensors.

    python training/prepare_dataset.py --model_id THUDM/CogVideoX-5b --data_root data \
        --caption_column prompts.txt --video_column videos.txt --output_dir data-prepared \
        --height_buckets 480 --width_buckets 720 --frame_buckets 49 --save_latents_and_embeddings
    torchrun --nproc_per_node 8 training/prepare_dataset.py ...      # same, split over 8 processes

Every sample's file name is a hash of what it depends on (video file, caption, model,
bucket, frame sampling, dtype, ...), so running again reuses finished entries and a killed
run resumes where it stopped. Writes are atomic (temporary file, then rename). The video file
counts by its path, size and mtime, or with --hash_videos by the sha256 of its bytes.
"""

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path


if __package__ in (None, ""):  # run as a script: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.checkpoint import simulate_crash  # noqa: E402
from training.args import (  # noqa: E402
    UsageError,
    add_dataset_arguments,
    check_buckets,
    check_data_source,
    check_output_dir,
    exit_on_usage_error,
    load_transformer_config,
)


logger = logging.getLogger("cogvideox_factory")

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_id", type=str, default="THUDM/CogVideoX-2b", help="Hub id or local pipeline folder.")
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None)
    parser.add_argument("--cache_dir", type=str, default=None)
    add_dataset_arguments(parser, caption_column_default="caption")
    parser.add_argument("--save_image_latents", action="store_true", help="Also encode the first frame (I2V).")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--max_sequence_length", type=int, default=226, help="T5 tokens; the model's max_text_seq_length.")
    parser.add_argument("--target_fps", type=int, default=8, help="Frame rate of the exported preprocessed clips.")
    parser.add_argument("--save_latents_and_embeddings", action="store_true", help="Encode with the VAE and T5.")
    parser.add_argument("--use_slicing", action="store_true", help="VAE slicing.")
    parser.add_argument("--use_tiling", action="store_true", help="VAE tiling.")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_decode_threads", type=int, default=0,
                        help="Threads scanning the videos (headers, stream check, --hash_videos) (0: 8).")
    parser.add_argument(
        "--hash_videos", action="store_true",
        help="Key each prepared entry by the sha256 of its video's bytes instead of the file's path, size and mtime: "
        "a replaced video is recomputed even if its size and mtime were kept (touch -r, cp -p), and a moved, renamed "
        "or copied data folder reuses every entry. Hashes are remembered in video_hashes.json in --output_dir; a file "
        "is read again only when its path, size, mtime, ctime or inode changed.",
    )
    parser.add_argument("--dtype", type=str, choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num_artifact_workers", type=int, default=4, help="Kept for compatibility; writes are synchronous.")
    parser.add_argument("--dry_run", action="store_true", help="Print what would be encoded (and disk needed); exit.")
    return parser


def validate(args):
    problems = []
    if args.batch_size < 1:
        problems.append(f"--batch_size must be at least 1 (got {args.batch_size})")
    check_data_source(args, problems)
    check_output_dir(args.output_dir, problems)
    args.pretrained_model_name_or_path = args.model_id
    try:
        config = load_transformer_config(args)
    except UsageError as error:
        problems.extend(error.problems)
        config = None
    if config is not None:
        check_buckets(args, config, problems)
        if args.max_sequence_length != config["max_text_seq_length"]:
            problems.append(
                f"--max_sequence_length {args.max_sequence_length}: {args.model_id} takes "
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


def estimate_bytes(buckets, vae_config, transformer_config, args):
    """Disk size of the entries for these buckets (latent moments, prompt embeddings, first frames)."""
    element = 2 if args.dtype in ("fp16", "bf16") else 4
    spatial = 2 ** (len(vae_config["block_out_channels"]) - 1)
    channels = 2 * vae_config["latent_channels"]  # mean and log-variance
    total = 0
    for frames, height, width in buckets:
        latent = channels * ((frames - 1) // 4 + 1) * (height // spatial) * (width // spatial)
        image = (channels * (height // spatial) * (width // spatial) + 3 * height * width) if args.save_image_latents else 0
        text = args.max_sequence_length * transformer_config["text_embed_dim"]
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


def print_prepare_plan(usable, skipped, to_encode, needed, args):
    buckets = {}
    for item in usable:
        buckets[item.bucket] = buckets.get(item.bucket, 0) + 1
    print("dry run: nothing will be encoded")
    print(f"  usable samples: {len(usable)}; to encode: {to_encode}; already prepared: {len(usable) - to_encode}")
    print("  buckets: " + ", ".join(f"{f}x{h}x{w}: {n}" for (f, h, w), n in sorted(buckets.items())))
    print(f"  disk needed for new entries: {needed / 2**30:.3f} GiB")
    print(f"  unusable samples: {len(skipped)}" + (" (the run would stop: fix them or pass --skip_bad_samples)"
                                                  if skipped and not args.skip_bad_samples else ""))
    for entry in skipped:
        print(f"    entry {entry.index + 1} ({entry.video_path}): {entry.reason}")


def _atomic_save(tensors, path, metadata):
    from safetensors.torch import save_file

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def _export_clip(video, path, fps):
    from diffusers.utils import export_to_video

    frames = ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    export_to_video(list(frames), str(temporary), fps=fps)
    os.replace(temporary, path)


def _distributed():
    """(rank, world_size, device); starts a process group under torchrun/accelerate."""
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
    return rank, world_size, device


def _barrier(world_size):
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def prepare(args):
    import torch
    from tqdm.auto import tqdm

    from training.dataset import (
        BucketBatchSampler,
        VideoDataset,
        assign_buckets,
        bad_sample_error,
        collate,
        data_notes,
        load_samples,
        write_skip_report,
    )
    from training.models import encode_prompts, encode_video_distribution, load_text_encoder, load_tokenizer, load_vae
    from training.precomputed import (
        FORMAT,
        HASHES,
        MANIFEST,
        ContentHashes,
        readable_entry,
        text_encoder_fingerprint,
        vae_fingerprint,
    )

    transformer_config = validate(args)
    rank, world_size, device = _distributed()
    torch.manual_seed(args.seed + rank)
    dtype = getattr(torch, DTYPES[args.dtype])
    output = Path(args.output_dir)
    for sub in ("latents", "videos"):
        (output / sub).mkdir(parents=True, exist_ok=True)

    samples = load_samples(args.data_root, args.dataset_file, args.caption_column, args.video_column, args.id_token)
    hashes = ContentHashes(output / HASHES) if args.hash_videos else None
    if hashes is not None and rank != 0:  # rank 0 hashes (below); the others then find every hash remembered
        _barrier(world_size)
        hashes = ContentHashes(output / HASHES)
    usable, skipped = assign_buckets(
        samples, args.frame_buckets, args.height_buckets, args.width_buckets, args.max_num_frames,
        args.skip_frames_start, args.skip_frames_end, num_threads=args.num_decode_threads or 8, hashes=hashes,
    )
    if hashes is not None and rank == 0:
        hashes.save()
        logger.info("hashed %d video file(s); %d unchanged since they were last hashed", hashes.hashed, hashes.reused)
        _barrier(world_size)
    notes = data_notes(usable, args.video_reshape_mode)
    if notes and rank == 0:
        write_skip_report(notes, output / "data_notes.jsonl")
        logger.warning("%d note(s) about the data (duplicates, upscaling, stretching), all in %s", len(notes),
                       output / "data_notes.jsonl")
    if skipped and not args.skip_bad_samples and not args.dry_run:
        if rank == 0:
            write_skip_report(skipped, output / "skipped_samples.jsonl")
        raise bad_sample_error(skipped, output / "skipped_samples.jsonl", what="encoding")
    vae_config = vae_fingerprint(args)
    settings = {
        "model": args.model_id,
        "revision": args.revision,
        "vae_config": vae_config,
        "text_embed_dim": transformer_config["text_embed_dim"],
        "text_encoder_config": text_encoder_fingerprint(args),
        "max_sequence_length": args.max_sequence_length,
        "dtype": args.dtype,
        "video_reshape_mode": args.video_reshape_mode,
        "random_flip": args.random_flip,
        "image_latents": bool(args.save_image_latents),
        "latents": bool(args.save_latents_and_embeddings),
    }
    stems = [entry_key(item, settings) for item in usable]

    def is_done(stem):
        latents_ready = not args.save_latents_and_embeddings or readable_entry(output / "latents" / f"{stem}.safetensors")
        return latents_ready and (output / "videos" / f"{stem}.mp4").is_file()

    mine = [i for i in range(len(usable)) if i % world_size == rank and not is_done(stems[i])]
    todo = [usable[i].bucket for i in range(len(usable)) if not is_done(stems[i])]
    needed = estimate_bytes(todo, vae_config, transformer_config, args) if args.save_latents_and_embeddings else 0
    cached = sum(1 for i in range(len(usable)) if i % world_size == rank) - len(mine)
    if args.dry_run:
        if rank == 0:
            print_prepare_plan(usable, skipped, len(todo), needed, args)
        return output
    if rank == 0:
        check_free_space(output, needed)
    logger.info("rank %d: %d sample(s) to encode, %d already prepared", rank, len(mine), cached)

    if mine:
        text_encoder = tokenizer = vae = None
        if args.save_latents_and_embeddings:
            tokenizer = load_tokenizer(args)
            text_encoder = load_text_encoder(args, dtype).to(device).eval()
            vae = load_vae(args, dtype).to(device).eval()
        dataset = VideoDataset(
            [usable[i] for i in mine], args.video_reshape_mode, args.random_flip, image_to_video=args.save_image_latents
        )
        sampler = BucketBatchSampler(dataset.bucket_keys, args.batch_size, shuffle=False)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.dataloader_num_workers,
            pin_memory=args.pin_memory and torch.cuda.is_available(),
        )
        position_of = {usable[i].sample.index: i for i in mine}
        progress = tqdm(total=len(mine), desc=f"preparing (rank {rank})", disable=rank != 0)
        written = 0
        with torch.no_grad():
            for batch in loader:
                tensors = [{} for _ in batch["index"]]
                if args.save_latents_and_embeddings:
                    video_dist = encode_video_distribution(vae, batch["video"].to(dtype))
                    embeds = encode_prompts(tokenizer, text_encoder, batch["prompt"], args.max_sequence_length, device, dtype)
                    image_dist = None
                    if args.save_image_latents:
                        image_dist = encode_video_distribution(vae, batch["image"].to(dtype))
                    for j, entry in enumerate(tensors):
                        entry["video_latent_dist"] = video_dist[j].cpu()
                        entry["prompt_embeds"] = embeds[j].cpu()
                        if image_dist is not None:
                            entry["image_latent_dist"] = image_dist[j].cpu()
                            entry["first_frame"] = batch["image"][j].to(dtype)
                for j, sample_index in enumerate(batch["index"]):
                    position = position_of[sample_index]
                    stem, item = stems[position], usable[position]
                    _export_clip(batch["video"][j], output / "videos" / f"{stem}.mp4", args.target_fps)
                    if tensors[j]:
                        metadata = {"caption": item.sample.caption, "bucket": json.dumps(list(item.bucket))}
                        _atomic_save(tensors[j], output / "latents" / f"{stem}.safetensors", metadata)
                    written += 1
                    simulate_crash("prepare", written)
                progress.update(len(batch["index"]))
        progress.close()
    _barrier(world_size)

    if rank == 0:
        entries = []
        for item, stem in zip(usable, stems):
            entries.append(
                {
                    "index": item.sample.index,
                    "caption": item.sample.caption,
                    "source_video": str(item.sample.video_path),
                    "video": f"videos/{stem}.mp4",
                    "file": f"latents/{stem}.safetensors",
                    "bucket": list(item.bucket),
                    **({"video_sha256": item.content_hash} if item.content_hash else {}),
                }
            )
        (output / "prompts.txt").write_text("".join(e["caption"].replace("\n", " ") + "\n" for e in entries), encoding="utf-8")
        (output / "videos.txt").write_text("".join(e["video"] + "\n" for e in entries), encoding="utf-8")
        if args.save_latents_and_embeddings:
            manifest = {
                "format": FORMAT,
                "model": {
                    "path": args.model_id,
                    "revision": args.revision,
                    "latent_channels": vae_config["latent_channels"],
                    "scaling_factor": vae_config["scaling_factor"],
                    "text_embed_dim": transformer_config["text_embed_dim"],
                },
                "settings": settings,
                "entries": entries,
                "skipped": [{"entry": s.index + 1, "video": s.video_path, "reason": s.reason} for s in skipped],
            }
            temporary = output / f".{MANIFEST}.tmp"
            temporary.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            os.replace(temporary, output / MANIFEST)
        (output / "skipped_samples.jsonl").unlink(missing_ok=True)  # a report from an earlier run would mislead
        if skipped:
            write_skip_report(skipped, output / "skipped_samples.jsonl")
            logger.warning("%d sample(s) skipped, listed with reasons in %s", len(skipped), output / "skipped_samples.jsonl")
            for entry in skipped[:5]:
                logger.warning("  skipped entry %d (%s): %s", entry.index + 1, entry.video_path, entry.reason)
        logger.info("prepared %d sample(s) in %s", len(entries), output)
    _barrier(world_size)
    if world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return output


@exit_on_usage_error
def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    prepare(args)


if __name__ == "__main__":
    main()
