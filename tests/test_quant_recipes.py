"""quant/recipes.py on the tiny embedder bundle: int8 / int4 tables stay quantized and still look up."""

from __future__ import annotations

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from quant.recipes import bundle_recipe, quantize_tflite


def lookup(model: bytes, ids: np.ndarray) -> np.ndarray:
    return Interpreter(model_content=model).get_signature_runner("decode_embedder")(token_ids=ids)["embeddings"]


@pytest.mark.parametrize(
    "scheme, max_size_ratio, max_rel_err",
    [
        # int8 per-channel: 4x fewer weight bytes; the tiny file also holds graph structure and float
        # norm vectors (0.34 measured). Error ~1/254 of each row's range.
        ("int8", 0.36, 0.02),
        # int4 block-32: ~8x fewer table bytes plus fp16 scales; error ~1/14 of each block's range.
        ("int4", 0.22, 0.25),
    ],
)
def test_embedder_quantizes_and_runs(tiny_bundle, scheme, max_size_ratio, max_rel_err):
    src = (tiny_bundle / "embedder.tflite").read_bytes()
    out = quantize_tflite(src, "embedder", scheme)
    assert len(out) < max_size_ratio * len(src)
    ids = np.array([[5]], np.int32)
    expected, got = lookup(src, ids), lookup(out, ids)
    assert np.abs(got - expected).max() <= max_rel_err * np.abs(expected).max()


def test_recipe_rejects_unknown_scheme_and_block():
    assert bundle_recipe("text_core", "none") == []
    with pytest.raises(ValueError):
        bundle_recipe("text_core", "int3")
    with pytest.raises(ValueError):
        bundle_recipe("text_core", "int4", block_size=48)
