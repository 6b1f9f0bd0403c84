"""Config dataclasses become command lines."""

import dataclasses

import pytest

from jaxmint.config import field, from_dict, parse, to_dict


@dataclasses.dataclass
class Cfg:
    """A config."""

    lr: float = field(1e-3, "learning rate")
    batch_size: int = field(32, "batch")
    hidden: tuple[int, ...] = field((8, 8), "widths")
    name: str = field("run", "name")
    dtype: str | None = field(None, "dtype")
    flag: bool = field(False, "a switch")


def test_defaults_and_overrides():
    assert parse(Cfg, []) == Cfg()
    c = parse(
        Cfg,
        [
            "--lr",
            "0.5",
            "--batch-size",
            "4",
            "--hidden",
            "3",
            "2",
            "1",
            "--flag",
            "--dtype",
            "bfloat16",
        ],
    )
    assert c == Cfg(lr=0.5, batch_size=4, hidden=(3, 2, 1), flag=True, dtype="bfloat16")
    assert parse(Cfg, ["--dtype", "none"]).dtype is None


def test_smoke_overrides_and_explicit_flags_win():
    smoke = {"batch_size": 2, "hidden": (1,)}
    assert parse(Cfg, ["--smoke"], smoke=smoke) == Cfg(batch_size=2, hidden=(1,))
    assert parse(Cfg, ["--smoke", "--batch-size", "5"], smoke=smoke).batch_size == 5
    assert parse(Cfg, [], smoke=smoke) == Cfg()


def test_bad_values_exit_with_usage(capsys):
    with pytest.raises(SystemExit):
        parse(Cfg, ["--batch-size", "many"])
    assert "invalid" in capsys.readouterr().err


def test_round_trip_through_json_dict():
    c = Cfg(hidden=(4,))
    d = to_dict(c)
    d["hidden"] = list(d["hidden"])  # as JSON gives it back
    d["removed_field"] = 1
    assert from_dict(Cfg, d) == c
