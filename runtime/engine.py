"""Text generation over a g3n bundle folder with LiteRT.

The engine owns the KV cache and a position counter. `feed` pushes prompt tokens through the
prefill signatures without computing logits; `step` decodes one token and returns its next-token
logits. A prompt is fed as `feed(prompt[:-1])` then `step(prompt[-1])`, the order LiteRT-LM uses.

Two ways to run the text core, with bit-identical logits (tests/test_runtime.py):

  "compiled"     LiteRT's CompiledModel. One set of cache TensorBuffers is passed as both input
                 and output of every signature, so the cache stays in place: no copy through
                 Python, and the graph's DYNAMIC_UPDATE_SLICE writes only the new positions.
                 E2B int4, cache 1024, 2 threads: 99-103 ms/token against 128-134 ms for
                 "interpreter" (docs/BENCHMARKS.md). This is what g3n-run uses.
  "interpreter"  The classic Interpreter's SignatureRunner: the cache goes in and comes back as
                 numpy arrays every call. With reference=True it runs the built-in kernels
                 without XNNPACK, which read float weights straight from the mapped file; the
                 quality report scores quantized bundles against float ones this way.

Every .tflite is opened with `Interpreter(model_path=...)` first: that loader verifies the
flatbuffer (a corrupt file is a ValueError), while CompiledModel.from_file does not and can
crash the process on a damaged file.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np

from bundle import names
from bundle.errors import BundleError
from bundle.manifest import Manifest, open_bundle
from bundle.native_logs import quiet_native_logs
from runtime.pages import release_file_pages
from runtime.weight_cache import SUFFIX as CACHE_SUFFIX, WeightCache

LOAD_ORDER = (names.TEXT_CORE, names.EMBEDDER, names.PLE)  # the text bundles, in the order they load
# Relative costs for planning prompt chunks, in prefill positions (E2B int4, 2 threads: a decode
# call ~100 ms, a prefill position ~24 ms; docs/BENCHMARKS.md). CALL_COST: per-call lookups and copies.
DECODE_COST = 4
CALL_COST = 1
RELEASE_ROWS = 64  # table rows looked up between two releases of the tables' pages (TextEngine._look_up)


def open_interpreter(path: Path, num_threads: int | None = None, reference: bool = False):
    """An Interpreter over `path`, with a damaged flatbuffer reported as a BundleError."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if reference else OpResolverType.AUTO
    try:
        with quiet_native_logs():
            return Interpreter(model_path=str(path), num_threads=num_threads, experimental_op_resolver_type=resolver)
    except (ValueError, RuntimeError) as exc:
        raise BundleError(f"{path} is not a valid LiteRT model ({exc}); `g3n-convert verify` checks a folder") from exc


class InterpreterCore:
    def __init__(self, path: Path, cache_shapes: dict, num_threads: int | None, reference: bool):
        self.interpreter = open_interpreter(path, num_threads, reference)
        self.cache_shapes = cache_shapes
        self.runners = {}

    def reset(self) -> None:
        self.kv = {k: np.zeros(shape, np.float32) for k, shape in self.cache_shapes.items()}

    def run(self, signature: str, inputs: dict, want_logits: bool):
        if signature not in self.runners:
            self.runners[signature] = self.interpreter.get_signature_runner(signature)
        out = self.runners[signature](**inputs, **self.kv)
        self.kv = {k: out[k] for k in self.kv}
        return out[names.LOGITS][0, -1] if want_logits else None


def default_weight_cache_dir() -> Path:
    """Where XNNPACK weight caches go: $G3N_CACHE_DIR, else $XDG_CACHE_HOME/g3n, else ~/.cache/g3n."""
    if os.environ.get("G3N_CACHE_DIR"):
        return Path(os.environ["G3N_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "g3n"


class CompiledCore:
    """`weight_cache`: XNNPACK's packed weights in a file. Without one, XNNPACK repacks the int4
    weights into heap memory on every load (E2B: 12 s), and the mapped file pages it read stay
    resident too, so the weights count twice. With one, the first load writes the packed weights
    to the file and every load maps them: they count once, and later loads skip the packing.
    runtime/weight_cache.py builds the file safely and decides when one may be mapped."""

    def __init__(self, path: Path, cache_shapes: dict, num_threads: int | None, weight_cache: WeightCache | None = None,
                 logit_signatures: frozenset[str] = frozenset({names.DECODE})):
        # Verifies the flatbuffer before the unverifying loader sees it; no delegate, so no packing.
        open_interpreter(path, reference=True)
        with quiet_native_logs():
            from ai_edge_litert.compiled_model import CompiledModel, CpuOptions, HardwareAccelerator, Options

        def compile_with(cache_path: str):
            cpu = CpuOptions(num_threads=num_threads or 2, xnnpack_weight_cache_path=cache_path)
            with quiet_native_logs():
                return CompiledModel.from_file(str(path), options=Options(hardware_accelerators=HardwareAccelerator.CPU, cpu_options=cpu))

        try:
            self.weight_cache = "off"
            if weight_cache is not None:
                try:
                    self.model, self.weight_cache = weight_cache.compile(compile_with)
                except OSError:  # an unwritable cache folder only costs speed and memory
                    weight_cache = None
            if weight_cache is None:
                self.model = compile_with("")
            with quiet_native_logs():
                signatures = self.model.get_signature_list()
                # One cache, shared by every signature and passed as input and output: updated in place.
                self.cache = {name: self.model.create_input_buffer_by_name(names.DECODE, name) for name in cache_shapes}
                self.inputs = {s: {n: self.model.create_input_buffer_by_name(s, n) for n in names.TEXT_CORE_INPUTS}
                               for s in signatures}
                vocab = int(np.prod(self.model.get_output_tensor_details(names.DECODE)[names.LOGITS]["shape"]))
                self.logits = (self.model.create_output_buffer_by_name(names.DECODE, names.LOGITS), vocab)
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"LiteRT could not compile {path}: {' '.join(str(exc).split())}") from exc
        self.cache_shapes = cache_shapes
        self.logit_signatures = logit_signatures  # every one writes the same logits buffer
        self.warm: set[str] = set()

    def reset(self) -> None:
        with quiet_native_logs():  # TensorBuffer.write sets up an environment the first time, loudly
            for name, buffer in self.cache.items():  # new buffers are not zeroed
                buffer.write(np.zeros(self.cache_shapes[name], np.float32))

    def run(self, signature: str, inputs: dict, want_logits: bool):
        buffers = self.inputs[signature]
        for name, value in inputs.items():
            buffers[name].write(value)
        outputs = dict(self.cache)
        if signature in self.logit_signatures:
            outputs[names.LOGITS] = self.logits[0]
        if signature in self.warm:
            self.model.run_by_name(signature, {**buffers, **self.cache}, outputs)
        else:  # the first run of a signature sets up its accelerator environment, loudly
            with quiet_native_logs():
                self.model.run_by_name(signature, {**buffers, **self.cache}, outputs)
            self.warm.add(signature)
        return self.logits[0].read(self.logits[1], np.float32) if want_logits else None


@contextlib.contextmanager
def litert_errors(what):
    """A file the flatbuffer verifier lets through can still be refused by LiteRT when a signature
    is set up or run ("Invalid tensor index"): one clear error naming it, not a traceback."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as exc:
        raise BundleError(f"LiteRT cannot run {what} ({' '.join(str(exc).split())}); "
                          "the file may be damaged: `g3n-convert verify` checks it") from exc


class EncoderEngine:
    """One encoder bundle (vision / audio): inputs -> soft-token embeddings, on XNNPACK."""

    def __init__(self, path: Path, signature: str, num_threads: int | None = None):
        started = time.perf_counter()
        self.path = path
        with litert_errors(path):
            self.runner = open_interpreter(path, num_threads).get_signature_runner(signature)
        self.packed = False
        self.load_seconds = time.perf_counter() - started

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        with quiet_native_logs(), litert_errors(self.path):  # the first run sets up XNNPACK, loudly
            out = self.runner(**inputs)
        if not self.packed:  # XNNPACK packed the weights on that first run: the file's pages are read through
            self.packed = True
            release_file_pages(self.path)
        return out


class TextEngine:
    """`manifest`: the folder's, already checked (bundle.manifest.open_bundle; read and checked
    here when None). `files` replaces some bundles' paths (the quality report pairs float and
    quantized files). `verified_sha256`: the text core's sha256 when the caller has checked the file
    against it (a weight cache built from that content may then be shared)."""

    def __init__(self, folder: Path, num_threads: int | None = None, *, manifest: Manifest | None = None,
                 files: dict[str, Path] | None = None, backend: str = "compiled", reference: bool = False,
                 weight_cache_dir: Path | None = None, verified_sha256: str | None = None):
        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else open_bundle(self.folder, needs=names.TEXT_BUNDLES)
        self.cache_length = self.manifest.cache_length
        self.prefill_lengths = sorted(self.manifest.prefill_lengths)
        self.blocked = np.float32(self.manifest.mask.blocked)
        missing = [name for name in names.TEXT_BUNDLES if name not in self.manifest.bundles]
        if missing:
            raise BundleError(f"{self.folder} has no {', '.join(missing)} bundle in its manifest")
        paths = {name: (files or {}).get(name) or self.folder / self.manifest.bundles[name].file for name in LOAD_ORDER}
        core_entry = self.manifest.bundles[names.TEXT_CORE]
        decode = core_entry.signatures.get(names.DECODE)
        if decode is None:
            raise BundleError(f"{self.folder}: the text core has no {names.DECODE} signature in manifest.json")
        cache_shapes = {k: list(v.shape) for k, v in decode.inputs.items() if k.startswith(names.KV_CACHE_PREFIX)}
        # Context buckets the manifest declares (and the text core has): the smallest span that
        # holds a call's positions serves it (TextEngine.signature).
        self.spans = [s for s in sorted(self.manifest.context_spans or ())
                      if names.span_step(s) in core_entry.signatures]
        logit_signatures = frozenset(name for name, sig in core_entry.signatures.items() if names.LOGITS in sig.outputs)
        if backend == "compiled" and not reference:
            weight_cache = None
            if weight_cache_dir is not None and names.TEXT_CORE not in (files or {}):
                cache_file = Path(weight_cache_dir) / f"{names.TEXT_CORE}-{core_entry.sha256[:16]}{CACHE_SUFFIX}"
                weight_cache = WeightCache(cache_file, paths[names.TEXT_CORE], verified_sha256)
            self.core = CompiledCore(paths[names.TEXT_CORE], cache_shapes, num_threads, weight_cache, logit_signatures)
        elif backend in ("compiled", "interpreter"):
            self.core = InterpreterCore(paths[names.TEXT_CORE], cache_shapes, num_threads, reference)
        else:
            raise ValueError(f"unknown backend {backend!r}")
        emb, ple = (open_interpreter(paths[n], num_threads, reference) for n in (names.EMBEDDER, names.PLE))

        def lookups(length: int | None):
            return (emb.get_signature_runner(names.lookup_signature(names.EMBEDDER, length)),
                    ple.get_signature_runner(names.lookup_signature(names.PLE, length)))

        # Prompt chunks are looked up in pieces of the shortest prefill length: a signature's
        # tensors become resident once it has run (E2B: ~100 MiB for a 512-token lookup), and a
        # lookup costs microseconds per token next to milliseconds in the text core. A signature
        # LiteRT would refuse is refused when it first runs (tests/test_reliability.py).
        self.lookup_length = self.prefill_lengths[0] if self.prefill_lengths else 1
        with litert_errors(f"{paths[names.EMBEDDER]} or {paths[names.PLE]}"):
            self._lookups = {1: lookups(None)}
            if self.lookup_length > 1:
                self._lookups[self.lookup_length] = lookups(self.lookup_length)
        self.table_paths = (paths[names.EMBEDDER], paths[names.PLE])
        self._rows_since_release = 0
        for path in paths.values():  # loading read every page; from here on only what runs stays resident
            release_file_pages(path)
        self.reset()

    def reset(self) -> None:
        self.core.reset()
        self.position = 0

    def _mask(self, positions: np.ndarray) -> np.ndarray:
        allowed = np.arange(self.cache_length)[None, :] <= positions[:, None]
        return np.where(allowed, np.float32(0), self.blocked)[None, None].astype(np.float32)

    def embed(self, token_ids) -> np.ndarray:
        """The embedder's output for single tokens: [len(token_ids), H]."""
        embed = self._lookups[1][0]
        with litert_errors(f"the embedder of {self.folder}"):
            return np.concatenate([embed(**{names.TOKEN_IDS: np.array([[t]], np.int32)})[names.EMBEDDINGS][0] for t in token_ids])

    def _run(self, token_ids: np.ndarray, positions: np.ndarray, want_logits: bool, soft: dict | None = None):
        with litert_errors(f"the text bundles of {self.folder}"):  # a damaged file LiteRT meets only now
            n = len(token_ids)
            embeddings, per_layer = self._look_up(token_ids)
            for i, vector in (soft or {}).items():  # image / audio soft tokens replace their placeholders' rows
                embeddings[0, i] = vector
            inputs = {
                names.EMBEDDINGS: embeddings,
                names.PER_LAYER_EMBEDDINGS: per_layer,
                names.INPUT_POS: positions.astype(np.int32),
                names.MASK: self._mask(positions),
            }
            return self.core.run(self.signature(n, int(positions[-1]) + 1, want_logits), inputs, want_logits)

    def signature(self, n: int, end: int, want_logits: bool) -> str:
        """The text-core signature for a call of `n` positions ending before position `end`: a
        prefill length without logits, else the single-token step; within the smallest context
        bucket that holds `end` positions, when the bundle has one."""
        prefill = not want_logits and n in self.prefill_lengths
        span = next((s for s in self.spans if end <= s), None)
        if span is None:
            return names.prefill(n) if prefill else names.DECODE
        return names.span_fill(span, n) if prefill else names.span_step(span)

    def _look_up(self, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The embedder's and PLE's rows for `token_ids`: [1, n, H] and [1, n, layers * width].

        Each looked-up row faults in a page or more of the mapped table file (the kernel maps
        the pages around it too: ~200 KiB a token over both E2B tables), and those pages would
        stay resident for the process's life. So once RELEASE_ROWS tokens have been looked up
        the tables' pages are given back (runtime/pages.py; ~1 ms): resident table memory
        follows the tokens of the last call, not every token the session has seen."""
        m = 1 if len(token_ids) == 1 else self.lookup_length
        embed, per_layer = self._lookups[m]
        n = len(token_ids)
        ids = np.asarray(token_ids, np.int32)
        ids = np.concatenate([ids, np.zeros(-n % m, np.int32)]).reshape(-1, 1, m)
        pieces = []
        for piece in ids:  # the outputs are copies: the next call does not overwrite them
            pieces.append((embed(**{names.TOKEN_IDS: piece})[names.EMBEDDINGS],
                           per_layer(**{names.TOKEN_IDS: piece})[names.EMBEDDINGS]))
            self._rows_since_release += m
            if self._rows_since_release >= RELEASE_ROWS:
                for path in self.table_paths:
                    release_file_pages(path)
                self._rows_since_release = 0
        return tuple(np.concatenate([p[k] for p in pieces], axis=1)[:, :n] for k in (0, 1))

    def plan(self, count: int) -> list[int]:
        """The signature calls that feed `count` tokens from the current position: prefill lengths,
        or 1 for a single-token decode call. The plan with the least compute wins: a prefill call
        costs its length, padding included, a decode call DECODE_COST; CALL_COST breaks ties
        toward fewer calls. So 130 tokens
        with lengths 128 / 512 go as 128 + 2 decode calls, not one padded 512. A chunk must end
        inside the cache, or DYNAMIC_UPDATE_SLICE would clamp the write."""
        cost, first = [0.0], [0]  # for the last r tokens: least cost, and the call that starts it
        for r in range(1, count + 1):
            start = self.position + count - r  # where these r tokens begin in the cache
            options = [(DECODE_COST + CALL_COST + cost[r - 1], 1)]
            options += [(n + CALL_COST + cost[max(0, r - n)], n)
                        for n in self.prefill_lengths if start + n <= self.cache_length]
            best = min(options, key=lambda o: (o[0], -o[1]))
            cost.append(best[0])
            first.append(best[1])
        calls, r = [], count
        while r:
            calls.append(first[r])
            r = max(0, r - first[r])
        return calls

    def feed(self, token_ids, soft: dict[int, np.ndarray] | None = None) -> None:
        """Write tokens into the KV cache with the prefill signatures (no logits). `soft` maps
        indices into `token_ids` to embeddings [H] that replace the embedder's rows there."""
        ids = np.asarray(token_ids, np.int64)
        soft = dict(soft or {})
        if self.position + len(ids) > self.cache_length:
            raise BundleError(
                f"context full: {self.position} + {len(ids)} tokens exceed the bundle's cache length {self.cache_length}"
            )
        done = 0
        for n in self.plan(len(ids)):
            chunk = ids[done:done + n]
            real = len(chunk)
            # Padding writes only positions that later tokens overwrite before anything attends to them.
            padded = np.concatenate([chunk, np.zeros(n - real, np.int64)])
            here = {i - done: v for i, v in soft.items() if done <= i < done + real}
            self._run(padded, self.position + np.arange(n), want_logits=False, soft=here)
            self.position += real
            done += real

    def step(self, token_id: int) -> np.ndarray:
        """Decode one token at the current position; returns the next-token logits [vocab]."""
        if self.position >= self.cache_length:
            raise BundleError(f"context full: the bundle's cache holds {self.cache_length} tokens")
        logits = self._run(np.array([token_id]), np.array([self.position]), want_logits=True)
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
