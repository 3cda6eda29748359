"""The memory estimate of every run config in presets/: each phase's peak against its card's budget.

A preset is read as the trainer reads it (`--config presets/<name>.toml`, the trainer's own parser), its placeholder
paths swapped for stand-ins, and estimated as `--dry_run` would on a GPU: the real training code on fake tensors
(training/memory_estimate.py), for the published model its `pretrained_model_name_or_path` names
(benchmark_training.MODELS: no weights, no download), at its largest bucket.

    python benchmarks/estimate_presets.py                    # the README's GPU table (a few minutes)
    python benchmarks/estimate_presets.py presets/2b-lora-12gb.toml

Budget: a card sold as G GB has G * 10^9 bytes; every phase must stay MARGIN_GIB below that (the CUDA context,
kernel workspaces and allocator fragmentation, which the estimate does not count: docs/memory.md).
"""

import argparse
import re
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESETS = ROOT / "presets"
MARGIN_GIB = 1.5
PHASES = ("training", "validation", "final_test")

# What a preset leaves for the user to fill in, and the stand-ins the estimate reads instead (the estimate opens
# none of them: it needs only that they parse).
PLACEHOLDERS = {
    "data_root": "path/to/prepared-data",
    "validation_images": "path/to/first_frame.png",
}


def presets():
    return sorted(PRESETS.glob("*.toml"))


def card_gb(path):
    """The card a preset is made for, from its name: 5b-lora-24gb.toml -> 24 (GB, as sold)."""
    match = re.search(r"-(\d+)gb$", Path(path).stem)
    if not match:
        raise ValueError(f"{path}: a preset's name ends in -<card size>gb")
    return int(match.group(1))


def budget_bytes(gb):
    return gb * 10**9 - MARGIN_GIB * 2**30


def header(path, field):
    """A preset's `# <field>: ...` header line (Card, Gives up), continued on the `#   ` lines below it."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"# {field}:"):
            text = [line.split(":", 1)[1].strip()]
            for more in lines[i + 1:]:
                if not more.startswith("#   "):
                    break
                text.append(more[1:].strip())
            return " ".join(text)
    raise ValueError(f"{path}: no '# {field}:' line in its header")


def preset_flags(path, stand_in_dir="."):
    """The trainer's flag sections (sections.RunFlags) of `--config path`, placeholders replaced by stand-ins under
    `stand_in_dir`."""
    from training.args import parse_args
    from training.sections import run_flags

    argv = ["--config", str(path)]
    for flag, placeholder in PLACEHOLDERS.items():
        if placeholder in Path(path).read_text(encoding="utf-8"):
            argv += [f"--{flag}", str(Path(stand_in_dir) / Path(placeholder).name)]
    return run_flags(parse_args(argv))


def model_of(flags):
    """(name in benchmark_training.MODELS, its ModelSpec) of the preset's Hub id."""
    from benchmarks.benchmark_training import MODELS

    for name, spec in MODELS.items():
        if spec.model_id == flags.model.pretrained_model_name_or_path:
            return name, spec
    raise ValueError(f"{flags.model.pretrained_model_name_or_path}: no published config in benchmark_training.MODELS")


def mode_of(path):
    return "sft" if "-sft-" in Path(path).stem else "lora"


def estimate_preset(path, stand_in_dir="."):
    """{"training": bytes, "validation": bytes, "final_test": bytes, "bucket": "FxHxW", ...} of one preset, with
    CUDA autocast's rules (a GPU run)."""
    return estimate_run(preset_flags(path, stand_in_dir), mode_of(path))


def estimate_run(flags, mode):
    """The same for any run's flag sections (sections.RunFlags) and mode ("lora" or "sft"), e.g. a sweep script's
    command."""
    import torch
    from transformers import T5Config

    from benchmarks.estimate_memory import T5_XXL
    from training.conditioning import CONDITIONINGS
    from training.memory_estimate import estimate_phases
    from training.modes import MODES

    _, spec = model_of(flags)
    buckets = [(f, h, w) for f in flags.buckets.frame_buckets for h in flags.buckets.height_buckets
               for w in flags.buckets.width_buckets]
    largest = max(buckets, key=lambda b: b[0] * b[1] * b[2])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(flags.training.mixed_precision, torch.float32)
    return estimate_phases(flags.data, flags.buckets, flags.training, flags.optimizer, flags.lora, flags.validation,
                           flags.memory, flags.parallelism, spec.transformer, spec.vae, T5Config(**T5_XXL),
                           CONDITIONINGS[spec.conditioning](), MODES[mode](), dtype,
                           {largest: flags.training.train_batch_size}, autocast="cuda")


def gib(value):
    return f"{value / 2**30:.1f}"


TABLE_HEADER = ("| your GPU | preset | trains | training (GiB) | validation (GiB) | final test (GiB) | budget (GiB) | "
                "gives up |\n|---|---|---|---|---|---|---|---|")


def table_row(path, phases):
    return (f"| {header(path, 'Card')} | [`{Path(path).name}`](presets/{Path(path).name}) | "
            f"{phases['bucket']} x {phases['batch_size']} | {gib(phases['training'])} | {gib(phases['validation'])} | "
            f"{gib(phases['final_test'])} | {gib(budget_bytes(card_gb(path)))} | {header(path, 'Gives up')} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="*", type=Path, help="Preset files (default: all of presets/).")
    options = parser.parse_args(argv)
    print(TABLE_HEADER)
    for path in options.presets or presets():
        print(table_row(path, estimate_preset(path)), flush=True)


if __name__ == "__main__":
    main()
