"""Use a folder prepared by the original cogvideox-factory (a-r-r-o-w, up to commit 80d1150) for --load_tensors.

The original's training/prepare_dataset.py --save_latents_and_embeddings wrote `prompts.txt`, `videos.txt`
(`videos/<id>.mp4` per line), `video_latents/<id>.pt` (the VAE's latent distribution: mean and log-variance,
unscaled, [2C, f, h, w]), `prompt_embeds/<id>.pt` ([S, D]) and, with --save_image_latents, `images/<id>.png` (the
first frame) and `image_latents/<id>.pt`. This converts it once into this toolkit's layout: each entry's tensors go
to `latents/<id>.safetensors` as they are (nothing is encoded again), and `manifest.json` records the model they were
encoded with (--model_id), so training checks them against its model as it checks folders prepared here.

    python tools/import_prepared.py --prepared data-prepared --model_id THUDM/CogVideoX-5b
    python training/cogvideox_text_to_video_lora.py --load_tensors --data_root data-prepared \\
        --caption_column prompts.txt --video_column videos.txt --pretrained_model_name_or_path THUDM/CogVideoX-5b ...

The .pt files are read with torch.load(weights_only=True) (tensors only: no code in them can run). Without --output
the new files are written beside the old ones; the .pt files can be deleted afterwards.
"""

import argparse
import json
import logging
import os
import pickle
import shutil
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.errors import UsageError, exit_on_usage_error  # noqa: E402
from training.sections import section_classes, section_of  # noqa: E402


logger = logging.getLogger("cogvideox_factory")

# What the original's prepare_dataset.py wrote (besides data.jsonl and videos/<id>.txt, which add nothing here).
LISTS = ("prompts.txt", "videos.txt")
VIDEO_LATENTS, PROMPT_EMBEDS, IMAGE_LATENTS, IMAGES = "video_latents", "prompt_embeds", "image_latents", "images"
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
SOURCE = "a-r-r-o-w/cogvideox-factory training/prepare_dataset.py (80d1150)"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", required=True,
                        help="the original's prepared folder (its prepare_dataset.py --output_dir)")
    parser.add_argument("--model_id", required=True,
                        help="the model whose VAE and T5 encoded it (the original's --model_id): Hub id or local "
                        "pipeline folder. Only shapes can be checked against it: name the one it was made with.")
    parser.add_argument("--revision", default=None, help="revision of --model_id on the Hub")
    parser.add_argument("--variant", default=None, help="variant of --model_id's weight files, e.g. fp16")
    parser.add_argument("--cache_dir", default=None, help="where downloaded models are stored (default: the HF cache)")
    parser.add_argument("--output", default=None,
                        help="the folder to write (the trainer's --data_root); default: --prepared itself")
    parser.add_argument("--embed_empty_prompt", action="store_true",
                        help="also embed the empty prompt \"\" with --model_id's T5 (loads it once), which training's "
                        "--caption_dropout_rate needs; the original stored none")
    return parser


def original_folder_problems(folder):
    """Lines saying why `folder` is not a folder written by the original's prepare_dataset.py (empty: it is one)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"--prepared {folder}: no such folder"]
    missing = [name for name in (*LISTS, VIDEO_LATENTS, PROMPT_EMBEDS) if not (folder / name).exists()]
    if missing:
        return [f"--prepared {folder}: no {', '.join(missing)}; not a folder written by the original's "
                "prepare_dataset.py --save_latents_and_embeddings"]
    if not _holds(folder / VIDEO_LATENTS, "pt"):  # the original made every folder, filled or not
        return [f"--prepared {folder}: video_latents/ is empty (prepared without --save_latents_and_embeddings): "
                f"its videos/ are the preprocessed clips; train on them without --load_tensors (--data_root {folder} "
                "--caption_column prompts.txt --video_column videos.txt)"]
    return []


def _holds(directory, extension):
    return directory.is_dir() and any(directory.glob(f"*.{extension}"))


def _read_lists(folder):
    """[(caption, stem)] in the order of prompts.txt and videos.txt (stripped, empty lines dropped, as the original read
    them)."""
    captions, videos = ([line.strip() for line in (folder / name).read_text(encoding="utf-8").splitlines() if line.strip()]
                        for name in LISTS)
    if len(captions) != len(videos):
        raise UsageError(f"--prepared {folder}: prompts.txt has {len(captions)} lines but videos.txt {len(videos)}")
    if not captions:
        raise UsageError(f"--prepared {folder}: prompts.txt and videos.txt list no sample")
    return [(caption, Path(video).name.split(".")[0]) for caption, video in zip(captions, videos)]


def _load(path):
    import torch

    for mmap in (True, False):  # memory-mapped, a check reads the header only; the legacy format cannot be mapped
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as error:  # a truncated or foreign file, or one holding more than tensors
            problem = f"{path}: cannot read it as a tensor file ({type(error).__name__}): truncated, or not torch.save's"
            if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):
                problem = f"{path}: holds pickled objects other than tensors, which are not loaded (weights_only=True)"
    else:
        raise UsageError(problem)
    if not isinstance(tensor, torch.Tensor):
        raise UsageError(f"{path}: holds a {type(tensor).__name__}, not a tensor")
    return tensor


def _first_frame(path, height, width, dtype):
    """The original's images/<id>.png ((x + 1) / 2 of the first frame, 8 bits) as [1, 3, H, W] in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    if pixels.shape[:2] != (height, width):
        raise UsageError(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} pixels, but the entry's latents are of a "
                         f"{width}x{height} clip")
    frame = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255 * 2 - 1
    return frame.unsqueeze(0).to(dtype)


def read_entry(folder, stem, model, image_to_video):
    """(tensors for latents/<stem>.safetensors, bucket) of one entry; UsageError with one line per problem."""
    paths = {"video_latent_dist": folder / VIDEO_LATENTS / f"{stem}.pt", "prompt_embeds": folder / PROMPT_EMBEDS / f"{stem}.pt"}
    if image_to_video:
        paths["image_latent_dist"] = folder / IMAGE_LATENTS / f"{stem}.pt"
        paths["first_frame"] = folder / IMAGES / f"{stem}.png"
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise UsageError(f"--prepared {folder}: entry {stem} has no {', '.join(missing)}")
    latents, embeds = _load(paths["video_latent_dist"]), _load(paths["prompt_embeds"])
    channels, length, width = 2 * model["latent_channels"], model["max_text_seq_length"], model["text_embed_dim"]
    if latents.ndim != 4 or latents.shape[0] != channels:
        raise UsageError(f"{paths['video_latent_dist']}: shape {list(latents.shape)}, but {model['path']}'s VAE gives "
                         f"[{channels}, frames, height, width] (mean and log-variance): encoded by another model")
    if list(embeds.shape) != [length, width]:
        raise UsageError(f"{paths['prompt_embeds']}: shape {list(embeds.shape)}, but {model['path']} takes "
                         f"[{length}, {width}] (max_text_seq_length, text_embed_dim): embedded by another model or "
                         "with another --max_sequence_length")
    frames, latent_height, latent_width = latents.shape[1:]
    # The original's rule (its dataset's load_tensors mode): latent frames back to frames, latent pixels to pixels.
    temporal, spatial = model["temporal_compression_ratio"], model["spatial_scale"]
    bucket = [frames * temporal if frames % 2 == 0 else (frames - 1) * temporal + 1,
              latent_height * spatial, latent_width * spatial]
    tensors = {"video_latent_dist": latents, "prompt_embeds": embeds}
    if image_to_video:
        image_latents = _load(paths["image_latent_dist"])
        if list(image_latents.shape) != [channels, 1, latent_height, latent_width]:
            raise UsageError(f"{paths['image_latent_dist']}: shape {list(image_latents.shape)}, but the entry's video "
                             f"latents need [{channels}, 1, {latent_height}, {latent_width}]")
        # Training encodes the (noise-augmented) first frame at every step, from pixels: the original's images/.
        tensors["first_frame"] = _first_frame(paths["first_frame"], bucket[1], bucket[2], latents.dtype)
    return tensors, bucket


def _model_facts(pretrained):
    from training.args import load_transformer_config
    from training.models import vae_scale_factor_spatial
    from training.precomputed import vae_fingerprint

    transformer_config = load_transformer_config(pretrained)
    vae_config = vae_fingerprint(pretrained)
    facts = {
        "path": pretrained.path,
        "latent_channels": vae_config["latent_channels"],
        "max_text_seq_length": transformer_config["max_text_seq_length"],
        "text_embed_dim": transformer_config["text_embed_dim"],
        "temporal_compression_ratio": vae_config.get("temporal_compression_ratio", 4),
        "spatial_scale": vae_scale_factor_spatial(vae_config),
    }
    return transformer_config, vae_config, facts


def _prepare_flags(options, output, dtype, max_sequence_length, image_to_video):
    """prepare_dataset.py's flags as they would have made this folder, for its settings and manifest writers."""
    from training.prepare_dataset import PrepareFlags
    from training.prepare_dataset import build_parser as prepare_parser

    argv = ["--model_id", options.model_id, "--data_root", options.prepared, "--output_dir", str(output),
            "--caption_column", "prompts.txt", "--video_column", "videos.txt", "--dtype", dtype,
            "--max_sequence_length", str(max_sequence_length),
            "--save_latents_and_embeddings", *(["--save_image_latents"] if image_to_video else [])]
    for flag in ("revision", "variant", "cache_dir"):
        if getattr(options, flag):
            argv += [f"--{flag}", getattr(options, flag)]
    return section_of(PrepareFlags, prepare_parser().parse_args(argv))


def _link_or_copy(source, target):
    if target.exists() or source.resolve() == target.resolve():
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def import_prepared(options):
    """Convert the folder; returns the output folder. UsageError (one line per problem) before anything is written."""
    import torch

    from training.models import Pretrained
    from training.prepare_dataset import (
        EncodingPlan,
        _atomic_save,
        _write_manifest,
        cache_settings,
        empty_prompt_file,
        save_empty_prompt,
    )

    folder = Path(options.prepared)
    problems = original_folder_problems(folder)
    if problems:
        raise UsageError(problems)
    output = Path(options.output) if options.output else folder
    samples = _read_lists(folder)
    # With or without --save_image_latents the original made images/ and image_latents/: filled means image-to-video.
    image_to_video = _holds(folder / IMAGE_LATENTS, "pt") or _holds(folder / IMAGES, "png")
    pretrained = Pretrained(options.model_id, options.revision, options.variant, options.cache_dir)
    transformer_config, vae_config, model = _model_facts(pretrained)

    # Every entry is checked before anything is written (then read again, one at a time, to be written).
    checked = [read_entry(folder, stem, model, image_to_video) for _, stem in samples]
    dtypes = {tensors["video_latent_dist"].dtype for tensors, _ in checked}
    del checked
    if len(dtypes) > 1 or next(iter(dtypes)) not in (torch.float32, torch.float16, torch.bfloat16):
        raise UsageError(f"--prepared {folder}: latents of dtypes {sorted(map(str, dtypes))}; expected one of "
                         "float32, float16, bfloat16 (the original's --dtype)")
    dtype = DTYPE_NAMES[str(next(iter(dtypes))).removeprefix("torch.")]

    flags = _prepare_flags(options, output, dtype, model["max_text_seq_length"], image_to_video)
    settings = cache_settings(flags, vae_config, transformer_config)
    # Not recorded by the original: how its clips were fitted to their buckets.
    settings.update(video_reshape_mode=None, random_flip=None,
                    imported_from={"folder": str(folder.resolve()), "written_by": SOURCE})
    (output / "latents").mkdir(parents=True, exist_ok=True)
    manifest_entries = []
    for index, (caption, stem) in enumerate(samples):
        tensors, bucket = read_entry(folder, stem, model, image_to_video)
        tensors = {key: value for key, value in tensors.items() if key != "image_latent_dist"}
        _atomic_save(tensors, output / "latents" / f"{stem}.safetensors", {"caption": caption, "bucket": json.dumps(bucket)})
        manifest_entries.append({"index": index, "caption": caption, "source_video": str(folder / "videos" / f"{stem}.mp4"),
                                 "video": f"videos/{stem}.mp4", "file": f"latents/{stem}.safetensors",
                                 "bucket": bucket, "repeats": 1})
    if output.resolve() != folder.resolve():
        (output / "videos").mkdir(exist_ok=True)
        for name in LISTS:
            shutil.copyfile(folder / name, output / name)
        for _, stem in samples:  # the clips as the original encoded them, where it kept them
            if (folder / "videos" / f"{stem}.mp4").is_file():
                _link_or_copy(folder / "videos" / f"{stem}.mp4", output / "videos" / f"{stem}.mp4")

    plan = EncodingPlan(settings=settings, vae_config=vae_config, stems=[Path(e["file"]).stem for e in manifest_entries],
                        mine=[], already_prepared=len(manifest_entries), to_encode=0, needed_bytes=0,
                        empty_prompt=empty_prompt_file(settings))
    if options.embed_empty_prompt:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        save_empty_prompt(flags, output, plan, device)
    else:
        plan.empty_prompt = None  # training's --caption_dropout_rate then says how to add it
    _write_manifest(output, manifest_entries, [], plan, transformer_config, flags, buckets=None)
    buckets = sorted({tuple(e["bucket"]) for e in manifest_entries})
    print(f"imported {len(manifest_entries)} entries ({dtype}; buckets "
          f"{', '.join('x'.join(map(str, b)) for b in buckets)}"
          f"{'; image-to-video' if image_to_video else '; text-to-video only: no images/'}) into {output}")
    return output


# This tool's flags as one section: what import_prepared below takes, as `options`.
ImportFlags = section_classes(build_parser(), "import_prepared")["import_prepared"]


@exit_on_usage_error
def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    import training  # noqa: F401  (quiet library notices)

    return import_prepared(section_of(ImportFlags, build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
