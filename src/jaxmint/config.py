"""Config dataclasses as command lines: every field is a ``--flag``, with its help.

Example::

    @dataclasses.dataclass
    class Config:
        lr: float = field(1e-3, "peak learning rate")
        hidden: tuple[int, ...] = field((256,), "widths of the hidden layers")

    config = parse(Config, ["--lr", "3e-4", "--hidden", "128", "128"])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any


def field(
    default: Any,
    help: str = "",
    *,
    run_control: bool = False,
    min: float | None = None,
    max: float | None = None,
    **kwargs,
) -> Any:
    """A dataclass field with a help text; mutable defaults are handled.

    ``run_control`` marks a field that steers a run without changing what it
    computes (``steps``, ``workdir``, logging): a resumed run may change it silently,
    while a change of any other field is reported. ``min`` and ``max`` bound a
    number (both included); `parse` refuses a value outside them in one line.
    """
    metadata = {"help": help, "run_control": run_control, "min": min, "max": max}
    if isinstance(default, list | dict | set):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata=metadata, **kwargs
        )
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def run_control_fields(config_cls) -> frozenset[str]:
    """The fields of a config dataclass marked ``run_control``."""
    return frozenset(
        f.name for f in dataclasses.fields(config_cls) if f.metadata.get("run_control", False)
    )


def normalized(values: Any) -> Any:
    """``values`` as JSON would give it back (tuples become lists): what a run dir records."""

    return json.loads(json.dumps(values, default=str))


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _none_or(conv):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else conv(text)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _add_argument(parser: argparse.ArgumentParser, f: dataclasses.Field, tp) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    tp, optional = _unwrap_optional(tp)
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    origin = typing.get_origin(tp)
    if tp is bool:
        parser.add_argument(
            flag,
            action=argparse.BooleanOptionalAction,
            help=f"{help_text} (default: {default})",
            **kwargs,
        )
        return
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        kwargs.update(choices=choices, type=type(choices[0]))
    elif origin in (tuple, list, Sequence):
        item = typing.get_args(tp)[0] if typing.get_args(tp) else str
        kwargs.update(nargs="*", type=item)
    elif tp in (int, float, str):
        kwargs.update(type=_none_or(tp) if optional else tp)
    else:
        raise TypeError(f"config field {f.name!r} has a type {tp!r} that cannot be parsed")
    shown = " ".join(map(str, default)) if isinstance(default, tuple | list) else default
    low, high = f.metadata.get("min"), f.metadata.get("max")
    bounds = "".join(
        [f"; min {low}" if low is not None else "", f"; max {high}" if high is not None else ""]
    )
    parser.add_argument(
        flag, help=f"{help_text} (default: {shown}{bounds})", metavar=f.name.upper(), **kwargs
    )


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """An ``argparse`` type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``PROG: error: ...; see --help``)
    and exit with code 2, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser_for(config_cls, *, description: str | None = None, smoke: bool = False):
    """An ``argparse`` parser with one ``--flag`` per field of ``config_cls``."""
    parser = OneLineParser(
        description=description or (config_cls.__doc__ or "").strip().splitlines()[0],
    )
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        _add_argument(parser, f, hints[f.name])
    if smoke:
        parser.add_argument(
            "--smoke",
            action="store_true",
            help="a tiny, fast run of the whole path (for tests); flags given explicitly win",
        )
    return parser


def parse(
    config_cls,
    argv: Sequence[str] | None = None,
    *,
    smoke: Mapping[str, Any] | None = None,
    description: str | None = None,
):
    """Build ``config_cls`` from the command line (``sys.argv[1:]`` by default).

    With ``smoke`` given, ``--smoke`` applies those overrides first; values given
    explicitly on the command line still win. A config with a ``check_values()``
    method is checked; a bad value is one line naming it (exit code 2).
    """
    parser = parser_for(config_cls, description=description, smoke=smoke is not None)
    given = vars(parser.parse_args(argv))
    values = dict(smoke) if given.pop("smoke", False) and smoke else {}
    values.update(given)
    hints = typing.get_type_hints(config_cls)
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(_unwrap_optional(hints[name])[0]) is tuple:
            values[name] = tuple(value)
    config = dataclasses.replace(config_cls(), **values)
    try:
        check_bounds(config)
        if hasattr(config, "check_values"):
            config.check_values()
    except ValueError as e:
        parser.error(str(e))
    return config


def check_bounds(config) -> None:
    """Raise `ValueError` naming the first field outside its ``min``/``max``."""
    for f in dataclasses.fields(config):
        value, low, high = getattr(config, f.name), f.metadata.get("min"), f.metadata.get("max")
        if value is None or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            allowed = (
                f"between {low} and {high}"
                if low is not None and high is not None
                else f"at least {low}"
                if low is not None
                else f"at most {high}"
            )
            flag = "--" + f.name.replace("_", "-")
            raise ValueError(f"{flag} {value} is out of range: it must be {allowed}")


def to_dict(config) -> dict:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(config)


def from_dict(config_cls, values: Mapping[str, Any]):
    """Rebuild ``config_cls`` from `to_dict` output, ignoring fields it no longer has."""
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    kept = {}
    for k, v in values.items():
        if k in names:
            tp = _unwrap_optional(hints[k])[0]
            kept[k] = tuple(v) if isinstance(v, list) and typing.get_origin(tp) is tuple else v
    return dataclasses.replace(config_cls(), **kept)
