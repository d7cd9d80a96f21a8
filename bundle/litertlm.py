"""The .litertlm file: LiteRT-LM's one-file container, as g3n writes and checks it.

A .litertlm is a header (magic `LITERTLM`, a version, a flatbuffer listing sections with their
byte ranges and key/value items) followed by the sections' bytes. g3n adds one generic section,
`g3n_manifest`: the bundle folder's manifest.json and, per section, what it holds (bundle or
file), its model type, its byte count and its sha256. So the file carries its own proof: verify
reads the header, finds that section, and hashes every other section's byte range against it.

Reading uses LiteRT-LM's own header schema (litert-lm-builder's generated flatbuffer code).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from bundle.errors import BundleError, json_depth
from bundle.files import sha256_file
from bundle.manifest import Manifest

MAGIC = b"LITERTLM"
HEADER_END_OFFSET = 24  # where the header's end offset (uint64) sits
HEADER_BEGIN = 32  # where the header flatbuffer starts
MAX_HEADER_BYTES = 1 << 24

MANIFEST_ITEM = "g3n_manifest"  # the key/value item that marks g3n's manifest section
MANIFEST_FORMAT = "g3n-litertlm"
MANIFEST_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Section:
    index: int
    data_type: str  # TFLiteModel, SP_Tokenizer, LlmMetadataProto, GenericBinaryData, ...
    begin: int
    end: int
    items: dict  # the section's key/value items (model_type, ...)

    @property
    def bytes(self) -> int:
        return self.end - self.begin

    @property
    def model_type(self) -> str | None:
        return self.items.get("model_type")


def is_litertlm(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _value(kvp, schema):
    """A header key/value item's value as a Python value."""
    kinds = {v: k for k, v in vars(schema.VData).items() if not k.startswith("_")}
    kind = getattr(schema, kinds.get(kvp.ValueType(), "NONE"), None)
    table = kvp.Value()
    if kind is None or table is None:
        return None
    value = kind()
    value.Init(table.Bytes, table.Pos)
    result = value.Value()
    return result.decode("utf-8", "replace") if isinstance(result, bytes) else result


def read_sections(path: Path) -> list[Section]:
    """The file's sections, from its header; a damaged or foreign file is one BundleError."""
    from litert_lm_builder import litertlm_header_schema_py_generated as schema

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise BundleError(f"{path} is not a .litertlm file (no LITERTLM magic)")
            f.seek(HEADER_END_OFFSET)
            (header_end,) = struct.unpack("<Q", f.read(8))
            if not HEADER_BEGIN < header_end <= min(size, HEADER_BEGIN + MAX_HEADER_BYTES):
                raise BundleError(f"{path}: header end {header_end} is outside the file; it is damaged")
            f.seek(HEADER_BEGIN)
            header = f.read(header_end - HEADER_BEGIN)
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except struct.error:
        raise BundleError(f"{path} is truncated: no .litertlm header") from None

    type_names = {v: k for k, v in vars(schema.AnySectionDataType).items() if not k.startswith("_")}
    try:
        meta = schema.LiteRTLMMetaData.GetRootAs(header, 0).SectionMetadata()
        sections = []
        for i in range(meta.ObjectsLength() if meta else 0):
            obj = meta.Objects(i)
            items = {}
            for j in range(obj.ItemsLength()):
                kvp = obj.Items(j)
                if kvp is not None and kvp.Key() is not None:
                    items[kvp.Key().decode("utf-8", "replace")] = _value(kvp, schema)
            begin, end = obj.BeginOffset(), obj.EndOffset()
            if not header_end <= begin <= end <= size:
                raise BundleError(f"{path}: section {i} spans bytes {begin}..{end} of a {size}-byte file; it is damaged")
            sections.append(Section(i, type_names.get(obj.DataType(), str(obj.DataType())), begin, end, items))
    except BundleError:
        raise
    except Exception as exc:  # a flatbuffer read past its buffer: struct.error, IndexError, ...
        raise BundleError(f"{path}: the .litertlm header is damaged ({type(exc).__name__})") from None
    return sections


def read_range(path: Path, section: Section) -> bytes:
    with open(path, "rb") as f:
        f.seek(section.begin)
        return f.read(section.bytes)


@dataclass(frozen=True)
class PackedFile:
    """What g3n's manifest section says: the bundle manifest, and one entry per other section."""
    manifest: Manifest
    sections: list[dict]  # {index, holds, model_type, bytes, sha256}
    manifest_section: int


def read_packed(path: Path) -> tuple[PackedFile, list[Section]]:
    """g3n's manifest section of `path`, validated, and the file's sections."""
    path = Path(path)
    sections = read_sections(path)
    marked = [s for s in sections if s.items.get(MANIFEST_ITEM)]
    if not marked:
        raise BundleError(f"{path} has no g3n manifest section: it was not written by g3n-convert, "
                          "so there is nothing to verify it against")
    if len(marked) > 1:
        raise BundleError(f"{path} has {len(marked)} g3n manifest sections; it is damaged")
    section = marked[0]
    if section.bytes > 1 << 24:
        raise BundleError(f"{path}: the g3n manifest section is {section.bytes} bytes; it is damaged")
    text = read_range(path, section)
    where = f"{path} (g3n manifest section)"
    try:
        if json_depth(text.decode("utf-8", "replace")) > 64:
            raise ValueError("nested too deeply")
        data = json.loads(text)
    except ValueError as exc:
        raise BundleError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise BundleError(f"{where} is not a g3n .litertlm manifest")
    if data.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise BundleError(f"{where} has format_version {data.get('format_version')!r}; this g3n reads "
                          f"{MANIFEST_FORMAT_VERSION}")
    manifest = Manifest.from_dict(data.get("manifest"), where) if isinstance(data.get("manifest"), dict) else None
    if manifest is None:
        raise BundleError(f"{where} has no bundle manifest")
    entries = data.get("sections")
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("index"), int) and isinstance(e.get("sha256"), str)
            and isinstance(e.get("bytes"), int) and isinstance(e.get("holds"), str) for e in entries):
        raise BundleError(f"{where}: 'sections' must be a list of {{index, holds, bytes, sha256}}")
    return PackedFile(manifest, entries, section.index), sections


def verify_litertlm(path: Path) -> tuple[PackedFile, list[str]]:
    """Check every section of `path` against g3n's manifest section: the same sections, each
    with the recorded size and sha256. Returns the manifest and a list of problems (empty: OK)."""
    packed, sections = read_packed(path)
    by_index = {s.index: s for s in sections}
    problems = []
    listed = {e["index"] for e in packed.sections}
    for entry in packed.sections:
        section = by_index.get(entry["index"])
        what = f"section {entry['index']} ({entry['holds']})"
        if section is None:
            problems.append(f"{what}: missing")
        elif section.bytes != entry["bytes"]:
            problems.append(f"{what}: {section.bytes} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path, section.begin, section.bytes) != entry["sha256"]:
            problems.append(f"{what}: sha256 differs from the manifest (file corrupted or modified)")
        elif entry.get("model_type") != section.model_type:
            problems.append(f"{what}: model type {section.model_type!r}, manifest says {entry.get('model_type')!r}")
    for section in sections:
        if section.index not in listed and section.index != packed.manifest_section:
            problems.append(f"section {section.index} ({section.data_type}) is not in the g3n manifest")
    return packed, problems
