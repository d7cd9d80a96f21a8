"""Bad input to g3n-convert: one clear error line, non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from converter.cli import main


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def convert_args(checkpoint, out, *extra):
    return ["--checkpoint", checkpoint, "--out", out, "--prefill-lengths", "8", "--cache-length", "16", "-q", *extra]


def assert_clean_error(code: int, output: str, *needles: str) -> None:
    assert code != 0
    errors = [line for line in output.splitlines() if line.startswith("g3n-convert: error:")]
    assert len(errors) == 1, output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in errors[0], errors[0]


def assert_nothing_finished(out: Path) -> None:
    if out.exists():
        assert not (out / "manifest.json").exists()
        assert not [p for p in out.iterdir() if p.name.endswith(".partial")]


@pytest.fixture
def ckpt_copy(tiny_mm_checkpoint, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_mm_checkpoint, dst)
    return dst


def test_missing_checkpoint_folder(tmp_path):
    code, out = run_cli(*convert_args(tmp_path / "nope", tmp_path / "out"))
    assert_clean_error(code, out, "does not exist")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    code, out = run_cli(*convert_args(tmp_path / "empty", tmp_path / "out"))
    assert_clean_error(code, out, "no config.json")


def test_corrupt_safetensors(ckpt_copy, tmp_path):
    weights = ckpt_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: header claims more than the file holds
    code, out = run_cli(*convert_args(ckpt_copy, tmp_path / "out"))
    assert_clean_error(code, out, "model.safetensors", "not a readable safetensors file")
    assert_nothing_finished(tmp_path / "out")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['G3N_PWNED']}",))


def test_pickle_checkpoint_is_refused_never_unpickled(ckpt_copy, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("G3N_PWNED", str(marker))
    (ckpt_copy / "model.safetensors").unlink()
    (ckpt_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit()))
    code, out = run_cli(*convert_args(ckpt_copy, tmp_path / "out"))
    assert_clean_error(code, out, "pytorch_model.bin", "never unpickles")
    assert not marker.exists()


def test_wrong_model_type(ckpt_copy, tmp_path):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["model_type"] = "llama"
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    code, out = run_cli(*convert_args(ckpt_copy, tmp_path / "out"))
    assert_clean_error(code, out, "model_type 'llama'")


def test_variant_mismatch(ckpt_copy, tmp_path):
    code, out = run_cli(*convert_args(ckpt_copy, tmp_path / "out", "--variant", "e2b"))
    assert_clean_error(code, out, "not a Gemma 3n e2b checkpoint")


def test_shape_mismatch(ckpt_copy, tmp_path):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["text_config"]["intermediate_size"][0] = 64
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    code, out = run_cli(*convert_args(ckpt_copy, tmp_path / "out"))
    assert_clean_error(code, out, "shape mismatch", "layers.0.mlp.gate_proj.weight")


def test_missing_and_unexpected_tensors_are_all_named(ckpt_copy, tmp_path):
    weights = ckpt_copy / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.language_model.layers.2.mlp.up_proj.weight"]
    del tensors["model.language_model.norm.weight"]
    tensors["model.language_model.layers.2.mlp.extra.weight"] = tensors["model.language_model.layers.1.mlp.up_proj.weight"].clone()
    save_file(tensors, weights)
    code, out = run_cli(*convert_args(ckpt_copy, tmp_path / "out"))
    assert_clean_error(
        code, out, "layers.2.mlp.up_proj.weight", "language_model.norm.weight", "unexpected", "layers.2.mlp.extra.weight"
    )


def test_shared_layer_kv_weights_are_accepted(ckpt_copy, tmp_path):
    """Google's published checkpoints carry (unused) K/V weights for KV-shared layers."""
    from converter.checkpoint import SafetensorsCheckpoint, expected_shapes
    from converter.config import load_hf_config

    weights = ckpt_copy / "model.safetensors"
    tensors = load_file(weights)
    prefix = "model.language_model.layers"
    for name in ("k_proj", "v_proj", "k_norm"):
        tensors[f"{prefix}.6.self_attn.{name}.weight"] = tensors[f"{prefix}.0.self_attn.{name}.weight"].clone()
    save_file(tensors, weights)
    _, cfg = load_hf_config(ckpt_copy)
    SafetensorsCheckpoint(ckpt_copy, cfg, expected_shapes(cfg))  # does not raise


def test_corrupt_tokenizer(ckpt_copy, tmp_path):
    (ckpt_copy / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    code, out = run_cli(*convert_args(ckpt_copy, tmp_path / "out"))
    assert_clean_error(code, out, "tokenizer.model", "SentencePiece")


def test_no_weights_given(tmp_path):
    code, out = run_cli("--out", tmp_path / "out", "-q")
    assert_clean_error(code, out, "--checkpoint", "--random-weights")


def _tmpfs(path: Path, options: str, purpose: str):
    """A real tmpfs mount (root only) standing in for a full or read-only disk."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"needs permission to mount a tmpfs (root) {purpose}")
    yield path
    subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    yield from _tmpfs(tmp_path / "small_disk", "size=64k", "to simulate a full disk")


@pytest.fixture
def read_only_dir(tmp_path):
    yield from _tmpfs(tmp_path / "read_only", "ro,size=64k", "to get a read-only folder")


def test_disk_full(tiny_mm_checkpoint, small_disk):
    """embedder.tflite (~170 kB) does not fit on a 64 kB filesystem."""
    out = small_disk / "out"
    code, output = run_cli(*convert_args(tiny_mm_checkpoint, out, "--bundles", "embedder"))
    assert_clean_error(code, output, "disk full")
    assert not (out / "embedder.tflite").exists()
    assert_nothing_finished(out)


def test_unwritable_output(tiny_mm_checkpoint, read_only_dir):
    code, output = run_cli(*convert_args(tiny_mm_checkpoint, read_only_dir / "out"))
    assert_clean_error(code, output, "cannot write")


def test_output_path_is_a_file(tiny_mm_checkpoint, tmp_path):
    (tmp_path / "file").write_text("x")
    code, output = run_cli(*convert_args(tiny_mm_checkpoint, tmp_path / "file" / "out"))
    assert_clean_error(code, output, "cannot write")


def test_interrupted_run_leaves_no_manifest_and_no_partial_files(tiny_mm_checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "converter.cli", *map(str, convert_args(tiny_mm_checkpoint, out))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (out / "ple.tflite").exists():  # embedder and ple done; text_core conversion under way
        assert proc.poll() is None and time.monotonic() < deadline, "conversion ended before it could be interrupted"
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert_clean_error(proc.returncode, output, "interrupted")
    assert not (out / "text_core.tflite").exists()
    assert_nothing_finished(out)
