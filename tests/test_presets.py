"""presets/: complete run configs for common cards. Each is read as the trainer reads it, estimated like `--dry_run`
on a GPU (benchmarks/estimate_presets.py: the training code on fake tensors, the published model's config) and must
fit its card; the README's GPU table (both languages) shows those estimates."""

import os
import re

import pytest
from conftest import ROOT

from benchmarks import estimate_presets
from benchmarks.estimate_presets import PLACEHOLDERS, budget_bytes, card_gb, estimate_preset, header, presets


PRESETS = [path.name for path in presets()]
READMES = ["README.md", "README_zh.md"]
# A full-size estimate takes 0.5-2 minutes on 2 CPU cores: CI estimates the presets with the least room; the whole
# set (and every sweep script) with COGVIDEOX_FACTORY_ALL_PRESETS=1 bash scripts/test.sh tests/test_presets.py
# (CONTRIBUTING.md has its last result).
ALL = os.environ.get("COGVIDEOX_FACTORY_ALL_PRESETS") == "1"
ESTIMATED = PRESETS if ALL else ["2b-lora-12gb.toml", "5b-lora-16gb.toml"]


def _readme_rows(readme):
    """{preset file name: [training, validation, final test, budget] (GiB)} from the README's GPU table."""
    text = (ROOT / readme).read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\|[^|]*\| \[`([\w.-]+\.toml)`\]\(presets/\1\) \|[^|]*\|((?: [\d.]+ \|){4})", line)
        if match:
            rows[match.group(1)] = [float(cell) for cell in match.group(2).strip(" |").split(" | ")]
    return rows


def test_the_presets_cover_the_common_cards_and_jobs():
    assert {"2b-lora-12gb.toml", "5b-lora-16gb.toml", "5b-lora-24gb.toml", "5b-i2v-lora-24gb.toml",
            "1.5-lora-24gb.toml", "1.5-lora-48gb.toml", "5b-sft-80gb.toml"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_is_a_run_config_the_trainer_reads(name, tmp_path):
    """The trainer's own parser reads it; it names a published model, says its card and what it gives up, and its
    header names every placeholder the user replaces."""
    path = ROOT / "presets" / name
    flags = estimate_presets.preset_flags(path, tmp_path)
    model, spec = estimate_presets.model_of(flags)
    assert ("image_to_video" in spec.conditioning.replace("-", "_")) == ("i2v" in name)
    assert card_gb(path) > 0 and f"{card_gb(path)} GB" in header(path, "Card") and header(path, "Gives up")
    assert flags.memory.gradient_checkpointing and flags.validation.validation_prompt  # every preset validates
    text = path.read_text(encoding="utf-8")
    head = text.split("\n\n")[0]
    for flag, placeholder in PLACEHOLDERS.items():
        if placeholder in text:
            assert flag in head, f"{name}: its header should tell the user to replace {flag}"
            read = str(getattr(flags.data if flag == "data_root" else flags.validation, flag))
            assert read.startswith(str(tmp_path)), f"{name}: the estimate read {flag} = {read!r}, not a stand-in"
    assert flags.data.data_root.startswith(str(tmp_path)), f"{name}: data_root is not the placeholder"


@pytest.mark.slow  # one full-size estimate per preset (30-120 s each on a CPU)
@pytest.mark.parametrize("name", ESTIMATED)
def test_a_preset_fits_its_card_and_the_readme_shows_its_estimate(name, tmp_path):
    """Every phase's estimated peak stays MARGIN_GIB under the card's bytes (G GB = G * 10^9 bytes), and both
    READMEs' GPU tables give this preset these figures (rounded to 0.1 GiB)."""
    path = ROOT / "presets" / name
    phases = estimate_preset(path, tmp_path)
    budget = budget_bytes(card_gb(path))
    over = {phase: round(phases[phase] / 2**30, 2) for phase in estimate_presets.PHASES if phases[phase] >= budget}
    assert not over, f"{name}: over the {budget / 2**30:.2f} GiB budget of a {card_gb(path)} GB card: {over}"
    estimated = [phases[phase] / 2**30 for phase in estimate_presets.PHASES] + [budget / 2**30]
    for readme in READMES:
        shown = _readme_rows(readme).get(name)
        assert shown is not None, f"{readme}: no row for presets/{name} in the GPU table"
        # The README rounds to 0.1 GiB; a figure further than that from the estimate is stale.
        assert shown == pytest.approx(estimated, abs=0.06), f"{readme}: presets/{name}"


def test_the_readme_gpu_tables_list_every_preset_once():
    for readme in READMES:
        assert sorted(_readme_rows(readme)) == sorted(PRESETS), readme
    assert _readme_rows("README.md") == _readme_rows("README_zh.md")


# The single-GPU sweep scripts: their header names the card their defaults fit. (train_image_to_video_sft.sh runs
# on two GPUs under DeepSpeed ZeRO-2, which the estimate does not simulate.)
SWEEPS = ["train_text_to_video_lora.sh", "train_text_to_video_sft.sh", "train_image_to_video_lora.sh"]


@pytest.mark.slow  # one full-size estimate per script
@pytest.mark.parametrize("script", SWEEPS if ALL else ["train_text_to_video_sft.sh"])
def test_a_sweep_scripts_defaults_fit_the_card_its_header_names(script, tmp_path):
    import shlex
    import subprocess

    from benchmarks.estimate_presets import estimate_run
    from training.args import parse_args
    from training.sections import run_flags

    (card,) = re.findall(r"^# Fits one (\d+) GB GPU with these defaults", (ROOT / script).read_text(), re.M)
    result = subprocess.run(["bash", str(ROOT / script)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DRY_RUN": "1", "DATA_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    command = shlex.split(next(line for line in result.stdout.splitlines() if ".py" in line))
    (trainer,) = [i for i, word in enumerate(command) if word.endswith(".py")]
    phases = estimate_run(run_flags(parse_args(command[trainer + 1:])), "sft" if "sft" in command[trainer] else "lora")
    budget = budget_bytes(int(card))
    over = {phase: round(phases[phase] / 2**30, 2) for phase in estimate_presets.PHASES
            if phase in phases and phases[phase] >= budget}
    assert not over, f"{script}: over the {budget / 2**30:.2f} GiB budget of a {card} GB card: {over}"
    # docs/memory.md's table of the sweep defaults shows these estimates (tests/test_docs.py: the same in both
    # languages and in the READMEs); "-" for a phase the run skips.
    (row,) = re.findall(rf"^\| `{re.escape(script)}` \|[^|]*\| ([\d.-]+) \| ([\d.-]+) \| ([\d.-]+) \| {card} GB \|",
                        (ROOT / "docs" / "memory.md").read_text(encoding="utf-8"), re.M)
    for cell, phase in zip(row, estimate_presets.PHASES):
        shown = None if cell == "-" else float(cell)
        estimated = phases[phase] / 2**30 if phase in phases else None
        assert (shown is None) == (estimated is None) and (shown is None or abs(shown - estimated) < 0.06), \
            f"docs/memory.md: {script} {phase} shows {cell}, the estimate is {estimated}"
