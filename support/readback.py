"""
Reading back the files the project writes and a user may have damaged (logs, reports, metadata, prompts).

Every file read here is untrusted: bytes that are not UTF-8, JSON that does not parse, a folder where a
file should be. Each reader turns such trouble into one UserError line that names the file and says
what to do (`fix`), so that no script ends in a decoding traceback.
"""

import json
from pathlib import Path

from support.configurator import UserError


def read_text(path, fix):
    """The UTF-8 text of `path`; anything else raises UserError naming the file and `fix`."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}): it is "
                        f"damaged; {fix}") from None
    except OSError as error:
        raise UserError(f"{path} cannot be read ({error.strerror or error}); {fix}") from None


def read_json(path, fix):
    """The JSON value in `path`; damaged contents raise UserError naming the file and `fix`."""
    text = read_text(path, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is damaged (not JSON: {error.msg} at line {error.lineno}); {fix}") from None


def read_jsonl(path, fix, skip_torn=True):
    """The objects of a JSON-lines file, one per line. A line that does not parse is a line torn by a killed
    writer and is skipped when `skip_torn`; bytes that are not UTF-8 are damage, never skipped."""
    entries = []
    for number, line in enumerate(read_text(path, fix).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if skip_torn:
                continue
            raise UserError(f"{path} is damaged (line {number} is not JSON); {fix}") from None
        if not isinstance(entry, dict):
            raise UserError(f"{path} is damaged (line {number} is not a JSON object); {fix}")
        entries.append(entry)
    return entries
