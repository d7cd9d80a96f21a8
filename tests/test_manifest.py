"""manifest.json's schema: one writer and one validating reader (bundle/manifest.py)."""

from __future__ import annotations

import copy
import json

import pytest

from bundle import names
from bundle.errors import BundleError
from bundle.manifest import Manifest, read_manifest
from tests.conftest import TINY_CACHE, TINY_PREFILL


def test_reader_and_writer_round_trip_the_converted_manifest(tiny_bundle):
    raw = json.loads((tiny_bundle / names.MANIFEST).read_text())
    manifest = read_manifest(tiny_bundle)
    assert manifest.to_dict() == raw  # nothing lost, nothing added, same key order below
    assert json.loads(manifest.to_json()) == raw
    assert manifest.cache_length == TINY_CACHE and manifest.prefill_lengths == TINY_PREFILL
    decode = manifest.bundles[names.TEXT_CORE].signatures[names.DECODE]
    assert decode.outputs[names.LOGITS].shape == (1, 1, manifest.config["vocab_size"])
    assert [e.file for e in manifest.listed_files()] == [*(names.bundle_file(b) for b in manifest.bundles), names.TOKENIZER_FILE]
    assert manifest.encoders["audio"].audio.frames > 0 and manifest.encoders["vision"].image.size == 768


def _mutations():
    """(label, change to the parsed manifest, words the one-line error must contain)."""
    def drop(*path):
        def change(m):
            for key in path[:-1]:
                m = m[key]
            del m[path[-1]]
        return change

    def put(value, *path):
        def change(m):
            for key in path[:-1]:
                m = m[key]
            m[path[-1]] = value
        return change

    core = ("bundles", names.TEXT_CORE)
    k0 = (*core, "signatures", names.DECODE, "inputs", names.kv_cache("k", 0))
    return [
        ("no cache_length", drop("cache_length"), ["cache_length"]),
        ("no prefill_lengths", drop("prefill_lengths"), ["prefill_lengths"]),
        ("no mask", drop("mask"), ["mask"]),
        ("no signatures", drop(*core, "signatures"), ["signatures"]),
        ("null file", put(None, *core, "file"), ["file", "string"]),
        ("int sha256", put(7, *core, "sha256"), ["sha256", "string"]),
        ("string shape", put(["1", "2"], *k0, "shape"), ["shape[0]", "integer"]),
        ("bundles as a list", put([], "bundles"), ["bundles", "object"]),
        ("files as a string", put("tokenizer.model", "files"), ["files", "object"]),
        ("cache length in TiB", put(1 << 40, "cache_length"), ["cache_length"]),
        ("cache shape in TiB", put([1, 1 << 20, 1 << 20, 1 << 10], *k0, "shape"), ["larger than any bundle tensor"]),
        ("prefill past the cache", put([TINY_CACHE + 1], "prefill_lengths"), ["prefill length"]),
        ("a context span as long as the cache", put([TINY_CACHE], "context_spans"), ["context span"]),
        ("a bool for an int", put(True, "cache_length"), ["cache_length", "integer"]),
        ("NaN mask", put(float("nan"), "mask", "blocked"), ["mask.blocked", "finite"]),
        ("a path that climbs out", put("../../other/text_core.tflite", *core, "file"), ["not a plain file name"]),
        ("an absolute path", put("/etc/passwd", *core, "file"), ["not a plain file name"]),
        ("an unknown bundle", lambda m: m["bundles"].update(lm_head=m["bundles"].pop(names.EMBEDDER)), ["unknown bundle"]),
        ("an encoder without its input", drop("encoders", "vision", "image"), ["either an image or audio"]),
        ("two entries, one file", put(names.bundle_file(names.EMBEDDER), *core, "file"), ["same file"]),
        ("wrong format", put("other", "format"), ["not a g3n bundle manifest"]),
        ("newer format", put(3, "format_version"), ["format_version 3"]),
        ("an older g3n's folder", put(1, "format_version"), ["format_version 1", "convert the checkpoint again"]),
        ("an adapter of another modality", put(names.AUDIO_ADAPTER, "encoders", "vision", "end_of_media"), ["not a vision bundle"]),
        ("a companion the folder lacks", lambda m: m["bundles"].pop(names.END_OF_AUDIO), ["end_of_audio", "does not list"]),
    ]


@pytest.mark.parametrize("label,change,words", _mutations(), ids=[m[0] for m in _mutations()])
def test_reader_refuses_a_bad_manifest_with_one_clear_error(tiny_bundle, tmp_path, label, change, words):
    data = copy.deepcopy(json.loads((tiny_bundle / names.MANIFEST).read_text()))
    change(data)
    (tmp_path / names.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError) as error:
        read_manifest(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("text,words", [
    ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ('{"cache_length": ' + "9" * 5000 + "}", ["cannot read"]),
    ("[1, 2]", ["does not hold a JSON object"]),
    ("\xff\xfe", ["cannot read"]),
])
def test_reader_refuses_unparseable_json(tmp_path, text, words):
    (tmp_path / names.MANIFEST).write_text(text, encoding="latin-1")
    with pytest.raises(BundleError) as error:
        read_manifest(tmp_path)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_writer_refuses_what_the_reader_would(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    data = manifest.to_dict()
    data["cache_length"] = 0
    with pytest.raises(BundleError, match="cache_length 0"):
        Manifest.from_dict(data)
