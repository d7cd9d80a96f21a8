"""The converted tiny bundles against our PyTorch model and transformers' greedy generate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Gemma3nForConditionalGeneration

from bundle.files import sha256_file
from bundle.manifest import verify_bundle
from converter.checkpoint import load_text_model
from converter.model import empty_kv_cache
from runtime.engine import TextEngine
from tests.conftest import TINY_CACHE, TINY_PREFILL

# XNNPACK's fp32 kernels (fused fully-connected, their own tiling and accumulation order) vs
# PyTorch's: ulp-level differences per op compounding over 7 layers, logits up to 30.
BUNDLE_ATOL = 1e-4
PROMPT_LEN = 40
NEW_TOKENS = 32


def prompt_ids(seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (PROMPT_LEN,), generator=gen).tolist()


def test_manifest_lists_every_file_with_sha256(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert set(manifest["bundles"]) == {"text_core", "embedder", "ple", "vision_encoder", "end_of_vision",
                                        "audio_encoder", "audio_adapter", "end_of_audio"}
    for entry in [*manifest["bundles"].values(), *manifest["files"].values()]:
        path = tiny_bundle / entry["file"]
        assert path.stat().st_size == entry["bytes"]
        assert sha256_file(path) == entry["sha256"]
    assert manifest["files"]["tokenizer"]["file"] == "tokenizer.model"
    assert manifest["source"]["kind"] == "checkpoint" and len(manifest["source"]["sha256"]) == 64
    assert manifest["variant"] == "tiny", "a checkpoint is named after the built-in variant it matches"
    assert verify_bundle(tiny_bundle) == []
    assert not list(tiny_bundle.glob("*.partial")), "no temporary files left behind"


def test_signatures_follow_litert_lm_names(tiny_bundle):
    from ai_edge_litert.interpreter import Interpreter

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    expected = {
        "text_core": {*(f"prefill_{n}" for n in TINY_PREFILL), "decode"},
        "embedder": {*(f"prefill_embedder_{n}" for n in TINY_PREFILL), "decode_embedder"},
        "ple": {*(f"prefill_per_layer_embedder_{n}" for n in TINY_PREFILL), "decode_per_layer_embedder"},
    }
    cfg = manifest["config"]
    slots = len(cfg["intermediate_sizes"]) - cfg["num_kv_shared_layers"]
    for bundle, names in expected.items():
        interpreter = Interpreter(model_path=str(tiny_bundle / f"{bundle}.tflite"))
        signatures = interpreter.get_signature_list()
        assert set(signatures) == names
        if bundle != "text_core":  # LiteRT-LM's CPU executor looks tokens up through the first signature
            assert next(iter(signatures)).startswith("decode_"), list(signatures)
        for name, io in signatures.items():
            declared = manifest["bundles"][bundle]["signatures"][name]
            assert set(io["inputs"]) == set(declared["inputs"])
            assert set(io["outputs"]) == set(declared["outputs"])
            runner = interpreter.get_signature_runner(name)
            for tensor, detail in runner.get_input_details().items():
                assert list(detail["shape"]) == declared["inputs"][tensor]["shape"], (bundle, name, tensor)
    decode = manifest["bundles"]["text_core"]["signatures"]["decode"]
    # Sliding slots are rings of window + longest prefill - 1 positions; full-attention slots hold the cache.
    ring = cfg["sliding_window"] + max(TINY_PREFILL) - 1
    assert manifest["sliding_cache_length"] == ring < TINY_CACHE
    owners = [i for i in range(len(cfg["layer_types"])) if i < slots]
    for slot in owners:
        length = ring if cfg["layer_types"][slot] == "sliding_attention" else TINY_CACHE
        assert decode["inputs"][f"kv_cache_k_{slot}"]["shape"] == [1, cfg["num_kv_heads"], length, cfg["head_dim"]]
        assert decode["inputs"][f"kv_cache_v_{slot}"]["shape"] == [1, cfg["num_kv_heads"], cfg["head_dim"], length]
    assert {cfg["layer_types"][s] for s in owners} == {"sliding_attention", "full_attention"}
    assert f"kv_cache_k_{slots - 1}" in decode["outputs"] and f"kv_cache_k_{slots}" not in decode["outputs"]
    assert "logits" in decode["outputs"]
    assert "logits" not in manifest["bundles"]["text_core"]["signatures"][f"prefill_{TINY_PREFILL[0]}"]["outputs"]


def test_bundle_logits_match_pytorch(tiny_bundle, tiny_mm_checkpoint):
    """29 prompt tokens through the prefill signatures (16 + a padded 16), then 11 decode steps."""
    model = load_text_model(tiny_mm_checkpoint)
    ids = prompt_ids(seed=2)
    with torch.no_grad():
        expected, _ = model(torch.tensor([ids]), torch.arange(PROMPT_LEN), empty_kv_cache(model.cfg, TINY_CACHE))
    engine = TextEngine(tiny_bundle)
    engine.feed(ids[:29])
    got = np.stack([engine.step(t) for t in ids[29:]])
    np.testing.assert_allclose(got, expected[0, 29:].numpy(), atol=BUNDLE_ATOL, rtol=0)


@pytest.mark.parametrize("seed", [3, 4])
def test_greedy_continuation_equals_transformers_generate(tiny_bundle, tiny_mm_checkpoint, seed):
    ids = prompt_ids(seed)
    reference = Gemma3nForConditionalGeneration.from_pretrained(
        tiny_mm_checkpoint, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    expected = out[0, PROMPT_LEN:].tolist()
    got = TextEngine(tiny_bundle).greedy(ids, NEW_TOKENS)
    assert got == expected
