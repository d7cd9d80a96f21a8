"""Errors that g3n reports to the user as one clear line (no traceback)."""

from __future__ import annotations

import json
import re
from pathlib import Path

MAX_JSON_DEPTH = 64  # g3n's own files nest 8 deep; a deeper one is damaged or hostile
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in `text` (strings skipped). Checked before parsing:
    json's C parser recurses, and a process whose recursion limit was raised (torch raises it)
    overflows the C stack on deep input instead of raising RecursionError."""
    depth = deepest = 0
    for char in re.sub(r"[^\[\]{}]", "", _JSON_STRING.sub("", text)):
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


class G3nError(Exception):
    """Base class: anything raised as a G3nError is a user-facing problem with a fix."""


class CheckpointError(G3nError):
    """The checkpoint folder is missing, unreadable, unsafe or not a Gemma 3n model."""


class BundleError(G3nError):
    """A bundle folder or one of its files does not match its manifest."""


class ExportError(G3nError):
    """Conversion to LiteRT failed or produced a model that does not match PyTorch."""


class MatformerError(G3nError):
    """A MatFormer configuration that is malformed or does not slice the given model."""


class DeviceError(G3nError):
    """An Android device is missing, not ready, full, or lost while the harness worked on it."""


class QualityError(G3nError):
    """Quantized bundles scored below their quality thresholds and --strict was given."""


def read_json_object(path, error: type[G3nError], missing_hint: str) -> dict:
    """Parse a JSON object file, turning every way it can be absent or malformed into `error`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path.parent} has no {path.name}; {missing_hint}")
    try:
        text = path.read_text()
        if json_depth(text) > MAX_JSON_DEPTH:
            raise error(f"cannot read {path}: it is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
        data = json.loads(text)
    except RecursionError:
        raise error(f"cannot read {path}: it is nested too deeply") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, or an int of > 4300 digits
        raise error(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object")
    return data
