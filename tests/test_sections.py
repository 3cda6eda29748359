"""The flags as frozen, typed sections (training/sections.py), generated from the parsers that define them, and the
flag reference (--help, docs/flags.md) generated from the same definitions."""

import dataclasses
import os
import re
import subprocess
import sys
import typing

import pytest
from conftest import ROOT

from training.args import build_parser, parse_args
from training.run_config import TRAINER_SECTIONS, trainer_sections
from training.sections import RunFlags, flag_type, run_flags


def test_every_trainer_flag_is_a_field_of_its_config_section_with_its_type_and_default():
    parser = build_parser()
    sections = trainer_sections(parser)
    fields = {section: {f.name: f for f in dataclasses.fields(getattr(RunFlags, "__dataclass_fields__")[section].type)}
              for section in TRAINER_SECTIONS}
    flags = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "config", "print_config")]
    assert {a.dest for a in flags} == set(sections)
    assert sum(len(f) for f in fields.values()) == len(flags)
    for action in flags:
        field = fields[sections[action.dest]][action.dest]
        default = tuple(action.default) if isinstance(action.default, list) else action.default
        if action.required:
            assert field.default is dataclasses.MISSING
        else:
            assert field.default == default, action.dest
        assert field.type in (flag_type(action), typing.Optional[flag_type(action)]), action.dest
    kinds = {name: fields[sections[name]][name].type for name in ("learning_rate", "rank", "frame_buckets",
                                                                  "gradient_checkpointing", "output_dir")}
    assert kinds == {"learning_rate": float, "rank": int, "frame_buckets": tuple[int, ...],
                     "gradient_checkpointing": bool, "output_dir": str}


def test_run_flags_hold_the_parsed_values_frozen(tmp_path):
    args = parse_args(["--pretrained_model_name_or_path", "x", "--rank", "8", "--frame_buckets", "9", "17",
                       "--learning_rate", "3e-4", "--gradient_checkpointing", "--output_dir", str(tmp_path)])
    flags = run_flags(args)
    assert (flags.lora.rank, flags.buckets.frame_buckets, flags.training.learning_rate) == (8, (9, 17), 3e-4)
    assert flags.memory.gradient_checkpointing and flags.model.pretrained_model_name_or_path == "x"
    assert flags.training.output_dir == str(tmp_path) and flags.optimizer.optimizer == "adam"
    with pytest.raises(dataclasses.FrozenInstanceError):
        flags.lora.rank = 16
    with pytest.raises(AttributeError):  # a tuple: not changed in place either
        flags.buckets.frame_buckets.append(33)
    assert args.frame_buckets == [9, 17]  # the namespace is not touched


def test_help_lists_the_flags_by_section_with_their_defaults():
    text = subprocess.run([sys.executable, str(ROOT / "training" / "cogvideox_text_to_video_lora.py"), "--help"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}).stdout
    headings = [line.split("]")[0] + "]" for line in text.splitlines() if line.startswith("[")]
    assert headings == [f"[{name}]" for name in TRAINER_SECTIONS]
    blocks = [" ".join(block.split()) for block in re.split(r"\n(?=  --|\[)", text) if block.startswith("  --")]
    lines = {block.split()[0]: block for block in blocks}
    assert "(default: 0.0001)" in lines["--learning_rate"] and "(default: 64)" in lines["--rank"]
    assert "(default: 49)" in lines["--frame_buckets"] and "(default: adam)" in lines["--optimizer"]
    undocumented = [a.dest for a in build_parser()._actions if a.option_strings and not a.help]
    assert not undocumented


def test_the_flag_reference_is_what_the_parsers_define():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "flag_reference.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = (ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    for name in TRAINER_SECTIONS:
        assert f"### [{name}]" in text
    assert "| `--learning_rate` | float | `0.0001` |" in text
    assert "| `--frame_buckets` | list of int | `49` |" in text
    assert "| `--pretrained_model_name_or_path` | text | `required` |" in text
    assert "## [prepare]" in text and "## [infer]" in text


# Where the whole flag set may be seen: parsed (args, run_config, sections), checked (settings; args' checks) and
# handed out (core, and dry_run/report, which describe the whole run; the benchmark and the preset estimate build a
# trainer's flags and hand their sections on).
PARSING = {"training/args.py", "training/run_config.py", "training/sections.py"}
WHOLE_FLAGS = PARSING | {"training/settings.py", "training/core.py", "training/dry_run.py", "training/report.py",
                         "benchmarks/benchmark_training.py", "benchmarks/estimate_presets.py"}


def _python_files():
    return sorted(path for folder in ("training", "tools", "benchmarks") for path in (ROOT / folder).glob("*.py"))


def test_outside_parsing_and_checking_no_function_takes_the_flag_namespace_or_all_sections():
    """A module is handed the sections it reads (or plain values), never the parsed namespace or the whole
    RunFlags: which module reads which flag shows in its signature, not only through grep."""
    import ast

    flag_names = {a.dest for a in build_parser()._actions}
    fields = {field.name: {f.name for f in dataclasses.fields(field.type)} for field in dataclasses.fields(RunFlags)}
    fields["args"] = flag_names
    namespaces, whole, getattrs = [], [], []
    for path in _python_files():
        where = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) == 3 \
                    and where not in PARSING and isinstance(node.args[1], ast.Constant):
                holder, name = getattr(node.args[0], "id", None), node.args[1].value
                if name in fields.get(holder, ()) and (holder, name) != ("optimizer", "optimizer"):
                    getattrs.append(f"{where}:{node.lineno} getattr({holder}, {name!r}, ...)")
            if isinstance(node, ast.Attribute) and node.attr in TRAINER_SECTIONS and where not in WHOLE_FLAGS:
                holder = node.value
                if (isinstance(holder, ast.Name) and holder.id == "flags") or getattr(holder, "attr", None) == "flags":
                    whole.append(f"{where}:{node.lineno} .{node.attr}")
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or where in PARSING:
                continue
            for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                reads = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
                         and isinstance(n.value, ast.Name) and n.value.id == arg.arg}
                if arg.arg in ("args", "namespace") and reads & flag_names:
                    namespaces.append(f"{where}:{node.lineno} {node.name}({arg.arg}): {sorted(reads & flag_names)}")
    assert not getattrs, "getattr(args or a section, flag, default) outside the parsing modules: every field exists"
    assert not whole, "the whole RunFlags read outside the modules that check it or hand it out"
    assert not namespaces, "a function takes the parsed flag namespace"
