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

With `--steps N` (say 27) each run trains N steps and the table adds the steady step: the median seconds per step
after the first two, with where they go (data, forward, backward, clipping, optimizer, the rest of the step), taken
by `benchmarks/step_profile.py` in both trainers alike (it wraps the library calls both make; neither trainer's
code changes). Side by side with the original:

    python benchmarks/benchmark_startup.py --num_clips 96 --steps 27 --repeats 3 \\
        --original /path/to/cogvideox-factory/training/cogvideox_text_to_video_lora.py \\
        --original_pythonpath /tmp/origdeps --work_dir /tmp/side-by-side
"""

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import step_profile  # noqa: E402
from benchmarks.benchmark_prepare import DATA_FLAGS, ROOT, original_command, run_once, work_folder  # noqa: E402


TRAIN_FLAGS = ["--caption_column", "prompts.txt", "--video_column", "videos.txt", "--height_buckets", "64", "96",
               "--width_buckets", "96", "128", "--frame_buckets", "17", "--max_num_frames", "17", "--load_tensors",
               "--dataloader_num_workers", "0", "--seed", "42", "--rank", "16", "--lora_alpha", "16",
               "--mixed_precision", "no", "--train_batch_size", "1",
               "--checkpointing_steps", "1000", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-4",
               "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--optimizer", "adamw"]

# The step bar after its first update: ours says "steps", the original "Steps".
FIRST_STEP = re.compile(rb"[Ss]teps: +\d+%[^\r\n]*\| 1/\d+ ")

ORIGINAL_RUNNER = '''import runpy, sys
import torch
{profile}if not torch.cuda.is_available():  # called unconditionally by the original; they raise on a machine without CUDA
    for name in ("synchronize", "reset_peak_memory_stats", "reset_accumulated_memory_stats"):
        setattr(torch.cuda, name, lambda *args, **kwargs: None)
    for name in ("memory_allocated", "max_memory_allocated", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *args, **kwargs: 0)
sys.path.insert(0, {folder!r})
sys.argv = [{path!r}] + sys.argv[1:]
runpy.run_path({path!r}, run_name="__main__")
'''
OURS_RUNNER = '''import runpy, sys
{profile}sys.path.insert(0, {folder!r})
sys.argv = [{path!r}] + sys.argv[1:]
runpy.run_path({path!r}, run_name="__main__")
'''
# Put before either runner's first line: the step clock of benchmarks/step_profile.py.
PROFILE = '''sys.path.insert(0, {root!r})
from benchmarks import step_profile
step_profile.install({path!r})
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


def print_steady_table(rows, kinds):
    """Median of the runs' steady s/step, and of each phase, per implementation."""
    median = {k: statistics.median(r["steady_step_s"] for r in rows if r["implementation"] == k) for k in kinds}
    phases = ("data", "forward", "backward", "clip", "optimizer", "other")
    print("\n| implementation | runs: steady s/step | median | / original | "
          + " | ".join(f"{p} (median s)" for p in phases) + " |")
    print("|---|---|---|---|" + "---|" * len(phases))
    for kind in kinds:
        runs = [r for r in rows if r["implementation"] == kind]
        ratio = f"{median[kind] / median['original']:.3f}x" if "original" in median else "-"
        cells = [statistics.median(r["steady_phases_s"][p] for r in runs) for p in phases]
        print(f"| {kind} | {', '.join(format(r['steady_step_s'], '.3f') for r in runs)} | {median[kind]:.3f} | "
              f"{ratio} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_clips", type=int, default=8)
    parser.add_argument("--model", default=None, help="A CogVideoX pipeline folder (default: build the medium one).")
    parser.add_argument("--original", default=None,
                        help="The original's training/cogvideox_text_to_video_lora.py (its prepare_dataset.py is "
                             "taken from the same folder).")
    parser.add_argument("--original_pythonpath", default=None, help="Extra PYTHONPATH for the original (torchvision).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each implementation (alternating).")
    parser.add_argument("--steps", type=int, default=1,
                        help="Steps per run; above 2, the steady step is measured and profiled (see --help's top).")
    parser.add_argument("--work_dir", default=None, help="Where clips, model and outputs go (default: a temp dir).")
    parser.add_argument("--output", default=None, help="Append every run as a JSON line to this file.")
    args = parser.parse_args(argv)

    work, data, model, env = work_folder(args.work_dir, args.num_clips, args.model, "benchmark-startup-")
    prepare_flags = ["--model_id", str(model), "--data_root", str(data), *DATA_FLAGS]
    train_flags = ["--pretrained_model_name_or_path", str(model), *TRAIN_FLAGS, "--max_train_steps", str(args.steps)]
    profiled = args.steps > 2

    def runner(template, folder, path, profile_path):
        profile = PROFILE.format(root=str(ROOT), path=str(profile_path)) if profiled else ""
        return [sys.executable, "-c", template.format(folder=str(folder), path=str(path), profile=profile)]

    trainers, envs = {"ours": functools.partial(
        runner, OURS_RUNNER, ROOT / "training", ROOT / "training" / "cogvideox_text_to_video_lora.py")}, {}
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
        trainers["original"] = functools.partial(runner, ORIGINAL_RUNNER, original.parent, original)
    kinds = list(trainers)
    rows = []
    for repeat in range(args.repeats):
        for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
            output = work / f"startup-out-{kind}"
            profile_path = work / f"steps-{kind}-{repeat}.json"
            command = [*trainers[kind](profile_path), *train_flags, "--data_root", str(data_roots[kind]),
                       "--output_dir", str(output)]
            first_step, total = time_to_first_step(kind, command, envs[kind], work / f"startup-{kind}-{repeat}.log")
            row = {"implementation": kind, "repeat": repeat, "first_step_s": round(first_step, 2),
                   "exit_s": round(total, 2)}
            if profiled:
                steps = json.loads(profile_path.read_text())["steps"]
                if len(steps) != args.steps:
                    raise SystemExit(f"{kind} took {len(steps)} optimizer steps, not {args.steps}")
                phases, used = step_profile.summary(steps)
                row.update(steady_step_s=round(phases["wall"], 4), steady_steps=used,
                           steady_phases_s={k: round(v, 4) for k, v in phases.items() if k != "wall"})
            if kind == "ours":
                row["phases_s"] = json.loads((output / "summary.json").read_text()).get("startup_seconds")
            rows.append(row)
            steady = f", steady step {row['steady_step_s']:.3f} s" if profiled else ""
            print(f"  {kind:8s} run {repeat + 1}: first step at {first_step:.1f} s, exit at {total:.1f} s{steady}",
                  flush=True)
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
    if profiled:
        print_steady_table(rows, kinds)
    ours = [r for r in rows if r["implementation"] == "ours"]
    if ours and ours[-1].get("phases_s"):
        print("\nours, by phase (its summary.json, last run):",
              ", ".join(f"{name} {seconds:.1f} s" for name, seconds in ours[-1]["phases_s"].items()))
    return rows


if __name__ == "__main__":
    main()
