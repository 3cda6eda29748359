"""A whole run in one file: `--config run.toml` (or .yaml), the flags grouped in sections; flags given on the
command line override it. The trainers read the sections below; `prepare_dataset.py` reads [prepare] and
`tools/infer.py` [infer], so one file can describe the whole pipeline (each tool skips the others' sections).

    [model]
    pretrained_model_name_or_path = "THUDM/CogVideoX-5b"
    [lora]
    rank = 64
    [optimizer]
    optimizer = "adamw"

Every key is a flag's name without the dashes; a switch (`--gradient_checkpointing`) is `true` or `false`, a flag
that takes several values a list. A run writes what it ran with, every value resolved, to <output_dir>/config.toml
(`config_toml`), without secrets (--hub_token) and without what only says how to start this time (--dry_run,
--resume_from_checkpoint): `--config <run>/config.toml` trains the same run again.
"""

import argparse
import difflib
import json
import math
import sys
from pathlib import Path

from .errors import UsageError


RUN_CONFIG = "config.toml"  # in --output_dir

# Flags that are never written (secrets) or that say how to start rather than what the run is.
SECRETS = {"hub_token"}
NOT_RECORDED = {"config", "print_config", "dry_run", "resume_from_checkpoint", "help"}

# The trainers' sections, in the order config.toml (and --help) lists them: each is an argument group of the parser,
# titled "[name] what it holds".
SECTION_TITLES = {
    "model": "the pipeline to fine-tune, and optionally a transformer of another size",
    "data": "where the samples are and how they are read",
    "buckets": "the sizes samples train at (the original's bucket flags, a bucket config, or CogVideoX-Fun's)",
    "training": "the run: output, precision, length, learning rate and its schedule",
    "optimizer": "the optimizer and its settings",
    "lora": "the LoRA adapter (LoRA trainers)",
    "validation": "validation videos during and after training, and the held-out evaluation loss",
    "checkpointing": "resumable checkpoints",
    "memory": "levers that trade speed for accelerator memory",
    "parallelism": "sequence parallelism, attention kernels, compilation, FP8 matmuls, processes",
    "logging": "trackers and the Hugging Face Hub",
}
TRAINER_SECTIONS = list(SECTION_TITLES)
# Flags --help shows up front (the trainers' "Start here" group), and the section each belongs to.
UP_FRONT = {"dry_run": "training", "load_tensors": "data"}
TOOL_SECTIONS = ["prepare", "infer"]


def add_config_arguments(parser):
    group = parser.add_argument_group("Run configuration")
    group.add_argument("--config", type=str, default=None,
                       help="A TOML or YAML file of this command's flags in sections (docs/training.md: one run, one config); "
                            "flags on the command line override it.")
    group.add_argument("--print_config", action="store_true",
                       help="Print every resolved value as a config file and exit.")


def section_group(parser, section):
    """The argument group of a trainer's section: `--help` shows the flags as config.toml groups them."""
    return parser.add_argument_group(f"[{section}] {SECTION_TITLES[section]}")


def trainer_sections(parser):
    """{dest: section} of a trainer's parser (its section groups' flags)."""
    sections = {}
    for group in parser._action_groups:
        name = (group.title or "").partition("]")[0].lstrip("[")
        if (group.title or "").startswith("[") and name in SECTION_TITLES:
            sections.update({action.dest: name for action in group._group_actions})
    sections.update({action.dest: UP_FRONT[action.dest] for action in parser._actions if action.dest in UP_FRONT})
    return sections


def parse_with_config(parser, argv, sections, resolve=None):
    """parser.parse_args(argv), with the --config file's values as defaults. `sections`: {dest: section} (a trainer:
    trainer_sections) or one section name for every flag (a tool). `resolve(args)`, when given, turns other tools'
    forms of flags into ours (UsageError where it cannot). --print_config prints the result and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given, _ = _pre_parser().parse_known_args(argv)
    if given.config:
        defaults = read_config(given.config, parser, sections)
        for action in parser._actions:
            if action.dest not in defaults:
                continue
            action.required = False  # the file gives it
            if isinstance(action, argparse._AppendAction) and any(
                    word == option or word.startswith(option + "=") for word in argv for option in action.option_strings):
                del defaults[action.dest]  # a repeated flag given on the command line replaces the file's list
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if resolve is not None:
        args = resolve(args)
    if args.print_config:
        print(config_toml(args, parser, sections), end="")
        sys.exit(0)
    return args


def _pre_parser():
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    return pre


def read_config(path, parser, sections):
    """{dest: value} from the file, each value checked and converted as its flag's would be; UsageError with one
    line per problem, naming the file, the section and the key."""
    data = _load(Path(path))
    mine = _my_sections(sections)
    known_sections = set(TRAINER_SECTIONS) | set(TOOL_SECTIONS)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    values, problems = {}, []
    for section, table in data.items():
        where = f"--config {path}: [{section}]"
        if not isinstance(table, dict):
            problems.append(f"--config {path}: {section} = {table!r} is outside any section; put it under "
                            f"its section ({', '.join(f'[{s}]' for s in mine)})")
            continue
        if section not in known_sections:
            close = difflib.get_close_matches(section, sorted(known_sections), n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else f" (sections: {', '.join(sorted(known_sections))})"
            problems.append(f"{where}: unknown section{hint}")
            continue
        if section not in mine:
            continue  # another tool's section
        for key, value in table.items():
            action = actions.get(key)
            own = _section_of(key, sections)
            if action is None or own is None:
                close = difflib.get_close_matches(key, sorted(actions), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{where} {key}: unknown setting{hint}")
            elif own != section:
                problems.append(f"{where} {key}: belongs in [{own}]")
            else:
                try:
                    values[key] = _converted(action, value)
                except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
                    shown = _toml_value(value) if _writable(value) else repr(value)
                    problems.append(f"{where} {key} = {shown}: {error}")
    if problems:
        raise UsageError(problems)
    return values


def _load(path):
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser as a package
                import tomli as tomllib

            data = tomllib.loads(text)
    except Exception as error:  # noqa: BLE001 - any parse error is the file's, reported in one line
        detail = str(error).splitlines()[0]
        raise UsageError(f"--config {path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'TOML'}"
                         f" ({detail})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected sections of settings, got {type(data).__name__}")
    return data


def _my_sections(sections):
    return [sections] if isinstance(sections, str) else TRAINER_SECTIONS


def _section_of(dest, sections):
    return sections if isinstance(sections, str) else sections.get(dest)


def _converted(action, value):
    """`value` as argparse would have made it from the command line (its type, choices and number of values)."""
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else None
        if items is None:
            raise TypeError("expected a list, e.g. [1, 2]")
        return [_scalar(action, item) for item in items]
    if isinstance(value, (list, dict)):
        raise TypeError("expected a single value")
    return _scalar(action, value)


def _scalar(action, value):
    if isinstance(value, bool):
        raise TypeError("expected a value, not true/false")
    kind = action.type
    if kind is int and (isinstance(value, float) or isinstance(value, str)):
        raise TypeError("expected a whole number")
    if kind is float and isinstance(value, str):
        raise TypeError("expected a number")
    if kind in (None, str) and not isinstance(value, str):
        raise TypeError("expected a string (in quotes)")
    converted = kind(value if kind in (int, float) else str(value)) if kind is not None else value
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
    return converted


# ----------------------------------------------------------------------------------------------
# Writing: what a run ran with
# ----------------------------------------------------------------------------------------------


def recorded_values(args, parser, sections):
    """{section: {dest: value}} of every flag this run resolved, secrets and per-start flags left out, None left out
    (the default of such flags is None)."""
    table = {}
    for action in parser._actions:
        dest = action.dest
        section = _section_of(dest, sections)
        if not action.option_strings or section is None or dest in SECRETS | NOT_RECORDED \
                or action.help == argparse.SUPPRESS:  # a flag this trainer does not have: at its default
            continue
        value = getattr(args, dest, None)
        if value is None:
            continue
        table.setdefault(section, {})[dest] = value
    order = _my_sections(sections)
    return {section: table[section] for section in order if section in table}


def config_toml(args, parser, sections):
    lines = ["# Every value this run resolved (flags, --config and defaults). Rerun with --config this_file;",
             "# flags on the command line override it."]
    for section, values in recorded_values(args, parser, sections).items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def write_trainer_config(args, parser, path):
    """<output_dir>/config.toml of a trainer's run (`parser`: the trainer's)."""
    Path(path).write_text(config_toml(args, parser, trainer_sections(parser)), encoding="utf-8")


def public_values(flags):
    """{flag: value} of every section of `flags` (sections.RunFlags) without secrets: what trackers and reports may
    show."""
    import dataclasses

    return {field.name: getattr(section, field.name) for section in vars(flags).values()
            for field in dataclasses.fields(section) if field.name not in SECRETS}


def _writable(value):
    return isinstance(value, (bool, int, float, str)) or (isinstance(value, list) and all(map(_writable, value)))


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string: JSON's escapes are TOML's
