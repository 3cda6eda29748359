"""Start-up of the text-to-video LoRA trainer from prepared data: seconds from process start to the end of the first
optimizer step, optionally side by side with the original cogvideox-factory's trainer on the same model and flags.

    python benchmarks/benchmark_startup.py                                   # ours only, medium model, 8 clips
    python benchmarks/benchmark_startup.py --original /path/to/cogvideox-factory/training/cogvideox_text_to_video_lora.py \\
        --original_pythonpath /tmp/origdeps --repeats 3

Needs no download: the clips and the "medium" random pipeline are those of `benchmark_prepare.py` (same
`--work_dir` reuses them). Each implementation first prepares the clips with its own `prepare_dataset.py` (once,
kept in the work folder), then trains one step with `--load_tensors` (batch 1, fp32, no validation, no
checkpoint, no tracker). The first step ends when the trainer's step bar shows 1/1 (both update it right after the
optimizer step); the time to exit (LoRA saved) is reported beside it. Runs alternate (ours, original, original,
ours, ...) so that drift on a shared machine touches both alike.

The original runs unchanged, except that on a machine without CUDA the `torch.cuda` calls it makes unconditionally
(`synchronize`, the memory statistics) become no-ops, as `benchmark_prepare.py` does for its prepare script.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.benchmark_prepare import DATA_FLAGS, ROOT, original_command, run_once, work_folder  # noqa: E402


TRAIN_FLAGS = ["--caption_column", "prompts.txt", "--video_column", "videos.txt", "--height_buckets", "64", "96",
               "--width_buckets", "96", "128", "--frame_buckets", "17", "--max_num_frames", "17", "--load_tensors",
               "--dataloader_num_workers", "0", "--seed", "42", "--rank", "16", "--lora_alpha", "16",
               "--mixed_precision", "no", "--train_batch_size", "1", "--max_train_steps", "1",
               "--checkpointing_steps", "1000", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-4",
               "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--optimizer", "adamw"]

# The step bar after its first update: ours says "steps", the original "Steps".
FIRST_STEP = re.compile(rb"[Ss]teps: +100%[^\r\n]*\| 1/1 ")

ORIGINAL_RUNNER = '''import runpy, sys
import torch
if not torch.cuda.is_available():  # called unconditionally by the original; they raise on a machine without CUDA
    for name in ("synchronize", "reset_peak_memory_stats", "reset_accumulated_memory_stats"):
        setattr(torch.cuda, name, lambda *args, **kwargs: None)
    for name in ("memory_allocated", "max_memory_allocated", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *args, **kwargs: 0)
sys.path.insert(0, {folder!r})
sys.argv = [{path!r}] + sys.argv[1:]
runpy.run_path({path!r}, run_name="__main__")
'''


def prepared(kind, command, folder, env, log):
    """The clips prepared by `command` in `folder` (kept across runs of this script)."""
    done = folder / ("manifest.json" if kind == "ours" else "data.jsonl")
    if not done.is_file():
        print(f"preparing the clips with {kind}'s prepare_dataset.py", flush=True)
        run_once(kind, [*command, "--output_dir", str(folder)], folder, env, log)
    return folder


def time_to_first_step(kind, command, env, log):
    """(seconds to the end of the first optimizer step, seconds to exit) of one run, its output kept in `log`."""
    started = time.perf_counter()
    first_step = None
    with open(log, "wb") as stream:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        seen = b""
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            stream.write(chunk)
            if first_step is None:
                seen = seen[-4096:] + chunk
                if FIRST_STEP.search(seen):
                    first_step = time.perf_counter() - started
        returncode = process.wait()
    total = time.perf_counter() - started
    if returncode != 0 or first_step is None:
        raise SystemExit(f"{kind} failed (exit {returncode}) or never finished a step; its output is in {log}:\n"
                         + Path(log).read_text(errors="replace")[-3000:])
    return first_step, total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_clips", type=int, default=8)
    parser.add_argument("--model", default=None, help="A CogVideoX pipeline folder (default: build the medium one).")
    parser.add_argument("--original", default=None,
                        help="The original's training/cogvideox_text_to_video_lora.py (its prepare_dataset.py is "
                             "taken from the same folder).")
    parser.add_argument("--original_pythonpath", default=None, help="Extra PYTHONPATH for the original (torchvision).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each implementation (alternating).")
    parser.add_argument("--work_dir", default=None, help="Where clips, model and outputs go (default: a temp dir).")
    parser.add_argument("--output", default=None, help="Append every run as a JSON line to this file.")
    args = parser.parse_args(argv)

    work, data, model, env = work_folder(args.work_dir, args.num_clips, args.model, "benchmark-startup-")
    prepare_flags = ["--model_id", str(model), "--data_root", str(data), *DATA_FLAGS]
    train_flags = ["--pretrained_model_name_or_path", str(model), *TRAIN_FLAGS]
    trainers, envs = {"ours": [sys.executable, str(ROOT / "training" / "cogvideox_text_to_video_lora.py")]}, {}
    envs["ours"] = env
    data_roots = {"ours": prepared("ours", [sys.executable, str(ROOT / "training" / "prepare_dataset.py"),
                                            *prepare_flags], work / f"startup-prepared-ours-{args.num_clips}", env,
                                   work / "startup-prepare-ours.log")}
    if args.original:
        original = Path(args.original).resolve()
        envs["original"] = dict(env, PYTHONPATH=os.pathsep.join(
            p for p in (args.original_pythonpath, env.get("PYTHONPATH")) if p))
        data_roots["original"] = prepared(
            "original", original_command(original.parent / "prepare_dataset.py", prepare_flags),
            work / f"startup-prepared-original-{args.num_clips}", envs["original"], work / "startup-prepare-original.log")
        trainers["original"] = [sys.executable, "-c",
                                ORIGINAL_RUNNER.format(folder=str(original.parent), path=str(original))]
    kinds = list(trainers)
    rows = []
    for repeat in range(args.repeats):
        for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
            output = work / f"startup-out-{kind}"
            command = [*trainers[kind], *train_flags, "--data_root", str(data_roots[kind]), "--output_dir", str(output)]
            first_step, total = time_to_first_step(kind, command, envs[kind], work / f"startup-{kind}-{repeat}.log")
            row = {"implementation": kind, "repeat": repeat, "first_step_s": round(first_step, 2),
                   "exit_s": round(total, 2)}
            if kind == "ours":
                row["phases_s"] = json.loads((output / "summary.json").read_text()).get("startup_seconds")
            rows.append(row)
            print(f"  {kind:8s} run {repeat + 1}: first step at {first_step:.1f} s, exit at {total:.1f} s", flush=True)
            if args.output:
                with open(args.output, "a") as f:
                    f.write(json.dumps({**row, "command": command}) + "\n")

    median = {k: statistics.median(r["first_step_s"] for r in rows if r["implementation"] == k) for k in kinds}
    print("\n| implementation | runs: first step (s, from process start) | median | / original | runs: exit (s) |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        runs = [r for r in rows if r["implementation"] == kind]
        ratio = f"{median[kind] / median['original']:.2f}x" if "original" in median else "-"
        print(f"| {kind} | {', '.join(format(r['first_step_s'], '.1f') for r in runs)} | {median[kind]:.1f} | "
              f"{ratio} | {', '.join(format(r['exit_s'], '.1f') for r in runs)} |")
    ours = [r for r in rows if r["implementation"] == "ours"]
    if ours and ours[-1].get("phases_s"):
        print("\nours, by phase (its summary.json, last run):",
              ", ".join(f"{name} {seconds:.1f} s" for name, seconds in ours[-1]["phases_s"].items()))
    return rows


if __name__ == "__main__":
    main()
