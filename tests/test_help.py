"""`--help` as a reference: each trainer its own description and only its own flags, every flag with its default,
--dry_run and --load_tensors up front, examples with their line breaks; a flag of another trainer (on the command
line or in a --config section the trainer does not have) parsed, kept out of config.toml, and named in one note."""

import ast
import importlib
import re

import pytest
from conftest import ASSETS, ROOT, lora_argv, run_trainer

from training.args import build_parser, ignored_flags, only_for, parse_args
from training.run_config import TRAINER_SECTIONS, config_toml, trainer_sections
from training.sections import STARTING_FLAGS


TRAINERS = [(conditioning, mode) for conditioning in ("text-to-video", "image-to-video") for mode in ("lora", "sft")]


def _help(capsys, monkeypatch, conditioning, mode):
    """The --help the entry point prints."""
    monkeypatch.setenv("COLUMNS", "200")
    main = importlib.import_module(f"training.cogvideox_{conditioning.replace('-', '_')}_{mode}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _flag_blocks(text):
    """{--flag: its help block, on one line} of a --help text."""
    blocks = [" ".join(block.split()) for block in re.split(r"\n(?=  -)", text) if block.startswith("  -")]
    return {block.split()[0].rstrip(","): block for block in blocks}


@pytest.mark.parametrize("conditioning, mode", TRAINERS)
def test_each_trainer_shows_its_own_description_and_only_its_own_flags(capsys, monkeypatch, conditioning, mode):
    text = _help(capsys, monkeypatch, conditioning, mode)
    task = "Text-to-video" if conditioning == "text-to-video" else "Image-to-video"
    kind = "LoRA fine-tuning" if mode == "lora" else "full fine-tuning"
    description = text.split("\n\n")[1]
    assert description.startswith(f"{task} {kind} of CogVideoX")
    assert f"train_{conditioning.replace('-', '_')}_{mode}.sh" in text
    others = {"lora": {"sft"}, "sft": {"lora"}}[mode] | ({"image-to-video"} if conditioning == "text-to-video" else set())
    owned = only_for(trainer_sections(build_parser()))
    assert {"rank", "lora_alpha", "init_lora", "quantize_base"} <= owned["lora"] and "seed" not in owned["lora"]
    own = set(owned) - others
    shown = set(re.findall(r"^  (?:-h, )?(--\w+)", text, flags=re.MULTILINE))
    every = {f"--{a.dest}" for a in build_parser()._actions if a.option_strings}
    hidden = {f"--{dest}" for key in others for dest in owned[key]}
    assert shown == every - hidden  # each of its own flags, none of another trainer's
    named = {flag for block in _flag_blocks(text).values() for flag in re.findall(r"--\w+", block)}
    assert not named & hidden, named & hidden  # no help text sends a user to a flag this trainer does not have
    assert {f"--{dest}" for key in own for dest in owned[key]} <= shown
    headings = [line.split("]")[0] + "]" for line in text.splitlines() if line.startswith("[")]
    assert headings == [f"[{name}]" for name in TRAINER_SECTIONS if name != "lora" or mode == "lora"]


def test_dry_run_and_load_tensors_come_first_and_every_flag_shows_its_default(capsys, monkeypatch):
    text = _help(capsys, monkeypatch, "image-to-video", "lora")
    usage = text.split("\n\n")[0]
    assert usage.split()[2:4] == ["[--dry_run]", "[--load_tensors]"]
    flags = re.findall(r"^  (?:-h, )?(--\w+)", text, flags=re.MULTILINE)
    assert flags[:3] == ["--help", "--dry_run", "--load_tensors"]
    blocks = _flag_blocks(text)
    for action in build_parser(conditioning="image-to-video", mode="lora")._actions:
        if action.option_strings and action.default not in (None, False, []) and action.dest != "help":
            assert "default" in blocks[f"--{action.dest}"].lower(), action.dest
    assert blocks["--noised_image_dropout"].endswith("(default: 0.05)")
    assert blocks["--output_dir"].endswith("(default: cogvideox-lora)")  # not the original's cogvideox-sft
    # Each value's placeholder says what it is, not the flag's name again in capitals.
    values = {flag: block.split()[1] for flag, block in blocks.items() if len(block.split()) > 1}
    assert [values[f] for f in ("--pretrained_model_name_or_path", "--rank", "--learning_rate", "--train_batch_size",
                                "--output_dir", "--mixed_precision", "--id_token")] == [
        "PATH", "N", "X", "N|auto", "PATH", "{no,fp16,bf16}", "TEXT"]
    assert not [f for f, value in values.items() if value == f[2:].upper()]


def test_the_sections_and_the_flag_reference_keep_every_flag_of_every_trainer():
    full = {a.dest for a in build_parser()._actions if a.option_strings and a.dest not in STARTING_FLAGS}
    for conditioning, mode in TRAINERS:
        parser = build_parser(conditioning=conditioning, mode=mode)
        assert set(trainer_sections(parser)) == full  # hidden flags still belong to their section
        assert trainer_sections(parser)["dry_run"] == "training" and trainer_sections(parser)["load_tensors"] == "data"
    reference = (ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    assert all(f"| `--{dest}` |" in reference for dest in full)
    assert "| `--rank` | int | `64` | *Only the LoRA trainers.*" in reference
    assert "| `--train_batch_size` | int or auto | `4` |" in reference and "Union" not in reference


def test_a_full_fine_tune_writes_no_lora_section_and_reads_an_old_one(tmp_path):
    argv = ["--pretrained_model_name_or_path", "x", "--output_dir", str(tmp_path)]
    parser = build_parser(conditioning="text-to-video", mode="sft")
    args = parse_args(argv, conditioning="text-to-video", mode="sft")
    written = config_toml(args, parser, trainer_sections(parser))
    assert "[lora]" not in written and "noised_image_dropout" not in written and "[training]" in written
    old = tmp_path / "old.toml"  # a full fine-tune's config.toml of before: [lora] at its defaults
    old.write_text(written + "\n[lora]\nrank = 64\nlora_alpha = 64\n", encoding="utf-8")
    again = parse_args(["--config", str(old)], conditioning="text-to-video", mode="sft")
    assert {**vars(again), "config": None} == vars(args) and ignored_flags(again, "text-to-video", "sft") == []
    changed = tmp_path / "changed.toml"
    changed.write_text(written + "\n[lora]\nrank = 8\n", encoding="utf-8")
    notes = ignored_flags(parse_args(["--config", str(changed)], conditioning="text-to-video", mode="sft"),
                          "text-to-video", "sft")
    assert notes == ["note: this text-to-video sft trainer ignores --rank (--config: [lora] rank): it is for the "
                     "LoRA trainers"]
    lora = parse_args(["--config", str(changed)], conditioning="text-to-video", mode="lora")
    assert lora.rank == 8 and ignored_flags(lora, "text-to-video", "lora") == []


def test_a_run_names_the_flags_of_other_trainers_it_ignores(caplog, monkeypatch, tiny_model_2b, tmp_path):
    """Said once the processes have started (the main process alone); the run stops here at its data step."""
    from conftest import trainer_main

    import training.core

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(training.core, "build_training_data", stop)
    argv = lora_argv(tiny_model_2b, ASSETS, tmp_path / "run", "--noised_image_dropout", "0.2", "--dry_run")
    with caplog.at_level("WARNING", logger="cogvideox_factory"), pytest.raises(Stop):
        run_trainer(argv, trainer_main("cogvideox_text_to_video_sft"))
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("note: ")]
    assert notes == ["note: this text-to-video sft trainer ignores --lora_alpha (--config: [lora] lora_alpha), "
                     "--noised_image_dropout (--config: [training] noised_image_dropout), --rank (--config: [lora] "
                     "rank): they are for the LoRA trainers and the image-to-video trainers"]


def _docstrings():
    for folder in ("training", "tools", "tests", "scripts", "benchmarks"):
        for path in sorted((ROOT / folder).glob("*.py")):
            text = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False)
            if text:
                yield path.relative_to(ROOT), text


def test_examples_in_help_texts_keep_their_line_breaks():
    """A `\\` + newline in a plain docstring joins the example's lines into one run of spaces (`--data_root data
    --caption_column`); the descriptions that --help prints are module docstrings."""
    joined = [f"{path}: {match.group(0)!r}" for path, text in _docstrings()
              for match in re.finditer(r"\S {4,}--\w+", text)]
    assert not joined
    prepare = importlib.import_module("training.prepare_dataset").build_parser().format_help()
    assert "--data_root data \\\n        --caption_column prompts.txt" in prepare


def test_prepare_does_not_offer_what_it_refuses():
    """prepare_dataset.py reads --control_column only to refuse it (no control latents are prepared): its --help
    does not list it; the text-to-video trainers' does."""
    prepare = importlib.import_module("training.prepare_dataset").build_parser().format_help()
    assert "--control_column" not in prepare
    from training.args import build_parser

    assert "--control_column" in build_parser(conditioning="text-to-video", mode="lora").format_help()
