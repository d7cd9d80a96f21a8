"""g3n-convert's command line: help, random-weight conversion, verify."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from converter.cli import main


def test_help_lists_the_main_options():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for option in ("--checkpoint", "--random-weights", "--variant", "--quant", "--out", "--prefill-lengths", "--cache-length"):
        assert option in result.output
    assert "verify" in result.output


def test_random_weights_embedder_only(tmp_path):
    """--random-weights needs no checkpoint; --bundles picks what to build; --json prints the manifest."""
    out = tmp_path / "out"
    args = ["--variant", "tiny", "--random-weights", "--seed", "7", "--bundles", "embedder", "--out", str(out),
            "--prefill-lengths", "4", "--cache-length", "8", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["source"] == {"kind": "random-weights", "path": None, "seed": 7, "sha256": "random-weights:seed=7"}
    assert set(manifest["bundles"]) == {"embedder"} and manifest["files"] == {}
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_verify_detects_bit_flip_and_truncation(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    ok = CliRunner().invoke(main, ["verify", str(copy)])
    assert ok.exit_code == 0 and ok.output.startswith("OK")

    core = copy / "text_core.tflite"
    data = bytearray(core.read_bytes())
    data[len(data) // 2] ^= 0x01
    core.write_bytes(bytes(data))
    flipped = CliRunner().invoke(main, ["verify", str(copy)])
    assert flipped.exit_code != 0 and "text_core.tflite: sha256 differs" in flipped.output

    ple = copy / "ple.tflite"
    ple.write_bytes(ple.read_bytes()[:100])
    truncated = CliRunner().invoke(main, ["verify", str(copy), "--fast"])
    assert truncated.exit_code != 0 and "ple.tflite: 100 bytes" in truncated.output


def test_verify_rejects_folder_without_manifest(tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert result.exit_code != 0 and "no manifest.json" in result.output
