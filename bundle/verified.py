"""sha256 verification done once per file and remembered, so every load can afford it.

A file whose sha256 matched once is recorded in `<cache folder>/verified-files.json` under its real
path with its size, device, inode, mtime and ctime. A later check skips the hash only while all of
those are unchanged: any write to a file moves its ctime, which no user tool can set back, so a
changed file is always hashed again. The record is read and rewritten under a lock, and written
atomically, so concurrent runners never see half of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from bundle.files import sha256_file, write_bytes_atomic

RECORD = "verified-files.json"


def file_key(path: Path) -> dict:
    """What identifies the bytes of `path` on this machine without reading them."""
    st = os.stat(path)
    return {"size": st.st_size, "dev": st.st_dev, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


class VerifiedFiles:
    """`folder` None: nothing is remembered, every check hashes."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None

    @contextlib.contextmanager
    def _record(self):
        """The record, locked for this process, written back on exit."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / (RECORD + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                record = json.loads((self.folder / RECORD).read_text())
                if not isinstance(record, dict):
                    record = {}
            except (OSError, ValueError):
                record = {}  # missing or damaged: it only costs a re-hash
            before = dict(record)
            yield record
            if record != before:
                write_bytes_atomic(self.folder / RECORD, json.dumps(record, indent=1).encode())

    def matches(self, path: Path, sha256: str) -> bool:
        """Whether `path` holds the bytes whose hash is `sha256`: remembered, or hashed now."""
        path = Path(path)
        if self.folder is None:
            return sha256_file(path) == sha256
        real = str(path.resolve())
        try:
            with self._record() as record:
                key = dict(file_key(path), sha256=sha256)
                if record.get(real) == key:
                    return True
                record.pop(real, None)
                if sha256_file(path) != sha256:
                    return False
                if file_key(path) == {k: v for k, v in key.items() if k != "sha256"}:  # unchanged while hashed
                    record[real] = key
                return True
        except OSError:  # an unwritable cache folder: hash every time
            return sha256_file(path) == sha256
