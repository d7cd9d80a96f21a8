"""Context buckets: text-core signatures that attend over the caches' first S positions only, so a
long cache costs what the context in use costs. Same numbers as the full-cache signatures, chosen
by the runner, ignored by LiteRT-LM."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bundle import names
from bundle.errors import ExportError
from converter.cli import main as convert_main
from runtime.engine import TextEngine
from tests.conftest import TINY_CACHE, TINY_PREFILL
from tests.support.tiny_checkpoint import vary_final_norm

SPANS = (32, 64)
PROMPT = 70  # runs through both spans and past them, into the full-cache signatures


@pytest.fixture(scope="module")
def spans_case(tiny_text_checkpoint, tmp_path_factory):
    """The tiny text checkpoint with a random final norm (varied replies), converted with spans."""
    from converter.pipeline import ConvertOptions, convert

    root = tmp_path_factory.mktemp("spans")
    checkpoint = vary_final_norm(shutil.copytree(tiny_text_checkpoint, root / "tiny-varied"))
    folder = root / "bundle"
    convert(ConvertOptions(out=folder, checkpoint=checkpoint, prefill_lengths=TINY_PREFILL, cache_length=TINY_CACHE,
                           context_spans=SPANS, quality_report=False))
    return checkpoint, folder


def test_manifest_and_signatures(spans_case):
    _, folder = spans_case
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["context_spans"] == list(SPANS)
    signatures = manifest["bundles"]["text_core"]["signatures"]
    for span in SPANS:
        step = signatures[names.span_step(span)]
        assert step == signatures[names.DECODE]  # same tensors: the runner passes the same cache and mask
        for n in TINY_PREFILL:
            assert signatures[names.span_fill(span, n)] == signatures[names.prefill(n)]


@pytest.mark.parametrize("backend", ["compiled", "interpreter"])
def test_spans_give_the_full_cache_logits_bit_for_bit(spans_case, backend):
    """Feeding and decoding through the buckets equals the full-cache signatures exactly: past the
    span every score is masked to -1e9, whose softmax weight is exactly 0 in float32."""
    _, folder = spans_case
    prompt = np.random.default_rng(0).integers(3, 500, PROMPT).tolist()
    bucketed, full = TextEngine(folder, backend=backend), TextEngine(folder, backend=backend)
    full.spans = []
    used = []
    run = bucketed.core.run
    bucketed.core.run = lambda signature, inputs, want_logits: (used.append(signature), run(signature, inputs, want_logits))[1]
    for engine in (bucketed, full):
        engine.feed(prompt[:40])
    for token in prompt[40:]:
        np.testing.assert_array_equal(bucketed.step(token), full.step(token))
    # 40 tokens as 16 + 16 + 8: the first two end within 32, the third within 64; steps from 41 to 64
    # in the 64 bucket, then the full-cache decode.
    assert used[:3] == [names.span_fill(32, 16), names.span_fill(32, 16), names.span_fill(64, 8)]
    assert set(used[3:]) == {names.span_step(64), names.DECODE}
    assert used.count(names.span_step(64)) == 64 - 40


def test_runner_picks_the_smallest_span_that_holds_the_call(spans_case):
    _, folder = spans_case
    engine = TextEngine(folder)
    assert engine.signature(1, 1, True) == names.span_step(32)
    assert engine.signature(1, 33, True) == names.span_step(64)
    assert engine.signature(16, 32, False) == names.span_fill(32, 16)
    assert engine.signature(16, 48, False) == names.span_fill(64, 16)
    assert engine.signature(16, 80, False) == names.prefill(16)
    assert engine.signature(1, 65, True) == names.DECODE
    assert engine.signature(1, 10, False) == names.span_step(32)  # one fed token goes through the step signature


def test_greedy_through_spans_matches_transformers(spans_case):
    from transformers import Gemma3nForCausalLM

    from runtime import Session

    checkpoint, folder = spans_case
    model = Gemma3nForCausalLM.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32).eval()
    session = Session(folder)
    ids = [session.tokenizer.bos_id] + np.random.default_rng(1).integers(3, 500, 20).tolist()
    reply = session.generate(ids, max_new_tokens=60)  # 20 prompt tokens, then decoding across 32 and 64
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=60, do_sample=False,
                             eos_token_id=sorted(session.tokenizer.stop_ids), pad_token_id=0)
    assert reply.token_ids == out[0, len(ids):].tolist()
    assert len(set(reply.token_ids)) > 10  # varied tokens: every step's cache read counts


def test_litertlm_ignores_the_span_signatures(spans_case, tmp_path):
    """LiteRT-LM runs prefill_<N> / decode only; the file with spans gives g3n-run's reply."""
    from converter.pack import pack
    from runtime import Session
    from tests.test_litertlm import litertlm

    _, folder = spans_case
    packed = pack(folder, tmp_path / "spans.litertlm")
    prompt = "The quick brown fox jumps over the lazy dog"
    got = litertlm(packed, raw=[prompt], max_new_tokens=12)["raw"]
    assert got == [Session(folder).generate(prompt, raw=True, max_new_tokens=12).text]


def test_bad_spans_are_one_clear_error(tiny_text_checkpoint, tmp_path):
    from converter.export import context_spans

    assert context_spans((32, 128), 4096) == (1024, 2048)  # the default ladder
    assert context_spans((32, 128), 8192) == (1024, 2048, 4096)
    assert context_spans((32, 128), 1024) == ()
    with pytest.raises(ExportError, match="longest prefill length"):
        context_spans((8, 16), 96, (8, 32))
    with pytest.raises(ExportError, match="shorter than --cache-length 96"):
        context_spans((8, 16), 96, (96,))
    result = CliRunner().invoke(convert_main, ["--checkpoint", str(tiny_text_checkpoint), "--out", str(tmp_path / "x"),
                                               "--prefill-lengths", "8,16", "--cache-length", "96", "--context-spans", "4", "-q"])
    assert result.exit_code != 0 and "context spans [4] must hold the longest prefill length (16)" in result.output
