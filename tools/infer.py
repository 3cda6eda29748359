"""Generate videos with a CogVideoX pipeline (and a trained LoRA or full fine-tune) on one or many GPUs.

The prompts are shared out over the processes (`accelerate launch --num_processes N`, or the run_infer_*.sh
scripts): each process loads the pipeline once and generates its share. With --sequence_parallel_shards S, groups of
S processes generate each video together (its tokens split over them: training/attention.py), and the groups share
out the prompts. Every video is seeded by its place in the
prompt list (--seed + index), so a video comes out the same however many processes run. Output: one mp4 per prompt,
named after it (`003_a-panda-plays-the-guitar.mp4`), and `sheet.png`, a contact sheet of all of them.

    accelerate launch --num_processes 4 tools/infer.py --model_name_or_path THUDM/CogVideoX-5b \\
        --lora_path outputs/my-lora --prompts_file prompts.txt --output_dir videos
    python tools/infer.py --model_name_or_path THUDM/CogVideoX-5b-I2V --prompt "a cat wakes up" --image cat.png

CogVideoX-Fun models are recognised by their transformer's input channels: an InP model (2C + 1) starts from --image
and ends on --end_image if given (training/fun_inpaint_pipeline.py); a Control model (2C, like an image-to-video
model) follows --control_video (diffusers' CogVideoXFunControlPipeline). Both sample with DDIM, as Fun does.
"""

import argparse
import re
import sys
from pathlib import Path


if __package__ in (None, ""):  # run as a script: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.args import FlagHelpFormatter, UsageError, exit_on_usage_error  # noqa: E402
from training.sections import section_classes, section_of  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=FlagHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Hub id or local folder of a CogVideoX pipeline.")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--lora_path", help="A training run's folder (pytorch_lora_weights.safetensors, or adapter/ "
                         "of a LoHa or LoKr run) or the file.")
    weights.add_argument("--transformer_path", help="A full fine-tune's transformer folder (<run>/transformer).")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="1.0: the strength it was trained at.")
    parser.add_argument("--prompt", action="append", default=[], help="A prompt (repeat the flag for more).")
    parser.add_argument("--prompts_file", help="A text file, one prompt per line.")
    parser.add_argument("--image", action="append", default=[],
                        help="Image-to-video: the first frame, one per prompt (or one for all).")
    parser.add_argument("--images_file", help="Image-to-video: a text file, one image path per line.")
    parser.add_argument("--end_image", action="append", default=[],
                        help="CogVideoX-Fun InP models: the last frame, one per prompt (or one for all).")
    parser.add_argument("--control_video", action="append", default=[],
                        help="CogVideoX-Fun Control models: the control video (pose, depth, edges), one per prompt "
                        "(or one for all); its first --num_frames frames are followed.")
    parser.add_argument("--height", type=int, default=None, help="Default: the model's own size.")
    parser.add_argument("--width", type=int, default=None, help="Default: the model's own size.")
    parser.add_argument("--num_frames", type=int, default=None, help="Default: the model's own length.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps.")
    parser.add_argument("--guidance_scale", type=float, default=6.0, help="Classifier-free guidance scale.")
    parser.add_argument("--seed", type=int, default=42, help="Video i is made with seed + i.")
    parser.add_argument("--fps", type=int, default=8, help="Frame rate of the written mp4 files.")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="Precision of the pipeline (bf16 for 5b and 1.5, fp16 for 2b).")
    parser.add_argument("--enable_model_cpu_offload", action="store_true",
                        help="Keep each model on the CPU until it runs (less GPU memory, slower).")
    parser.add_argument("--sequence_parallel_shards", type=int, default=1,
                        help="Processes per video: each video's tokens are split over this many processes (sequence "
                        "parallelism, for long or large videos); the groups share out the prompts. Must divide the "
                        "processes, the attention heads and the video's tokens.")
    parser.add_argument("--output_dir", default="inference-output", help="Where the mp4 files are written.")
    from training.run_config import add_config_arguments

    add_config_arguments(parser)  # its settings: the [infer] section
    return parser


# This tool's flags, all one section ([infer] in a --config file): what its functions below take, as `infer`.
InferFlags = section_classes(build_parser(), "infer")["infer"]


def read_lines(path, flag):
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot read it ({error.strerror})") from error


def jobs(infer):
    """[(index, prompt, {pipeline input: path})] of the [infer] flags (the first frame, a Fun InP model's last, a Fun
    Control model's control video), checked before any model loads."""
    prompts = [*infer.prompt, *(read_lines(infer.prompts_file, "--prompts_file") if infer.prompts_file else [])]
    if not prompts:
        raise UsageError("give --prompt (one or more) or --prompts_file")
    given = {"image": [*infer.image, *(read_lines(infer.images_file, "--images_file") if infer.images_file else [])],
             "end_image": infer.end_image, "control_video": infer.control_video}
    problems = [f"{name.replace('_', ' ')} not found: {path}" for name, paths in given.items() for path in paths
                if not Path(path).is_file()]
    for name, paths in given.items():
        if paths and len(paths) not in (1, len(prompts)):
            problems.append(f"{len(paths)} --{name} for {len(prompts)} prompts: give one, or one per prompt")
    if problems:
        raise UsageError(problems)
    inputs = [{name: (paths * len(prompts) if len(paths) == 1 else paths)[i] for name, paths in given.items() if paths}
              for i in range(len(prompts))]
    return list(zip(range(len(prompts)), prompts, inputs))


def model_kind(infer, inputs):
    """"text-to-video", "image-to-video", "fun-inpaint" or "fun-control", from the transformer's input channels (its
    config is read, not its weights) and the inputs given; UsageError where they do not go together."""
    from training.models import Pretrained, read_config

    try:
        config = read_config(Pretrained(infer.model_name_or_path), "transformer")
    except OSError as error:
        raise UsageError(f"--model_name_or_path {infer.model_name_or_path}: no CogVideoX transformer there "
                         f"({str(error).splitlines()[0]})") from error
    channels, latent = config["in_channels"], config["out_channels"]
    given = set().union(*inputs) if inputs else set()
    kind = {latent: "text-to-video", 2 * latent: "image-to-video", 2 * latent + 1: "fun-inpaint"}.get(channels)
    if kind == "image-to-video" and "control_video" in given:
        kind = "fun-control"
    needs = {"image-to-video": {"image"}, "fun-inpaint": {"image"}, "fun-control": {"control_video"}}.get(kind, set())
    takes = needs | ({"end_image"} if kind == "fun-inpaint" else set())
    problems = [f"--{name}: a {kind} model ({channels} input channels) takes none" for name in sorted(given - takes)]
    problems += [f"a {kind} model ({channels} input channels) needs --{name}" for name in sorted(needs - given)]
    if kind is None:
        problems.append(f"--model_name_or_path {infer.model_name_or_path}: a transformer of {channels} input channels "
                        f"is no CogVideoX model this tool knows ({latent}, {2 * latent} or {2 * latent + 1})")
    if kind == "fun-control":  # the pipeline takes its frame count from the control video: it must have enough
        from training.conditioning import control_video_problem

        frames = infer.num_frames or config["sample_frames"]
        for path in sorted({job["control_video"] for job in inputs}):
            problem = control_video_problem(path, frames, "the videos", "--num_frames")
            if problem:
                problems.append(f"--control_video {problem}")
    if problems:
        raise UsageError(problems)
    return kind


def file_name(index, prompt):
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "video"
    return f"{index:03d}_{slug}.mp4"


def shard_problems(infer, num_processes):
    """--sequence_parallel_shards against the processes and the model's config (read, not its weights)."""
    shards = infer.sequence_parallel_shards
    if shards == 1:
        return []
    if shards < 1 or num_processes % shards:
        return [f"--sequence_parallel_shards {shards} must divide the {num_processes} process(es)"]
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    from training.attention import shard_problems as token_problems
    from training.models import vae_scale_factor_spatial

    config = CogVideoXTransformer3DModel.load_config(infer.model_name_or_path, subfolder="transformer")
    scale = vae_scale_factor_spatial(AutoencoderKLCogVideoX.load_config(infer.model_name_or_path, subfolder="vae"))
    height, width = video_size(infer, config, scale)
    frames = infer.num_frames or config["sample_frames"]
    return token_problems([(frames, height, width)], config, shards, what="video")


def load_pipeline(infer, kind, device):
    import diffusers
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from training.models import convolve_on_cpu_with_onednn
    from training.modes import peft_folder_of

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[infer.dtype]
    if kind == "fun-inpaint":
        from training.fun_inpaint_pipeline import CogVideoXFunInpaintPipeline as pipeline_class
    else:
        pipeline_class = getattr(diffusers, {"text-to-video": "CogVideoXPipeline",
                                             "image-to-video": "CogVideoXImageToVideoPipeline",
                                             "fun-control": "CogVideoXFunControlPipeline"}[kind])
    extra = {}
    if infer.transformer_path:
        extra["transformer"] = CogVideoXTransformer3DModel.from_pretrained(infer.transformer_path, torch_dtype=dtype)
    pipe = pipeline_class.from_pretrained(infer.model_name_or_path, torch_dtype=dtype, **extra)
    if kind.startswith("fun-"):  # Fun samples with DDIM (its predict scripts' default; the control pipeline's step
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)  # takes no DPM arguments)
    convolve_on_cpu_with_onednn(pipe.vae)  # decoding on a CPU: oneDNN for the small layers too (training/models.py)
    peft_folder = peft_folder_of(infer.lora_path) if infer.lora_path else None
    if peft_folder:  # a LoHa or LoKr run: diffusers does not load those
        from training.modes import load_peft_folder

        load_peft_folder(pipe.transformer, peft_folder, "lora")
        for module in pipe.transformer.modules():
            if "lora" in getattr(module, "scaling", {}):
                module.set_scale("lora", infer.lora_scale)  # peft's LoHa/LoKr: scale x alpha / rank
    elif infer.lora_path:
        path = Path(infer.lora_path)
        folder, name = (path.parent, path.name) if path.is_file() else (path, "pytorch_lora_weights.safetensors")
        pipe.load_lora_weights(str(folder), weight_name=name, adapter_name="lora")
        pipe.set_adapters(["lora"], [infer.lora_scale])
    if infer.enable_model_cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def video_size(infer, transformer_config, spatial_scale):
    """(height, width): as given (--height/--width of `infer`), else the size the model was trained at (for
    CogVideoX 1.5 not the pipelines' default, which would be 2400 x 2400)."""
    from training.models import default_video_size

    height, width = default_video_size(transformer_config, spatial_scale)
    return infer.height or height, infer.width or width


def generate(pipe, infer, prompt, inputs, index):
    """One video of `prompt` (with `inputs`: first frame, last frame, control video), generated as the [infer] flags
    say, seeded by --seed + index."""
    import torch
    from diffusers.utils import load_image, load_video

    height, width = video_size(infer, pipe.transformer.config, pipe.vae_scale_factor_spatial)
    frames = infer.num_frames or pipe.transformer.config.sample_frames
    sizes = dict(height=height, width=width)
    extra = {name: load_image(path) for name, path in inputs.items() if name != "control_video"}
    if "control_video" in inputs:  # the control pipeline takes its frame count from the control video
        extra["control_video"] = load_video(inputs["control_video"])[:frames]
    elif infer.num_frames:
        sizes["num_frames"] = infer.num_frames
    # prompt by name: CogVideoXImageToVideoPipeline takes the image first
    return pipe(prompt=prompt, num_inference_steps=infer.num_inference_steps, guidance_scale=infer.guidance_scale,
                max_sequence_length=pipe.transformer.config.max_text_seq_length, output_type="np",
                generator=torch.Generator().manual_seed(infer.seed + index), **sizes, **extra).frames[0]


@exit_on_usage_error
def main(argv=None):
    import os

    from accelerate import PartialState
    from diffusers.utils import export_to_video
    from tqdm.auto import tqdm

    from training.modes import peft_folder_of
    from training.run_config import parse_with_config

    infer = section_of(InferFlags, parse_with_config(build_parser(), argv, "infer"))
    work = jobs(infer)
    kind = model_kind(infer, [inputs for _, _, inputs in work])
    if infer.lora_path and not peft_folder_of(infer.lora_path):
        from tools.lora_math import read_lora

        read_lora(infer.lora_path)  # one line for a missing file, a folder without the LoRA, a file that is not one
    if infer.transformer_path and not (Path(infer.transformer_path) / "config.json").is_file():
        raise UsageError(f"--transformer_path {infer.transformer_path}: no transformer folder there (config.json and "
                         "weights, as a full fine-tune writes <run>/transformer)")
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads it
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:  # torchrun on a machine without GPUs, no ACCELERATE_USE_CPU
        raise UsageError(f"started as {launched} processes, but each runs alone (each would generate every video): "
                         "on a machine without GPUs set ACCELERATE_USE_CPU=true, or start with accelerate launch")
    problems = shard_problems(infer, state.num_processes)
    if problems:
        raise UsageError(problems)
    output = Path(infer.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(infer, kind, device=state.device)
    group, writes = state.process_index // infer.sequence_parallel_shards, True
    if infer.sequence_parallel_shards > 1:  # every process of a group generates the group's videos together
        from training.attention import build_shard_groups, install

        shards = build_shard_groups(infer.sequence_parallel_shards)
        install(pipe.transformer, shards)
        writes = shards.rank == 0
    groups = state.num_processes // infer.sequence_parallel_shards
    mine = work[group::groups]
    for index, prompt, inputs in tqdm(mine, desc=f"videos (process {state.process_index})", disable=len(mine) < 2):
        frames = generate(pipe, infer, prompt, inputs, index)
        if writes:
            export_to_video(list(frames), str(output / file_name(index, prompt)), fps=infer.fps)
    if infer.sequence_parallel_shards > 1 and writes:
        print(f"group {group}: {shards.sharded_calls} transformer calls sharded over {infer.sequence_parallel_shards} "
              "processes")
    state.wait_for_everyone()
    if state.is_main_process:
        import numpy as np
        from diffusers.utils import load_image, load_video

        from training.report import contact_sheet

        videos = [np.asarray(load_video(str(output / file_name(i, p)))) / 255.0 for i, p, _ in work]
        images = [load_image(inputs["image"]) for _, _, inputs in work if "image" in inputs]  # each row's first frame
        contact_sheet(videos, [p for _, p, _ in work], output / "sheet.png", images=images or None)
        print(f"{len(work)} video(s) and sheet.png in {output}")


if __name__ == "__main__":
    main()
