"""A chat session over a g3n bundle folder: the Python API behind g3n-run.

    from runtime import Session, SamplingConfig
    chat = Session("e2b-int4/")
    for piece in chat.stream("Why is the sky blue?"):
        print(piece.text, end="", flush=True)
    reply = chat.generate("And at sunset?", sampling=SamplingConfig(temperature=0.7, top_p=0.95, seed=1))
    chat.reset()

The text interpreters (text_core, embedder, ple) load with the session; a vision or audio encoder
loads only when a prompt carries an image or audio, and `release_encoders()` drops them. The KV
cache persists across turns, so each turn prefills only its own tokens.

Context limit: a turn whose prompt does not fit in the cache left raises ContextFullError before
anything runs (the session is unchanged); a reply that reaches the end of the cache stops with
finish_reason "context_full". `reset()` starts an empty conversation.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bundle import names
from bundle.errors import BundleError
from bundle.manifest import EncoderEntry, open_bundle
from runtime.chat import TextStream, Tokenizer
from runtime.engine import LOAD_ORDER, EncoderEngine, TextEngine, default_weight_cache_dir
from runtime.media import MediaError, audio_window, load_audio, load_image
from runtime.sampling import Sampler, SamplingConfig

ENCODERS = {"image": "vision", "audio": "audio"}  # prompt input -> manifest "encoders" key


class ContextFullError(BundleError):
    """The prompt does not fit in what is left of the bundle's KV cache."""


@dataclass(frozen=True)
class Piece:
    """One generated token and the text it adds."""

    token_id: int
    text: str


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos / end_of_turn), "max_new_tokens" or "context_full"
    stats: dict = field(default_factory=dict)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Session:
    def __init__(self, folder: Path, *, verify: str | bool = "once", num_threads: int | None = None,
                 backend: str = "compiled", weight_cache_dir: Path | None | str = "default"):
        """`verify`: "once" (each file's sha256 checked the first time it is seen and whenever it
        changes, remembered in the cache folder), "always" (True) or "sizes" (False: sizes only).
        `weight_cache_dir`: where XNNPACK keeps the text core's packed weights between loads and the
        record of verified files live (default: runtime.engine.default_weight_cache_dir()); None
        packs the weights in memory every load."""
        started = time.perf_counter()
        self.folder = Path(folder)
        mode = ("always" if verify else "sizes") if isinstance(verify, bool) else verify
        if weight_cache_dir == "default":
            weight_cache_dir = default_weight_cache_dir()
        self.manifest = open_bundle(self.folder, verify=mode, needs=names.TEXT_BUNDLES,
                                    memo=weight_cache_dir or default_weight_cache_dir())
        verified = self.manifest.bundles[names.TEXT_CORE].sha256 if mode != "sizes" else None
        self.engine = TextEngine(self.folder, num_threads, manifest=self.manifest, backend=backend,
                                 weight_cache_dir=weight_cache_dir, verified_sha256=verified)
        tokenizer = self.manifest.files.get(names.TOKENIZER)
        self.tokenizer = Tokenizer(self.folder / tokenizer.file) if tokenizer else None
        self.encoder_specs = self.manifest.encoders
        self.num_threads = num_threads
        self.encoders: dict[str, EncoderEngine] = {}
        self.load_seconds = time.perf_counter() - started
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (the KV cache and the owed history tokens)."""
        self.engine.reset()
        self._owed: list[int] = []  # tokens that belong in the history but are not in the cache yet

    @property
    def cache_length(self) -> int:
        return self.engine.cache_length

    @property
    def position(self) -> int:
        """Tokens in the KV cache (the conversation so far)."""
        return self.engine.position

    @property
    def loaded_bundles(self) -> list[str]:
        return [*LOAD_ORDER, *self.encoders]

    def release_encoders(self) -> None:
        self.encoders.clear()

    # -- inputs --------------------------------------------------------------------------------
    def _encoder(self, kind: str) -> tuple[EncoderEntry, EncoderEngine | None]:
        """The encoder for `kind` ("image" / "audio"): its manifest spec, and its engine once loaded."""
        spec = self.encoder_specs.get(ENCODERS[kind])
        if spec is None or kind == "audio" and spec.adapter is None:
            raise MediaError(
                f"this bundle has no {ENCODERS[kind]} encoder, so it cannot take --{kind} input; "
                f"the bundle holds: {', '.join(self.manifest.bundles)}"
            )
        return spec, self.encoders.get(spec.bundle)

    def _read_media(self, kind: str, path: Path) -> tuple[dict[str, np.ndarray], bool]:
        """The encoder's inputs for one image / clip (MediaError if unreadable), and whether a
        clip was cut to the encoder's window."""
        spec, _ = self._encoder(kind)
        if kind == "image":
            return {names.IMAGES: load_image(Path(path), spec.image.size)}, False
        frames, cut = load_audio(Path(path), spec.audio)
        return audio_window(frames, spec.audio.frames), cut

    def _engine(self, bundle: str) -> EncoderEngine:
        """A media bundle's engine, loaded on first use."""
        if bundle not in self.encoders:
            self.encoders[bundle] = EncoderEngine(self.folder / self.manifest.bundles[bundle].file,
                                                  names.encoder_signature(bundle), self.num_threads)
        return self.encoders[bundle]

    def _encode(self, kind: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Soft-token embeddings [N, H], loading the encoder (and the audio adapter) on first use.
        Padding tokens of a short clip get the embedding of the last audio id, as in the reference."""
        spec, _ = self._encoder(kind)
        out = self._engine(spec.bundle)(**inputs)
        if spec.adapter is None:
            return out[names.EMBEDDINGS][0]
        embeddings = self._engine(spec.adapter)(**{names.FEATURES: out[names.FEATURES], names.MASK: out[names.MASK]})[names.EMBEDDINGS][0]
        padding = self.engine.embed([self.manifest.config["vocab_size"] - 1])[0]
        return np.where(out[names.MASK][0, :, None] > 0, embeddings, padding)

    def _prompt_ids(self, prompt: str | list[int], raw: bool, system: str | None, media: list[str | int] = ()) -> list[int]:
        if not isinstance(prompt, str):
            if media:
                raise ValueError("an image or audio input needs a text prompt, not token ids")
            return [int(t) for t in prompt]  # token ids, used as given
        if self.tokenizer is None:
            raise BundleError(f"{self.folder} has no tokenizer.model; pass token ids, or convert with --tokenizer")
        first = self.position == 0 and not self._owed
        if raw:
            return ([self.tokenizer.bos_id] if first else []) + self.tokenizer.encode_parts([*media, prompt])
        return self.tokenizer.user_turn(prompt, system=system if first else None, first=first, media=media)

    # -- generation ----------------------------------------------------------------------------
    def stream(self, prompt: str | list[int], *, max_new_tokens: int = 256, sampling: SamplingConfig | None = None,
               raw: bool = False, system: str | None = None, image: Path | None = None,
               audio: Path | None = None) -> Iterator[Piece]:
        """Yield the reply token by token. `prompt` as a string is wrapped in the chat turn format
        (or, with raw=True, only tokenized, with <bos> at the start of a conversation); as a list
        it is token ids, fed as given. The result and stats land in `self.last`."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        started = time.perf_counter()
        media = [(kind, path) for kind, path in (("image", image), ("audio", audio)) if path is not None]
        for kind, path in media:
            spec, _ = self._encoder(kind)  # no encoder: refused before any work
            if not Path(path).is_file():
                raise MediaError(f"--{kind} {path}: no such file")
        if media and self.tokenizer is None:
            raise BundleError(f"{self.folder} has no tokenizer.model, which image / audio prompts need")
        media_parts = [part for s in (self._encoder(kind)[0] for kind, _ in media)
                       for part in self.tokenizer.media_parts(s.start_token_id, s.soft_token_id, s.soft_tokens, s.end_token_id)]
        ids = self._owed + self._prompt_ids(prompt, raw, system, media_parts)
        if not ids:
            raise ValueError("the prompt is empty")
        free = self.cache_length - self.position
        if len(ids) > free:
            raise ContextFullError(
                f"the prompt needs {len(ids)} tokens but only {free} of the bundle's {self.cache_length} cache "
                "positions are free; start a new conversation (reset) or convert with a larger --cache-length"
            )
        inputs = [self._read_media(kind, path) for kind, path in media]  # every file read before any model runs
        soft, media_stats = {}, []
        for (kind, path), (encoder_inputs, cut) in zip(media, inputs):  # each fills its placeholders, in prompt order
            encode_started = time.perf_counter()
            embeddings = self._encode(kind, encoder_inputs)
            soft_id = self._encoder(kind)[0].soft_token_id
            slots = [i for i, t in enumerate(ids) if t == soft_id and i not in soft]
            soft.update(zip(slots[: len(embeddings)], embeddings))
            media_stats.append({"kind": kind, "file": str(path), "soft_tokens": int(embeddings.shape[0]),
                                "encode_seconds": round(time.perf_counter() - encode_started, 3), "truncated": cut})
        sampler = Sampler(sampling or SamplingConfig())
        stop_ids = self.tokenizer.stop_ids if self.tokenizer else set()
        text = TextStream(self.tokenizer) if self.tokenizer else None
        self._owed = []
        prefill_started = time.perf_counter()
        self.engine.feed(ids[:-1], soft)
        prefill_s = time.perf_counter() - prefill_started
        logits = self.engine.step(ids[-1])
        first_token_at = None
        generated: list[int] = []
        finish = "max_new_tokens"
        while True:
            token = sampler(logits)
            generated.append(token)
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if token in stop_ids:
                finish = "stop"
                break
            yield Piece(token, text.push(token) if text else "")
            if len(generated) >= max_new_tokens:
                break
            if self.position >= self.cache_length:
                finish = "context_full"
                break
            logits = self.engine.step(token)
        done = time.perf_counter()
        self._owed = self._history_tail(generated[-1], raw or not isinstance(prompt, str))
        reply = [t for t in generated if t not in stop_ids]
        first_token_s, decode_s = first_token_at - started, done - first_token_at
        self.last = Generation(
            text=self.tokenizer.decode(reply) if self.tokenizer else "",
            token_ids=generated,
            finish_reason=finish,
            stats={
                "prompt_tokens": len(ids),
                "generated_tokens": len(generated),
                "load_seconds": round(self.load_seconds, 3),
                "weight_cache": getattr(self.engine.core, "weight_cache", "off"),
                "time_to_first_token_seconds": round(first_token_s, 4),
                # Prefill: every prompt token but the last, which the first decode call takes;
                # speed counts the whole prompt over that time, as LiteRT-LM's benchmark does.
                "prefill_seconds": round(prefill_s, 6),
                "prefill_tokens_per_second": round(len(ids) / prefill_s, 2) if len(ids) > 1 else None,
                "decode_tokens_per_second": round((len(generated) - 1) / decode_s, 2) if len(generated) > 1 else None,
                "context_used": self.position,
                "peak_rss_mib": round(peak_rss_mib(), 1),
                "media": media_stats,
                "loaded_bundles": self.loaded_bundles,
            },
        )

    def _history_tail(self, last: int, raw: bool) -> list[int]:
        """The sampled last token is not in the cache yet. A chat turn is then closed with
        <end_of_turn> and a newline, as the chat template renders a finished reply (a stop token is replaced)."""
        if raw or self.tokenizer is None or not self.tokenizer.has_chat:
            return [last]
        return ([] if last in self.tokenizer.stop_ids else [last]) + self.tokenizer.close_model_turn()

    def generate(self, prompt: str | list[int], **kwargs) -> Generation:
        for _ in self.stream(prompt, **kwargs):
            pass
        return self.last
