"""The folder written by prepare_dataset.py, and the checks training makes before using it.

Layout (see assets/dataset.md):
    manifest.json            settings, model facts, and one entry per prepared sample
    prompts.txt, videos.txt  the original's lists: caption and `videos/<stem>.mp4` per line
    latents/<stem>.safetensors   video_latent_dist [2C, f, h, w], prompt_embeds [S, D]
                                 (+ first_frame [1, 3, H, W] in [-1, 1] with --save_image_latents)
    empty_prompt-<key>.safetensors   prompt_embeds [S, D] of the empty prompt "" (caption dropout), named in the
                                 manifest ("empty_prompt"); folders prepared before caption dropout have none
    videos/<stem>.mp4        the clip as it was encoded (resized, cropped, sampled)
    video_hashes.json        with --hash_videos: sha256 of each source video, with the file's stat when hashed
"""

import hashlib
import json
import os
import re
import threading
from pathlib import Path

from .args import UsageError, frame_rule_problem


MANIFEST = "manifest.json"
FORMAT = "cogvideox-factory/precomputed-v1"
HASHES = "video_hashes.json"
HASHES_FORMAT = "cogvideox-factory/video-hashes-v1"


def sha256_of_file(path, chunk_size=1 << 20):
    """sha256 hex digest, read in 1 MiB chunks (hashlib releases the GIL on them: threads hash in parallel)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class ContentHashes:
    """Content hashes of the source videos, remembered in `video_hashes.json` so an unchanged file is not read again.

    A remembered hash is reused only while the file's path, size, mtime, ctime and inode are all the same as when
    it was hashed. `touch -r` and copying with preserved times (`cp -p`, rsync -t) restore the mtime but cannot
    restore the ctime, which the kernel sets on every write or rename, so a file replaced by another of the same
    size and mtime is hashed again. A moved, renamed or copied data folder is hashed again too (new paths), which
    reads the files but, the contents being the same, recomputes no prepared entry.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.known, self.used = {}, {}
        self.hashed = self.reused = 0  # files read and hashed in this run / taken from video_hashes.json
        self._lock = threading.Lock()
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("format") == HASHES_FORMAT:
                self.known = dict(saved["files"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no file yet, or unreadable: everything is hashed

    @staticmethod
    def _stat(path):
        stat = os.stat(path)
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}

    def digest(self, video):
        """sha256 of the file's bytes (OSError if it cannot be read)."""
        resolved = str(Path(video).resolve())
        before = self._stat(resolved)
        known = self.known.get(resolved)
        if known and all(known.get(key) == value for key, value in before.items()):
            digest = known["sha256"]
            with self._lock:
                self.reused += 1
        else:
            digest = sha256_of_file(resolved)
            with self._lock:
                self.hashed += 1
            if self._stat(resolved) != before:  # written while being read: hash it again next time
                return digest
        with self._lock:
            self.used[resolved] = {**before, "sha256": digest}
        return digest

    def save(self):
        """Write the hashes of the files seen in this run (atomically: temporary file, then rename)."""
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"format": HASHES_FORMAT, "files": self.used}, indent=1), encoding="utf-8")
        os.replace(temporary, self.path)


def vae_fingerprint(pretrained):
    """The VAE's config, of the pipeline `pretrained` (a models.Pretrained: the trainer's --pretrained_model_name_or_path
    or prepare_dataset.py's --model_id) names. Stored whole by prepare_dataset.py; compared without the keys that do
    not change the latents it writes (`moment_config`)."""
    from .models import read_config

    config = read_config(pretrained, "vae")
    return {k: v for k, v in config.items() if not k.startswith("_")}


# Applied by training, not by the encoder: prepared entries hold unscaled moments (mean, log-variance), and training
# scales them with its own model's factor. CogVideoX-2b and -5b share their VAE weights but not these.
NOT_IN_THE_MOMENTS = ("scaling_factor", "shift_factor", "invert_scale_latents", "force_upcast")


def moment_config(vae_config):
    return {k: v for k, v in vae_config.items() if k not in NOT_IN_THE_MOMENTS}


def text_encoder_fingerprint(pretrained):
    """The text encoder's architecture settings (not the weights: see `weights_digest`) of the pipeline `pretrained`
    (a models.Pretrained) names."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(pretrained.path, subfolder="text_encoder", revision=pretrained.revision,
                                        cache_dir=pretrained.cache_dir)
    keys = ("model_type", "d_model", "d_ff", "d_kv", "num_layers", "num_heads", "vocab_size", "feed_forward_proj")
    return {k: getattr(config, k, None) for k in keys}


_WEIGHT_FILE = re.compile(r"^(?:diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>[\w-]+?))?"
                          r"(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")
DIGEST_SAMPLES, DIGEST_CHUNK = 64, 1 << 16


def weights_digest(pretrained, subfolder):
    """A digest of a component's weight files (`vae`, `text_encoder`; of `pretrained`, a models.Pretrained, and its
    variant): their names, sizes and 64 slices of 64 KiB spread over each, so a few MiB are read even for T5-XXL.
    Different weights differ everywhere, so this tells two models' weights apart; it is not a cryptographic hash of
    every byte. None when the files are not on this machine (a Hub model not yet downloaded): the check is then
    skipped."""
    folder = _local_component(pretrained, subfolder)
    if folder is None:
        return None
    variant = pretrained.variant
    files = sorted(p for p in folder.iterdir() if (m := _WEIGHT_FILE.match(p.name)) and m.group("variant") == variant)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            for index in range(DIGEST_SAMPLES):
                f.seek(size * index // DIGEST_SAMPLES)
                digest.update(f.read(DIGEST_CHUNK))
    return digest.hexdigest()


def _local_component(pretrained, subfolder):
    path = pretrained.path
    if Path(path).is_dir():
        return Path(path) / subfolder if (Path(path) / subfolder).is_dir() else None
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(path, revision=pretrained.revision, cache_dir=pretrained.cache_dir,
                                 allow_patterns=[f"{subfolder}/*"], local_files_only=True)
    except Exception:  # not in the cache (or not a Hub id): nothing to read
        return None
    return Path(root) / subfolder if (Path(root) / subfolder).is_dir() else None


def component_digests(pretrained):
    return {"vae": weights_digest(pretrained, "vae"), "text_encoder": weights_digest(pretrained, "text_encoder")}


def readable_entry(path):
    """True for a complete safetensors file (a truncated one has an unreadable header or short data)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            return bool(keys) and f.get_slice(keys[-1]) is not None
    except Exception:
        return False


def original_folder_hint(data_root):
    """The line for a folder without a manifest that the original cogvideox-factory's prepare_dataset.py wrote (its
    lists and .pt tensors), else None."""
    folder = Path(data_root)
    if all((folder / name).exists() for name in ("prompts.txt", "videos.txt", "video_latents", "prompt_embeds")):
        return (f"--load_tensors: {folder} was written by the original cogvideox-factory's prepare_dataset.py (.pt "
                f"tensors, no manifest.json); convert it once, nothing is encoded again: python tools/import_prepared.py "
                f"--prepared {folder} --model_id <the model it was encoded with>")
    return None


def load_manifest(data_root):
    path = Path(data_root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"--load_tensors: cannot read {path} ({error}); re-run prepare_dataset.py") from error
    if manifest.get("format") != FORMAT:
        raise UsageError(f"--load_tensors: {path} is not a manifest of this toolkit (format {manifest.get('format')})")
    return manifest


def _encoder_problems(manifest, pretrained, where):
    """The latents and embeddings must come from the VAE and T5 of this model (`pretrained`, a models.Pretrained): the
    same architecture (the VAE's scaling factor aside: training applies its own) and, where both sides' files are on
    this machine, the same weights."""
    settings, model = manifest["settings"], manifest["model"]
    made_with = f"re-run prepare_dataset.py with --model_id {pretrained.path}"
    if pretrained.variant:
        made_with += f" --variant {pretrained.variant}"
    problems = []
    if settings.get("vae_config") is not None and moment_config(settings["vae_config"]) != moment_config(vae_fingerprint(pretrained)):
        problems.append(f"{where}: latents were made by the VAE of {model['path']}, which differs from this model's; {made_with}")
    if settings.get("text_encoder_config") is not None and settings["text_encoder_config"] != text_encoder_fingerprint(pretrained):
        problems.append(f"{where}: prompts were embedded by the text encoder of {model['path']}, which differs; {made_with}")
    if problems:
        return problems
    ours, theirs = component_digests(pretrained), model.get("weights") or {}
    for component, what in (("vae", "latents were made by the VAE"), ("text_encoder", "prompts were embedded by the text encoder")):
        if ours[component] and theirs.get(component) and ours[component] != theirs[component]:
            problems.append(f"{where}: {what} of {model['path']}, whose weights differ from this model's; {made_with}")
    return problems


def manifest_problems(manifest, transformer_config, conditioning, pretrained, data):
    """Why the prepared data cannot train this model (`pretrained`, a models.Pretrained, for its encoders) with these
    flags ([data]: --data_root, --id_token, --caption_dropout_rate) (empty list: it can)."""
    problems = []
    settings, model = manifest["settings"], manifest["model"]
    where = f"--load_tensors {data.data_root}"
    if settings["max_sequence_length"] != transformer_config["max_text_seq_length"]:
        problems.append(
            f"{where}: prompts were embedded with --max_sequence_length {settings['max_sequence_length']} but the "
            f"model takes {transformer_config['max_text_seq_length']}; re-run prepare_dataset.py with "
            f"--max_sequence_length {transformer_config['max_text_seq_length']}"
        )
    if model["text_embed_dim"] != transformer_config["text_embed_dim"]:
        problems.append(
            f"{where}: prompt embeddings have width {model['text_embed_dim']}, the model expects "
            f"{transformer_config['text_embed_dim']}: they were made with another text encoder ({model['path']})"
        )
    if model["latent_channels"] != transformer_config["out_channels"]:
        problems.append(
            f"{where}: latents have {model['latent_channels']} channels, the model expects "
            f"{transformer_config['out_channels']}: they were made with another VAE ({model['path']})"
        )
    problems.extend(_encoder_problems(manifest, pretrained, where))
    if conditioning.image_to_video and not settings.get("image_latents"):
        problems.append(f"{where}: no image latents; re-run prepare_dataset.py with --save_image_latents" if
                        "imported_from" not in settings else f"{where}: imported from a folder the original "
                        "prepared without --save_image_latents (no images/, image_latents/): it trains text-to-video "
                        "only; prepare the clips with training/prepare_dataset.py --save_image_latents")
    token = (data.id_token or "").strip()
    if token and not all(e["caption"].startswith(token) for e in manifest["entries"]):
        problems.append(
            f"--id_token {token}: the prepared captions do not start with it (prompts are embedded by "
            f"prepare_dataset.py); re-run it with --id_token {token}, or drop --id_token here"
        )
    if data.caption_dropout_rate > 0:
        problems.extend(_empty_prompt_problems(manifest, data, where))
    if not manifest["entries"]:
        problems.append(f"{where}: the manifest lists no prepared sample")
    for frames, height, width in sorted({tuple(e["bucket"]) for e in manifest["entries"]}):
        problem = frame_rule_problem(frames, transformer_config)
        if problem:
            problems.append(f"{where}: prepared bucket {frames}x{height}x{width}: {problem}")
    missing = [e["file"] for e in manifest["entries"] if not (Path(data.data_root) / e["file"]).is_file()]
    if missing:
        problems.append(f"{where}: {len(missing)} prepared file(s) missing, e.g. {missing[0]}; re-run prepare_dataset.py")
    broken = [e["file"] for e in manifest["entries"]
              if e["file"] not in missing and not readable_entry(Path(data.data_root) / e["file"])]
    if broken:
        problems.append(
            f"{where}: {len(broken)} prepared file(s) truncated or corrupt, e.g. {broken[0]}; re-run "
            "prepare_dataset.py with the same flags (it recomputes exactly those)"
        )
    return problems


def _empty_prompt_problems(manifest, data, where):
    """--caption_dropout_rate with prepared data trains dropped samples on the empty prompt's embedding, which
    prepare_dataset.py stores once; a folder prepared before caption dropout existed has none."""
    rerun = ("re-run prepare_dataset.py with the same flags (it reuses every entry and embeds only the empty prompt), "
             "or drop --caption_dropout_rate")
    name, flag = manifest.get("empty_prompt"), f"--caption_dropout_rate {data.caption_dropout_rate:g}"
    if not name and "imported_from" in manifest["settings"]:
        return [f"{flag}: {where} was imported from the original's prepare_dataset.py, which stored no embedding of the "
                "empty prompt; run tools/import_prepared.py again with --embed_empty_prompt (its T5 embeds only that), "
                "or drop --caption_dropout_rate"]
    if not name:
        return [f"{flag}: {where} holds no embedding of the empty prompt (prepared before caption dropout existed); "
                f"{rerun}"]
    if not readable_entry(Path(data.data_root) / name):
        return [f"{flag}: {where}: {name} is missing or truncated; {rerun}"]
    return []
