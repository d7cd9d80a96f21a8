"""Errors that g3n reports to the user as one clear line (no traceback)."""


class G3nError(Exception):
    """Base class: anything raised as a G3nError is a user-facing problem with a fix."""


class CheckpointError(G3nError):
    """The checkpoint folder is missing, unreadable, unsafe or not a Gemma 3n model."""


class BundleError(G3nError):
    """A bundle folder or one of its files does not match its manifest."""


class ExportError(G3nError):
    """Conversion to LiteRT failed or produced a model that does not match PyTorch."""
