"""
Command-line and config-file settings for the scripts, checked against a dataclass.

    python train.py config/shakespeare_char.py --residual=add --learning_rate=1e-3 --compile=False

A config file is a Python file of plain assignments (`n_layer = 6`); `--key=value` arguments win
over it, wherever they stand on the line. A bare `--flag` means `--flag=True`. Every key must be a
field of the dataclass (a typo gets the closest valid name), and every value is converted to the
field's type, so `--learning_rate=1` is the float 1.0 and `--compile=false` is False; a config file's
True is not the number 1. A folder or file setting (a name ending in _dir, or marked `path`) that
starts with ~ means the home folder, as in a shell.

What a config file may do: it is Python, run as it is, so it can do anything Python can, and only its
assignments are read back as settings. An error in it, or a sys.exit, is reported with its line; but
os._exit or a kill of the process ends the run on the spot, with no message and whatever status it
chose. Run only config files you trust, and keep them to assignments.
"""

import dataclasses
import difflib
import inspect
import math
import os
import sys
import traceback
import types
import typing
from pathlib import Path

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class UserError(Exception):
    """A mistake the user can fix (a setting, a missing or damaged file): the scripts print its one
    line and exit with status 1, never a traceback."""


class ConfigError(UserError):
    """A setting that cannot work."""


class TrainingError(UserError):
    """A run that cannot start or go on: its dataset, its folder, or the checkpoint it resumes."""


def field_type(field):
    """The plain type of a dataclass field; `int | None` gives (int, True)."""
    t = field.type
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0], True
    return t, False


def is_path(field):
    """Whether a setting names a folder or file: its name ends in _dir, or its field is marked `path`."""
    return field.name.endswith("_dir") or field.metadata.get("path", False)


def expand_home(key, path):
    """`path` with a leading ~ (or ~user) turned into that home folder, as a shell does; refused if there is none."""
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):
        raise ConfigError(f"--{key}={path}: {path.split('/')[0]} is no user's home folder here; write the full path")
    return expanded


def coerce(key, value, field):
    """Convert a command-line string (or a config-file value) to the type of `field`."""
    t, optional = field_type(field)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "auto"))):
        return None
    try:
        if isinstance(value, bool) and t is not bool:  # bool is an int subclass: True would be 1 layer
            raise ValueError
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
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if is_path(field) and str(value).startswith("~"):
            return expand_home(key, str(value))
        return str(value)
    except (TypeError, ValueError, OverflowError):
        allowed = " (or None)" if optional else ""
        kind = "a finite float" if t is float else t.__name__
        raise ConfigError(f"--{key}={value!r}: expected {kind}{allowed}") from None


def unknown_key_error(key, valid):
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean --{close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown setting {key!r}{hint}")


def read_config_file(path):
    """The assignments a config file makes, as a dict (names starting with '_' and modules skipped)."""
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} not found")
    namespace = {}
    try:
        exec(compile(Path(path).read_text(encoding="utf-8"), str(path), "exec"), namespace)
    except (Exception, SystemExit) as error:  # a config file is user input: any failure in it is the user's to fix
        line = getattr(error, "lineno", None) or next(
            (frame.lineno for frame in reversed(traceback.extract_tb(error.__traceback__))
             if frame.filename == str(path)), "?")
        raise ConfigError(f"config file {path}, line {line}: {type(error).__name__}: {error}; a config file "
                          "holds plain assignments such as n_layer = 6") from None
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
            key = key.replace("-", "_")
            field = fields.get(key)
            if not sep:  # a bare --flag: True for on/off settings, or the value the field names for it
                bare = field.metadata.get("bare") if field else "True"
                if field and bare is None and field_type(field)[0] is not bool:
                    raise ConfigError(f"--{key} needs a value: --{key}=VALUE (only on/off settings stand alone)")
                value = bare or "True"
            elif field and value == "" and field.default not in ("", None):
                raise ConfigError(f"--{key}= is empty; give a value, or leave it out for the default "
                                  f"({field.default!r})")
            raw[key] = value
    overrides = {}
    for key, value in raw.items():
        if key not in fields:
            raise unknown_key_error(key, list(fields))
        overrides[key] = coerce(key, value, fields[key])
    return overrides


def field_help(cls):
    """{field name: the comment on its line in the class source}: the dataclass is the one place where
    a setting and its meaning are written down, and --help reads them from there."""
    helps = {}
    for klass in reversed(cls.__mro__[:-1]):
        for line in inspect.getsource(klass).splitlines():
            name, colon, rest = line.strip().partition(":")
            if colon and name.isidentifier() and "#" in rest:
                helps[name] = rest.split("#", 1)[1].strip()
    return helps


def usage(cls, doc):
    """The --help text: the script's docstring, then every setting with its default and meaning."""
    helps = field_help(cls)
    rows = [(f"--{f.name}={f.default!r}" if not isinstance(f.default, str) else f"--{f.name}={f.default}",
             helps.get(f.name, "")) for f in dataclasses.fields(cls)]
    width = max(len(left) for left, _ in rows)
    return (doc.strip() + "\n\nsettings (default shown):\n" +
            "\n".join(f"  {left:<{width}}  {text}" for left, text in rows))


def run_cli(main, cls, doc, argv):
    """Run a script's main(argv): --help prints the usage; a user's mistake or a failure of the machine
    (disk full, permissions) ends in one line and a non-zero exit; Ctrl-C in one line and status 130."""
    if "--help" in argv or "-h" in argv:
        print(usage(cls, doc))
        return
    try:
        main(argv)
    except UserError as error:
        sys.exit(f"error: {error}")
    except BrokenPipeError:  # whoever reads the output stopped reading (python sample.py | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else Python complains when it flushes at exit
        sys.exit(128 + 13)  # the status of a pipe writer ended by SIGPIPE, as `yes | head` gives
    except OSError as error:  # the machine's trouble, not a bug: say which file and why
        where = f"{error.filename}: " if error.filename else ""
        sys.exit(f"error: {where}{error.strerror or error}")
    except (MemoryError, RuntimeError) as error:  # torch reports running out of memory as a RuntimeError
        text = (str(error).strip() or type(error).__name__).splitlines()[0]
        if not isinstance(error, MemoryError) and not any(
                words in text for words in ("out of memory", "allocate memory", "not enough memory")):
            raise
        sys.exit(f"error: out of memory ({text[:300]}); use smaller settings (batch size, context length, "
                 "model size, evaluation batches) or a machine with more memory")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def fields_of(cls, values):
    """Only the entries of `values` that are fields of `cls` (to build one dataclass from another's dict)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}
