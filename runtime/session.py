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

from converter.bundle import read_manifest, verify_bundle
from converter.errors import BundleError
from runtime.chat import TextStream, Tokenizer
from runtime.engine import TEXT_BUNDLES, TextEngine, default_weight_cache_dir
from runtime.sampling import Sampler, SamplingConfig

ENCODERS = {"image": "vision", "audio": "audio"}


class ContextFullError(BundleError):
    """The prompt does not fit in what is left of the bundle's KV cache."""


class MediaError(BundleError):
    """An image or audio input that cannot be read, or that the bundle cannot encode."""


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


def check_media(kind: str, path: Path) -> None:
    """Refuse unreadable media before any model work, with the reason."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"--{kind} {path}: no such file")
    try:
        if kind == "image":
            from PIL import Image

            with Image.open(path) as im:
                im.verify()
        else:
            import wave

            with wave.open(str(path), "rb") as wav:
                if wav.getnframes() == 0:
                    raise MediaError(f"--audio {path}: the WAV file has no samples")
    except MediaError:
        raise
    except Exception as exc:  # PIL and wave raise many types for malformed files
        what = "an image PIL can read" if kind == "image" else "a PCM WAV file"
        raise MediaError(f"--{kind} {path} is not {what}: {exc}") from exc


def open_bundle(folder: Path, verify: bool = False) -> dict:
    """The folder's manifest, after checking every listed file's size (and sha256 with `verify`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"bundle folder {folder} does not exist")
    manifest = read_manifest(folder)
    problems = verify_bundle(folder, check_hashes=verify)
    if problems:
        hint = "re-copy the folder or convert again" + ("" if verify else "; `g3n-convert verify` checks sha256 too")
        raise BundleError(f"{folder} does not match its manifest.json: {'; '.join(problems)} ({hint})")
    missing = [b for b in TEXT_BUNDLES if b not in manifest.get("bundles", {})]
    if missing:
        raise BundleError(f"{folder} has no {', '.join(missing)} bundle; g3n-run needs text_core, embedder and ple")
    return manifest


class Session:
    def __init__(self, folder: Path, *, verify: bool = False, num_threads: int | None = None, backend: str = "compiled",
                 weight_cache_dir: Path | None | str = "default"):
        """`weight_cache_dir`: where XNNPACK keeps the text core's packed weights between loads
        (default: runtime.engine.default_weight_cache_dir()); None packs them in memory every load."""
        started = time.perf_counter()
        self.folder = Path(folder)
        self.manifest = open_bundle(self.folder, verify)
        if weight_cache_dir == "default":
            weight_cache_dir = default_weight_cache_dir()
        self.engine = TextEngine(self.folder, num_threads, manifest=self.manifest, backend=backend,
                                 weight_cache_dir=weight_cache_dir)
        tokenizer = self.manifest.get("files", {}).get("tokenizer")
        self.tokenizer = Tokenizer(self.folder / tokenizer["file"]) if tokenizer else None
        self.encoders: dict[str, object] = {}
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
        return [*TEXT_BUNDLES, *self.encoders]

    def release_encoders(self) -> None:
        self.encoders.clear()

    # -- inputs --------------------------------------------------------------------------------
    def _encoder(self, kind: str):
        name = ENCODERS[kind]
        if name not in self.encoders:
            entry = self.manifest["bundles"].get(name)
            if entry is None:
                raise MediaError(
                    f"this bundle has no {name} encoder ({name}.tflite), so it cannot take --{kind} input; "
                    f"the bundle holds: {', '.join(self.manifest['bundles'])}"
                )
            raise MediaError(f"{self.folder} has a {name} bundle, but this g3n-run cannot feed {kind} embeddings yet")
        return self.encoders[name]

    def _prompt_ids(self, prompt: str | list[int], raw: bool, system: str | None) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]  # token ids, used as given
        if self.tokenizer is None:
            raise BundleError(f"{self.folder} has no tokenizer.model; pass token ids, or convert with --tokenizer")
        first = self.position == 0 and not self._owed
        if raw:
            return ([self.tokenizer.bos_id] if first else []) + self.tokenizer.encode(prompt)
        return self.tokenizer.user_turn(prompt, system=system if first else None, first=first)

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
        for kind, path in (("image", image), ("audio", audio)):
            if path is not None:
                check_media(kind, path)
                self._encoder(kind)
        ids = self._owed + self._prompt_ids(prompt, raw, system)
        if not ids:
            raise ValueError("the prompt is empty")
        free = self.cache_length - self.position
        if len(ids) > free:
            raise ContextFullError(
                f"the prompt needs {len(ids)} tokens but only {free} of the bundle's {self.cache_length} cache "
                "positions are free; start a new conversation (reset) or convert with a larger --cache-length"
            )
        sampler = Sampler(sampling or SamplingConfig())
        stop_ids = self.tokenizer.stop_ids if self.tokenizer else set()
        text = TextStream(self.tokenizer) if self.tokenizer else None
        self._owed = []
        self.engine.feed(ids[:-1])
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
        prefill_s, decode_s = first_token_at - started, done - first_token_at
        self.last = Generation(
            text=self.tokenizer.decode(reply) if self.tokenizer else "",
            token_ids=generated,
            finish_reason=finish,
            stats={
                "prompt_tokens": len(ids),
                "generated_tokens": len(generated),
                "load_seconds": round(self.load_seconds, 3),
                "weight_cache": getattr(self.engine.core, "weight_cache", "off"),
                "time_to_first_token_seconds": round(prefill_s, 4),
                "prefill_tokens_per_second": round(len(ids) / prefill_s, 2),
                "decode_tokens_per_second": round((len(generated) - 1) / decode_s, 2) if len(generated) > 1 else None,
                "context_used": self.position,
                "peak_rss_mib": round(peak_rss_mib(), 1),
            },
        )

    def _history_tail(self, last: int, raw: bool) -> list[int]:
        """The sampled last token is not in the cache yet. A chat turn is then closed with
        <end_of_turn> and a newline, as the chat template renders a finished reply (a stop token is replaced)."""
        if raw or self.tokenizer is None or not self.tokenizer.markers:
            return [last]
        return ([] if last in self.tokenizer.stop_ids else [last]) + self.tokenizer.close_model_turn()

    def generate(self, prompt: str | list[int], **kwargs) -> Generation:
        for _ in self.stream(prompt, **kwargs):
            pass
        return self.last
