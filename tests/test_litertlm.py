""".litertlm: packed from a bundle folder, verified section by section, and run by Google's
LiteRT-LM engine (litert-lm-api) with transformers' greedy output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bundle.errors import BundleError
from bundle.litertlm import read_sections, verify_litertlm
from converter.cli import main as convert_main
from converter.pack import pack
from runtime.chat import Tokenizer
from tests.conftest import TINY_CACHE, TINY_PREFILL
from tests.support.tiny_checkpoint import louden_attention, vary_final_norm

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 12


def litertlm(path: Path, **spec) -> dict:
    """LiteRT-LM's answers for `spec` (tests/support/litertlm_probe.py), in its own process."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec_file:
        spec_file.write(json.dumps({"max_new_tokens": NEW_TOKENS, **spec}))
        spec_file.flush()
        done = subprocess.run([sys.executable, "-m", "tests.support.litertlm_probe", str(path), spec_file.name],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def hf_greedy(model, ids: list[int], stop_ids, new_tokens: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=sorted(stop_ids), pad_token_id=0)
    return [t for t in out[0, len(ids):].tolist() if t not in stop_ids]


def hf_log_probs(model, prompt_ids: list[int], target_ids: list[int]) -> np.ndarray:
    """log p(target token | everything before it), teacher-forced, as LiteRT-LM's text scoring."""
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(target_ids) - 1)
    return log_probs[rows, torch.tensor(target_ids)].numpy()


@pytest.fixture(scope="module")
def varied_checkpoint(tiny_text_checkpoint, tmp_path_factory) -> Path:
    """The tiny text checkpoint with a random final norm, so that greedy replies are not echoes."""
    out = tmp_path_factory.mktemp("varied") / "tiny-varied"
    shutil.copytree(tiny_text_checkpoint, out)
    return vary_final_norm(out)


@pytest.fixture(scope="module")
def text_model(varied_checkpoint):
    from transformers import Gemma3nForCausalLM

    return Gemma3nForCausalLM.from_pretrained(varied_checkpoint, attn_implementation="eager",
                                              dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text_bundle(varied_checkpoint, tmp_path_factory) -> Path:
    from converter.pipeline import ConvertOptions, convert

    out = tmp_path_factory.mktemp("litertlm") / "text"
    convert(ConvertOptions(out=out, checkpoint=varied_checkpoint, prefill_lengths=TINY_PREFILL, cache_length=TINY_CACHE))
    return out


@pytest.fixture(scope="module")
def text_file(text_bundle, tmp_path_factory) -> Path:
    return pack(text_bundle, tmp_path_factory.mktemp("litertlm") / "text.litertlm")


@pytest.fixture(scope="module")
def mm_file(tiny_bundle, tmp_path_factory) -> Path:
    """The multimodal checkpoint's folder (all five bundles), packed; kept next to the folder in
    G3N_ARTIFACTS (CI publishes both)."""
    artifacts = os.environ.get("G3N_ARTIFACTS")
    out = Path(artifacts) / "tiny.litertlm" if artifacts else tmp_path_factory.mktemp("litertlm") / "mm.litertlm"
    return pack(tiny_bundle, out)


# --- the file and its manifest ------------------------------------------------------------------


def test_sections_are_the_folders_files_byte_for_byte(text_bundle, text_file):
    packed, problems = verify_litertlm(text_file)
    assert problems == []
    by_name = {e["holds"]: e for e in packed.sections}
    assert {"text_core", "embedder", "ple", "tokenizer", "llm_metadata"} <= set(by_name)
    sections = {s.index: s for s in read_sections(text_file)}
    data = text_file.read_bytes()
    for name in ("text_core", "embedder", "ple"):
        entry = packed.manifest.bundles[name]
        section = sections[by_name[name]["index"]]
        assert data[section.begin:section.end] == (text_bundle / entry.file).read_bytes()
    assert sections[by_name["text_core"]["index"]].model_type == "tf_lite_prefill_decode"
    assert sections[by_name["ple"]["index"]].model_type == "tf_lite_per_layer_embedder"
    assert packed.manifest.to_dict() == json.loads((text_bundle / "manifest.json").read_text())


def test_verify_names_a_damaged_section(text_file, tmp_path):
    damaged = tmp_path / "damaged.litertlm"
    shutil.copy(text_file, damaged)
    packed, _ = verify_litertlm(damaged)
    ple = next(e for e in packed.sections if e["holds"] == "ple")
    section = next(s for s in read_sections(damaged) if s.index == ple["index"])
    with open(damaged, "r+b") as f:
        f.seek(section.begin + section.bytes // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    _, problems = verify_litertlm(damaged)
    assert problems == [f"section {ple['index']} (ple): sha256 differs from the manifest (file corrupted or modified)"]

    result = CliRunner().invoke(convert_main, ["verify", str(damaged)])
    assert result.exit_code == 1
    assert "(ple): sha256 differs" in result.output
    ok = CliRunner().invoke(convert_main, ["verify", str(text_file)])
    assert ok.exit_code == 0 and "OK 5 sections match" in ok.output


@pytest.mark.parametrize("damage", ["truncated", "not a litertlm", "foreign"])
def test_damaged_or_foreign_files_are_one_clear_error(text_file, tmp_path, damage):
    path = tmp_path / "x.litertlm"
    if damage == "truncated":
        path.write_bytes(text_file.read_bytes()[:40])
    elif damage == "not a litertlm":
        path.write_bytes(b"PK\x03\x04" + bytes(100))
    else:  # a .litertlm without g3n's manifest section
        from litert_lm_builder import litertlm_builder as lb

        builder = lb.LitertLmFileBuilder()
        builder.add_system_metadata(lb.Metadata("Authors", "someone", lb.DType.STRING))
        builder.add_generic_binary_data(__file__)
        with open(path, "wb") as f:
            builder.build(f)
    with pytest.raises(BundleError) as err:
        verify_litertlm(path)
    assert str(path) in str(err.value)


def test_pack_refuses_a_damaged_folder_and_leaves_nothing(text_bundle, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(text_bundle, folder)
    with open(folder / "embedder.tflite", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    out = tmp_path / "out.litertlm"
    with pytest.raises(BundleError, match="embedder.tflite: sha256 differs"):
        pack(folder, out)
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".*")) == []


# --- LiteRT-LM runs it: transformers' greedy output ---------------------------------------------------


def _check_against_transformers(path: Path, model, tokenizer: Tokenizer, varied: bool):
    raw_prompts = ["The quick brown fox jumps over the lazy dog", "1 2 3 4 5"]
    chat = ["Hi there", "And again?"]
    got = litertlm(path, raw=raw_prompts, chat=chat)
    stops = set(tokenizer.stop_ids)

    # Raw prompts: no template, the start token then the text.
    for prompt, text in zip(raw_prompts, got["raw"]):
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        expected = hf_greedy(model, ids, stops)
        assert text == tokenizer.decode(expected), prompt
        if varied:  # the reply is no repeat of one token: every step's cache read counts
            assert len(set(expected)) >= NEW_TOKENS // 2, expected

    # Chat: LiteRT-LM renders the Gemma turns itself; transformers gets the same token ids.
    assert got["rendered"] == "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    history = tokenizer.user_turn(chat[0])
    reply1 = hf_greedy(model, history, stops)
    assert got["chat"][0] == tokenizer.decode(reply1)
    # The second turn runs on LiteRT-LM's cached conversation; transformers gets the whole history.
    history += reply1 + tokenizer.encode("<end_of_turn>\n") + tokenizer.user_turn(chat[1], first=False)
    assert got["chat"][1] == tokenizer.decode(hf_greedy(model, history, stops))


def test_litertlm_engine_matches_transformers_text_only(text_file, text_bundle, text_model):
    _check_against_transformers(text_file, text_model, Tokenizer(text_bundle / "tokenizer.model"), varied=True)


def test_litertlm_engine_matches_transformers_multimodal_checkpoint(mm_file, tiny_bundle, reference):
    _check_against_transformers(mm_file, reference, Tokenizer(tiny_bundle / "tokenizer.model"), varied=False)


MEDIA_TOKENS = 16


@pytest.fixture(scope="module")
def media_case(tiny_mm_checkpoint, tmp_path_factory):
    """The tiny multimodal checkpoint made to say varied tokens (a random final norm) and to listen
    to its soft tokens (louder attention), converted with both encoders and packed; its
    transformers model; two clips and two pictures."""
    from PIL import Image
    from transformers import Gemma3nForConditionalGeneration

    from converter.pipeline import ConvertOptions, convert

    root = tmp_path_factory.mktemp("media")
    checkpoint = root / "tiny-mm-media"
    shutil.copytree(tiny_mm_checkpoint, checkpoint)
    louden_attention(vary_final_norm(checkpoint))
    folder = root / "bundle"
    convert(ConvertOptions(out=folder, checkpoint=checkpoint, prefill_lengths=TINY_PREFILL, cache_length=TINY_CACHE,
                           quality_report=False))
    model = Gemma3nForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    clips = []
    for i, pitch in enumerate((220.0, 440.0)):  # half a second each: two tones in noise
        t = np.arange(8000) / 16000
        samples = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.1 * np.sin(6 * np.pi * pitch * t) + 0.02 * rng.standard_normal(t.size)
        clips.append(write_wav(root / f"clip{i}.wav", samples))
    # At the encoder's 768 x 768 already, so LiteRT-LM's resize is the identity.
    pictures = [root / "noise.png", root / "black.png"]
    Image.fromarray((rng.random((768, 768, 3)) * 255).astype(np.uint8)).save(pictures[0])
    Image.new("RGB", (768, 768)).save(pictures[1])
    return pack(folder, root / "media.litertlm"), folder, model, clips, pictures


def write_wav(path: Path, samples: np.ndarray) -> Path:
    import wave

    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(16000)
        wav.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def byte_pieces(tokenizer: Tokenizer) -> list[int]:
    """The tokenizer's byte-fallback pieces. A random model says them often, and LiteRT-LM's text
    stream stops showing a reply at an invalid UTF-8 sequence (<0xD1><0x70>) where sentencepiece
    writes U+FFFD: media prompts are compared with these ids suppressed on both sides."""
    return [i for i in range(tokenizer.sp.get_piece_size()) if tokenizer.sp.is_byte(i)]


def media_prompt(tokenizer: Tokenizer, entry: dict, soft_tokens: int, text: str) -> list[int]:
    """A user turn with one image / clip laid out as transformers' Gemma3nProcessor does, and as
    the packed file tells LiteRT-LM to: \n\n<start> + soft tokens + <end> + \n\n, then the text."""
    sot, eot = tokenizer.markers["<start_of_turn>"], tokenizer.markers["<end_of_turn>"]
    ids = [tokenizer.bos_id, sot] + tokenizer.sp.encode("user\n\n\n") + [entry["start_token_id"]]
    ids += [entry["soft_token_id"]] * soft_tokens + [entry["end_token_id"]]
    return ids + tokenizer.sp.encode("\n\n" + text) + [eot] + tokenizer.sp.encode("\n") + [sot] + tokenizer.sp.encode("model\n")


def hf_media_reply(model, tokenizer: Tokenizer, ids: list[int], **media) -> str:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MEDIA_TOKENS, do_sample=False, suppress_tokens=byte_pieces(tokenizer),
                             eos_token_id=sorted(tokenizer.stop_ids), pad_token_id=0, **media)
    return tokenizer.decode([t for t in out[0, len(ids):].tolist() if t not in tokenizer.stop_ids])


def test_litertlm_audio_prompt_matches_transformers(media_case):
    """A WAV file through LiteRT-LM's engine: it frames the clip (the packed file tells it to skip
    its own log-mel), the audio encoder computes transformers' log-mel in-graph, the adapter
    projects, and the clip's tokens plus the <end_of_audio> section's embedding go into the prompt.
    transformers gets the same clip through its own feature extractor."""
    from transformers import Gemma3nAudioFeatureExtractor

    from runtime.media import read_wav

    path, folder, model, clips, _ = media_case
    tokenizer = Tokenizer(folder / "tokenizer.model")
    audio = json.loads((folder / "manifest.json").read_text())["encoders"]["audio"]
    got = litertlm(path, media=[("audio", str(c), "Describe.") for c in clips], suppress=byte_pieces(tokenizer),
                   max_new_tokens=MEDIA_TOKENS)["media"]
    expected, configured = [], model.config.audio_soft_tokens_per_image
    for clip in clips:
        samples, _ = read_wav(clip)
        frames = 1 + (len(samples) - 512) // 160  # LiteRT-LM frames whole windows of the clip, no padding
        features = Gemma3nAudioFeatureExtractor(feature_size=128)(samples)["input_features"][0][:frames]
        tokens = -(-frames // 16)  # LiteRT-LM places the clip's tokens only; transformers pads to its config's count
        model.config.audio_soft_tokens_per_image = tokens
        try:
            expected.append(hf_media_reply(model, tokenizer, media_prompt(tokenizer, audio, tokens, "Describe."),
                                           input_features=torch.from_numpy(features)[None],
                                           input_features_mask=torch.ones(1, frames, dtype=torch.bool)))
        finally:
            model.config.audio_soft_tokens_per_image = configured
    assert got == expected
    assert expected[0] != expected[1]  # the clip decides the reply: the test sees where its tokens land


def test_litertlm_image_prompt_matches_transformers(media_case):
    """An image through LiteRT-LM's engine, laid out as transformers' processor lays it out
    (<end_of_image> from the end_of_vision section)."""
    from runtime.media import load_image

    path, folder, model, _, pictures = media_case
    tokenizer = Tokenizer(folder / "tokenizer.model")
    vision = json.loads((folder / "manifest.json").read_text())["encoders"]["vision"]
    got = litertlm(path, media=[("image", str(p), "Describe.") for p in pictures], suppress=byte_pieces(tokenizer),
                   max_new_tokens=MEDIA_TOKENS)["media"]
    ids = media_prompt(tokenizer, vision, vision["soft_tokens"], "Describe.")
    expected = [hf_media_reply(model, tokenizer, ids, pixel_values=torch.from_numpy(load_image(p, 768)).permute(0, 3, 1, 2))
                for p in pictures]
    assert got == expected
    # Without <end_of_image> (LiteRT-LM's own Gemma 3n layout) the reply differs: the end token counts.
    without_end = [t for t in ids if t != vision["end_token_id"]]
    pixels = torch.from_numpy(load_image(pictures[0], 768)).permute(0, 3, 1, 2)
    assert hf_media_reply(model, tokenizer, without_end, pixel_values=pixels) != expected[0]


class PixelProbe(torch.nn.Module):
    """A stand-in vision encoder whose soft tokens follow each colour channel's mean: black, red and
    white pictures then say different things to the text model, and a wrong scale or channel order
    in front of the encoder would say something else again."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.tokens, self.width = tokens, width
        self.register_buffer("base", torch.randn(tokens * width, generator=gen))
        self.register_buffer("per_channel", 3 * torch.randn(3, tokens * width, generator=gen))

    def forward(self, images):  # [1,S,S,3] RGB -> {"embeddings": [1,N,H]} of unit RMS, as the real soft tokens
        x = (self.base + images.mean(dim=(1, 2)) @ self.per_channel).reshape(1, self.tokens, self.width)
        return {"embeddings": x * torch.rsqrt((x * x).mean(-1, keepdim=True))}


def test_litertlm_gives_the_vision_section_transformers_pixels(media_case, tmp_path, monkeypatch):
    """LiteRT-LM's image preprocessing for the packed file hands the vision section what
    transformers' processor hands the tower (RGB in [0,1] at 768 x 768): shown with PixelProbe in
    the vision encoder's place, in the file and in transformers alike."""
    import litert_torch
    from PIL import Image
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from bundle.manifest import file_entry, read_manifest, write_manifest
    from runtime.media import load_image

    _, folder, model, _, _ = media_case
    probe_folder = tmp_path / "bundle"
    shutil.copytree(folder, probe_folder)
    manifest = read_manifest(probe_folder)
    vision = manifest.encoders["vision"]
    probe = PixelProbe(vision.soft_tokens, manifest.config["hidden_size"]).eval()
    entry = manifest.bundles["vision_encoder"]
    litert_torch.signature("vision_encoder", probe, sample_kwargs={"images": torch.zeros(1, 768, 768, 3)}).convert().export(
        str(probe_folder / entry.file))
    fresh = file_entry(probe_folder / entry.file)
    entry.bytes, entry.sha256 = fresh.bytes, fresh.sha256
    write_manifest(probe_folder, manifest)
    path = pack(probe_folder, tmp_path / "probe.litertlm")

    pictures = []
    for name, colour in (("black", (0, 0, 0)), ("red", (255, 0, 0)), ("white", (255, 255, 255))):
        pictures.append(tmp_path / f"{name}.png")
        Image.new("RGB", (768, 768), colour).save(pictures[-1])
    tokenizer = Tokenizer(probe_folder / "tokenizer.model")
    got = litertlm(path, media=[("image", str(p), "Describe.") for p in pictures], suppress=byte_pieces(tokenizer),
                   max_new_tokens=MEDIA_TOKENS)["media"]

    def probed(pixel_values, **kwargs):  # transformers' NCHW pixels through the same probe
        return BaseModelOutputWithPooling(pooler_output=probe(pixel_values.permute(0, 2, 3, 1))["embeddings"])

    monkeypatch.setattr(model.model, "get_image_features", probed)
    ids = media_prompt(tokenizer, vision.__dict__, vision.soft_tokens, "Describe.")
    expected = [hf_media_reply(model, tokenizer, ids, pixel_values=torch.from_numpy(load_image(p, 768)).permute(0, 3, 1, 2))
                for p in pictures]
    assert got == expected
    assert len(set(expected)) == 3


def test_int4_litertlm_follows_the_float_file(mm_file, tiny_int4_bundle, tmp_path):
    """The int4 text bundles, packed, through LiteRT-LM: greedy text equal to the float file's for
    INT4_GREEDY_FOLLOWS (20) tokens on each prompt, the bar g3n-run's int4 bundles meet."""
    from converter.quality import PROMPTS
    from tests.test_quantization import INT4_GREEDY_FOLLOWS

    int4_file = pack(tiny_int4_bundle, tmp_path / "int4.litertlm")
    spec = dict(raw=list(PROMPTS), max_new_tokens=INT4_GREEDY_FOLLOWS)
    assert litertlm(int4_file, **spec)["raw"] == litertlm(mm_file, **spec)["raw"]


@pytest.mark.xfail(strict=True, reason=(
    "LiteRT-LM 0.18.1's teacher-forced log-probabilities (Session.run_text_scoring) differ from "
    "transformers' by up to 1.35 nats on this file (0.64 on the unvaried tiny model; g3n-run on the "
    "same folder: within 1e-4), while its greedy text over varied tokens agrees. Not a second softcap, a temperature, the start token, the mask's extent or the "
    "activation type (FLOAT32 gives the same numbers); the cause is not found yet."))
def test_litertlm_log_probs_match_transformers(text_file, text_bundle, text_model):
    # Every position of prompt and target goes through the KV cache, so a wrong cache, mask or
    # position shows here even when the tiny model's greedy text (it repeats the last token) agrees.
    # atol 2e-3: LiteRT-LM's CPU executor may quantize activations on the fly (XNNPACK dynamic
    # range), which moves float32 logits by about 1e-3.
    tokenizer = Tokenizer(text_bundle / "tokenizer.model")
    prompt, target = "Once upon a time", " there was a fox who lived in a wood"
    (scores,) = litertlm(text_file, score=[(prompt, target)])["score"]
    expected = hf_log_probs(text_model, [tokenizer.bos_id] + tokenizer.encode(prompt), tokenizer.encode(target))
    np.testing.assert_allclose(np.array(scores), expected, atol=2e-3)


# --- the command line ----------------------------------------------------------------------------


def test_convert_format_litertlm_writes_one_file(tiny_text_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(convert_main, [
        "--checkpoint", str(tiny_text_checkpoint), "--out", str(out), "--format", "litertlm", "-q",
        "--prefill-lengths", ",".join(map(str, TINY_PREFILL)), "--cache-length", str(TINY_CACHE)])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert files == [f"{tiny_text_checkpoint.name}.litertlm"]
    _, problems = verify_litertlm(out / files[0])
    assert problems == []


def test_g3n_run_names_the_engine_for_a_litertlm(text_file):
    from runtime.cli import main as run_main

    result = CliRunner().invoke(run_main, [str(text_file), "--prompt", "hi"])
    assert result.exit_code != 0
    assert "run it with LiteRT-LM's engine" in result.output


def test_pack_command(text_bundle, tmp_path):
    out = tmp_path / "cli.litertlm"
    result = CliRunner().invoke(convert_main, ["pack", str(text_bundle), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert verify_litertlm(out)[1] == []
    bad = CliRunner().invoke(convert_main, ["pack", str(tmp_path / "missing"), "--out", str(out)])
    assert bad.exit_code == 1 and "does not exist" in bad.output
