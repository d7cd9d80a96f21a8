"""The quantization pass on the tiny checkpoint: sizes, run-time layout, quality report, thresholds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy
from ai_edge_litert.interpreter import Interpreter
from click.testing import CliRunner

from converter.cli import main
from converter.config import tiny_config
from converter.model import PerLayerEmbedder, TextDecoder, TokenEmbedder
from converter.quality import PROMPTS, THRESHOLDS, check_thresholds
from quant.recipes import bundle_scheme, plan_quantization, quantize_file
from runtime.engine import TextEngine

BUNDLE_FILES = ("embedder.tflite", "ple.tflite", "text_core.tflite")

# Largest quantized / float file-size ratio per bundle. The weights shrink 4x (int8) or ~7x (int4 +
# fp16 block scales); the tiny files also hold graph structure and float norm vectors that do not.
SIZE_RATIO = {
    "int8": {"embedder": 0.36, "ple": 0.33, "text_core": 0.62},  # measured 0.34 / 0.31 / 0.58
    "int4": {"embedder": 0.22, "ple": 0.17, "text_core": 0.52},  # measured 0.21 / 0.15 / 0.49
}

# Quality bars for the tiny checkpoint (tighter than THRESHOLDS, which must hold for any model):
# each sits a little under the measured value so that a regression in the pass shows.
TINY_QUALITY = {
    "int8": {
        "embedder": 0.9999,  # measured 0.99998: per-channel int8 on a Gaussian table
        "ple": 0.9999,  # measured 0.99998, same reason
        "text_core": 0.999,  # measured 0.9999: int8 matmul noise, 7 layers
        "top1_agreement": 0.98,  # measured 1.0: int8 changes no argmax over the 64 positions
        "mean_kl": 0.005,  # measured 0.0008 nats
    },
    "int4": {
        "embedder": 0.993,  # measured 0.995: block-32 int4 on a Gaussian table (theory: 0.996)
        "ple": 0.993,  # measured 0.995, same reason
        "text_core": 0.97,  # measured 0.98: int4 noise through 7 layers of matmuls
        "top1_agreement": 0.8,  # measured 0.89: near-tied argmaxes flip
        "mean_kl": 0.25,  # measured 0.13 nats
    },
}

# The int4 text path's greedy continuation follows the float one for at least this many tokens on
# each fixed prompt. Measured on the tiny checkpoint: 32, 32, 23, 32 (the 23 is a near-tie that int8
# flips too), so 20 leaves room for platform rounding but catches a pass that derails the model.
INT4_GREEDY_FOLLOWS = 20


def ops(model_path) -> list[str]:
    interpreter = Interpreter(model_path=str(model_path))
    return [op["op_name"] for op in interpreter._get_ops_details()]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bundles_shrink_by_the_expected_ratio(tiny_bundle, tiny_int8_bundle, tiny_int4_bundle, scheme):
    folder = {"int8": tiny_int8_bundle, "int4": tiny_int4_bundle}[scheme]
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, limit in SIZE_RATIO[scheme].items():
        ratio = (folder / f"{name}.tflite").stat().st_size / (tiny_bundle / f"{name}.tflite").stat().st_size
        assert ratio <= limit, (name, ratio)
        entry = manifest["bundles"][name]
        assert entry["quantization"]["scheme"] == scheme
        assert entry["bits_per_weight"] == pytest.approx(8 * entry["bytes"] / entry["parameters"], abs=1e-3)
    # The PLE file is one table: 8 bits + a per-row fp32 scale and int64 zero point (int8), or 4 bits
    # + an fp16 scale per 32 weights (int4); the graph adds ~1.5 bits at this tiny size
    # (measured 9.98 / 5.21).
    assert manifest["bundles"]["ple"]["bits_per_weight"] <= {"int8": 10.3, "int4": 5.5}[scheme]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_tables_stay_quantized_at_run_time(tiny_int8_bundle, tiny_int4_bundle, scheme):
    """The lookups read the int8 / int4 tables directly: no DEQUANTIZE op, no float table tensor."""
    folder = {"int8": tiny_int8_bundle, "int4": tiny_int4_bundle}[scheme]
    cfg = tiny_config()
    for name, (rows, width) in (("embedder", (cfg.vocab_size, cfg.hidden_size)),
                                ("ple", (cfg.vocab_size_per_layer_input, cfg.per_layer_width))):
        assert "DEQUANTIZE" not in ops(folder / f"{name}.tflite")
        details = Interpreter(model_path=str(folder / f"{name}.tflite")).get_tensor_details()
        tables = [t for t in details if list(t["shape"]) == [rows, width]]
        assert tables and all(t["dtype"] == np.int8 for t in tables), tables  # int4 tensors show as int8 here
        if scheme == "int4":  # block-32 scales, fp16, one per 32 weights of each row
            assert any(list(t["shape"]) == [rows, width // 32] and t["dtype"] == np.float16 for t in details)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quality_report_meets_the_tiny_bars(tiny_int8_bundle, tiny_int4_bundle, scheme):
    folder = {"int8": tiny_int8_bundle, "int4": tiny_int4_bundle}[scheme]
    manifest = json.loads((folder / "manifest.json").read_text())
    bars = TINY_QUALITY[scheme]
    for name in ("embedder", "ple", "text_core"):
        assert manifest["bundles"][name]["quality"]["cosine"] >= bars[name], name
    path = manifest["quality"]["text_path"]
    assert path["positions"] == len(PROMPTS) * 16
    assert path["top1_agreement"] >= bars["top1_agreement"]
    assert path["mean_kl"] <= bars["mean_kl"]
    assert manifest["quality"]["warnings"] == []
    assert manifest["quality"]["prompts"].startswith("4 fixed sentences")
    assert not (folder / ".g3n-work").exists()  # the float originals are removed after scoring


def test_int4_greedy_follows_float(tiny_bundle, tiny_int4_bundle):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_bundle / "tokenizer.model"))
    reference, quantized = TextEngine(tiny_bundle), TextEngine(tiny_int4_bundle)
    for prompt in PROMPTS:
        ids = [2] + sp.encode(prompt)
        expected = reference.greedy(ids, INT4_GREEDY_FOLLOWS)
        got = quantized.greedy(ids, INT4_GREEDY_FOLLOWS)
        reference.reset()
        quantized.reset()
        assert got == expected, prompt


def test_recipe_falls_back_where_blocks_do_not_divide():
    import torch

    cfg = tiny_config()
    with torch.device("meta"):
        core, embedder, ple = TextDecoder(cfg), TokenEmbedder(cfg), PerLayerEmbedder(cfg)
    plan = plan_quantization("text_core", "int4", 32, core)
    # AltUp's coefficient layers read 4 inputs and LAuReL's second layer reads rank 4: int8 instead.
    assert plan.int8_linears == ("correction_coefs", "linear_right", "prediction_coefs")
    # At block 128 the 96-wide FFN down projections and 64-wide layers fall back as well.
    assert {"down_proj", "o_proj", "q_proj"} <= set(plan_quantization("text_core", "int4", 128, core).int8_linears)
    # Tiny PLE rows are 7 x 32 = 224 wide: block 64 does not divide them, 32 does.
    assert plan_quantization("ple", "int4", 64, ple).table_block_size == 32
    # The tiny audio hard-token table is 32 wide, so the embedder's tables stay at block 32.
    assert plan_quantization("embedder", "int4", 256, embedder).table_block_size == 32
    assert plan_quantization("embedder", "int8", 32, embedder).recipe()[0]["op_config"]["weight_tensor_config"]["num_bits"] == 8
    with pytest.raises(ValueError):
        plan_quantization("text_core", "int3", 32, core)
    with pytest.raises(ValueError):
        plan_quantization("text_core", "int4", 48, core)


def test_scheme_policy_and_threshold_check():
    assert bundle_scheme("ple", "int4") == "int4"
    assert bundle_scheme("vision_encoder", "int4") == "int8"  # encoders default to int8 under --quant int4
    assert bundle_scheme("vision_encoder", "int4", {"vision_encoder": "int4"}) == "int4"
    assert bundle_scheme("text_core", "int4", {"text_core": "int8"}) == "int8"
    for metrics in THRESHOLDS.values():
        assert all(bar.reason for bar in metrics.values())
    failures = check_thresholds({"embedder": "int4"}, {"embedder": {"cosine": 0.5}})
    assert len(failures) == 1 and "embedder int4: cosine 0.5" in failures[0]
    assert check_thresholds({"embedder": "int4"}, {"embedder": {"cosine": 0.999}}) == []


def test_scheme_none_copies_the_float_file(tiny_bundle, tmp_path):
    quantize_file(tiny_bundle / "ple.tflite", tmp_path / "ple.tflite", plan_quantization("ple", "none", 32, None))
    assert (tmp_path / "ple.tflite").read_bytes() == (tiny_bundle / "ple.tflite").read_bytes()


@pytest.fixture(scope="module")
def outlier_checkpoint(tiny_mm_checkpoint, tmp_path_factory):
    """The tiny checkpoint with embedding rows built to defeat int4: in every block of 32 one value
    is 1.0 and the rest +-1/15, which int4 (step 1/7) rounds to zero: row cosine drops to ~0.94."""
    folder = tmp_path_factory.mktemp("outliers") / "ckpt"
    shutil.copytree(tiny_mm_checkpoint, folder)
    weights = safetensors.numpy.load_file(folder / "model.safetensors")
    key = "model.language_model.embed_tokens.weight"
    rng = np.random.default_rng(0)
    table = rng.choice([-1 / 15, 1 / 15], size=weights[key].shape).astype(np.float32)
    table[:, ::32] = 1.0
    weights[key] = table
    safetensors.numpy.save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def convert_args(checkpoint, out, *extra):
    return ["--checkpoint", str(checkpoint), "--out", str(out), "--bundles", "embedder",
            "--prefill-lengths", "4", "--cache-length", "8", *extra]


def test_outlier_weights_warn_loudly(outlier_checkpoint, tmp_path):
    out = tmp_path / "warned"
    result = CliRunner().invoke(main, convert_args(outlier_checkpoint, out, "--quant", "int4"))
    assert result.exit_code == 0, result.output
    assert "WARNING: quantized quality below threshold: embedder int4: cosine 0.9" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bundles"]["embedder"]["quality"]["cosine"] < THRESHOLDS[("embedder", "int4")]["cosine"].limit
    assert len(manifest["quality"]["warnings"]) == 1


def test_outlier_weights_fail_with_strict(outlier_checkpoint, tmp_path):
    out = tmp_path / "strict"
    result = CliRunner().invoke(main, convert_args(outlier_checkpoint, out, "--quant", "int4", "--strict"))
    assert result.exit_code != 0
    assert "below the threshold (--strict)" in result.stderr and "embedder int4: cosine" in result.stderr
    assert not (out / "manifest.json").exists() and not (out / ".g3n-work").exists()
    # int8 keeps these rows (step 1/127), so the same checkpoint passes --strict at int8.
    ok = CliRunner().invoke(main, convert_args(outlier_checkpoint, tmp_path / "int8", "--quant", "int8", "--strict"))
    assert ok.exit_code == 0, ok.output


def test_per_bundle_overrides(tiny_text_checkpoint, tmp_path):
    out = tmp_path / "mixed"
    args = ["--checkpoint", str(tiny_text_checkpoint), "--out", str(out), "--bundles", "embedder,ple",
            "--prefill-lengths", "4", "--cache-length", "8", "--quant", "int4", "--quant-ple", "int8",
            "--block-size", "64", "--no-quality-report", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    embedder, ple = manifest["bundles"]["embedder"]["quantization"], manifest["bundles"]["ple"]["quantization"]
    assert embedder["scheme"] == "int4" and embedder["block_size"] == 64
    assert embedder["table_block_size"] == 64  # the text-only checkpoint has no 32-wide audio table
    assert ple == {"scheme": "int8", "activations": "float32 (dynamic range)", "granularity": "per-channel"}
    assert "quality" not in manifest


def test_bad_block_size_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["--variant", "tiny", "--random-weights", "--quant", "int4", "--block-size", "48", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "48" in result.output
    assert not (tmp_path / "x").exists()


def test_reference_that_does_not_fit_is_reported_not_scored(tiny_mm_checkpoint, tmp_path, monkeypatch):
    """On a machine too small for the float32 text core (E4B on 24 GiB), the report scores the
    tables, says what it could not score and why, and writes no float text core."""
    import converter.pipeline as pipeline

    monkeypatch.setattr(pipeline, "physical_memory", lambda: 24 * 2**30)  # this project's machine
    assert pipeline.reference_memory_problem("text_core", 2_421_916_768) is None  # e2b: 9.0 GiB
    assert "16.7 GiB" in pipeline.reference_memory_problem("text_core", 4_486_425_328)  # e4b
    assert pipeline.reference_memory_problem("ple", 2_348_810_240) is None  # lookups touch a few rows
    monkeypatch.setattr(pipeline, "physical_memory", lambda: 2 * 1024**2)  # 2 MiB: the tiny core is 1.4 MB
    out = tmp_path / "small-machine"
    args = ["--checkpoint", str(tiny_mm_checkpoint), "--out", str(out), "--prefill-lengths", "4",
            "--cache-length", "16", "--quant", "int8", "--bundles", "embedder,ple,text_core", "--json"]  # the encoders take no part
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    report = manifest["quality"]
    assert set(report["not_scored"]) == {"text_core", "text_path"}
    assert "needs more than half of this machine's" in report["not_scored"]["text_core"]
    assert report["text_path"] is None and "quality" not in manifest["bundles"]["text_core"]
    assert manifest["bundles"]["embedder"]["quality"]["cosine"] > 0.999
