"""Each training step's options are a small dataclass (nanoGPT's configs); this turns one into its command line.

    @dataclass
    class PrepareConfig:
        min_count: int = option(10, "keep words seen more than this often")

    config = parse_config(PrepareConfig, argv, __doc__)   # --min-count 4 -> PrepareConfig(min_count=4)

Every default is written once, in its dataclass: the step's command line, `training.run_all` and tests all
build the same object.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path


def option(default, help: str = "", choices=None):
    """A config field with its command-line help (and allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def parse_config(config_class, argv=None, description: str | None = None):
    """argv -> an instance of `config_class`: one --flag per field; a bool field is a switch that turns it on."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        flag, help_text = "--" + field.name.replace("_", "-"), field.metadata.get("help", "")
        kind = _plain_type(hints[field.name])
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=field.default, help=help_text)
        elif typing.get_origin(kind) is tuple:  # tuple[Path, ...]: one or more values after the flag
            parser.add_argument(flag, type=typing.get_args(kind)[0], nargs="+", default=field.default,
                                help=help_text + " (default: %(default)s)")
        else:
            shown = "" if field.default is None else " (default: %(default)s)"
            parser.add_argument(flag, type=kind, default=field.default, choices=field.metadata.get("choices"),
                                help=help_text + shown)
    values = vars(parser.parse_args(argv))
    return config_class(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})


def _plain_type(hint):
    """int | None -> int; Path -> Path."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return Path if hint is Path else hint
