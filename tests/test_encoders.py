"""The vision and audio encoder bundles and image / audio prompts, against transformers."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch
from transformers import Gemma3nAudioFeatureExtractor

from runtime import MediaError, Session
from runtime.engine import EncoderEngine
from runtime.media import audio_window, frame_clip, load_image, read_wav

# Float32 convolutions and matmuls summed in another order over MobileNet-V5's ~80 blocks / the
# conformer; measured differences are ~3e-6 on outputs of magnitude ~2.5.
ENCODER_ATOL = 1e-4
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    picture = folder / "picture.png"
    Image.fromarray((rng.random((90, 120, 3)) * 255).astype(np.uint8)).save(picture)
    clip = folder / "clip.wav"  # 0.45 s at 16 kHz: a chirp plus noise
    t = np.arange(7200) / 16000
    samples = 0.4 * np.sin(2 * np.pi * (300 + 900 * t) * t) + 0.05 * rng.standard_normal(t.size)
    with wave.open(str(clip), "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(16000)
        wav.writeframes((samples * 32767).astype("<i2").tobytes())
    return picture, clip, samples.astype(np.float32)


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_manifest_describes_the_encoders(tiny_bundle):
    m = manifest(tiny_bundle)
    vision, audio = m["encoders"]["vision"], m["encoders"]["audio"]
    assert vision["bundle"] == "vision_encoder" and vision["image"]["size"] == 768 and vision["soft_tokens"] == 4
    assert vision["end_of_media"] == "end_of_vision" and "adapter" not in vision
    assert (audio["bundle"], audio["adapter"], audio["end_of_media"]) == ("audio_encoder", "audio_adapter", "end_of_audio")
    assert audio["audio"] == {"frames": 4 * 16, "frame_length": 512, "hop_length": 160, "sample_rate": 16000, "mel_bins": 128}
    sig = m["bundles"]["audio_encoder"]["signatures"]["audio_encoder"]
    assert sig["inputs"]["audio"] == {"shape": [1, 64, 512], "dtype": "float32"}
    assert sig["inputs"]["mask"] == {"shape": [1, 64], "dtype": "uint8"}
    assert sig["outputs"] == {"features": {"shape": [1, 4, 32], "dtype": "float32"}, "mask": {"shape": [1, 4], "dtype": "uint8"}}
    adapter = m["bundles"]["audio_adapter"]["signatures"]["audio_adapter"]
    assert adapter["outputs"]["embeddings"]["shape"] == [1, 4, 64]
    for end in ("end_of_vision", "end_of_audio"):
        assert m["bundles"][end]["signatures"][end] == {"inputs": {}, "outputs": {"embeddings": {"shape": [1, 1, 64], "dtype": "float32"}}}
    assert m["bundles"]["vision_encoder"]["signatures"]["vision_encoder"]["outputs"]["embeddings"]["shape"] == [1, 4, 64]


def test_vision_bundle_matches_transformers(tiny_bundle, reference, media):
    picture, _, _ = media
    image = load_image(picture, 768)
    got = EncoderEngine(tiny_bundle / "vision_encoder.tflite", "vision_encoder")(images=image)["embeddings"]
    with torch.no_grad():
        expected = reference.model.get_image_features(torch.from_numpy(image).permute(0, 3, 1, 2)).pooler_output
    np.testing.assert_allclose(got, expected.numpy(), atol=ENCODER_ATOL, rtol=0)


def test_audio_bundles_match_transformers(tiny_bundle, reference, media):
    """Framed samples through the audio encoder and adapter bundles equal transformers' feature
    extractor and get_audio_features on the same clip."""
    _, _, samples = media
    ref_features = Gemma3nAudioFeatureExtractor(feature_size=128)(samples)
    features = ref_features["input_features"][0][: ref_features["input_features_mask"][0].sum()]
    frames = frame_clip(samples, 512, 160)
    assert len(frames) == len(features) == 43  # (7296 - 513) // 160 + 1: the clip padded to a multiple of 128
    inputs = audio_window(frames, 64)
    encoded = EncoderEngine(tiny_bundle / "audio_encoder.tflite", "audio_encoder")(**inputs)
    out = EncoderEngine(tiny_bundle / "audio_adapter.tflite", "audio_adapter")(features=encoded["features"], mask=encoded["mask"])
    with torch.no_grad():
        ref = reference.model.get_audio_features(torch.from_numpy(features)[None], torch.zeros(1, len(features), dtype=torch.bool))
    n = ref.pooler_output.shape[1]  # ceil(43 frames / 16) = 3 soft tokens of the clip
    assert n == 3 and encoded["mask"].tolist() == [[1, 1, 1, 0]]
    np.testing.assert_allclose(out["embeddings"][:, :n], ref.pooler_output.numpy(), atol=ENCODER_ATOL, rtol=0)
    assert not out["embeddings"][:, n:].any()  # tokens past the clip


def test_front_end_equals_transformers_feature_extractor():
    """The encoder's in-graph log-mel (converter/encoders.py AudioFrontEnd), in PyTorch, against
    transformers' Gemma3nAudioFeatureExtractor, with its defaults and with a per-bin normalisation.
    atol 2e-4: a float32 matmul against a float64 FFT; log-mel values are ~-11..3, so ~1e-5 relative."""
    from converter.encoders import AudioFrontEnd

    for length, settings in ((7200, {"feature_size": 128}), (3 * 16000 + 77, {"feature_size": 32, "per_bin_mean": [0.5] * 32,
                                                                           "per_bin_stddev": [2.0] * 32, "input_scale_factor": 0.5})):
        samples = (np.random.default_rng(length).standard_normal(length) * 0.1).astype(np.float32)
        ref = Gemma3nAudioFeatureExtractor(**settings)(samples)
        expected = ref["input_features"][0][: ref["input_features_mask"][0].sum()]
        with torch.no_grad():
            ours = AudioFrontEnd(settings)(torch.from_numpy(frame_clip(samples, 512, 160)))
        np.testing.assert_allclose(ours.numpy(), expected, atol=2e-4, rtol=0)


def multimodal_ids(tok, spec: dict, text: str) -> list[int]:
    """The prompt as transformers' Gemma3nProcessor lays it out: each medium as
    \\n\\n<start> + soft tokens + <end>\\n\\n before the text, in a user turn."""
    ids = [tok.bos_id, tok.markers["<start_of_turn>"]] + tok.sp.encode("user\n\n\n")
    for i, (kind, s) in enumerate(spec.items()):
        if i:
            ids += tok.sp.encode("\n\n\n\n")
        ids += [s["start_token_id"]] + [s["soft_token_id"]] * s["soft_tokens"] + [s["end_token_id"]]
    ids += tok.sp.encode("\n\n" + text) + [tok.markers["<end_of_turn>"]] + tok.sp.encode("\n")
    return ids + [tok.markers["<start_of_turn>"]] + tok.sp.encode("model\n")


def test_image_and_audio_prompt_greedy_matches_transformers(tiny_bundle, reference, media):
    picture, clip, _ = media
    session = Session(tiny_bundle)
    assert session.loaded_bundles == ["text_core", "embedder", "ple"]
    result = session.generate("Describe both.", image=picture, audio=clip, max_new_tokens=NEW_TOKENS)
    assert session.loaded_bundles == ["text_core", "embedder", "ple", "vision_encoder", "audio_encoder", "audio_adapter"]

    specs = manifest(tiny_bundle)["encoders"]
    ids = multimodal_ids(session.tokenizer, {"vision": specs["vision"], "audio": specs["audio"]}, "Describe both.")
    assert result.stats["prompt_tokens"] == len(ids)
    extracted = Gemma3nAudioFeatureExtractor(feature_size=128)(read_wav(clip)[0])  # the WAV's 16-bit samples
    features = extracted["input_features"][0][: extracted["input_features_mask"][0].sum()]
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]),
            pixel_values=torch.from_numpy(load_image(picture, 768)).permute(0, 3, 1, 2),
            input_features=torch.from_numpy(features)[None],
            input_features_mask=torch.ones(1, len(features), dtype=torch.bool),
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=sorted(session.tokenizer.stop_ids), pad_token_id=0,
        )
    assert result.token_ids == out[0, len(ids):].tolist()
    assert [m["kind"] for m in result.stats["media"]] == ["image", "audio"]

    # A follow-up text turn loads nothing new; releasing drops the encoders.
    session.generate("Again?", max_new_tokens=2)
    session.release_encoders()
    assert session.loaded_bundles == ["text_core", "embedder", "ple"]


def test_quantized_encoders(tiny_int8_bundle):
    m = manifest(tiny_int8_bundle)
    for name in ("vision_encoder", "audio_encoder", "audio_adapter"):
        entry = m["bundles"][name]
        assert entry["quantization"]["scheme"] == "int8"
        assert entry["quality"]["cosine"] >= 0.99, name
    assert m["bundles"]["vision_encoder"]["bits_per_weight"] < 16  # the 1x1 convolutions are int8 too
    for name in ("end_of_vision", "end_of_audio"):  # one constant embedding each
        assert m["bundles"][name]["quantization"] == {"scheme": "float32"}


def test_bad_media_is_a_clear_error(tiny_bundle, tiny_int4_bundle, tmp_path, media):
    picture, clip, _ = media
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    session = Session(tiny_bundle)
    with pytest.raises(MediaError, match="is not an image"):
        session.generate("Describe", image=broken)
    not_wav = tmp_path / "clip.wav"
    not_wav.write_bytes(b"RIFF....WAVEfmt nonsense")
    with pytest.raises(MediaError, match="is not a PCM WAV file"):
        session.generate("Describe", audio=not_wav)
    with pytest.raises(MediaError, match="is not a PCM WAV file"):  # a good image does not load its encoder either
        session.generate("Describe", image=picture, audio=not_wav)
    assert session.position == 0 and session.loaded_bundles == ["text_core", "embedder", "ple"]  # nothing ran
    with pytest.raises(MediaError, match="has no vision encoder"):
        Session(tiny_int4_bundle).generate("Describe", image=picture)


def test_interactive_chat_attaches_media_to_the_next_prompt(tiny_bundle, media, tmp_path):
    from click.testing import CliRunner

    from runtime.cli import main

    picture, _, _ = media
    lines = f"/image {picture}\nWhat is it?\n/audio {tmp_path / 'missing.wav'}\nAnd this?\nHi\n/exit\n"
    result = CliRunner().invoke(main, [str(tiny_bundle), "--max-new-tokens", "3", "--stats"], input=lines)
    assert result.exit_code == 0, result.output
    assert "goes with the next prompt" in result.stderr and "no such file" in result.stderr
    assert "loaded: text_core, embedder, ple, vision_encoder" in result.stderr  # after the image prompt
