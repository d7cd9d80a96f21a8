"""The g3n LiteRT runner: `Session` (Python API) and `g3n-run` (command line)."""

from runtime.sampling import SamplingConfig
from runtime.session import ContextFullError, Generation, MediaError, Session

__all__ = ["ContextFullError", "Generation", "MediaError", "SamplingConfig", "Session"]
