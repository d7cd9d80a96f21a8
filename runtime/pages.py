"""Give back the resident pages of a model file this process has mapped and already read through.

LiteRT maps each .tflite read-only, and its loader verifies the whole flatbuffer, so after a load
every page of the file is resident in the process, E2B's 1.1 GB per-layer-embedding table
included, though a lookup later reads only its tokens' rows. madvise(MADV_DONTNEED) on the file's
read-only mappings drops those pages from this process (they stay in the page cache, and a later
read faults the one page it needs back in), so resident memory follows what is used. Mappings
with write permission are never touched: their pages could hold changes. Linux only; elsewhere
this does nothing.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

MADV_DONTNEED = 4


def release_file_pages(path: Path) -> int:
    """Drop this process's resident pages of `path`'s read-only mappings; returns the bytes of
    mapping advised (0 where nothing is mapped or the platform has no /proc/self/maps)."""
    try:
        st = os.stat(path)
        maps = open("/proc/self/maps")
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, AttributeError):
        return 0
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    device = (os.major(st.st_dev), os.minor(st.st_dev))
    advised = 0
    with maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[4] == "0" or int(fields[4]) != st.st_ino or "w" in fields[1]:
                continue
            major, minor = (int(v, 16) for v in fields[3].split(":"))
            if (major, minor) != device:
                continue
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
                advised += end - start
    return advised
