"""Images and audio clips -> the encoder bundles' inputs, with numpy and Pillow only.

Image: RGB, resized to S x S (bilinear, as transformers' Gemma 3n image processor), scaled to
[0, 1], no mean / std normalisation: [1, S, S, 3] float32.

Audio: a WAV file (PCM 8/16/24/32-bit or float 32/64-bit, 1 to 384 kHz, mono or mixed down), cut
to the encoder's window at its own rate, resampled to 16 kHz and cut into frames as transformers'
Gemma3nAudioFeatureExtractor cuts it (32 ms every 10 ms). The encoder computes the log-mel from
the frames itself (converter/encoders.py AudioFrontEnd), so the same bundle serves g3n-run and
LiteRT-LM, which hands it frames too. Clips longer than the encoder's window (30 s) are cut, as
the extractor cuts them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bundle.errors import BundleError

SAMPLE_RATE = 16_000
PAD_TO_MULTIPLE = 128  # samples, as the reference extractor pads
MAX_SECONDS = 30.0  # the reference extractor's cut


class MediaError(BundleError):
    """An image or audio input that cannot be read, or that the bundle cannot encode."""


def load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"{path} is not an image Pillow can read: {exc}") from exc
    return (np.asarray(rgb, np.float32) / np.float32(255.0))[None]


MIN_RATE, MAX_RATE = 1_000, 384_000  # what a WAV of speech or music is recorded at
PCM, IEEE_FLOAT, EXTENSIBLE = 1, 3, 0xFFFE


def _wav_chunks(data: bytes, path: Path) -> tuple[bytes, bytes]:
    """The `fmt ` and `data` chunks of a RIFF/WAVE file."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise MediaError(f"{path} is not a PCM WAV file: it has no RIFF/WAVE header")
    chunks, at = {}, 12
    while at + 8 <= len(data):
        name, size = data[at:at + 4], int.from_bytes(data[at + 4:at + 8], "little")
        chunks.setdefault(name, data[at + 8:at + 8 + size])  # a truncated last chunk keeps what is there
        at += 8 + size + (size & 1)
    if b"fmt " not in chunks or len(chunks[b"fmt "]) < 16 or b"data" not in chunks:
        raise MediaError(f"{path} is not a PCM WAV file: its fmt or data chunk is missing or cut short")
    return chunks[b"fmt "], chunks[b"data"]


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Samples in [-1, 1] (mono, float32) and the sample rate: PCM 8/16/24/32-bit or IEEE float
    32/64-bit, plain or WAVE_FORMAT_EXTENSIBLE."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read {path}: {exc.strerror or exc}") from exc
    fmt, raw = _wav_chunks(data, path)
    tag, channels, rate = int.from_bytes(fmt[0:2], "little"), int.from_bytes(fmt[2:4], "little"), int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == EXTENSIBLE and len(fmt) >= 26:
        tag = int.from_bytes(fmt[24:26], "little")  # the sub-format GUID starts with the plain tag
    if channels < 1:
        raise MediaError(f"{path} says it has {channels} channels")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise MediaError(f"{path} has a sample rate of {rate} Hz; g3n reads WAV files from {MIN_RATE} to {MAX_RATE} Hz")
    width = bits // 8
    if (tag, bits) not in {(PCM, 8), (PCM, 16), (PCM, 24), (PCM, 32), (IEEE_FLOAT, 32), (IEEE_FLOAT, 64)}:
        raise MediaError(f"{path}: WAV format {tag} with {bits}-bit samples is not supported (PCM 8/16/24/32-bit or float 32/64-bit)")
    raw = raw[: len(raw) // (width * channels) * width * channels]
    if not raw:
        raise MediaError(f"{path} has no audio samples")
    if tag == IEEE_FLOAT:
        samples = np.frombuffer(raw, f"<f{width}").astype(np.float32)
        if not np.isfinite(samples).all():
            raise MediaError(f"{path} holds NaN or infinite samples")
        samples = np.clip(samples, -1.0, 1.0)
    elif width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        samples = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 2**23
    else:
        samples = np.frombuffer(raw, f"<i{width}").astype(np.float32) / 2 ** (8 * width - 1)
    samples = samples.reshape(-1, channels).mean(axis=1)
    return samples.astype(np.float32), rate


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return samples
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(samples, target // g, rate // g).astype(np.float32)


def frame_clip(samples: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """[frames, frame_length]: a 16 kHz clip cut into frames as transformers' Gemma3nAudioFeatureExtractor
    cuts it: zero-padded to a multiple of 128 samples, frame k from sample k * hop. The extractor
    unfolds frame_length + 1 samples but its pre-emphasis reads only the first frame_length. Frames
    that start past the clip's end are dropped (the extractor may mark the last one as padding)."""
    real = len(samples)
    padded = np.zeros(-(-real // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE, np.float32)
    padded[:real] = samples
    if len(padded) < frame_length + 1:
        raise MediaError(f"the clip is too short ({real} samples at 16 kHz; at least {frame_length + 1} are needed)")
    count = min((len(padded) - frame_length - 1) // hop_length + 1, -(-real // hop_length))
    step = padded.strides[0]
    return np.lib.stride_tricks.as_strided(padded, (count, frame_length), (step * hop_length, step)).copy()


def load_audio(path: Path, spec) -> tuple[np.ndarray, bool]:
    """Frames [n, frame_length] of a WAV file for the audio encoder described by `spec` (the
    manifest's AudioInput), at most its window, and whether the clip was cut to fit."""
    samples, rate = read_wav(path)
    max_samples = min(int(MAX_SECONDS * spec.sample_rate), spec.frames * spec.hop_length)
    # Cut at the source rate first, so a long or low-rate file never resamples more than the window.
    source_max = math.ceil(max_samples * rate / spec.sample_rate)
    cut = len(samples) > source_max
    samples = resample(samples[:source_max], rate, spec.sample_rate)[:max_samples]
    return frame_clip(samples, spec.frame_length, spec.hop_length)[: spec.frames], cut


def audio_window(frames: np.ndarray, window: int) -> dict[str, np.ndarray]:
    """The audio encoder's inputs: the frames zero-padded to its window, and the real-frame mask."""
    n = min(len(frames), window)
    audio = np.zeros((1, window, frames.shape[1]), np.float32)
    audio[0, :n] = frames[:n]
    mask = np.zeros((1, window), np.uint8)
    mask[0, :n] = 1
    return {"audio": audio, "mask": mask}
