"""Reliability: no silent wrong output, no escape from the bundle folder, one clear line on bad input."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from bundle import names
from bundle.errors import BundleError, CheckpointError, G3nError
from bundle.files import LOCK_FILE, sha256_file
from bundle.manifest import AudioInput, read_manifest, verify_bundle, write_manifest
from runtime import MediaError, Session
from runtime.media import load_audio

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [2, 10, 20, 30, 40, 50]


def reference_tokens(folder: Path) -> list[int]:
    """Greedy tokens with no weight cache at all: what every cached run must reproduce."""
    return Session(folder, weight_cache_dir=None).generate(PROMPT, max_new_tokens=8).token_ids


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(LOCK_FILE))
    return dest


def flip_byte(path: Path, where: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    path.write_bytes(bytes(data))


# ---- the XNNPACK weight cache --------------------------------------------------------------------
SESSION_CHILD = """
import json, sys
from runtime import Session
result = Session(sys.argv[1]).generate({prompt}, max_new_tokens=8)
print(json.dumps([result.token_ids, result.stats["weight_cache"]]))
"""


@pytest.mark.parametrize("round_", range(3))
def test_first_loads_at_once_build_one_good_cache(tiny_bundle, tmp_path, round_):
    """4 sessions start together on an empty cache folder: one builds, the others wait and map it,
    and every one of them gives the tokens of a run without any cache."""
    env = dict(os.environ, G3N_CACHE_DIR=str(tmp_path / "cache"))
    code = SESSION_CHILD.format(prompt=PROMPT)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_bundle)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT) for _ in range(4)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    expected = reference_tokens(tiny_bundle)
    assert [tokens for tokens, _ in results] == [expected] * 4
    assert sorted(state for _, state in results) == ["built", "loaded", "loaded", "loaded"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_a_damaged_cache_is_rebuilt_not_used(tiny_bundle, tiny_int4_bundle, tmp_path, damage):
    cache_dir = tmp_path / "cache"
    first = Session(tiny_bundle, weight_cache_dir=cache_dir)
    assert first.engine.core.weight_cache == "built"
    (cache,) = cache_dir.glob("*.xnnpack_cache")
    if damage == "truncated":  # what a crashed writer leaves
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif damage == "garbage":  # the same size, other bytes
        cache.write_bytes(np.random.default_rng(0).bytes(cache.stat().st_size))
    else:  # another model's cache under this name
        Session(tiny_int4_bundle, weight_cache_dir=tmp_path / "other")
        shutil.copyfile(next((tmp_path / "other").glob("*.xnnpack_cache")), cache)
    again = Session(tiny_bundle, weight_cache_dir=cache_dir)
    assert again.engine.core.weight_cache == "built"
    assert again.generate(PROMPT, max_new_tokens=8).token_ids == reference_tokens(tiny_bundle)
    assert Session(tiny_bundle, weight_cache_dir=cache_dir).engine.core.weight_cache == "loaded"


def test_the_weight_cache_folder_keeps_to_its_budget(tiny_bundle, tiny_int4_bundle, tmp_path, monkeypatch):
    from runtime.weight_cache import prune

    cache_dir = tmp_path / "cache"
    Session(tiny_bundle, weight_cache_dir=cache_dir)
    (float_cache,) = cache_dir.glob("*.xnnpack_cache")
    monkeypatch.setenv("G3N_WEIGHT_CACHE_BYTES", str(float_cache.stat().st_size))  # room for one cache
    with open(float_cache.with_name(float_cache.name + ".lock"), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a process building or mapping it would
        Session(tiny_int4_bundle, weight_cache_dir=cache_dir)
        assert float_cache.is_file()  # over budget, but in use
    (int4_cache,) = set(cache_dir.glob("*.xnnpack_cache")) - {float_cache}
    assert Session(tiny_bundle, weight_cache_dir=cache_dir).engine.core.weight_cache == "loaded"
    # the int4 cache is now the least recently used one
    assert prune(cache_dir, keep=float_cache, budget=float_cache.stat().st_size) == [int4_cache]
    assert not int4_cache.exists() and not int4_cache.with_name(int4_cache.name + ".json").exists()
    again = Session(tiny_int4_bundle, weight_cache_dir=cache_dir)  # built again, and the float one goes
    assert again.engine.core.weight_cache == "built"
    assert sorted(cache_dir.glob("*.xnnpack_cache")) == [int4_cache]
    assert again.generate(PROMPT, max_new_tokens=8).token_ids == reference_tokens(tiny_int4_bundle)
    monkeypatch.setenv("G3N_WEIGHT_CACHE_BYTES", "8G")
    with pytest.raises(ValueError, match="G3N_WEIGHT_CACHE_BYTES must be a number of bytes"):
        Session(tiny_bundle, weight_cache_dir=cache_dir)


def test_a_changed_text_core_never_meets_its_old_cache(tiny_bundle, tmp_path):
    folder = copy_bundle(tiny_bundle, tmp_path / "bundle")
    cache_dir = tmp_path / "cache"
    Session(folder, weight_cache_dir=cache_dir)
    flip_byte(folder / names.bundle_file(names.TEXT_CORE))
    with pytest.raises(BundleError, match="text_core.tflite: sha256 differs"):  # the default checks it
        Session(folder, weight_cache_dir=cache_dir)
    try:  # told not to verify, the changed file is still not paired with the old packed weights
        state = Session(folder, verify="sizes", weight_cache_dir=cache_dir).engine.core.weight_cache
    except BundleError:
        state = "refused by LiteRT"
    assert state != "loaded"


# ---- verification: once per file, again whenever it changes ---------------------------------------
def test_a_flipped_byte_is_caught_without_any_flag(tiny_bundle, tmp_path):
    folder = copy_bundle(tiny_bundle, tmp_path / "bundle")
    cache_dir = tmp_path / "cache"
    Session(folder, weight_cache_dir=cache_dir)
    record = json.loads((cache_dir / "verified-files.json").read_text())
    assert {Path(p).name for p in record} == {e.file for e in read_manifest(folder).listed_files()}
    ple = folder / names.bundle_file(names.PLE)
    stat = ple.stat()
    flip_byte(ple)
    os.utime(ple, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only the ctime tells
    with pytest.raises(BundleError, match="ple.tflite: sha256 differs"):
        Session(folder, weight_cache_dir=cache_dir)
    Session(folder, verify="sizes", weight_cache_dir=cache_dir)  # --no-verify: the user's choice


def test_g3n_run_refuses_a_flipped_file_by_default(tiny_bundle, tmp_path):
    folder = copy_bundle(tiny_bundle, tmp_path / "bundle")
    flip_byte(folder / names.bundle_file(names.EMBEDDER))
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", str(folder), "--prompt", "Hi"], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, G3N_CACHE_DIR=str(tmp_path / "cache")))
    assert proc.returncode == 1 and "embedder.tflite: sha256 differs" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("bundle", [names.EMBEDDER, names.TEXT_CORE])
def test_a_file_litert_refuses_after_verification_is_one_clear_error(tiny_bundle, tmp_path, bundle):
    """An operator input pointing past the tensor list passes the flatbuffer verifier and the
    sha256 check (the manifest is rewritten to match), and LiteRT refuses it only when it sets the
    signature up: "Invalid tensor index". The damage is in a signature every prompt runs."""
    from ai_edge_litert.tools import flatbuffer_utils

    folder = copy_bundle(tiny_bundle, tmp_path / "bundle")
    path = folder / names.bundle_file(bundle)
    model = flatbuffer_utils.read_model(str(path))
    runs = names.DECODE if bundle == names.TEXT_CORE else names.lookup_signature(bundle)
    subgraph = next(s.subgraphIndex for s in model.signatureDefs if s.signatureKey.decode() == runs)
    model.subgraphs[subgraph].operators[0].inputs[0] = 99_999
    flatbuffer_utils.write_model(model, str(path))
    manifest = read_manifest(folder)
    manifest.bundles[bundle].bytes, manifest.bundles[bundle].sha256 = path.stat().st_size, sha256_file(path)
    write_manifest(folder, manifest)
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", str(folder), "--prompt", "Hi"], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, G3N_CACHE_DIR=str(tmp_path / "cache")))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("g3n-run: error: ")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert len(errors) == 1 and "LiteRT" in errors[0] and str(folder) in errors[0]


# ---- the bundle folder's edge -----------------------------------------------------------------------
def test_a_symlink_out_of_the_folder_is_refused(tiny_bundle, tmp_path):
    folder = copy_bundle(tiny_bundle, tmp_path / "bundle")
    outside = tmp_path / "elsewhere.tflite"
    ple = folder / names.bundle_file(names.PLE)
    shutil.move(ple, outside)
    ple.symlink_to(outside)
    with pytest.raises(BundleError, match="leads out of the bundle folder"):
        verify_bundle(folder)
    ple.unlink()
    os.link(outside, ple)  # a hard link is a file of the folder like any other
    assert verify_bundle(folder) == []


# ---- checkpoints -------------------------------------------------------------------------------------
def damaged_checkpoint(src: Path, dest: Path, value: float) -> Path:
    import safetensors.numpy

    shutil.copytree(src, dest)
    tensors = safetensors.numpy.load_file(dest / "model.safetensors")
    name = "model.language_model.embed_tokens.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][5, 3] = value
    safetensors.numpy.save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_by_name(tiny_mm_checkpoint, tmp_path, value):
    from converter.pipeline import ConvertOptions, convert

    checkpoint = damaged_checkpoint(tiny_mm_checkpoint, tmp_path / "ck", value)
    with pytest.raises(CheckpointError, match=r"embed_tokens\.weight .*NaN or infinite values \(first in row 5\)"):
        convert(ConvertOptions(out=tmp_path / "out", checkpoint=checkpoint, bundles=(names.EMBEDDER,),
                               prefill_lengths=(8,), cache_length=32))
    assert not (tmp_path / "out" / names.MANIFEST).exists()


def test_absurd_weights_warn(tiny_mm_checkpoint, tmp_path):
    from converter.checkpoint import CheckpointWarning
    from converter.pipeline import ConvertOptions, convert

    checkpoint = damaged_checkpoint(tiny_mm_checkpoint, tmp_path / "ck", 3e38)
    with pytest.warns(CheckpointWarning, match=r"embed_tokens\.weight holds values up to 3e\+38"):
        convert(ConvertOptions(out=tmp_path / "out", checkpoint=checkpoint, bundles=(names.EMBEDDER,),
                               prefill_lengths=(8,), cache_length=32))


@pytest.mark.parametrize("field,value,words", [
    ("hidden_size", 0, "hidden_size must be a whole number"),
    ("num_attention_heads", -4, "num_heads must be a whole number"),
    ("num_kv_shared_layers", 99, "num_kv_shared_layers must be in [0, 7)"),
    ("vocab_size", 10**30, "vocab_size must be a whole number"),
    ("hidden_size", "wide", "hidden_size"),
])
def test_out_of_range_configs_are_one_clear_error(tiny_mm_checkpoint, tmp_path, field, value, words):
    from converter.config import load_hf_config

    folder = tmp_path / "ck"
    folder.mkdir()
    config = json.loads((tiny_mm_checkpoint / "config.json").read_text())
    config["text_config"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_hf_config(folder)
    assert words in str(error.value) and "\n" not in str(error.value)


# ---- the output folder ----------------------------------------------------------------------------
def test_a_busy_output_folder_is_refused_and_stale_partials_go(tmp_path):
    from converter.pipeline import ConvertOptions, convert

    out = tmp_path / "out"
    out.mkdir()
    options = ConvertOptions(out=out, variant="tiny", random_weights=True, bundles=(names.EMBEDDER,),
                             prefill_lengths=(8,), cache_length=32)
    with open(out / LOCK_FILE, "a+") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(G3nError, match="in use by another g3n-convert run"):
            convert(options)
    stale = out / ".text_core.tflite.k3j9x_a1.partial"  # left by a run killed with -9
    stale.write_bytes(b"half a file")
    convert(options)
    assert not stale.exists() and verify_bundle(out) == []


# ---- media -----------------------------------------------------------------------------------------
def write_wav(path: Path, samples: np.ndarray, rate: int, fmt: str = "int16") -> Path:
    """PCM int16 through the wave module, or IEEE float32 (format 3) written by hand."""
    if fmt == "int16":
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(rate)
            wav.writeframes((samples * 32767).astype("<i2").tobytes())
        return path
    data = samples.astype("<f4").tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 3, 1, rate, rate * 4, 4, 32,
                         b"data", len(data))
    path.write_bytes(header + data)
    return path


# E2B's audio window: 188 tokens x 16 frames of 512 samples every 160, at 16 kHz.
E2B_AUDIO = AudioInput(frames=3008, frame_length=512, hop_length=160, sample_rate=16000, mel_bins=128)


def test_float_wav_reads_as_its_samples(tmp_path):
    t = np.arange(8000) / 16000
    pcm = np.round(0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    as_int, _ = load_audio(write_wav(tmp_path / "i.wav", pcm / 32767, 16000), E2B_AUDIO)
    # the same samples as float32: exactly what the int16 reader makes of them (x / 32768)
    as_float, _ = load_audio(write_wav(tmp_path / "f.wav", pcm.astype(np.float32) / 32768, 16000, "float32"), E2B_AUDIO)
    np.testing.assert_array_equal(as_float, as_int)


@pytest.mark.parametrize("rate", [0, 1, 10**7])
def test_absurd_sample_rates_are_one_clear_error(tmp_path, rate):
    path = write_wav(tmp_path / "a.wav", np.zeros(100, np.float32), 8000, "float32")
    data = bytearray(path.read_bytes())
    data[24:28] = rate.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(MediaError, match=f"sample rate of {rate} Hz"):
        load_audio(path, E2B_AUDIO)


def test_a_long_low_rate_clip_is_cut_before_resampling(tmp_path):
    rate = 1000  # 200 s at 1 kHz: resampled whole it would be 3.2 M samples; cut first, 30 s
    path = write_wav(tmp_path / "long.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 200 * rate).astype(np.float32), rate)
    frames, cut = load_audio(path, E2B_AUDIO)
    assert cut and frames.shape == ((480_000 - 513) // 160 + 1, 512)  # the frames of any 30 s clip at 16 kHz


# ---- tokenizers ------------------------------------------------------------------------------------
def test_media_ids_need_no_tokenizer_pieces(tiny_bundle, tmp_path, media_files):
    """A tokenizer without pieces at the image / audio ids: text and image prompts still run, with
    the same tokens as the full tokenizer gives."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    folder = copy_bundle(tiny_bundle, tmp_path / "bundle")
    model = pb.ModelProto()
    model.ParseFromString((folder / names.TOKENIZER_FILE).read_bytes())
    del model.pieces[512:]  # the 16 multimodal pieces
    (folder / names.TOKENIZER_FILE).write_bytes(model.SerializeToString())
    manifest = read_manifest(folder)
    entry = manifest.files[names.TOKENIZER]
    entry.bytes, entry.sha256 = (folder / names.TOKENIZER_FILE).stat().st_size, sha256_file(folder / names.TOKENIZER_FILE)
    write_manifest(folder, manifest)
    trimmed, full = Session(folder), Session(tiny_bundle)
    for kwargs in ({}, {"image": media_files}):
        got = trimmed.generate("Describe it", max_new_tokens=6, **kwargs)
        want = full.generate("Describe it", max_new_tokens=6, **kwargs)
        assert got.token_ids == want.token_ids and got.stats["prompt_tokens"] == want.stats["prompt_tokens"]
        trimmed.reset(), full.reset()


@pytest.fixture()
def media_files(tmp_path):
    from PIL import Image

    picture = tmp_path / "picture.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(picture)
    return picture
