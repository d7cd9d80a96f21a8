"""g3n converter: Gemma 3n checkpoints -> LiteRT bundles (model definition, loading, export)."""

__version__ = "0.1.0"
