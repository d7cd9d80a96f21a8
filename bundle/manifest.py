"""manifest.json: the typed schema of a bundle folder, its one writer and its one validating reader.

A bundle folder is valid only while its manifest.json exists and every file it lists has the
recorded size and sha256. The manifest is written last and removed first when a folder is
re-used, so an interrupted conversion never leaves a folder that claims to be complete.

Reading validates the whole manifest against the schema below before anything is allocated:
types, ranges (a cache length or a tensor shape that would ask for TiB is refused), and file
names, which must be plain names inside the folder (no path separators, no `..`, no symlink that
leads out of it). A manifest that fails is one BundleError naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from bundle.errors import BundleError, read_json_object
from bundle.files import explain_os_error, sha256_file, write_bytes_atomic
from bundle.names import ALL_BUNDLES, ENCODER_BUNDLES, LITERTLM_SUFFIX, MANIFEST, MODALITY_BUNDLES, MODALITY_PARTS
from bundle.verified import VerifiedFiles

FORMAT = "g3n-bundle"
FORMAT_VERSION = 2  # 2: the audio encoder takes framed samples (its log-mel front end in-graph), adapter split out

# Bounds a manifest of any real Gemma 3n bundle sits far inside; past them it is damaged or hostile.
MAX_DIM = 1 << 31
MAX_TENSOR_ELEMENTS = 1 << 31  # 8 GiB of float32 in one tensor
MAX_CACHE_LENGTH = 1 << 20
MAX_FILE_BYTES = 1 << 42
DTYPES = ("float32", "float16", "int32", "int64", "int8", "uint8", "bool")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _optional():
    """A field left out of the JSON when it is None."""
    return field(default=None, metadata={"omit_none": True})


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_int(value: int, low: int, high: int, what: str) -> None:
    _check(low <= value <= high, f"{what} {value} is outside [{low}, {high}]")


@dataclass
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self):
        for dim in self.shape:
            _check_int(dim, 1, MAX_DIM, "a dimension")
        _check(math.prod(self.shape) <= MAX_TENSOR_ELEMENTS, f"shape {list(self.shape)} is larger than any bundle tensor")
        _check(self.dtype in DTYPES, f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")


@dataclass
class Signature:
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


@dataclass
class FileEntry:
    """A file of the folder: a plain name inside it, its size and sha256."""

    file: str
    bytes: int
    sha256: str

    def __post_init__(self):
        _check(self.file not in ("", ".", "..") and not re.search(r"[/\\\x00]", self.file),
               f"file {self.file!r} is not a plain file name inside the bundle folder")
        _check_int(self.bytes, 0, MAX_FILE_BYTES, "bytes")
        _check(bool(_SHA256.fullmatch(self.sha256)), "sha256 is not 64 lowercase hex digits")


@dataclass
class BundleEntry(FileEntry):
    """A .tflite bundle: its file, weights, quantization and signatures."""

    parameters: int
    bits_per_weight: float
    quantization: dict  # quant/recipes.py BundleQuant.to_manifest()
    signatures: dict[str, Signature]
    quality: dict | None = _optional()  # its score against the float original, when quantized

    def __post_init__(self):
        super().__post_init__()
        _check(len(self.signatures) > 0, "a bundle needs at least one signature")


@dataclass
class ImageInput:
    size: int
    layout: str
    range: tuple[float, ...]
    resize: str

    def __post_init__(self):
        _check_int(self.size, 1, 8192, "image size")


@dataclass
class AudioInput:
    """How a runner frames a clip for the audio encoder, which computes the log-mel itself."""

    frames: int  # the encoder's window, in frames
    frame_length: int  # samples per frame
    hop_length: int  # samples from one frame's start to the next
    sample_rate: int
    mel_bins: int  # computed in-graph from each frame

    def __post_init__(self):
        _check_int(self.frames, 1, 1 << 20, "frames")
        _check_int(self.frame_length, 1, 1 << 16, "frame_length")
        _check_int(self.hop_length, 1, self.frame_length, "hop_length")
        _check_int(self.sample_rate, 1, 1 << 20, "sample_rate")
        _check_int(self.mel_bins, 1, 4096, "mel_bins")


@dataclass
class EncoderEntry:
    """What a runner needs to feed an encoder and place its soft tokens in a prompt."""

    bundle: str
    soft_tokens: int  # per image / per clip
    start_token_id: int
    soft_token_id: int  # one placeholder per soft token
    end_token_id: int
    config: dict  # the tower's transformers config
    image: ImageInput | None = _optional()
    audio: AudioInput | None = _optional()
    adapter: str | None = _optional()  # the bundle that takes the encoder's features to soft tokens (audio)
    end_of_media: str | None = _optional()  # the bundle holding the end token's embedding (for LiteRT-LM)

    def parts(self) -> list[str]:
        """The bundles of this modality that the folder has, the encoder first."""
        return [b for b in (self.bundle, self.adapter, self.end_of_media) if b is not None]

    def __post_init__(self):
        _check(self.bundle in ENCODER_BUNDLES, f"bundle {self.bundle!r} is not an encoder bundle")
        modality = next(m for m, b in MODALITY_BUNDLES.items() if b == self.bundle)
        for part in (self.adapter, self.end_of_media):
            _check(part is None or part in MODALITY_PARTS[modality][1:], f"bundle {part!r} is not a {modality} bundle")
        _check((self.image is None) != (self.audio is None), "an encoder takes either an image or audio")
        _check_int(self.soft_tokens, 1, 1 << 16, "soft_tokens")
        for token in (self.start_token_id, self.soft_token_id, self.end_token_id):
            _check_int(token, 0, 1 << 31, "a token id")


@dataclass
class Source:
    kind: str  # "checkpoint" / "random-weights"
    path: str | None
    seed: int | None
    sha256: str  # over the checkpoint's safetensors + config.json, or "random-weights:seed=N"


@dataclass
class MatformerEntry:
    """The MatFormer Mix-n-Match configuration the model was sliced to (converter/matformer.py)."""

    name: str
    published: bool  # one of the 16 published configurations of E4B, or a custom one
    source_layers: int  # the layer count of the model it was sliced from
    layers_kept: int
    layers_skipped: tuple[int, ...]  # indices in the source model
    ffn_hidden_dims: tuple[int, ...]  # one per kept layer
    effective_parameters: int

    def __post_init__(self):
        _check_int(self.source_layers, 1, 1024, "source_layers")
        _check(len(self.ffn_hidden_dims) == self.layers_kept, "ffn_hidden_dims needs one width per kept layer")
        _check(self.layers_kept + len(self.layers_skipped) == self.source_layers,
               "layers_kept and layers_skipped do not add up to source_layers")
        for layer in self.layers_skipped:
            _check_int(layer, 0, self.source_layers - 1, "a skipped layer")
        for width in self.ffn_hidden_dims:
            _check_int(width, 1, MAX_DIM, "an FFN width")


@dataclass
class Mask:
    attend: float
    blocked: float
    note: str


@dataclass
class Manifest:
    variant: str
    created: str
    tool: dict  # g3n's and the libraries' versions
    source: Source
    config: dict  # the full TextConfig (converter/config.py)
    cache_length: int
    prefill_lengths: tuple[int, ...]
    kv_cache_layout: dict[str, str]
    mask: Mask
    bundles: dict[str, BundleEntry]
    encoders: dict[str, EncoderEntry]
    files: dict[str, FileEntry]  # plain files: the tokenizer
    # Positions a sliding-window layer's cache holds: a ring (slot = position mod this) when it is
    # below cache_length; absent when every cache holds cache_length positions.
    sliding_cache_length: int | None = _optional()
    # The text core's context buckets: signatures names.span_step(S) / span_fill(S, N) that attend
    # over the caches' first S positions, for calls whose positions all lie below S.
    context_spans: tuple[int, ...] | None = _optional()
    matformer: MatformerEntry | None = _optional()  # set when the model is a MatFormer slice
    quality: dict | None = _optional()  # the quantization quality report
    conversion_seconds: float | None = _optional()

    def __post_init__(self):
        _check_int(self.cache_length, 1, MAX_CACHE_LENGTH, "cache_length")
        _check(len(self.prefill_lengths) > 0, "prefill_lengths is empty")
        for n in self.prefill_lengths:
            _check_int(n, 1, self.cache_length, "a prefill length")
        if self.sliding_cache_length is not None:
            _check_int(self.sliding_cache_length, max(self.prefill_lengths), self.cache_length - 1, "sliding_cache_length")
        for span in self.context_spans or ():
            _check_int(span, max(self.prefill_lengths), self.cache_length - 1, "a context span")
        unknown = set(self.bundles) - set(ALL_BUNDLES)
        _check(not unknown, f"unknown bundle(s) {', '.join(sorted(unknown))}")
        for modality, entry in self.encoders.items():
            _check(MODALITY_BUNDLES.get(modality) == entry.bundle, f"encoder {modality!r} names bundle {entry.bundle!r}")
            missing = [b for b in entry.parts() if b not in self.bundles]
            _check(not missing, f"encoder {modality!r} names bundle(s) {', '.join(missing)} the folder does not list")
        names = [entry.file for entry in self.listed_files()]
        _check(len(set(names)) == len(names), "two entries name the same file")
        for key in ("vocab_size", "bos_token_id"):
            value = self.config.get(key)
            _check(isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 31,
                   f"config.{key} is not a token count / id")

    def listed_files(self) -> list[FileEntry]:
        """Every file entry: the bundles, then the plain files (tokenizer...)."""
        return [*self.bundles.values(), *self.files.values()]

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **_encode(self)}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST) -> "Manifest":
        """Validate `data` against the schema; any problem is a BundleError naming the field."""
        if data.get("format") != FORMAT:
            raise BundleError(f"{where} is not a g3n bundle manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{where} has format_version {data.get('format_version')!r}; this g3n reads {FORMAT_VERSION}: "
                              "convert the checkpoint again with this g3n")
        return _decode(cls, data, where)


def _encode(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


_JSON_TYPE = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _decode(tp, value, where: str):
    """`value` (parsed JSON) as type `tp`, checked all the way down."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BundleError(f"{where} must be a JSON object")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _decode(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING:
                raise BundleError(f"{where} has no {f.name!r}")
        try:
            return tp(**kwargs)
        except ValueError as exc:
            raise BundleError(f"{where}: {exc}") from None
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise BundleError(f"{where} must be a JSON object")
        if tp is dict:
            return value
        return {k: _decode(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            raise BundleError(f"{where} must be a list")
        return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in _JSON_TYPE:
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise BundleError(f"{where} must be {_JSON_TYPE[tp]}")
        if tp is float and not math.isfinite(value):
            raise BundleError(f"{where} must be a finite number")
        return value
    raise TypeError(f"no decoder for {tp}")


# ---- the folder ------------------------------------------------------------------------------------
def prepare_output_dir(out: Path) -> None:
    """Create `out` (or re-use it) and withdraw any old manifest before new files land."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        probe = out / ".g3n-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise explain_os_error(exc, out / MANIFEST) from exc


def file_entry(path: Path) -> FileEntry:
    return FileEntry(path.name, path.stat().st_size, sha256_file(path))


def write_manifest(out: Path, manifest: Manifest) -> None:
    write_bytes_atomic(Path(out) / MANIFEST, manifest.to_json())


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST
    return Manifest.from_dict(read_json_object(path, BundleError, "it is not a finished g3n bundle folder"), str(path))


def member_path(folder: Path, entry: FileEntry) -> Path:
    """Where `entry` lives: inside `folder`, also after resolving symlinks, or a BundleError."""
    folder = Path(folder)
    path = folder / entry.file
    if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
        raise BundleError(f"{path} is a link that leads out of the bundle folder; copy the file in instead")
    return path


def verify_bundle(folder: Path, check_hashes: bool = True, manifest: Manifest | None = None,
                  verified: VerifiedFiles | None = None) -> list[str]:
    """Return a list of problems (empty when every listed file matches the manifest).
    `verified`: remembers files already hashed (bundle/verified.py); None hashes every file."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    verified = verified or VerifiedFiles(None)
    problems = []
    for entry in manifest.listed_files():
        path = member_path(folder, entry)
        if not path.is_file():
            problems.append(f"{entry.file}: missing")
            continue
        size = path.stat().st_size
        if size != entry.bytes:
            problems.append(f"{entry.file}: {size} bytes, manifest says {entry.bytes}")
        elif check_hashes and not verified.matches(path, entry.sha256):
            problems.append(f"{entry.file}: sha256 differs from the manifest (file corrupted or modified)")
    return problems


VERIFY_MODES = ("once", "always", "sizes")


def open_bundle(folder: Path, verify: str = "once", needs: tuple[str, ...] = (), memo: Path | None = None) -> Manifest:
    """The folder's manifest, after checking every listed file and that it has the bundles in
    `needs`: the one check a runner makes on load. `verify`: "once" checks each file's sha256
    the first time it is seen and again whenever it changes (remembered under `memo`), "always"
    hashes every file now, "sizes" checks sizes only (the user's choice, --no-verify)."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}")
    folder = Path(folder)
    if folder.is_file() and folder.suffix == LITERTLM_SUFFIX:
        # LiteRT's Python API loads a model from a path or from a bytes copy, never from a byte
        # range of a mapped file, so running a section in place is not possible from Python.
        raise BundleError(f"{folder} is a .litertlm file: run it with LiteRT-LM's engine (litert_lm.Engine, "
                          "or the Android / C++ API); g3n-run runs bundle folders (g3n-convert --format folder or both)")
    if not folder.is_dir():
        raise BundleError(f"bundle folder {folder} does not exist")
    manifest = read_manifest(folder)
    verified = VerifiedFiles(memo if verify == "once" else None)
    problems = verify_bundle(folder, verify != "sizes", manifest, verified)
    if problems:
        hint = "re-copy the folder or convert again" + ("; `g3n-convert verify` checks sha256 too" if verify == "sizes" else "")
        raise BundleError(f"{folder} does not match its manifest.json: {'; '.join(problems)} ({hint})")
    missing = [b for b in needs if b not in manifest.bundles]
    if missing:
        raise BundleError(f"{folder} has no {', '.join(missing)} bundle; it needs {', '.join(needs)}")
    return manifest
