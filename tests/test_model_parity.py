"""Our PyTorch text model against transformers' Gemma 3n on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3nForCausalLM, Gemma3nForConditionalGeneration

from converter.config import FULL, SLIDING, load_hf_config
from converter.model import empty_kv_cache, ring_length
from converter.checkpoint import load_text_model as load_ours

# fp32 on both sides with the same operations; only matmul blocking / reduction order differ.
LOGITS_ATOL = 1e-5
PROMPT_LEN = 40  # 5x the tiny sliding window (8)


def reference(checkpoint, multimodal: bool):
    cls = Gemma3nForConditionalGeneration if multimodal else Gemma3nForCausalLM
    return cls.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(params=["multimodal", "text_only"])
def case(request, tiny_mm_checkpoint, tiny_text_checkpoint):
    ckpt = tiny_mm_checkpoint if request.param == "multimodal" else tiny_text_checkpoint
    return ckpt, reference(ckpt, request.param == "multimodal"), load_ours(ckpt)


def test_tiny_config_exercises_every_mechanism(tiny_mm_checkpoint):
    _, cfg = load_hf_config(tiny_mm_checkpoint)
    shared = [i for i in range(cfg.num_layers) if cfg.is_kv_shared(i)]
    assert {cfg.layer_types[i] for i in shared} == {SLIDING, FULL}, "KV-shared layers of both types"
    assert any(s > 0 for s in cfg.activation_sparsity), "activation sparsity on"
    assert PROMPT_LEN > cfg.sliding_window
    assert len(set(cfg.intermediate_sizes)) > 1, "per-layer FFN widths (MatFormer-style)"


def prompt(cfg, seed: int = 0) -> torch.Tensor:
    """Random text ids, plus image and audio special ids when the model has those embedders."""
    ids = torch.randint(3, cfg.vocab_size_per_layer_input, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))
    for k, tokens in enumerate(t for t in (cfg.vision_tokens, cfg.audio_tokens) if t is not None):
        ids[0, 5 + 10 * k] = tokens.offset  # first id of the range (end-of-image / end-of-audio)
        ids[0, 6 + 10 * k] = tokens.offset + tokens.size - 1
    return ids


def test_full_prompt_logits_match_transformers(case):
    ckpt, ref, ours = case
    ids = prompt(ours.cfg)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got, _ = ours(ids, torch.arange(PROMPT_LEN), empty_kv_cache(ours.cfg, 64))
    assert expected.abs().max() > 1.0, "peaked logits, so the comparison means something"
    torch.testing.assert_close(got, expected, atol=LOGITS_ATOL, rtol=0)


def incremental_logits(model, ids, dtype):
    """Prefill 13 tokens (cache only), a 17-token chunk with logits, then one token at a time."""
    cache = empty_kv_cache(model.cfg, 64, dtype=dtype)
    _, cache = model(ids[:, :13], torch.arange(13), cache, compute_logits=False)
    chunk, cache = model(ids[:, 13:30], torch.arange(13, 30), cache)
    steps = [chunk]
    for t in range(30, PROMPT_LEN):
        logits, cache = model(ids[:, t : t + 1], torch.tensor([t]), cache)
        steps.append(logits)
    return torch.cat(steps, 1)


# In float64 rounding vanishes, so the incremental path (cache writes, KV sharing across calls,
# sliding masks beyond the window) must equal a single full forward almost exactly.
# (transformers cannot serve as the float64 reference: its RMSNorm computes in float32.)
FLOAT64_ATOL = 1e-10
# fp32: decode-shaped matmuls (GEMV, padded cache) sum in another order than the full forward;
# a few ulps per layer compound over 7 layers with logits up to 30.
INCREMENTAL_FP32_ATOL = 1e-4


def test_incremental_decoding_equals_full_forward_in_float64(case):
    _, _, ours = case
    ours = ours.double()
    ids = prompt(ours.cfg, seed=1)
    with torch.no_grad():
        full, _ = ours(ids, torch.arange(PROMPT_LEN), empty_kv_cache(ours.cfg, 64, dtype=torch.float64))
        incremental = incremental_logits(ours, ids, torch.float64)
    torch.testing.assert_close(incremental, full[:, 13:], atol=FLOAT64_ATOL, rtol=0)


@pytest.mark.parametrize("plan", [
    [13, 16, 1] + [1] * 10,  # the 16-position call wraps past the ring's end
    [5, 2, 16, 3, 1, 12, 1],  # calls of every size, one ending exactly at the ring's end
    [(16, 3), (16, 16), 1, (16, 2), 1, (8, 7), 1],  # (call length, real positions): padded calls
])
def test_sliding_ring_equals_the_full_cache_in_float64(case, plan):
    """A sliding layer's cache as a ring of window + 16 - 1 slots (calls of up to 16 positions):
    the logits of every real position equal the full forward's. Padded positions are written and
    must be overwritten or masked before anything reads them, as with the linear cache."""
    _, _, ours = case
    ours = ours.double()
    cfg = ours.cfg
    ids = prompt(cfg, seed=2)
    ring = ring_length(cfg, [16], 64)
    assert ring == cfg.sliding_window + 15
    with torch.no_grad():
        full, _ = ours(ids, torch.arange(PROMPT_LEN), empty_kv_cache(cfg, 64, dtype=torch.float64))
        cache = empty_kv_cache(cfg, 64, dtype=torch.float64, ring=ring)
        assert {k.shape[2] for k in cache[::2]} == {ring, 64}
        position, checked = 0, 0
        for call in plan:
            length, real = call if isinstance(call, tuple) else (call, call)
            chunk = ids[:, position:position + real]
            padded = torch.cat([chunk, torch.randint(3, 100, (1, length - real))], 1)
            logits, cache = ours(padded, torch.arange(position, position + length), cache)
            torch.testing.assert_close(logits[:, :real], full[:, position:position + real], atol=FLOAT64_ATOL, rtol=0)
            position += real
            checked += real
    assert position > ring, "the ring wrapped"


def test_incremental_decoding_matches_transformers(case):
    _, ref, ours = case
    ids = prompt(ours.cfg, seed=1)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits[:, 13:]
        got = incremental_logits(ours, ids, torch.float32)
    torch.testing.assert_close(got, expected, atol=INCREMENTAL_FP32_ATOL, rtol=0)


def test_multimodal_ids_read_per_layer_row_zero(tiny_mm_checkpoint):
    ours = load_ours(tiny_mm_checkpoint)
    image_id = ours.cfg.vocab_size_per_layer_input + 1
    got = ours.ple(torch.tensor([[image_id]]))
    torch.testing.assert_close(got, ours.ple(torch.tensor([[0]])), atol=0, rtol=0)
