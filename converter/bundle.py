"""Bundle folder I/O: atomic file writes, sha256, manifest.json, and verification.

A bundle folder is valid only while its manifest.json exists and every file it lists has the
recorded size and sha256. The manifest is written last and removed first when a folder is
re-used, so an interrupted conversion never leaves a folder that claims to be complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from converter.errors import BundleError, G3nError, read_json_object

MANIFEST = "manifest.json"
FORMAT = "g3n-bundle"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _explain_os_error(exc: OSError, path: Path) -> G3nError:
    if exc.errno == errno.ENOSPC:
        return G3nError(f"disk full while writing {path}; free space on {path.parent} and run again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return G3nError(f"cannot write to {path.parent}: permission denied; choose another --out folder")
    return G3nError(f"cannot write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync it and rename it into place.
    On any failure the temporary file is removed and `final` is left untouched."""
    final = Path(final)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        os.close(fd)
    except OSError as exc:
        raise _explain_os_error(exc, final) from exc
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; bundles are meant to be shared
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _explain_os_error(exc, final) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def file_entry(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def prepare_output_dir(out: Path) -> None:
    """Create `out` (or re-use it) and withdraw any old manifest before new files land."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        probe = out / ".g3n-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _explain_os_error(exc, out / MANIFEST) from exc


def write_manifest(out: Path, manifest: dict) -> None:
    data = json.dumps(manifest, indent=2, sort_keys=False).encode() + b"\n"
    write_bytes_atomic(out / MANIFEST, data)


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    manifest = read_json_object(path, BundleError, "it is not a finished g3n bundle folder")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a g3n bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {manifest.get('format_version')}; this g3n reads {FORMAT_VERSION}"
        )
    return manifest


def listed_files(manifest: dict) -> list[dict]:
    """Every file entry of a manifest: the bundles, then the plain files (tokenizer...)."""
    return [*manifest.get("bundles", {}).values(), *manifest.get("files", {}).values()]


def verify_bundle(folder: Path, check_hashes: bool = True) -> list[str]:
    """Return a list of problems (empty when every listed file matches the manifest)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    for entry in listed_files(manifest):
        path = folder / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']}: missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{entry['file']}: {size} bytes, manifest says {entry['bytes']}")
        elif check_hashes and sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['file']}: sha256 differs from the manifest (file corrupted or modified)")
    return problems
