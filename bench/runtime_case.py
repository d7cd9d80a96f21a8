"""One g3n-run measurement in its own process: load a bundle folder, prefill a prompt of N random
token ids, decode M tokens greedily; prints the Session's stats as JSON (peak RSS from the caller).
With --media image / audio the prompt also carries a random image / a 10 s clip, so the encoder
loads and runs; the text is then N words, since a media prompt is text, not token ids."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.session import Session  # noqa: E402


def write_medium(kind: str, folder: Path) -> Path:
    rng = np.random.default_rng(0)
    if kind == "image":
        from PIL import Image

        path = folder / "image.png"
        Image.fromarray((rng.random((768, 1024, 3)) * 255).astype(np.uint8)).save(path)
        return path
    path = folder / "clip.wav"
    t = np.arange(10 * 16000) / 16000
    samples = 0.4 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(t.size)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(16000)
        wav.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt-tokens", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--backend", default="compiled", choices=["compiled", "interpreter"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--media", choices=["image", "audio"], default=None)
    args = parser.parse_args()

    session = Session(args.folder, num_threads=args.threads, backend=args.backend)
    vocab = session.manifest.config["vocab_size_per_layer_input"]
    prompt = np.random.default_rng(0).integers(3, vocab, args.prompt_tokens).tolist()
    media, encoder_bytes = {}, 0
    if args.media:
        with tempfile.TemporaryDirectory() as tmp:
            media[args.media] = write_medium(args.media, Path(tmp))
            prompt = " ".join(["the"] * args.prompt_tokens)  # text: a media prompt is tokenized, not given as ids
            encoder = session.manifest.encoders["vision" if args.media == "image" else "audio"]
            loaded = [encoder.bundle, *([encoder.adapter] if encoder.adapter else [])]  # what g3n-run loads for it
            encoder_bytes = sum(session.manifest.bundles[b].bytes for b in loaded)
            started = time.perf_counter()
            result = session.generate(prompt, raw=True, max_new_tokens=args.new_tokens, **media)
    else:
        started = time.perf_counter()
        result = session.generate(prompt, max_new_tokens=args.new_tokens)
    stats = dict(result.stats, wall_seconds=round(time.perf_counter() - started, 3), backend=args.backend,
                 encoder_bytes=encoder_bytes)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
