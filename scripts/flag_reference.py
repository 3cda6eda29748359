"""Write docs/flags.md, the reference of every flag, from the parsers that define them (the same definitions give
`--help` and the sections modules are handed): the trainers' flags in config.toml's sections, then prepare_dataset.py's
[prepare] and tools/infer.py's [infer].

    python scripts/flag_reference.py           # rewrite docs/flags.md
    python scripts/flag_reference.py --check   # exit 1 if docs/flags.md is not what the parsers give
"""

import argparse
import sys
import typing
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REFERENCE = ROOT / "docs" / "flags.md"


def _type_name(action):
    from training.sections import flag_type

    if action.nargs == 0:
        return "switch"
    if action.choices is not None:
        return " \\| ".join(map(str, action.choices))
    kind = flag_type(action)
    element = getattr(kind, "__args__", (kind,))[0] if getattr(kind, "__origin__", None) is tuple else kind
    if typing.get_origin(element) is typing.Union:  # a number or "auto" (--train_batch_size, --blocks_to_swap)
        name = "int or auto"
    else:
        name = {"str": "text"}.get(element.__name__, element.__name__)
    return f"list of {name}" if element is not kind else name


def _default(action):
    default = action.default
    if action.required:
        return "required"
    if action.nargs == 0:
        return "off" if not default else "on"
    if default is None or default == []:
        return "-"
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default))
    return str(default)


def _row(action, owned):
    from training.args import ONLY_FOR_WORDS

    only = [ONLY_FOR_WORDS[key] for key, dests in owned.items() if action.dest in dests]
    text = " ".join((action.help or "").split()).replace("|", "\\|")
    text = f"*Only {only[0]}.* {text}" if only else text
    return f"| `--{action.dest}` | {_type_name(action)} | `{_default(action)}` | {text} |"


def _table(actions, owned=None):
    """`owned`: {trainer kind: its flags} (training.args.only_for), for the trainers' tables."""
    return ["| flag | value | default | what it does |", "|---|---|---|---|",
            *(_row(action, owned or {}) for action in actions if action.help != argparse.SUPPRESS)]


def reference():
    from tools.infer import build_parser as infer_parser
    from training.args import build_parser, only_for
    from training.prepare_dataset import build_parser as prepare_parser
    from training.run_config import SECTION_TITLES, trainer_sections
    from training.sections import STARTING_FLAGS

    lines = ["# Every flag", "",
             "Generated from the parsers by `python scripts/flag_reference.py` (each trainer's `--help` shows its part: "
             "a flag marked *Only ...* is hidden from the other trainers' `--help`, which ignore or refuse it). Each "
             "flag can also be set in a `--config` file, under its section's name without the dashes "
             "(docs/training.md: one run, one config); flags on the command line override the file.", "",
             "## The trainers", "",
             "`training/cogvideox_{text,image}_to_video_{lora,sft}.py` and the `train_*.sh` sweeps. `--config FILE` "
             "reads a run's settings; `--print_config` prints every resolved value as such a file and exits.", ""]
    parser = build_parser()
    sections = trainer_sections(parser)
    owned = only_for(sections)
    for name, title in SECTION_TITLES.items():
        actions = [a for a in parser._actions if sections.get(a.dest) == name]
        lines += [f"### [{name}]", "", title[0].upper() + title[1:] + ".", "", *_table(actions, owned), ""]
    for section, tool, build in (("prepare", "training/prepare_dataset.py (prepare_dataset.sh)", prepare_parser),
                                 ("infer", "tools/infer.py (run_infer_*.sh)", infer_parser)):
        actions = [a for a in build()._actions if a.option_strings and a.dest not in STARTING_FLAGS]
        lines += [f"## [{section}]: {tool}", "", *_table(actions), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Exit 1 if docs/flags.md is out of date.")
    text = reference()
    if parser.parse_args().check:
        if not REFERENCE.is_file() or REFERENCE.read_text(encoding="utf-8") != text:
            sys.exit(f"{REFERENCE.relative_to(ROOT)} is out of date: run python scripts/flag_reference.py")
        return
    REFERENCE.write_text(text, encoding="utf-8")
    print(f"wrote {REFERENCE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
