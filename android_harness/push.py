"""Push a bundle folder or a .litertlm to a device, verified on the device, resumable.

For each file: adb push to `NAME.partial`, sha256 on the device (toybox `sha256sum`) against the
manifest, and only then `mv` to the final name. A file already on the device with the right
hash is skipped, so a run cut off by a disconnect resumes where it stopped. A folder's
manifest.json goes last (and is withdrawn first when anything is to change), so a folder on the
device is complete exactly when its manifest is there, as on the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from android_harness.adb import Adb, Device, quote
from bundle import names
from bundle.errors import BundleError, DeviceError
from bundle.files import sha256_file
from bundle.manifest import open_bundle

DEVICE_ROOT = "/data/local/tmp/g3n"  # where LiteRT-LM's instructions put models: adb can write there
PARTIAL = ".partial"


@dataclass
class SourceFile:
    name: str
    path: Path
    bytes: int
    sha256: str


@dataclass
class Source:
    """What to push: a verified bundle folder (its files, manifest last) or one .litertlm file."""

    name: str
    files: list[SourceFile]
    kind: str  # "folder" / "litertlm"

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


def read_source(path: Path) -> Source:
    """The files to push, each with its sha256, after checking them on the host."""
    path = Path(path)
    if path.is_file() and path.suffix == names.LITERTLM_SUFFIX:
        from bundle.litertlm import verify_litertlm

        _, problems = verify_litertlm(path)
        if problems:
            raise BundleError(f"{path} does not match the g3n manifest it carries: {'; '.join(problems)}; pack it again")
        return Source(path.stem, [SourceFile(path.name, path, path.stat().st_size, sha256_file(path))], "litertlm")
    if not path.is_dir():
        raise BundleError(f"{path} is neither a bundle folder nor a {names.LITERTLM_SUFFIX} file")
    manifest = open_bundle(path, verify="always")  # a damaged folder is refused here, not found on the device
    files = [SourceFile(e.file, path / e.file, e.bytes, e.sha256) for e in manifest.listed_files()]
    manifest_path = path / names.MANIFEST
    files.append(SourceFile(names.MANIFEST, manifest_path, manifest_path.stat().st_size, sha256_file(manifest_path)))
    return Source(path.resolve().name, files, "folder")


@dataclass
class DeviceInfo:
    serial: str
    model: str
    abi: str
    android: str
    sdk: str


def device_info(adb: Adb, device: Device) -> DeviceInfo:
    keys = ("ro.product.model", "ro.product.cpu.abi", "ro.build.version.release", "ro.build.version.sdk")
    out, _ = adb.shell(device.serial, "; ".join(f"getprop {k}" for k in keys))
    values = (out.splitlines() + [""] * len(keys))[:len(keys)]
    return DeviceInfo(device.serial, *(v.strip() for v in values))


def device_hashes(adb: Adb, serial: str, paths: list[str]) -> dict[str, str]:
    """sha256 of each device path that exists (toybox sha256sum prints `HASH  PATH`)."""
    if not paths:
        return {}
    out, _ = adb.shell(serial, "sha256sum " + " ".join(quote(p) for p in paths) + " 2>/dev/null")
    hashes = {}
    for line in out.splitlines():
        digest, _, path = line.strip().partition("  ")
        if len(digest) == 64 and path:
            hashes[path] = digest
    return hashes


def free_bytes(adb: Adb, serial: str, folder: str) -> int:
    """Available bytes on the file system holding `folder` (df -k's Available column)."""
    out, status = adb.shell(serial, f"df -k {quote(folder)}")
    rows = [line.split() for line in out.splitlines() if line.strip()]
    if status != 0 or len(rows) < 2 or len(rows[-1]) < 4 or not rows[-1][3].isdigit():
        raise DeviceError(f"cannot read the free space of {folder} on {serial} (df said: {out.strip() or 'nothing'})")
    return int(rows[-1][3]) * 1024


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@dataclass
class PushResult:
    device: dict
    dest: str
    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def push_source(adb: Adb, device: Device, source: Source, dest: str,
                on_file: Callable[[SourceFile], Callable[[int], None]] = lambda f: (lambda done: None)) -> PushResult:
    """Push `source` into the device folder `dest`. `on_file(file)` returns a callback that gets
    the bytes sent of that file so far (for a progress bar)."""
    started = time.perf_counter()
    info = device_info(adb, device)
    _, status = adb.shell(device.serial, f"mkdir -p {quote(dest)}")
    if status != 0:
        raise DeviceError(f"cannot create {dest} on {device.serial}; pick a writable --dest (adb can write under /data/local/tmp)")
    final = {f.name: f"{dest}/{f.name}" for f in source.files}
    present = device_hashes(adb, device.serial, list(final.values()))
    todo = [f for f in source.files if present.get(final[f.name]) != f.sha256]
    if source.kind == "folder" and todo and source.files[-1] not in todo:
        todo.append(source.files[-1])  # manifest.json: withdrawn below while files change, so sent again last
    result = PushResult(asdict(info), dest, skipped=[f.name for f in source.files if f not in todo])
    if not todo:
        result.seconds = round(time.perf_counter() - started, 3)
        return result

    need = sum(f.bytes for f in todo)
    free = free_bytes(adb, device.serial, dest)
    if free < need:
        raise DeviceError(f"not enough space on {device.serial} for {source.name}: {_mb(need)} to send, {_mb(free)} free "
                          f"under {dest}; free {_mb(need - free)} more (old bundles live under {DEVICE_ROOT}) and run again")
    if source.kind == "folder":  # the folder is incomplete on the device until its new manifest lands
        adb.shell(device.serial, f"rm -f {quote(final[names.MANIFEST])}")
    for f in todo:
        partial = final[f.name] + PARTIAL
        report = on_file(f)
        try:
            adb.push(device.serial, f.path, partial, lambda percent, f=f, report=report: report(f.bytes * percent // 100))
        except DeviceError as exc:
            done = f"; {len(result.sent)} file(s) before it are on the device, verified" if result.sent else ""
            raise DeviceError(f"{exc} while sending {f.name}: it was left as {f.name}{PARTIAL}, never under its final "
                              f"name{done}. Reconnect the device and run again: verified files are skipped") from None
        got = device_hashes(adb, device.serial, [partial]).get(partial)
        if got != f.sha256:
            adb.shell(device.serial, f"rm -f {quote(partial)}")
            raise DeviceError(f"{f.name} arrived damaged on {device.serial} (sha256 {got or 'unreadable'}, "
                              f"expected {f.sha256}); it was removed: run again")
        _, status = adb.shell(device.serial, f"mv -f {quote(partial)} {quote(final[f.name])}")
        if status != 0:
            raise DeviceError(f"cannot rename {partial} on {device.serial}")
        report(f.bytes)
        result.sent.append(f.name)
        result.bytes_sent += f.bytes
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def verify_on_device(adb: Adb, device: Device, source: Source, dest: str) -> list[str]:
    """Problems with the copy of `source` under `dest` on the device (empty: every file matches)."""
    final = {f.name: f"{dest}/{f.name}" for f in source.files}
    present = device_hashes(adb, device.serial, list(final.values()))
    problems = []
    for f in source.files:
        got = present.get(final[f.name])
        if got is None:
            problems.append(f"{f.name}: missing on the device")
        elif got != f.sha256:
            problems.append(f"{f.name}: sha256 on the device differs from the manifest (damaged or modified there)")
    return problems


def default_dest(source: Source) -> str:
    return f"{DEVICE_ROOT}/{source.name}"
