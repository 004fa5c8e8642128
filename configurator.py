"""
Command-line and config-file settings for the scripts, checked against a dataclass.

    python train.py config/shakespeare_char.py --residual=add --learning_rate=1e-3 --compile=False

A config file is a Python file of plain assignments (`n_layer = 6`); `--key=value` arguments win
over it, wherever they stand on the line. A bare `--flag` means `--flag=True`. Every key must be a
field of the dataclass (a typo gets the closest valid name), and every value is converted to the
field's type, so `--learning_rate=1` is the float 1.0 and `--compile=false` is False.
"""

import dataclasses
import difflib
import types
import typing
from pathlib import Path

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ConfigError(ValueError):
    pass


def field_type(field):
    """The plain type of a dataclass field; `int | None` gives (int, True)."""
    t = field.type
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0], True
    return t, False


def coerce(key, value, field):
    """Convert a command-line string (or a config-file value) to the type of `field`."""
    t, optional = field_type(field)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "auto"))):
        return None
    try:
        if t is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in TRUE:
                return True
            if str(value).lower() in FALSE:
                return False
            raise ValueError
        if t is int:
            number = float(value)  # accepts "5000" and "5e3"
            if number != int(number):
                raise ValueError
            return int(number)
        if t is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        allowed = " (or None)" if optional else ""
        raise ConfigError(f"--{key}={value!r}: expected {t.__name__}{allowed}") from None


def unknown_key_error(key, valid):
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean --{close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown setting {key!r}{hint}")


def read_config_file(path):
    """The assignments a config file makes, as a dict (names starting with '_' and modules skipped)."""
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} not found")
    namespace = {}
    exec(compile(Path(path).read_text(encoding="utf-8"), str(path), "exec"), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)}


def parse_overrides(cls, argv):
    """The settings that a config file and `--key=value` arguments give, checked and typed for `cls`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    files = [arg for arg in argv if not arg.startswith("--")]
    for arg in files:
        if not arg.endswith(".py"):
            raise ConfigError(f"unexpected argument {arg!r}: use a config file (*.py) or --key=value")
    raw = {}
    for arg in files:  # config files first, in order; then --key=value wins, wherever it stands
        raw.update(read_config_file(arg))
    for arg in argv:
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            raw[key.replace("-", "_")] = value if sep else "True"
    overrides = {}
    for key, value in raw.items():
        if key not in fields:
            raise unknown_key_error(key, list(fields))
        overrides[key] = coerce(key, value, fields[key])
    return overrides


def fields_of(cls, values):
    """Only the entries of `values` that are fields of `cls` (to build one dataclass from another's dict)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}
