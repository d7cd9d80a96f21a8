"""Shared fixtures: tiny random Gemma 3n checkpoints (built once per session) and their bundles.

Set G3N_ARTIFACTS=DIR to keep the converted tiny bundle folder (CI publishes it as an artifact).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.tiny_checkpoint import build_tiny_checkpoint

# Bundle signatures used by the tests: two prefill lengths so chunking and padding are exercised,
# a cache long enough for a 40-token prompt plus 32 generated tokens.
TINY_PREFILL = (8, 16)
TINY_CACHE = 96


@pytest.fixture(scope="session", autouse=True)
def weight_cache_dir(tmp_path_factory) -> Path:
    """g3n-run's XNNPACK weight caches go here, not to the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("weight_cache")
    os.environ["G3N_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_mm_checkpoint(tmp_path_factory) -> Path:
    """Gemma3nForConditionalGeneration (text + tiny vision and audio towers), save_pretrained."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_mm"), seed=0)


@pytest.fixture(scope="session")
def tiny_text_checkpoint(tmp_path_factory) -> Path:
    """Gemma3nForCausalLM, save_pretrained (text-only key layout)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_text"), text_only=True, seed=1)


@pytest.fixture(scope="session")
def reference(tiny_mm_checkpoint):
    """transformers' Gemma3nForConditionalGeneration on the tiny checkpoint: the numerical reference."""
    import torch
    from transformers import Gemma3nForConditionalGeneration

    return Gemma3nForConditionalGeneration.from_pretrained(
        tiny_mm_checkpoint, attn_implementation="eager", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def tiny_bundle(tiny_mm_checkpoint, tmp_path_factory) -> Path:
    from converter.pipeline import ConvertOptions, convert

    artifacts = os.environ.get("G3N_ARTIFACTS")
    out = Path(artifacts) / "tiny" if artifacts else tmp_path_factory.mktemp("bundle") / "tiny"
    convert(ConvertOptions(out=out, checkpoint=tiny_mm_checkpoint, prefill_lengths=TINY_PREFILL, cache_length=TINY_CACHE))
    return out


def _quantized_tiny_bundle(scheme: str, checkpoint: Path, tmp_path_factory, bundles=None) -> Path:
    from converter.pipeline import ConvertOptions, convert

    artifacts = os.environ.get("G3N_ARTIFACTS")
    out = Path(artifacts) / f"tiny-{scheme}" if artifacts else tmp_path_factory.mktemp("bundle") / f"tiny-{scheme}"
    convert(ConvertOptions(out=out, checkpoint=checkpoint, quant=scheme, prefill_lengths=TINY_PREFILL,
                           cache_length=TINY_CACHE, bundles=bundles))
    return out


@pytest.fixture(scope="session")
def tiny_int8_bundle(tiny_mm_checkpoint, tmp_path_factory) -> Path:
    """Every bundle, the encoders included."""
    return _quantized_tiny_bundle("int8", tiny_mm_checkpoint, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_int4_bundle(tiny_mm_checkpoint, tmp_path_factory) -> Path:
    """The text bundles only (converting the tiny MobileNet-V5 takes a minute)."""
    from bundle.names import TEXT_BUNDLES

    return _quantized_tiny_bundle("int4", tiny_mm_checkpoint, tmp_path_factory, TEXT_BUNDLES)
