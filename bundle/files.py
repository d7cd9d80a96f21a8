"""Atomic file writes and sha256: how every g3n artifact reaches its final name.

A file is written to `.<name>.<random>.partial` beside its final name, fsynced and renamed, so a
reader never sees half a file under a final name, whatever interrupts the writer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bundle.errors import G3nError

HASH_BLOCK = 1 << 24


def sha256_file(path: Path, start: int = 0, length: int | None = None) -> str:
    """sha256 of the file, or of `length` bytes from `start` (a section of a .litertlm)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        left = length
        while left is None or left > 0:
            block = fh.read(HASH_BLOCK if left is None else min(HASH_BLOCK, left))
            if not block:
                break
            digest.update(block)
            if left is not None:
                left -= len(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def explain_os_error(exc: OSError, path: Path) -> G3nError:
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
        raise explain_os_error(exc, final) from exc
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; bundles are meant to be shared
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise explain_os_error(exc, final) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


PARTIAL = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.partial$")  # what atomic_path names its temporary files
LOCK_FILE = ".g3n-lock"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder` for one writer: a second one is refused at once with a clear error instead of
    racing the first. The lock is the kernel's (flock), so a killed writer never leaves it held.
    Temporary files that an earlier, interrupted writer left behind are removed on entry."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+")
    except OSError as exc:
        raise explain_os_error(exc, folder / LOCK_FILE) from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise G3nError(f"{folder} is in use by another {what}; wait for it to finish or choose another folder") from None
        for stale in folder.iterdir():
            if PARTIAL.match(stale.name) and stale.is_file():
                stale.unlink(missing_ok=True)
        yield
