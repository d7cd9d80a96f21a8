"""XNNPACK's packed-weight cache for a text core: built once, under a lock, trusted only while it
matches.

XNNPACK writes the cache while LiteRT compiles the model, straight to the path it is given, and on
later loads maps whatever file is there without checking it against the model. Two first loads at
once then write one file together, and a cache left by another text core gives wrong tokens. So:

  * the cache is built under an exclusive lock (`<cache>.lock`; a second first load waits, then
    maps the finished cache), to a temporary name, renamed into place only after the compile
    succeeded;
  * a record beside it (`<cache>.json`) holds the cache file's size, inode and mtime, and the text
    core it was built from: its sha256, and its size, inode, mtime and ctime;
  * before a cache is mapped its record must match the cache file as it is on disk, its header's
    buffer list must end at the end of the file, and the text core must be the one it was built
    from (the same sha256, when the caller has verified the file; else the same file, unchanged).
    Anything else is rebuilt, never used;
  * the folder keeps to a byte budget ($G3N_WEIGHT_CACHE_BYTES, default 8 GiB: an E2B int4 cache
    is 1.4 GB, E4B 2.5 GB): after a build, the least recently used other caches are deleted until
    the rest fit, each only once its lock is free (a process mapping a deleted cache keeps its
    pages; the next load of that text core builds it again).
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bundle.files import write_bytes_atomic
from bundle.verified import file_key

T = TypeVar("T")
HEADER = struct.Struct("<QQQ")  # XNNPACK weight cache: version, buffer list offset, buffer list size
SUFFIX = ".xnnpack_cache"
DEFAULT_BUDGET_BYTES = 8 << 30


def budget_bytes() -> int:
    value = os.environ.get("G3N_WEIGHT_CACHE_BYTES", "")
    try:
        return int(value) if value else DEFAULT_BUDGET_BYTES
    except ValueError:
        raise ValueError(f"G3N_WEIGHT_CACHE_BYTES must be a number of bytes, not {value!r}") from None


def header_ok(path: Path) -> bool:
    """The cache header's buffer list lies inside the file and ends at its end."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            _, offset, length = HEADER.unpack(fh.read(HEADER.size))
    except (OSError, struct.error):
        return False
    return HEADER.size <= offset and offset + length == size


class WeightCache:
    def __init__(self, path: Path, model: Path, model_sha256: str | None):
        """`model_sha256`: the text core's sha256 if the caller has checked the file against it."""
        self.path = Path(path)
        self.record, self.lock = record_of(self.path), lock_of(self.path)
        self.budget = budget_bytes()
        self.model, self.model_sha256 = Path(model), model_sha256

    def _cache_key(self, path: Path) -> dict:
        st = path.stat()
        return {"size": st.st_size, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns}

    def _trusted(self) -> bool:
        try:
            record = json.loads(self.record.read_text())
            if record["cache"] != self._cache_key(self.path) or not header_ok(self.path):
                return False
            if self.model_sha256 is not None:
                return record["model_sha256"] == self.model_sha256
            return record["model"] == {"path": str(self.model.resolve()), **file_key(self.model)}
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def compile(self, compile_with: Callable[[str], T]) -> tuple[T, str]:
        """`compile_with(cache path)` -> model, mapping a trusted cache ("loaded") or building a new
        one ("built")."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
            if self._trusted():
                try:
                    model = compile_with(str(self.path))
                    os.utime(self.record)  # its mtime says when the cache was last used (prune)
                    return model, "loaded"
                except (RuntimeError, ValueError):
                    pass  # a cache XNNPACK will not take: build a new one
            self.record.unlink(missing_ok=True)
            building = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
            building.unlink(missing_ok=True)
            try:
                model = compile_with(str(building))
                if header_ok(building):
                    os.replace(building, self.path)
                    record = {"cache": self._cache_key(self.path), "model_sha256": self.model_sha256,
                              "model": {"path": str(self.model.resolve()), **file_key(self.model)}}
                    write_bytes_atomic(self.record, json.dumps(record, indent=1).encode())
            finally:
                building.unlink(missing_ok=True)
        prune(self.path.parent, keep=self.path, budget=self.budget)
        return model, "built"


def record_of(cache: Path) -> Path:
    return cache.with_name(cache.name + ".json")


def lock_of(cache: Path) -> Path:
    return cache.with_name(cache.name + ".lock")


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # gone since the folder was listed
        return 0


def last_used(cache: Path) -> float:
    """When `cache` was last built or mapped: its record's mtime (0 for a cache without one)."""
    try:
        return record_of(cache).stat().st_mtime
    except OSError:
        return 0.0


def prune(folder: Path, keep: Path, budget: int) -> list[Path]:
    """Deletes the least recently used caches in `folder` other than `keep` until the caches left
    fit in `budget` bytes; a cache whose lock another process holds is left. Returns the deleted."""
    others = sorted((c for c in folder.glob("*" + SUFFIX) if c != keep), key=last_used, reverse=True)
    total, deleted = size_of(keep), []
    for cache in others:
        size = size_of(cache)
        if total + size <= budget:
            total += size
            continue
        with open(lock_of(cache), "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # being built or mapped now
                total += size
                continue
            record_of(cache).unlink(missing_ok=True)
            cache.unlink(missing_ok=True)
        deleted.append(cache)
    return deleted
