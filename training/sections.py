"""The flags as frozen, typed sections: what the modules are handed once the flags are parsed and checked.

The parser (`args.build_parser`, `prepare_dataset.build_parser`, `tools/infer.py`) is the one definition of every
flag; the section classes below are generated from it, field by field (name, type, default), so a flag added there
is a field here, and the flag reference (`--help`, docs/flags.md) comes from the same definitions. A trainer's
sections are config.toml's ([model], [data], ... see run_config.TRAINER_SECTIONS); a tool's flags are one section.

    flags = run_flags(parse_args(argv))       # core.run: parsed once
    settings = validate_training_args(flags, conditioning, mode)       # checked once, with the whole RunFlags
    build_optimizer(flags.optimizer, flags.memory, parameters, learning_rate)     # a module: the sections it reads

A module takes the sections it reads (or plain values, where prepare_dataset.py and the tools share it) and
nothing else. The parsed namespace stays where the flags are parsed (args, run_config, core.run, the tools' own
main) and the whole RunFlags where they are checked (settings, args' checks) and handed out (core, the benchmark).
Lists become tuples: a section cannot be changed after the checks, not even in place.
"""

import argparse
import dataclasses
import typing

from .run_config import TRAINER_SECTIONS, trainer_sections


# Flags that say how to start this process rather than what the run is: parsed, never handed to a module.
STARTING_FLAGS = ("help", "config", "print_config")


def flag_type(action):
    """The Python type of the value `action` stores (a list flag's elements, a switch's bool)."""
    if action.nargs == 0:
        return bool
    if action.type is None:
        element = str
    elif isinstance(action.type, type):
        element = action.type
    else:  # a checking function: its return annotation, e.g. `-> int | str`
        element = typing.get_type_hints(action.type).get("return", typing.Any)
    if action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction):
        return tuple[element, ...]
    return element


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def section_class(name, actions):
    """A frozen dataclass with one field per flag, required flags first (no default), the rest defaulting as their
    flag does."""
    required, optional = [], []
    for action in actions:
        kind = flag_type(action)
        if action.required:
            required.append((action.dest, kind))
        else:
            default = _frozen(action.default)
            optional.append((action.dest, kind if default is not None else typing.Optional[kind],
                             dataclasses.field(default=default)))
    cls = dataclasses.make_dataclass(f"{name.title()}Flags", required + optional, frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = f"The [{name}] flags." if name.isidentifier() else cls.__doc__
    return cls


def section_classes(parser, sections):
    """{section: class} of `parser`; `sections`: {dest: section} (run_config.trainer_sections) or one name."""
    grouped = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in STARTING_FLAGS:
            continue
        section = sections if isinstance(sections, str) else sections[action.dest]
        grouped.setdefault(section, []).append(action)
    return {name: section_class(name, actions) for name, actions in grouped.items()}


def section_of(cls, args):
    """An instance of section class `cls` with the values `args` holds for its fields."""
    return cls(**{f.name: _frozen(getattr(args, f.name)) for f in dataclasses.fields(cls)})


def _trainer_classes():
    from .args import build_parser

    parser = build_parser()
    return section_classes(parser, trainer_sections(parser))


_TRAINER = _trainer_classes()
ModelFlags = _TRAINER["model"]
DataFlags = _TRAINER["data"]
BucketsFlags = _TRAINER["buckets"]
TrainingFlags = _TRAINER["training"]
OptimizerFlags = _TRAINER["optimizer"]
LoraFlags = _TRAINER["lora"]
ValidationFlags = _TRAINER["validation"]
CheckpointingFlags = _TRAINER["checkpointing"]
MemoryFlags = _TRAINER["memory"]
ParallelismFlags = _TRAINER["parallelism"]
LoggingFlags = _TRAINER["logging"]


@dataclasses.dataclass(frozen=True)
class RunFlags:
    """A trainer's flags, section by section (config.toml's sections, in its order)."""

    model: ModelFlags
    data: DataFlags
    buckets: BucketsFlags
    training: TrainingFlags
    optimizer: OptimizerFlags
    lora: LoraFlags
    validation: ValidationFlags
    checkpointing: CheckpointingFlags
    memory: MemoryFlags
    parallelism: ParallelismFlags
    logging: LoggingFlags


assert [f.name for f in dataclasses.fields(RunFlags)] == TRAINER_SECTIONS, "RunFlags lists config.toml's sections"


def run_flags(args):
    """The trainer's parsed and checked flags as sections."""
    return RunFlags(**{name: section_of(_TRAINER[name], args) for name in TRAINER_SECTIONS})
