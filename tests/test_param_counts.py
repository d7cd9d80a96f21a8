"""Real-size variants built on the meta device against Gemma 3n's published parameter split."""

from __future__ import annotations

import pytest
import torch

from converter.config import variant_config
from converter.matformer import effective_parameters
from converter.model import Gemma3nText


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "variant, published_core_b, ple, shared_layers",
    [("e2b", 1.91, 2_013_265_920, 10), ("e4b", 3.98, 2_348_810_240, 15)],
)
def test_published_split(variant, published_core_b, ple, shared_layers):
    cfg = variant_config(variant)
    with torch.device("meta"):
        model = Gemma3nText(cfg)
    assert all(p.is_meta for p in model.parameters()), "no memory is allocated for sizing"

    assert model.embedder.embed_tokens.weight.numel() == 537_395_200
    assert count(model.ple) == ple
    core = count(model.decoder) - model.decoder.lm_head.weight.numel()  # lm_head is tied to embed_tokens
    # Published "effective" counts include K/V projections that KV-shared layers never use; our
    # text core does not carry them: k_proj + v_proj (2 x 2048 x 512) + k_norm (256) per shared layer.
    unused_kv = shared_layers * (2 * cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim + cfg.head_dim)
    assert sum(cfg.is_kv_shared(i) for i in range(cfg.num_layers)) == shared_layers
    assert round((core + unused_kv) / 1e9, 2) == published_core_b
    assert effective_parameters(cfg) == core + unused_kv  # what g3n-convert matformer list reports
    shared = range(cfg.first_kv_shared_layer, cfg.num_layers)
    assert not any(hasattr(model.decoder.layers[i].self_attn, "k_proj") for i in shared)


def test_kv_sharing_reads_layers_18_and_19():
    for variant in ("e2b", "e4b"):
        cfg = variant_config(variant)
        sources = {cfg.kv_source_layer(i) for i in range(cfg.first_kv_shared_layer, cfg.num_layers)}
        assert sources == {18, 19}
        assert len(cfg.kv_cache_layers) == 20
