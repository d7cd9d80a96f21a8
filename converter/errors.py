"""Errors that g3n reports to the user as one clear line (no traceback)."""


class G3nError(Exception):
    """Base class: anything raised as a G3nError is a user-facing problem with a fix."""


class CheckpointError(G3nError):
    """The checkpoint folder is missing, unreadable, unsafe or not a Gemma 3n model."""


class BundleError(G3nError):
    """A bundle folder or one of its files does not match its manifest."""


class ExportError(G3nError):
    """Conversion to LiteRT failed or produced a model that does not match PyTorch."""


class QualityError(G3nError):
    """Quantized bundles scored below their quality thresholds and --strict was given."""


def read_json_object(path, error: type[G3nError], missing_hint: str) -> dict:
    """Parse a JSON object file, turning every way it can be absent or malformed into `error`."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise error(f"{path.parent} has no {path.name}; {missing_hint}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object")
    return data
