"""Text generation over a g3n bundle folder with the LiteRT interpreter.

The engine owns the KV cache (named numpy arrays, exactly the text core's signature tensors)
and a position counter. `feed` pushes prompt tokens through the prefill signatures without
computing logits; `step` decodes one token and returns its next-token logits. A prompt is fed
as `feed(prompt[:-1])` then `step(prompt[-1])`, the order LiteRT-LM uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converter.bundle import read_manifest
from converter.errors import BundleError


class TextEngine:
    """`files` replaces some bundles' paths (the quality report pairs float and quantized files);
    `reference=True` runs LiteRT's built-in kernels without XNNPACK, which reads float weights
    straight from the mapped file instead of repacking a second copy."""

    def __init__(self, folder: Path, num_threads: int | None = None, *, manifest: dict | None = None,
                 files: dict[str, Path] | None = None, reference: bool = False):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else read_manifest(self.folder)
        resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if reference else OpResolverType.AUTO
        self.cache_length = int(self.manifest["cache_length"])
        self.prefill_lengths = sorted(int(n) for n in self.manifest["prefill_lengths"])
        self.blocked = np.float32(self.manifest["mask"]["blocked"])
        self.interpreters = {}
        for name in ("text_core", "embedder", "ple"):
            entry = self.manifest["bundles"].get(name)
            if entry is None:
                raise BundleError(f"{self.folder} has no {name} bundle in its manifest")
            path = (files or {}).get(name) or self.folder / entry["file"]
            if files is None and (not path.is_file() or path.stat().st_size != entry["bytes"]):
                raise BundleError(f"{path} is missing or does not have the size recorded in manifest.json")
            self.interpreters[name] = Interpreter(
                model_path=str(path), num_threads=num_threads, experimental_op_resolver_type=resolver
            )
        core, emb, ple = (self.interpreters[n] for n in ("text_core", "embedder", "ple"))
        self._decode = (core.get_signature_runner("decode"), emb.get_signature_runner("decode_embedder"),
                        ple.get_signature_runner("decode_per_layer_embedder"))
        self._prefill = {
            n: (core.get_signature_runner(f"prefill_{n}"), emb.get_signature_runner(f"prefill_embedder_{n}"),
                ple.get_signature_runner(f"prefill_per_layer_embedder_{n}"))
            for n in self.prefill_lengths
        }
        spec = self.manifest["bundles"]["text_core"]["signatures"]["decode"]["inputs"]
        self._cache_shapes = {k: v["shape"] for k, v in spec.items() if k.startswith("kv_cache_")}
        self.reset()

    def reset(self) -> None:
        self.kv = {k: np.zeros(shape, np.float32) for k, shape in self._cache_shapes.items()}
        self.position = 0

    def _mask(self, positions: np.ndarray) -> np.ndarray:
        allowed = np.arange(self.cache_length)[None, :] <= positions[:, None]
        return np.where(allowed, np.float32(0), self.blocked)[None, None].astype(np.float32)

    def _run(self, runners, token_ids: np.ndarray, positions: np.ndarray, want_logits: bool):
        core, emb, ple = runners
        ids = token_ids.reshape(1, -1).astype(np.int32)
        out = core(
            embeddings=emb(token_ids=ids)["embeddings"],
            per_layer_embeddings=ple(token_ids=ids)["embeddings"],
            input_pos=positions.astype(np.int32),
            mask=self._mask(positions),
            **self.kv,
        )
        self.kv = {k: out[k] for k in self.kv}
        return out["logits"][0, -1] if want_logits else None

    def feed(self, token_ids) -> None:
        """Write tokens into the KV cache with the prefill signatures (no logits)."""
        ids = np.asarray(token_ids, np.int64)
        if self.position + len(ids) > self.cache_length:
            raise BundleError(
                f"context full: {self.position} + {len(ids)} tokens exceed the bundle's cache length {self.cache_length}"
            )
        while len(ids):
            # The smallest signature that takes the rest in one call, else the largest; padding
            # writes only positions that later tokens overwrite before anything attends to them.
            fits = [n for n in self.prefill_lengths if n >= len(ids) and self.position + n <= self.cache_length]
            usable = [n for n in self.prefill_lengths if self.position + n <= self.cache_length]
            if not usable:  # too close to the end of the cache for any prefill signature
                for t in ids:
                    self._run(self._decode, np.array([t]), np.array([self.position]), want_logits=False)
                    self.position += 1
                return
            n = min(fits) if fits else max(usable)
            chunk = ids[:n]
            real = len(chunk)
            padded = np.concatenate([chunk, np.zeros(n - real, np.int64)])
            self._run(self._prefill[n], padded, self.position + np.arange(n), want_logits=False)
            self.position += real
            ids = ids[real:]

    def step(self, token_id: int) -> np.ndarray:
        """Decode one token at the current position; returns the next-token logits [vocab]."""
        if self.position >= self.cache_length:
            raise BundleError(f"context full: the bundle's cache holds {self.cache_length} tokens")
        logits = self._run(self._decode, np.array([token_id]), np.array([self.position]), want_logits=True)
        self.position += 1
        return logits

    def greedy(self, prompt_ids, max_new_tokens: int, stop_ids=()) -> list[int]:
        prompt_ids = list(prompt_ids)
        self.feed(prompt_ids[:-1])
        logits = self.step(prompt_ids[-1])
        out = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            if token in stop_ids or self.position >= self.cache_length:
                break
            logits = self.step(token)
        return out
