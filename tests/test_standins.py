"""Stand-in conversion and the streaming bundle writer, against the real-weight conversion and
ai-edge-quantizer: every bundle, float / int8 / int4, must give identical outputs."""

from __future__ import annotations

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from converter.checkpoint import RandomWeights, SafetensorsCheckpoint, expected_shapes
from converter.config import load_hf_config, variant_config, variant_encoders
from bundle.errors import ExportError
from converter.export import build_module, convert_to_tflite, media_bundle_plans, text_bundle_plans
from converter.standins import StandIn, materialize_with_standins
from quant.recipes import plan_quantization, quantize_file
from quant.streaming import folded_scale, write_bundle
from tests.conftest import TINY_CACHE, TINY_PREFILL

BUNDLES = ("embedder", "ple", "text_core", "audio_encoder", "audio_adapter")


@pytest.fixture(scope="module")
def standin_conversions(tiny_mm_checkpoint, tmp_path_factory):
    """The tiny bundles converted with every linear layer and table as a stand-in (the default
    threshold leaves the tiny model's weights real): bundle -> (converted file, stand-ins, plan)."""
    _, cfg = load_hf_config(tiny_mm_checkpoint)
    audio = variant_encoders("tiny")["audio"]
    source = SafetensorsCheckpoint(tiny_mm_checkpoint, cfg, expected_shapes(cfg, [audio]))
    folder = tmp_path_factory.mktemp("standins")
    converted = {}
    encoder, adapter, _ = media_bundle_plans(audio)  # end_of_audio is a constant, converted with no weights
    for plan in [*text_bundle_plans(cfg, TINY_PREFILL, TINY_CACHE), encoder, adapter]:
        module, standins = materialize_with_standins(build_module(plan, cfg), plan.weights_prefix, source, min_elements=0)
        convert_to_tflite(plan, module, folder / plan.file)
        converted[plan.name] = (folder / plan.file, standins, module)
    return converted, source


def signature_outputs(path) -> dict:
    """Every signature's outputs on fixed inputs (token ids in the vocabulary, random floats)."""
    interpreter = Interpreter(model_path=str(path))
    results = {}
    for name in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(name)
        rng = np.random.default_rng(0)
        feeds = {}
        for key, detail in runner.get_input_details().items():
            shape = detail["shape"]
            if key == "token_ids":
                feeds[key] = rng.integers(0, 400, shape).astype(np.int32)
            elif key == "input_pos":
                feeds[key] = np.arange(shape[0], dtype=np.int32)
            elif key == "mask" and detail["dtype"] == np.uint8:  # the audio encoder's / adapter's real-frame mask
                feeds[key] = (np.arange(shape[-1]) < shape[-1] * 2 // 3).astype(np.uint8)[None]
            elif key == "mask":
                feeds[key] = np.zeros(shape, np.float32)
            else:
                feeds[key] = rng.standard_normal(shape).astype(np.float32)
        results[name] = runner(**feeds)
    return results


def assert_same_outputs(a, b):
    outputs_a, outputs_b = signature_outputs(a), signature_outputs(b)
    assert outputs_a.keys() == outputs_b.keys()
    for signature in outputs_a:
        for key in outputs_a[signature]:
            np.testing.assert_array_equal(outputs_a[signature][key], outputs_b[signature][key], err_msg=f"{signature}/{key}")


def test_standins_cover_every_linear_and_table(standin_conversions):
    converted, _ = standin_conversions
    _, standins, _ = converted["text_core"]
    names = {s.name for s in standins.values()}
    assert "decoder.lm_head.weight" in names and "decoder.layers.0.mlp.up_proj.weight" in names
    _, audio_standins, _ = converted["audio_encoder"]
    names = {s.name for s in audio_standins.values()}
    assert "audio_encoder.tower.conformer.0.ffw_layer_start.ffw_layer_1.weight" in names
    assert not any("pos_proj" in n for n in names)  # folded into a constant by the converter: kept real
    _, ple_standins, _ = converted["ple"]
    (table,) = ple_standins.values()
    assert table.standin_shape[0] < table.shape[0]  # converted with a few rows, written in full


@pytest.mark.parametrize("bundle", BUNDLES)
def test_standin_float_bundle_equals_real_weight_conversion(standin_conversions, tiny_bundle, tmp_path, bundle):
    """Filling the stand-ins gives the same model as converting the real weights, bit for bit:
    including the lm_head, router and per-layer projection, whose scales the converter folds in."""
    converted, source = standin_conversions
    path, standins, module = converted[bundle]
    out = tmp_path / f"{bundle}.tflite"
    write_bundle(path, out, plan_quantization(bundle, "none", 32, None), standins, source)
    assert_same_outputs(out, tiny_bundle / f"{bundle}.tflite")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("bundle", BUNDLES)
def test_streamed_quantization_equals_ai_edge_quantizer(standin_conversions, tiny_bundle, tmp_path, monkeypatch, bundle, scheme):
    """The writer's int8 / int4 against ai-edge-quantizer's own pass over the float bundle:
    identical outputs on every signature, and the same file size up to flatbuffer layout."""
    import quant.streaming

    monkeypatch.setattr(quant.streaming, "CHUNK_BYTES", 4096)  # several rows per chunk, many chunks
    converted, source = standin_conversions
    path, standins, module = converted[bundle]
    plan = plan_quantization(bundle, scheme, 32, module)
    streamed, reference = tmp_path / "streamed.tflite", tmp_path / "aeq.tflite"
    write_bundle(path, streamed, plan, standins, source)
    quantize_file(tiny_bundle / f"{bundle}.tflite", reference, plan)
    assert_same_outputs(streamed, reference)
    assert abs(streamed.stat().st_size - reference.stat().st_size) < 0.01 * reference.stat().st_size


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_audio_front_end_stays_float(standin_conversions, tmp_path, scheme):
    """The DFT and mel matrices of the in-graph log-mel are transformers' extractor, not weights:
    quantizing the audio encoder leaves them float32, in the writer and in ai-edge-quantizer alike."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    converted, source = standin_conversions
    path, standins, module = converted["audio_encoder"]
    plan = plan_quantization("audio_encoder", scheme, 32, module)
    write_bundle(path, tmp_path / "q.tflite", plan, standins, source)
    graph = flatbuffer_utils.read_model(str(tmp_path / "q.tflite")).subgraphs[0]
    types = {tuple(t.shape): t.type for t in graph.tensors}
    bins = 1024 // 2 + 1
    assert types[(2 * bins, 512)] == types[(128, bins)] == schema.TensorType.FLOAT32  # the DFT, the mel filters
    assert {schema.TensorType.INT8, schema.TensorType.INT4} & set(types.values())  # the conformer's weights


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_streamed_table_lookups_equal_ai_edge_quantizer_for_every_row(tiny_bundle, tmp_path, scheme):
    """A float file quantized by the writer (no stand-ins): every row of the PLE table."""
    import torch

    from converter.config import tiny_config
    from converter.model import PerLayerEmbedder

    with torch.device("meta"):
        plan = plan_quantization("ple", scheme, 32, PerLayerEmbedder(tiny_config()))
    reference, streamed = tmp_path / "aeq.tflite", tmp_path / "streamed.tflite"
    quantize_file(tiny_bundle / "ple.tflite", reference, plan)
    write_bundle(tiny_bundle / "ple.tflite", streamed, plan)

    def lookups(path):
        run = Interpreter(model_path=str(path)).get_signature_runner("decode_per_layer_embedder")
        return np.stack([run(token_ids=np.array([[i]], np.int32))["embeddings"] for i in range(tiny_config().vocab_size_per_layer_input)])

    np.testing.assert_array_equal(lookups(streamed), lookups(reference))


def test_folded_scale_is_recovered_exactly():
    rng = np.random.default_rng(1)
    standin = rng.uniform(-0.5, 0.5, 1024).astype(np.float32)
    for c in (np.float32(1 / 30), np.float32(2048**-0.5), np.float32(-0.125)):
        recovered = folded_scale(standin * c, standin)
        assert recovered is not None and np.array_equal(standin * recovered, standin * c)
    assert folded_scale(rng.permutation(standin), standin) is None  # not a scaled copy


def test_a_weight_the_writer_cannot_place_is_an_error(standin_conversions, tmp_path):
    converted, source = standin_conversions
    path, standins, _ = converted["ple"]
    ghost = StandIn("ple.ghost.weight", (4, 4), (4, 4), np.full(16, 7.0, np.float32))
    with pytest.raises(ExportError, match="ple.ghost.weight"):
        write_bundle(path, tmp_path / "x.tflite", plan_quantization("ple", "none", 32, None), {**standins, ghost.key: ghost}, source)


def test_weight_sources_read_row_slices(tiny_mm_checkpoint):
    """A big table is read a slice at a time: slices equal the whole tensor's rows, across the
    random source's generator blocks, and the random lm_head is tied to embed_tokens."""
    cfg = variant_config("tiny")
    shapes = expected_shapes(cfg)
    random = RandomWeights(cfg, 3, shapes)
    random.BLOCK_ELEMENTS = 1000  # many blocks
    name = "ple.embed_tokens_per_layer.weight"
    whole = random.tensor(name).numpy()
    assert whole.shape == shapes[name]
    np.testing.assert_array_equal(random.read_rows(name, 5, 37), whole[5:37])
    np.testing.assert_array_equal(random.tensor("decoder.lm_head.weight"), random.tensor("embedder.embed_tokens.weight"))
    _, real_cfg = load_hf_config(tiny_mm_checkpoint)
    checkpoint = SafetensorsCheckpoint(tiny_mm_checkpoint, real_cfg, expected_shapes(real_cfg))
    np.testing.assert_array_equal(checkpoint.read_rows(name, 10, 20), checkpoint.tensor(name)[10:20].numpy())


def test_streamed_conv_quantization_equals_ai_edge_quantizer(tiny_bundle, tmp_path):
    """The vision encoder's int8 CONV_2D filters (per output channel), written by the writer from
    the float bundle, against ai-edge-quantizer's pass over the same file."""
    plan = plan_quantization("vision_encoder", "int8", 32, None)
    streamed, reference = tmp_path / "streamed.tflite", tmp_path / "aeq.tflite"
    write_bundle(tiny_bundle / "vision_encoder.tflite", streamed, plan)
    quantize_file(tiny_bundle / "vision_encoder.tflite", reference, plan)
    assert_same_outputs(streamed, reference)
    assert streamed.stat().st_size < 0.5 * (tiny_bundle / "vision_encoder.tflite").stat().st_size


def test_scaled_standin_is_multiplied_while_writing(tmp_path):
    """`linear(x) * c` over a weight too big for the converter to fold is left as MUL(weight, c)
    feeding the FC (the audio encoder's query scale). The writer does the multiply on the real
    weight, wires the FC to it and drops the MUL: same outputs, and the weight can be quantized."""
    import litert_torch
    import torch

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(1024, 1536, bias=False)

        def forward(self, x):
            return {"y": self.proj(x) * 0.37}

    real = torch.randn(1536, 1024, generator=torch.Generator().manual_seed(0)) / 32

    class Source:
        def read_rows(self, name, start, stop):
            return real[start:stop].numpy()

    with torch.device("meta"):
        module = Scaled()
    module, standins = materialize_with_standins(module, "", Source())
    x = torch.randn(1, 4, 1024)
    with torch.no_grad():
        converted = litert_torch.signature("scaled", module, sample_kwargs={"x": x}).convert(
            lightweight_conversion=True, runtime_constant_folding=False)
    converted.export(str(tmp_path / "converted.tflite"))
    assert "MUL" in ops_of(tmp_path / "converted.tflite")
    plan = plan_quantization("audio_encoder", "none", 32, None)
    write_bundle(tmp_path / "converted.tflite", tmp_path / "float.tflite", plan, standins, Source())
    assert "MUL" not in ops_of(tmp_path / "float.tflite")
    got = Interpreter(model_path=str(tmp_path / "float.tflite")).get_signature_runner("scaled")(x=x.numpy())["y"]
    expected = (x @ real.T * 0.37).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)  # float32 sums in another order
    write_bundle(tmp_path / "converted.tflite", tmp_path / "int8.tflite", plan_quantization("audio_encoder", "int8", 32, None), standins, Source())
    assert (tmp_path / "int8.tflite").stat().st_size < 0.3 * (tmp_path / "float.tflite").stat().st_size


def ops_of(path) -> list[str]:
    return [op["op_name"] for op in Interpreter(model_path=str(path))._get_ops_details()]
