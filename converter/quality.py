"""Quality report of quantized bundles against their float originals, on fixed inputs: a
pipeline step that runs the bundles with the runtime, so it sits above both quant/ and runtime/.

Per bundle: cosine similarity of the quantized bundle's outputs to the float bundle's.
  embedder / ple: the embeddings of the fixed prompts' tokens.
  text_core:      next-token logits, quantized text core vs float text core, both fed the float
                  embedder's and PLE's outputs (so only the text core's own error shows).
Text path (all three bundles quantized vs all float, teacher-forced over the fixed prompts):
  top-1 agreement of the next-token argmax, mean KL(float || quantized), logits cosine.

The float side runs LiteRT's built-in kernels on the mapped float files (no XNNPACK repacking),
the quantized side the default kernels a phone runtime uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bundle import names
from bundle.manifest import EncoderEntry, Manifest

# Fixed prompt set: a few varied sentences, tokenized with the bundle's tokenizer when it has one.
PROMPTS = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Explain in two sentences why the sky is blue during the day and red at sunset.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Translate to French: I would like a cup of coffee and a croissant, please.",
)
PROMPT_TOKENS = 32  # tokens per prompt; the first half prefilled, the second half scored
RANDOM_PROMPT_SEED = 1234  # bundles without a tokenizer are scored on seeded random token ids


@dataclass(frozen=True)
class Threshold:
    """The worst acceptable value of a metric, and the reason it sits there."""

    limit: float
    reason: str
    higher_is_better: bool = True

    def violated_by(self, value: float) -> bool:
        return value < self.limit if self.higher_is_better else value > self.limit

    def describe(self) -> str:
        return f"{'min' if self.higher_is_better else 'max'} {self.limit}"


# Warn (or fail with --strict) below these. Keyed (bundle or "text_path", scheme) -> metric -> bar.
# int8 per-channel keeps each weight within 1/254 of its row's range; int4 block-32 within 1/14 of
# its block's range, so int4 bars sit lower. The bars are set well under what healthy models score
# (docs/QUANTIZATION.md lists the measurements), so crossing one means the weights quantize badly
# (outliers, a broken checkpoint), not ordinary rounding noise.
THRESHOLDS: dict[tuple[str, str], dict[str, Threshold]] = {
    (names.EMBEDDER, "int8"): {"cosine": Threshold(0.999, "a table lookup: the error is the rounding of one row, ~0.1%")},
    (names.EMBEDDER, "int4"): {"cosine": Threshold(0.98, "one row's int4 rounding; healthy tables score >= 0.99")},
    (names.PLE, "int8"): {"cosine": Threshold(0.999, "a table lookup: the error is the rounding of one row, ~0.1%")},
    (names.PLE, "int4"): {"cosine": Threshold(0.98, "one row's int4 rounding; healthy tables score >= 0.99")},
    (names.TEXT_CORE, "int8"): {"cosine": Threshold(0.99, "the errors of hundreds of int8 matmuls compound through the layers")},
    (names.TEXT_CORE, "int4"): {"cosine": Threshold(0.9, "int4 matmul errors compound through every layer")},
    (names.VISION_ENCODER, "int8"): {"cosine": Threshold(0.98, "int8 rounding compounds through MobileNet-V5's ~80 blocks")},
    (names.AUDIO_ENCODER, "int8"): {"cosine": Threshold(0.98, "int8 rounding compounds through the conformer's layers")},
    (names.VISION_ENCODER, "int4"): {"cosine": Threshold(0.9, "int4 projections on top of int8 convolutions")},
    (names.AUDIO_ENCODER, "int4"): {"cosine": Threshold(0.9, "int4 rounding in every conformer projection")},
    (names.AUDIO_ADAPTER, "int8"): {"cosine": Threshold(0.999, "one int8 projection between two RMSNorms")},
    (names.AUDIO_ADAPTER, "int4"): {"cosine": Threshold(0.98, "one int4 projection between two RMSNorms")},
    ("text_path", "int8"): {
        "top1_agreement": Threshold(0.9, "int8 rarely changes the argmax except between near-tied tokens"),
        "mean_kl": Threshold(0.05, "nats; int8 noise moves the distribution only slightly", higher_is_better=False),
    },
    ("text_path", "int4"): {
        "top1_agreement": Threshold(0.6, "int4 flips near-tied argmaxes; a broken model agrees far less"),
        "mean_kl": Threshold(0.5, "nats; int4 reshapes the tail of the distribution, not its bulk", higher_is_better=False),
    },
}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def fixed_prompts(tokenizer: Path | None, vocab_size: int, bos_id: int, length: int) -> tuple[list[list[int]], str]:
    """The prompt set as token ids, and a one-line description of it for the report."""
    if tokenizer is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        prompts = [([bos_id] + sp.encode(p))[:length] for p in PROMPTS]
        return prompts, f"{len(prompts)} fixed sentences, up to {length} tokens each"
    rng = np.random.default_rng(RANDOM_PROMPT_SEED)
    prompts = [[bos_id] + rng.integers(2, vocab_size, length - 1).tolist() for _ in PROMPTS]
    return prompts, f"{len(prompts)} seeded random token sequences of {length} tokens (no tokenizer)"


def token_bundle_cosine(float_path: Path, quant_path: Path, bundle: str, prompts: list[list[int]]) -> float:
    """Cosine of embedder / ple outputs over every prompt token (decode signature, one id at a time)."""
    from runtime.engine import open_interpreter

    signature = names.lookup_signature(bundle)
    ref = open_interpreter(float_path, reference=True).get_signature_runner(signature)
    got = open_interpreter(quant_path).get_signature_runner(signature)
    ids = sorted({t for p in prompts for t in p})
    a = np.stack([ref(**{names.TOKEN_IDS: np.array([[t]], np.int32)})[names.EMBEDDINGS] for t in ids])
    b = np.stack([got(**{names.TOKEN_IDS: np.array([[t]], np.int32)})[names.EMBEDDINGS] for t in ids])
    return cosine(a, b)


def encoder_inputs(entry: EncoderEntry) -> dict[str, np.ndarray]:
    """Fixed inputs for an encoder bundle (manifest "encoders" entry): a seeded random image; a
    seeded 3-second chirp in noise, framed for the audio encoder."""
    from runtime.media import audio_window, frame_clip

    rng = np.random.default_rng(RANDOM_PROMPT_SEED)
    if entry.image is not None:
        size = entry.image.size
        return {names.IMAGES: rng.random((1, size, size, 3), dtype=np.float32)}
    audio = entry.audio
    t = np.arange(3 * audio.sample_rate) / audio.sample_rate
    clip = 0.4 * np.sin(2 * np.pi * (200 + 600 * t) * t) + 0.05 * rng.standard_normal(t.size)
    return audio_window(frame_clip(clip.astype(np.float32), audio.frame_length, audio.hop_length), audio.frames)


def media_cosines(float_files: dict[str, Path], folder: Path, manifest: Manifest, entry: EncoderEntry) -> dict[str, float]:
    """Cosine of each quantized bundle of a modality against its float original, on the same
    inputs: the encoder's output (the clip's real tokens for audio); the audio adapter's
    embeddings from the float encoder's features, so each bundle is scored on its own."""
    from runtime.engine import EncoderEngine

    def run(path: Path, bundle: str, inputs: dict) -> dict:
        return EncoderEngine(path, names.encoder_signature(bundle))(**inputs)

    scores = {}
    inputs = encoder_inputs(entry)
    encoder_file = folder / manifest.bundles[entry.bundle].file
    ref = run(float_files.get(entry.bundle, encoder_file), entry.bundle, inputs)
    keep = ref[names.MASK][0] > 0 if names.MASK in ref else slice(None)
    output = names.FEATURES if entry.adapter else names.EMBEDDINGS
    if entry.bundle in float_files:
        got = run(encoder_file, entry.bundle, inputs)
        scores[entry.bundle] = cosine(ref[output][0][keep], got[output][0][keep])
    if entry.adapter in float_files:
        features = {names.FEATURES: ref[names.FEATURES], names.MASK: ref[names.MASK]}
        a = run(float_files[entry.adapter], entry.adapter, features)[names.EMBEDDINGS][0][keep]
        b = run(folder / manifest.bundles[entry.adapter].file, entry.adapter, features)[names.EMBEDDINGS][0][keep]
        scores[entry.adapter] = cosine(a, b)
    return scores


def teacher_forced_logits(engine, prompts: list[list[int]]) -> np.ndarray:
    """Next-token logits at each position of each prompt's second half: [positions, vocab]."""
    rows = []
    for prompt in prompts:
        engine.reset()
        half = len(prompt) // 2
        engine.feed(prompt[:half])
        rows += [engine.step(t) for t in prompt[half:]]
    return np.stack(rows)


def text_path_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict:
    p_log, q_log = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
    return {
        "top1_agreement": round(float((reference.argmax(-1) == candidate.argmax(-1)).mean()), 4),
        "mean_kl": round(float(kl.mean()), 5),
        "logits_cosine": round(cosine(reference, candidate), 5),
        "positions": int(reference.shape[0]),
    }


def check_thresholds(bundle_schemes: dict[str, str], report: dict) -> list[str]:
    """Human-readable failures of `report` (bundle -> metrics, plus "text_path") against THRESHOLDS."""
    failures = []
    for key, metrics in report.items():
        if not metrics:
            continue
        if key == "text_path":
            schemes = {s for b, s in bundle_schemes.items() if b in names.TEXT_BUNDLES}
            scheme = "int4" if "int4" in schemes else "int8"
        else:
            scheme = bundle_schemes.get(key, "none")
        for metric, bar in THRESHOLDS.get((key, scheme), {}).items():
            if metric not in metrics:
                continue
            if bar.violated_by(metrics[metric]):
                failures.append(f"{key} {scheme}: {metric} {metrics[metric]} ({bar.describe()}: {bar.reason})")
    return failures


def quality_report(folder: Path, manifest: Manifest, float_files: dict[str, Path], schemes: dict[str, str],
                   tokenizer: Path | None, unscored: dict[str, str] | None = None) -> dict:
    """Score the quantized bundles of `folder` against `float_files`; fills each quantized bundle's
    manifest entry with its "quality" and returns the folder-level report (text path, warnings).
    `unscored`: quantized bundles with no float original (and why); the text path then goes unscored."""
    from runtime.engine import TextEngine

    length = min(PROMPT_TOKENS, manifest.cache_length)
    prompts, described = fixed_prompts(tokenizer, manifest.config["vocab_size"], manifest.config["bos_token_id"], length)
    bundles = manifest.bundles
    results: dict[str, dict] = {}
    for name in (names.EMBEDDER, names.PLE):
        if name in float_files:
            results[name] = {"cosine": round(token_bundle_cosine(float_files[name], folder / bundles[name].file, name, prompts), 5)}

    for entry in manifest.encoders.values():
        for name, score in media_cosines(float_files, folder, manifest, entry).items():
            results[name] = {"cosine": round(score, 5)}

    unscored = dict(unscored or {})
    if all(name in bundles for name in names.TEXT_BUNDLES) and unscored:
        unscored["text_path"] = f"needs the float {', '.join(unscored)}"
    elif all(name in bundles for name in names.TEXT_BUNDLES):
        def logits(files: dict[str, Path], reference: bool) -> np.ndarray:
            engine = TextEngine(folder, manifest=manifest, files=files, reference=reference)
            return teacher_forced_logits(engine, prompts)

        quantized = {name: folder / entry.file for name, entry in bundles.items()}
        originals = {**quantized, **float_files}
        reference = logits(originals, reference=True)
        if names.TEXT_CORE in float_files:
            core_only = logits({**originals, names.TEXT_CORE: quantized[names.TEXT_CORE]}, reference=False)
            results[names.TEXT_CORE] = {"cosine": round(cosine(reference, core_only), 5)}
        results["text_path"] = text_path_metrics(reference, logits(quantized, reference=False))

    for name, metrics in results.items():
        if name in bundles:
            bundles[name].quality = metrics
    report = {
        "prompts": described,
        "text_path": results.get("text_path"),
        "warnings": check_thresholds(schemes, results),
    }
    if unscored:
        report["not_scored"] = unscored
    return report
