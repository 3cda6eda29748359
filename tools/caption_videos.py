"""Caption a folder of video clips (and still images) with a vision-language model, for training.

Each clip is decoded with PyAV, a few frames evenly spaced over it are shown to the model (as a video where the
processor takes videos, else as several images), and the answer becomes the clip's caption, on one line. Output:

- `--output lists` (default): `prompts.txt` and `videos.txt` in --output_dir (default: --input_dir), one line per
  clip, in the same order: train with `--data_root DIR --caption_column prompts.txt --video_column videos.txt`.
  Progress is kept in `captions.jsonl` beside them (appended after each batch), so a killed run continues.
- `--output beside`: `clip.txt` next to `clip.mp4`, the "captions beside files" layout (`--data_root DIR`).

Clips that already have a caption are skipped unless --overwrite. An unreadable clip is reported and skipped.

    python tools/caption_videos.py --input_dir my-clips
    python tools/caption_videos.py --input_dir my-clips --output beside --id_token BW_STYLE --num_frames 16

See assets/captioning.md.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path


if __package__ in (None, ""):  # run as a script: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.args import UsageError, exit_on_usage_error  # noqa: E402
from training.sections import section_classes, section_of  # noqa: E402


# The trainer's media (training/layouts.py; not imported here, as it imports torch and --help should be fast).
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_PROMPT = (
    "Describe this video in one paragraph, as a caption for training a text-to-video model: the main subject and "
    "what it looks like, what moves and how, the setting, the camera (angle, framing, movement) and the visual style "
    "(lighting, colours, realistic or animated). Start directly with the description: no preamble such as "
    "\"The video shows\", no lists, no line breaks."
)
PROGRESS_FILE = "captions.jsonl"
LISTS = ("prompts.txt", "videos.txt")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="Folder of clips and stills (sub-folders included).")
    parser.add_argument("--model_name_or_path", default=DEFAULT_MODEL,
                        help="Hub id or local folder of a vision-language model (AutoModelForImageTextToText).")
    parser.add_argument("--output", choices=("lists", "beside"), default="lists",
                        help="lists: prompts.txt + videos.txt; beside: a caption file next to each clip.")
    parser.add_argument("--output_dir", help="lists: where prompts.txt/videos.txt go (default: --input_dir).")
    parser.add_argument("--caption_extension", default=".txt", help="beside: the caption file's extension.")
    parser.add_argument("--num_frames", type=int, default=8, help="Frames shown per clip, evenly spaced.")
    parser.add_argument("--batch_size", type=int, default=4, help="Clips per generate call.")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--prompt_template", default=DEFAULT_PROMPT,
                        help="The instruction given with each clip, or @file.txt to read it from a file.")
    parser.add_argument("--id_token", help="Trigger word put before every caption (and a space).")
    parser.add_argument("--overwrite", action="store_true", help="Caption again clips that already have a caption.")
    parser.add_argument("--max_clips", type=int, help="Caption at most this many clips in this run (a rerun goes on).")
    parser.add_argument("--device", help="Default: cuda if available, else cpu.")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="Default: bf16 on CUDA, fp32 on the CPU.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding (reproducible).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--use_vllm", choices=("auto", "yes", "no"), default="auto",
                        help="auto: vLLM when it is installed and a CUDA device is present, else transformers.")
    return parser


# This tool's flags, one section (training/sections.py): what its functions are given once they are parsed.
CaptionFlags = section_classes(build_parser(), "caption")["caption"]


# ----------------------------------------------------------------------------------------------
# The plan: what to caption, checked before any model loads
# ----------------------------------------------------------------------------------------------


def find_media(folder):
    """Videos and stills under `folder`, sorted, sub-folders included, hidden files and folders left out."""
    suffixes = VIDEO_SUFFIXES + IMAGE_SUFFIXES
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_template(value):
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text(encoding="utf-8")
        except OSError as error:
            raise UsageError(f"--prompt_template {value}: cannot read it ({error.strerror})") from error
    if not value.strip():
        raise UsageError("--prompt_template is empty")
    return value.strip()


@dataclass(frozen=True)
class Plan:
    """What `check_args` makes of the flags: the folders as paths, the caption file extension with its dot, the
    instruction (--prompt_template, read), the clips and stills to caption, and whether vLLM generates."""

    input_dir: Path
    output_dir: Path  # lists: where prompts.txt and videos.txt go (--output_dir, else --input_dir)
    caption_extension: str
    prompt: str
    media: list
    use_vllm: bool


def check_args(flags):
    """The Plan of these flags (a CaptionFlags); UsageError for bad flags or an empty folder."""
    problems = [f"--{flag} must be 1 or more" for flag, value in (("num_frames", flags.num_frames),
                                                                  ("batch_size", flags.batch_size),
                                                                  ("max_new_tokens", flags.max_new_tokens))
                if value < 1]
    if flags.max_clips is not None and flags.max_clips < 0:
        problems.append("--max_clips must be 0 or more")
    extension = flags.caption_extension if flags.caption_extension.startswith(".") else "." + flags.caption_extension
    if extension.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        problems.append(f"--caption_extension {extension} is a media extension: it would overwrite clips")
    input_dir = Path(flags.input_dir)
    if not input_dir.is_dir():
        problems.append(f"--input_dir {input_dir}: no such folder")
    if flags.output == "beside" and flags.output_dir:
        problems.append("--output_dir is for --output lists (--output beside writes each caption next to its clip)")
    if problems:
        raise UsageError(problems)
    prompt = read_template(flags.prompt_template)
    output_dir = Path(flags.output_dir) if flags.output_dir else input_dir
    media = find_media(input_dir)
    if not media:
        raise UsageError(f"--input_dir {input_dir}: no videos ({' '.join(VIDEO_SUFFIXES)}) or images "
                         f"({' '.join(IMAGE_SUFFIXES)}) in this folder or its sub-folders")
    if flags.output == "lists" and not flags.overwrite and not (output_dir / PROGRESS_FILE).is_file():
        foreign = [name for name in LISTS if (output_dir / name).is_file()]
        if foreign:
            raise UsageError(f"{output_dir / foreign[0]} exists and this tool did not write it (no "
                             f"{PROGRESS_FILE} beside it): pass --overwrite to replace it, or another --output_dir")
    return Plan(input_dir, output_dir, extension, prompt, media, resolve_vllm(flags.use_vllm, flags.device))


def resolve_vllm(choice, device):
    """True to generate with vLLM: `yes`, or `auto` with vLLM importable and a CUDA device."""
    import importlib.util

    if choice == "no" or (choice == "auto" and importlib.util.find_spec("vllm") is None):
        return False
    try:
        import vllm  # noqa: F401
    except Exception as error:  # ImportError, or a broken install failing at import
        if choice == "yes":
            raise UsageError(f"--use_vllm yes: vLLM cannot be imported ({type(error).__name__}: {one_line(str(error))}); "
                             "pip install vllm, or --use_vllm no") from error
        return False
    import torch

    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if choice == "yes" and not cuda:
        raise UsageError("--use_vllm yes needs a CUDA device")
    return cuda


# ----------------------------------------------------------------------------------------------
# Where captions are kept: the progress file (lists) or the files beside the clips
# ----------------------------------------------------------------------------------------------


class ListsStore:
    """captions.jsonl ({"video": path relative to --output_dir, "caption": ...} per clip), written as captions come;
    prompts.txt and videos.txt are rewritten from it at the end, in the folder's order."""

    def __init__(self, output_dir, id_token, overwrite):
        self.root, self.id_token = output_dir, id_token
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / PROGRESS_FILE
        # --overwrite starts the file afresh, but only with the first new captions: a model that fails to load
        # loses nothing.
        self.start_afresh = overwrite
        self.captions = {} if overwrite else self._read()
        if not overwrite:  # rewritten whole (a line cut by a kill goes), through a new file: a kill loses nothing
            fresh = self.path.with_name(PROGRESS_FILE + ".new")
            fresh.write_text("".join(json.dumps({"video": k, "caption": v}, ensure_ascii=False) + "\n"
                                     for k, v in self.captions.items()), encoding="utf-8")
            os.replace(fresh, self.path)

    def _read(self):
        captions = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    captions[record["video"]] = record["caption"]
                except (ValueError, KeyError, TypeError):
                    continue  # the last line of a killed run
        return captions

    def key(self, clip):
        return Path(os.path.relpath(clip, self.root)).as_posix()

    def has(self, clip):
        return bool(self.captions.get(self.key(clip)))

    def add(self, pairs):
        with open(self.path, "w" if self.start_afresh else "a", encoding="utf-8") as f:
            self.start_afresh = False
            for clip, caption in pairs:
                self.captions[self.key(clip)] = caption
                f.write(json.dumps({"video": self.key(clip), "caption": caption}, ensure_ascii=False) + "\n")
            f.flush()

    def finish(self, media):
        done = [self.key(clip) for clip in media if self.has(clip)]
        prefix = f"{self.id_token.strip()} " if self.id_token else ""
        prompts = "".join(f"{prefix}{self.captions[k]}\n" for k in done)
        (self.root / "prompts.txt").write_text(prompts, encoding="utf-8")
        (self.root / "videos.txt").write_text("".join(f"{k}\n" for k in done), encoding="utf-8")
        return f"wrote {len(done)} lines to {self.root / 'prompts.txt'} and {self.root / 'videos.txt'}"


class BesideStore:
    """clip.txt (--caption_extension) next to clip.mp4; a non-empty one counts as a caption."""

    def __init__(self, caption_extension, id_token, overwrite):
        self.extension, self.id_token, self.overwrite = caption_extension, id_token, overwrite

    def caption_file(self, clip):
        return clip.with_suffix(self.extension)

    def has(self, clip):
        file = self.caption_file(clip)
        if self.overwrite or not file.is_file():
            return False
        return bool(file.read_text(encoding="utf-8", errors="replace").strip())

    def add(self, pairs):
        prefix = f"{self.id_token.strip()} " if self.id_token else ""
        for clip, caption in pairs:
            self.caption_file(clip).write_text(f"{prefix}{caption}\n", encoding="utf-8")

    def finish(self, media):
        count = sum(1 for clip in media if self.caption_file(clip).is_file())
        return f"{count} of the {len(media)} clips have a caption file ({self.extension}) beside them"


def clashing_caption_files(media, store):
    """beside: clips whose caption file is an earlier clip's (clip.mp4 and clip.png share clip.txt)."""
    owners, clashes = {}, {}
    for clip in media:
        owner = owners.setdefault(store.caption_file(clip), clip)
        if owner != clip:
            clashes[clip] = f"its caption file {store.caption_file(clip).name} is also {owner.name}'s"
    return clashes


# ----------------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------------


@dataclass
class Clip:
    path: Path
    frames: list  # PIL images (one for a still)
    is_still: bool
    metadata: dict = None  # videos: what the processor needs to time the frames


def frame_indices(total, count):
    """`count` frames evenly spaced over `total` (the middle of equal parts), fewer if the clip is shorter."""
    return sorted({min(total - 1, int((i + 0.5) * total / count)) for i in range(count)})


def read_clip(path, num_frames):
    """A Clip, or VideoReadError (one line) for a file that cannot be read."""
    from PIL import Image, ImageOps

    from training.video_io import VideoReadError, probe_video

    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            with Image.open(path) as image:
                return Clip(path, [ImageOps.exif_transpose(image).convert("RGB")], is_still=True)
        except Exception as error:  # PIL raises many error types for broken files
            raise VideoReadError(f"{path}: cannot read as an image ({type(error).__name__}: {error})") from error
    info = probe_video(path)
    indices = frame_indices(info.num_frames, num_frames)
    frames = decode_frames(path, indices)
    metadata = {"total_num_frames": info.num_frames, "fps": info.fps or None, "frames_indices": indices,
                "width": info.width, "height": info.height}
    return Clip(path, frames, is_still=False, metadata=metadata)


def decode_frames(path, indices):
    import av

    from training.video_io import VideoReadError

    wanted, frames = set(indices), []
    try:
        with av.open(str(path)) as container:
            container.streams.video[0].thread_type = "AUTO"
            for position, frame in enumerate(container.decode(video=0)):
                if position in wanted:
                    frames.append(frame.to_image())
                if position >= indices[-1]:
                    break
    except Exception as error:  # av raises many error types for corrupt files
        raise VideoReadError(f"{path}: decoding failed ({type(error).__name__}: {error})") from error
    if len(frames) < len(indices):
        raise VideoReadError(f"{path}: only {len(frames)} of the {len(indices)} frames wanted could be decoded "
                             "(file truncated?)")
    return frames


def read_batches(paths, num_frames, batch_size):
    """Yields [(path, Clip or error line)] per batch, the next batch decoding in a thread while the model works."""
    from concurrent.futures import ThreadPoolExecutor

    def read(batch):
        out = []
        for path in batch:
            try:
                out.append((path, read_clip(path, num_frames)))
            except Exception as error:  # VideoReadError (names the file), or anything a broken file raises
                message = str(error) if str(path) in str(error) else f"{path}: {type(error).__name__}: {error}"
                out.append((path, one_line(message)))
        return out

    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, batches[0]) if batches else None
        for position in range(len(batches)):
            current = pending.result()
            pending = pool.submit(read, batches[position + 1]) if position + 1 < len(batches) else None
            yield current


def one_line(text):
    """Whitespace (newlines, tabs, Unicode line separators) collapsed to single spaces; control characters dropped.
    A caption is one line of prompts.txt, so nothing in it may split a line."""
    import unicodedata

    text = "".join(c for c in text if c.isspace() or unicodedata.category(c) != "Cc")
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------


def conversation(clip, prompt, as_video):
    """One user turn: the clip (a video, or its frames as images) and the instruction."""
    if clip.is_still:
        media = [{"type": "image"}]
    else:
        media = [{"type": "video"}] if as_video else [{"type": "image"}] * len(clip.frames)
    return [{"role": "user", "content": [*media, {"type": "text", "text": prompt}]}]


def load_processor(path):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except ImportError as error:  # e.g. Qwen2-VL's video processor needs torchvision (transformers 5)
        needs = ("torchvision (pip install torchvision, the build that matches your torch)"
                 if "torchvision" in str(error).lower() else one_line(str(error)).split(". ")[0])
        raise UsageError(f"--model_name_or_path {path}: its processor needs a library that is not installed: "
                         f"{needs}") from error
    except (OSError, ValueError) as error:
        raise UsageError(f"--model_name_or_path {path}: cannot load its processor ({one_line(str(error))[:300]})") \
            from error
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
    return processor


class TransformersCaptioner:
    def __init__(self, flags, prompt):
        """`flags`: the tool's (CaptionFlags); `prompt`: the instruction given with each clip."""
        import torch
        import transformers
        from transformers import AutoModelForImageTextToText

        self.processor = load_processor(flags.model_name_or_path)
        self.device = flags.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = flags.dtype or ("bf16" if self.device.startswith("cuda") else "fp32")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(
                flags.model_name_or_path, device_map=self.device, **{dtype_key: self.dtype}).eval()
        except (OSError, ValueError) as error:
            raise UsageError(f"--model_name_or_path {flags.model_name_or_path}: cannot load the model "
                             f"({one_line(str(error))[:300]})") from error
        self.as_video = getattr(self.processor, "video_processor", None) is not None
        self.prompt = prompt
        if flags.temperature > 0:
            self.generate_kwargs = dict(do_sample=True, temperature=flags.temperature)
        else:  # greedy; the model's own sampling settings (Qwen's generation_config has some) are switched off
            self.generate_kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        self.generate_kwargs["max_new_tokens"] = flags.max_new_tokens

    def inputs(self, clips):
        import numpy as np

        texts, images, videos, metadata = [], [], [], []
        for clip in clips:
            texts.append(self.processor.apply_chat_template(conversation(clip, self.prompt, self.as_video),
                                                            add_generation_prompt=True, tokenize=False))
            if clip.is_still or not self.as_video:
                images.extend(clip.frames)
            else:
                videos.append(np.stack([np.asarray(frame) for frame in clip.frames]))
                metadata.append(clip.metadata)
        # The frames are already sampled; the metadata tells models that time their frames (Qwen2.5-VL) the fps.
        extra = {"videos": videos, "video_metadata": metadata, "do_sample_frames": False} if videos else {}
        return self.processor(text=texts, images=images or None, padding=True, return_tensors="pt", **extra)

    def __call__(self, clips, seed):
        import torch

        torch.manual_seed(seed)
        inputs = dict(self.inputs(clips).to(self.model.device))
        for key in [k for k in inputs if k.startswith("pixel_values")]:  # the pictures, in the model's dtype
            inputs[key] = inputs[key].to(self.dtype)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **self.generate_kwargs)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class VllmCaptioner:
    def __init__(self, flags, prompt):
        """`flags`: the tool's (CaptionFlags); `prompt`: the instruction given with each clip."""
        from transformers import AutoConfig
        from vllm import LLM

        self.processor = load_processor(flags.model_name_or_path)
        self.as_video = getattr(self.processor, "video_processor", None) is not None
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", None: "bfloat16"}[flags.dtype]
        config = AutoConfig.from_pretrained(flags.model_name_or_path)
        longest = getattr(config.get_text_config(), "max_position_embeddings", None) or 32768
        # A clip's tokens are a few thousand: 32k leaves KV-cache room for batches on a 24 GB GPU (the model's own
        # 128k context would not fit beside a 7B model there, and vLLM refuses to start).
        self.llm = LLM(model=flags.model_name_or_path, dtype=dtype, seed=flags.seed, max_model_len=min(longest, 32768),
                       limit_mm_per_prompt={"image": flags.num_frames, **({"video": 1} if self.as_video else {})})
        self.prompt, self.flags = prompt, flags

    def __call__(self, clips, seed):
        import numpy as np
        from vllm import SamplingParams

        requests = []
        for clip in clips:
            text = self.processor.apply_chat_template(conversation(clip, self.prompt, self.as_video),
                                                      add_generation_prompt=True, tokenize=False)
            if clip.is_still or not self.as_video:
                data = {"image": clip.frames if len(clip.frames) > 1 else clip.frames[0]}
            else:
                data = {"video": np.stack([np.asarray(f) for f in clip.frames])}
            requests.append({"prompt": text, "multi_modal_data": data})
        params = SamplingParams(temperature=self.flags.temperature, max_tokens=self.flags.max_new_tokens, seed=seed)
        return [result.outputs[0].text for result in self.llm.generate(requests, params, use_tqdm=False)]


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def caption(flags, plan, store, todo, skipped):
    """Caption `todo` batch by batch, saving after each; returns how many clips got a caption."""
    from tqdm import tqdm

    captioner = (VllmCaptioner if plan.use_vllm else TransformersCaptioner)(flags, plan.prompt)
    order = {clip: position for position, clip in enumerate(plan.media)}
    captioned = 0
    with tqdm(total=len(todo), unit="clip", desc="captioning", dynamic_ncols=True) as bar:
        for batch in read_batches(todo, flags.num_frames, flags.batch_size):
            clips = [item for _, item in batch if isinstance(item, Clip)]
            for path, problem in ((p, item) for p, item in batch if not isinstance(item, Clip)):
                report(bar, skipped, path, problem)
            texts = captioner(clips, flags.seed + order[clips[0].path]) if clips else []
            done = []
            for clip, text in zip(clips, texts):
                text = one_line(text)
                if text:
                    done.append((clip.path, text))
                else:
                    report(bar, skipped, clip.path, f"{clip.path}: the model returned an empty caption")
            store.add(done)
            captioned += len(done)
            bar.update(len(batch))
    return captioned


def count(number):
    return f"{number} clip{'' if number == 1 else 's'}"


def report(bar, skipped, path, problem):
    bar.write(f"error: {problem}", file=sys.stderr)
    skipped.append(path)


@exit_on_usage_error
def main(argv=None):
    flags = section_of(CaptionFlags, build_parser().parse_args(argv))
    plan = check_args(flags)
    if flags.output == "lists":
        store = ListsStore(plan.output_dir, flags.id_token, flags.overwrite)
    else:
        store = BesideStore(plan.caption_extension, flags.id_token, flags.overwrite)
    skipped = []
    if flags.output == "beside":
        for clip, problem in clashing_caption_files(plan.media, store).items():
            print(f"error: {clip}: skipped: {problem}", file=sys.stderr)
            skipped.append(clip)
    todo = [clip for clip in plan.media if clip not in skipped and not store.has(clip)]
    already = len(plan.media) - len(todo) - len(skipped)
    if flags.max_clips is not None:
        todo = todo[:flags.max_clips]
    print(f"{count(len(plan.media))} in {plan.input_dir}: {already} already captioned, {len(todo)} to caption")
    captioned = caption(flags, plan, store, todo, skipped) if todo else 0
    written = store.finish(plan.media)
    print(f"captioned {captioned}, skipped {already} (already captioned); {written}")
    if skipped:
        names = ", ".join(str(Path(os.path.relpath(p, plan.input_dir)).as_posix()) for p in skipped)
        print(f"{count(len(skipped))} skipped: {names}", file=sys.stderr)
    return {"captioned": captioned, "already": already, "skipped": [str(p) for p in skipped]}


if __name__ == "__main__":
    main()
