"""Quantization recipes for g3n bundles, applied with ai-edge-quantizer to a finished .tflite.

ai-edge-quantizer's per-operation recipes let the embedding tables (EMBEDDING_LOOKUP) and the
linear layers (FULLY_CONNECTED) get different schemes; litert-torch's convert-time quant_config
cannot tell them apart on our modules. Only *dynamic-range* recipes are used: the kernels then
read int8 / int4 weights directly, whereas weight-only recipes insert a DEQUANTIZE of the whole
table (fatal for the 2 GB PLE table).
"""

from __future__ import annotations

SCHEMES = ("none", "int8", "int4")
BLOCK_SIZES = (32, 64, 128, 256)  # what ai-edge-quantizer's blockwise granularity offers

# Which ops carry a bundle's weights (everything else in the graph stays float).
BUNDLE_OPS = {
    "embedder": ("EMBEDDING_LOOKUP", "FULLY_CONNECTED"),  # + the hard-token projections
    "ple": ("EMBEDDING_LOOKUP",),
    "text_core": ("FULLY_CONNECTED",),
}


def _weight_rule(operation: str, bits: int, granularity: str) -> dict:
    return {
        "regex": ".*",
        "operation": operation,
        "algorithm_key": "min_max_uniform_quantize",
        "op_config": {
            "weight_tensor_config": {"num_bits": bits, "symmetric": True, "granularity": granularity, "dtype": "INT"},
            "compute_precision": "INTEGER",  # dynamic range: activations stay float, weights stay quantized
            "explicit_dequantize": False,
            "skip_checks": False,
            "min_weight_elements": 0,
        },
    }


def bundle_recipe(bundle: str, scheme: str, block_size: int = 32) -> list[dict]:
    """int8: per-channel int8 weights. int4: blockwise int4 (block_size along the input dim)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}")
    if scheme == "none":
        return []
    bits, granularity = (8, "CHANNELWISE") if scheme == "int8" else (4, f"BLOCKWISE_{block_size}")
    return [_weight_rule(op, bits, granularity) for op in BUNDLE_OPS[bundle]]


def quantize_tflite(model: bytes, bundle: str, scheme: str, block_size: int = 32) -> bytes:
    """Quantize a float bundle's flatbuffer; returns the quantized flatbuffer."""
    from ai_edge_quantizer import quantizer

    rules = bundle_recipe(bundle, scheme, block_size)
    if not rules:
        return model
    q = quantizer.Quantizer(bytearray(model))
    q.load_quantization_recipe(rules)
    return bytes(q.quantize().quantized_model)  # bytearray -> bytes: the Interpreter rejects bytearray
