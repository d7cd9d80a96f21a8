"""Bundle sizes before converting: the weight bytes each bundle will hold, from its module's
shapes on the meta device and the quantization plan the converter will use (quant/recipes.py).

A .tflite adds its graph (a few hundred KB per signature) to these bytes: at real size the
estimate is within a fraction of a percent (docs/BENCHMARKS.md compares it with converted folders).
"""

from __future__ import annotations

import functools
import math

from bundle import names
from converter.config import TextConfig, variant_encoders
from quant.recipes import bundle_scheme, plan_quantization

SCALE_BYTES = {4: 2, 8: 4}  # int4 blocks carry an fp16 scale each, int8 channels a float32 one


def weight_bytes(module, plan) -> int:
    """Bytes of `module`'s weights as the bundle writer stores them under `plan` (BundleQuant)."""
    from torch import nn

    counted, total = set(), 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            op, width = "FULLY_CONNECTED", m.in_features
        elif isinstance(m, nn.Embedding):
            op, width = "EMBEDDING_LOOKUP", m.embedding_dim
        elif isinstance(m, nn.Conv2d):
            op, width = "CONV_2D", m.weight[0].numel()
        else:
            continue
        counted.add(id(m.weight))
        bits, block = plan.storage(op, width)
        rows = m.weight.shape[0]
        if bits == 32:
            total += 4 * m.weight.numel()
        else:
            scales = rows * (width // block if block else 1)
            total += math.ceil(m.weight.numel() * bits / 8) + scales * SCALE_BYTES[bits]
    # Norms, biases, AltUp's small coefficient tables: float32.
    total += sum(4 * p.numel() for p in module.parameters() if id(p) not in counted)
    return total


def text_bundle_bytes(cfg: TextConfig, scheme: str, block_size: int = 32) -> dict[str, int]:
    import torch

    from converter.model import PerLayerEmbedder, TextDecoder, TokenEmbedder

    out = {}
    with torch.device("meta"):
        for bundle, cls in ((names.EMBEDDER, TokenEmbedder), (names.PLE, PerLayerEmbedder), (names.TEXT_CORE, TextDecoder)):
            module = cls(cfg)
            out[bundle] = weight_bytes(module, plan_quantization(bundle, bundle_scheme(bundle, scheme), block_size, module))
    return out


@functools.lru_cache(maxsize=None)
def encoder_bytes(variant: str, scheme: str, block_size: int = 32) -> dict[str, int]:
    """The vision and audio bundles of a built-in variant (the same for every MatFormer slice)."""
    from converter.encoders import build_encoder

    out = {}
    for enc in variant_encoders(variant).values():
        module = build_encoder(enc)
        out[enc.bundle] = weight_bytes(module, plan_quantization(enc.bundle, bundle_scheme(enc.bundle, scheme), block_size, module))
    return out


def estimated_folder_bytes(cfg: TextConfig, encoders_of: str | None, scheme: str, block_size: int = 32) -> int:
    """Every bundle's weight bytes: the text bundles of `cfg`, plus the encoders of the variant
    `encoders_of` (None: a text-only folder)."""
    total = sum(text_bundle_bytes(cfg, scheme, block_size).values())
    if encoders_of is not None:
        total += sum(encoder_bytes(encoders_of, scheme, block_size).values())
    return total
