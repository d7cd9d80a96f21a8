"""A stand-in Android device for the adb harness's tests: the device side of adb's wire protocol
over loopback TCP, so the real `adb` client and server talk to it (`adb connect 127.0.0.1:PORT`).

What it implements, as AOSP documents it (adb's protocol.txt, services.txt, SYNC.TXT):
  * the transport: 24-byte message headers (command, arg0, arg1, length, checksum, magic) and
    CNXN / AUTH / OPEN / OKAY / WRTE / CLSE, with one WRTE in flight per stream until its OKAY;
  * `shell:` (the legacy, raw shell: output only, no exit status, as on devices without
    shell_v2) for the commands the harness runs: getprop, df -k, mkdir -p, sha256sum, mv -f,
    rm -f, cat, ls, echo and `$?`, and `sh FILE` / running a script whose first line is #!;
  * `sync:`: STAT, LIST, SEND (DATA... DONE), RECV and QUIT.

The device's storage is a sandbox folder (device path /x/y -> ROOT/x/y; nothing outside it is
reachable) with a quota that `df` reports and SEND enforces. Faults for the tests: `auth=True`
(the device never authorizes the host: adb lists it as unauthorized), `drop_after` (the TCP
connection is cut after that many bytes of file data, mid-file), and the sandbox itself (flip a
byte on the "device" with ordinary file I/O).

Not a device: no real Android userland, no ARM binaries; a test bench stand-in only.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import stat
import struct
import threading
import time
from pathlib import Path

A_SYNC, A_CNXN, A_OPEN, A_OKAY, A_CLSE, A_WRTE, A_AUTH = (
    0x434E5953, 0x4E584E43, 0x4E45504F, 0x59414B4F, 0x45534C43, 0x45545257, 0x48545541)
A_VERSION = 0x01000001  # no payload checksums
MAX_PAYLOAD = 256 * 1024
AUTH_TOKEN, AUTH_SIGNATURE = 1, 2
SYNC_DATA_MAX = 64 * 1024

DEFAULT_PROPS = {
    "ro.product.cpu.abi": "arm64-v8a",
    "ro.product.cpu.abilist": "arm64-v8a,armeabi-v7a,armeabi",
    "ro.build.version.release": "14",
    "ro.build.version.sdk": "34",
    "ro.product.model": "g3n-standin",
    "ro.product.manufacturer": "g3n",
}


class _Closed(Exception):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise _Closed()
        data += chunk
    return data


def _message(command: int, arg0: int, arg1: int, payload: bytes = b"") -> bytes:
    return struct.pack("<6I", command, arg0, arg1, len(payload), sum(payload) & 0xFFFFFFFF, command ^ 0xFFFFFFFF) + payload


class StandinDevice:
    """One stand-in device listening on 127.0.0.1:<port>. `quota` is the storage's size in bytes."""

    def __init__(self, root: Path, quota: int = 1 << 30, props: dict | None = None, auth: bool = False,
                 drop_after: int | None = None, serial_model: str = "g3n-standin"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quota = quota
        self.props = {**DEFAULT_PROPS, **(props or {}), "ro.product.model": serial_model}
        self.auth = auth
        self.drop_after = drop_after  # cut the connection after this many file-data bytes (once)
        self.data_bytes = 0  # file data received over sync, all connections together
        self.commands: list[str] = []  # every shell command, for the tests to inspect
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def serial(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop = True
        try:
            self._server.close()
        except OSError:
            pass

    # ---- storage ----------------------------------------------------------------------------
    def path(self, device_path: str) -> Path:
        """The sandbox file for a device path; a path that would leave the sandbox is refused."""
        parts = [p for p in device_path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise PermissionError(device_path)
        return self.root.joinpath(*parts)

    def used(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    # ---- transport ---------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        link = _Link(self, conn)
        try:
            link.run()
        except (_Closed, OSError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass


class _Link:
    """One transport connection: the handshake, then streams by id."""

    def __init__(self, device: StandinDevice, conn: socket.socket):
        self.device, self.conn = device, conn
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.send_lock = threading.Lock()

    def send(self, command: int, arg0: int, arg1: int, payload: bytes = b"") -> None:
        with self.send_lock:
            self.conn.sendall(_message(command, arg0, arg1, payload))

    def run(self) -> None:
        while True:
            header = _recv_exact(self.conn, 24)
            command, arg0, arg1, length, _, magic = struct.unpack("<6I", header)
            if magic != command ^ 0xFFFFFFFF:
                raise _Closed()
            payload = _recv_exact(self.conn, length) if length else b""
            self.handle(command, arg0, arg1, payload)

    def handle(self, command: int, arg0: int, arg1: int, payload: bytes) -> None:
        if command == A_CNXN:
            if self.device.auth:
                self.send(A_AUTH, AUTH_TOKEN, 0, os.urandom(20))
                return
            banner = ("device::" + ";".join(f"{k}={self.device.props[k]}" for k in
                                            ("ro.product.model", "ro.product.manufacturer")) + ";").encode()
            self.send(A_CNXN, A_VERSION, MAX_PAYLOAD, banner)
        elif command == A_AUTH:
            # This device never says yes: a signature gets a new token (so the host offers its public
            # key), and the public key waits for a prompt nobody taps.
            if arg0 == AUTH_SIGNATURE:
                self.send(A_AUTH, AUTH_TOKEN, 0, os.urandom(20))
        elif command == A_OPEN:
            local = self.next_id
            self.next_id += 1
            service = payload.rstrip(b"\0").decode()
            stream = _Stream(self, local, arg0, service)
            self.streams[local] = stream
            self.send(A_OKAY, local, arg0)
            stream.start()
        elif command == A_OKAY:
            stream = self.streams.get(arg1)
            if stream is not None:
                stream.acked()
        elif command == A_WRTE:
            stream = self.streams.get(arg1)
            if stream is None:
                return
            self.send(A_OKAY, arg1, arg0)
            stream.received(payload)
        elif command == A_CLSE:
            stream = self.streams.pop(arg1, None)
            if stream is not None:
                stream.host_closed()


class _Stream:
    """A service stream. Output goes out one WRTE at a time, each after the host's OKAY."""

    def __init__(self, link: _Link, local: int, remote: int, service: str):
        self.link, self.local, self.remote, self.service = link, local, remote, service
        self.device = link.device
        self.ready = threading.Event()
        self.ready.set()
        self.closed = False
        self.inbox = b""
        self.sync = None

    def start(self) -> None:
        if self.service.startswith("shell:"):
            threading.Thread(target=self._shell, args=(self.service[len("shell:"):],), daemon=True).start()
        elif self.service.startswith("sync:"):
            self.sync = _Sync(self)
        else:
            self.close()

    def acked(self) -> None:
        self.ready.set()

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_PAYLOAD):
            if not self.ready.wait(timeout=30) or self.closed:
                return
            self.ready.clear()
            self.link.send(A_WRTE, self.local, self.remote, data[i:i + MAX_PAYLOAD])

    def close(self) -> None:
        if not self.closed:
            self.ready.wait(timeout=30)
            self.closed = True
            self.link.streams.pop(self.local, None)
            try:
                self.link.send(A_CLSE, self.local, self.remote)
            except OSError:
                pass

    def host_closed(self) -> None:
        self.closed = True
        self.ready.set()

    def received(self, payload: bytes) -> None:
        if self.sync is not None:
            self.sync.feed(payload)

    def _shell(self, command: str) -> None:
        try:
            self.write(_Shell(self.device).run(command).encode())
        except OSError:
            pass
        self.close()


class _Sync:
    """The device side of the sync protocol (SYNC.TXT), fed the stream's bytes as they arrive."""

    def __init__(self, stream: _Stream):
        self.stream, self.device = stream, stream.device
        self.buffer = b""
        self.sending = None  # (path, file handle, failure) while a SEND is in progress

    def reply(self, ident: bytes, *words: int, data: bytes = b"") -> None:
        self.stream.write(ident + b"".join(struct.pack("<I", w) for w in words) + data)

    def fail(self, message: str) -> None:
        self.reply(b"FAIL", len(message.encode()), data=message.encode())

    def feed(self, payload: bytes) -> None:
        self.buffer += payload
        while len(self.buffer) >= 8:
            ident, length = self.buffer[:4], struct.unpack("<I", self.buffer[4:8])[0]
            if ident == b"DONE" and self.sending is not None:
                self.buffer = self.buffer[8:]
                self.finish_send(length)
                continue
            if len(self.buffer) < 8 + length:
                return
            body, self.buffer = self.buffer[8:8 + length], self.buffer[8 + length:]
            self.request(ident, body)

    def request(self, ident: bytes, body: bytes) -> None:
        if ident == b"DATA" and self.sending is not None:
            self.data(body)
        elif ident == b"STAT":
            try:
                st = self.device.path(body.decode()).stat()
                self.reply(b"STAT", st.st_mode, st.st_size, int(st.st_mtime))
            except OSError:
                self.reply(b"STAT", 0, 0, 0)
        elif ident == b"LIST":
            try:
                folder = self.device.path(body.decode())
                for entry in sorted(folder.iterdir()):
                    st = entry.stat()
                    name = entry.name.encode()
                    self.reply(b"DENT", st.st_mode, st.st_size, int(st.st_mtime), len(name), data=name)
            except OSError:
                pass
            self.reply(b"DONE", 0, 0, 0, 0)
        elif ident == b"SEND":
            spec = body.decode()
            path, _, mode = spec.rpartition(",")
            try:
                target = self.device.path(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                self.sending = [target, open(target, "wb"), None, int(mode) & 0o777 if mode.isdigit() else 0o644]
            except OSError as exc:
                self.sending = [None, None, f"{path}: {exc.strerror or exc}", 0]
        elif ident == b"RECV":
            try:
                with open(self.device.path(body.decode()), "rb") as fh:
                    for block in iter(lambda: fh.read(SYNC_DATA_MAX), b""):
                        self.reply(b"DATA", len(block), data=block)
                self.reply(b"DONE", 0)
            except OSError as exc:
                self.fail(f"remote object '{body.decode()}' does not exist" if isinstance(exc, FileNotFoundError)
                          else str(exc))
        elif ident == b"QUIT":
            self.stream.close()
        else:
            self.fail(f"unknown sync request {ident!r}")

    def data(self, body: bytes) -> None:
        target, fh, failure, _ = self.sending
        device = self.device
        with device._lock:
            device.data_bytes += len(body)
            drop = device.drop_after is not None and device.data_bytes >= device.drop_after
            if drop:
                device.drop_after = None  # one cut per device
        if failure is None:
            if device.used() + len(body) > device.quota:
                self.sending[2] = "No space left on device"
                fh.close()
                target.unlink(missing_ok=True)
            else:
                fh.write(body)
                fh.flush()
        if drop:  # the cable pulled mid-file: the partial file stays where it was being written
            self.stream.link.conn.shutdown(socket.SHUT_RDWR)
            raise _Closed()

    def finish_send(self, mtime: int) -> None:
        target, fh, failure, mode = self.sending
        self.sending = None
        if failure is not None:
            self.fail(failure)
            return
        fh.close()
        os.chmod(target, mode or 0o644)
        os.utime(target, (mtime, mtime))
        self.reply(b"OKAY", 0)


class _Shell:
    """Just enough of toybox's sh for the harness: `;` and `&&` lists, `$?`, quoting, 2>/dev/null."""

    def __init__(self, device: StandinDevice):
        self.device = device
        self.status = 0

    def run(self, line: str) -> str:
        self.device.commands.append(line)
        out = []
        for op, words in self._lists(line):
            if op == "&&" and self.status != 0:
                continue
            words = [w.replace("$?", str(self.status)) for w in words]
            quiet = "2>/dev/null" in words
            words = [w for w in words if w != "2>/dev/null"]
            if not words:
                continue
            text, err, self.status = self.command(words)
            out.append(text)
            if err and not quiet:
                out.append(err)
        return "".join(out)

    @staticmethod
    def _lists(line: str):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&")
        lexer.whitespace_split = True
        op, words = ";", []
        for token in lexer:
            if token in (";", "&&"):
                yield op, words
                op, words = token, []
            else:
                words.append(token)
        yield op, words

    def command(self, words: list[str]) -> tuple[str, str, int]:
        name, args = words[0], words[1:]
        d = self.device
        try:
            if name == "echo":
                return " ".join(args) + "\n", "", 0
            if name == "getprop":
                if not args:
                    return "".join(f"[{k}]: [{v}]\n" for k, v in sorted(d.props.items())), "", 0
                return d.props.get(args[0], "") + "\n", "", 0
            if name == "df":
                paths = [a for a in args if not a.startswith("-")]
                target = d.path(paths[0]) if paths else d.root
                if not target.exists():
                    return "", f"df: {paths[0]}: No such file or directory\n", 1
                used, total = d.used(), d.quota
                free = max(0, total - used)
                return ("Filesystem     1K-blocks    Used Available Use% Mounted on\n"
                        f"/dev/block/dm-48 {total // 1024:>9} {used // 1024:>7} {free // 1024:>9} "
                        f"{(100 * used) // max(1, total):>3}% /data\n"), "", 0
            if name == "mkdir":
                for p in (a for a in args if not a.startswith("-")):
                    d.path(p).mkdir(parents="-p" in args, exist_ok="-p" in args)
                return "", "", 0
            if name == "sha256sum":
                out, err, status = [], [], 0
                for p in args:
                    try:
                        digest = hashlib.sha256(d.path(p).read_bytes()).hexdigest()
                        out.append(f"{digest}  {p}\n")
                    except (FileNotFoundError, IsADirectoryError):
                        err.append(f"sha256sum: {p}: No such file or directory\n")
                        status = 1
                return "".join(out), "".join(err), status
            if name == "mv":
                src, dst = [a for a in args if not a.startswith("-")]
                os.replace(d.path(src), d.path(dst))
                return "", "", 0
            if name == "rm":
                for p in (a for a in args if not a.startswith("-")):
                    target = d.path(p)
                    if target.is_dir() and ("-r" in args or "-rf" in args):
                        import shutil

                        shutil.rmtree(target)
                    else:
                        target.unlink(missing_ok="-f" in args or "-rf" in args)
                return "", "", 0
            if name == "cat":
                return "".join(d.path(p).read_text(errors="replace") for p in args), "", 0
            if name == "ls":
                paths = [a for a in args if not a.startswith("-")] or ["/"]
                out = []
                for p in paths:
                    target = d.path(p)
                    if not target.exists():
                        return "", f"ls: {p}: No such file or directory\n", 1
                    out += [e.name + "\n" for e in sorted(target.iterdir())] if target.is_dir() else [p + "\n"]
                return "".join(out), "", 0
            if name in ("test", "["):
                flag, p = args[0], args[1]
                target = d.path(p)
                ok = {"-f": target.is_file(), "-d": target.is_dir(), "-e": target.exists(),
                      "-x": target.is_file() and bool(target.stat().st_mode & stat.S_IXUSR)}[flag]
                return "", "", 0 if ok else 1
            if name == "chmod":
                mode, *paths = args
                for p in paths:
                    os.chmod(d.path(p), int(mode, 8) if mode.isdigit() else 0o755)
                return "", "", 0
            if name == "sh" or d.path(name).is_file():
                script = d.path(args[0] if name == "sh" else name)
                lines = script.read_text().splitlines()
                if name != "sh" and not (lines and lines[0].startswith("#!")):
                    return "", f"/system/bin/sh: {name}: can't execute: Exec format error\n", 126
                env = {f"${i + 1}": a for i, a in enumerate(args[1:] if name == "sh" else args)}
                env["$@"] = " ".join(shlex.quote(a) for a in (args[1:] if name == "sh" else args))
                inner = _Shell(d)
                out = []
                for raw in lines[1 if lines and lines[0].startswith("#!") else 0:]:
                    for key, value in env.items():
                        raw = raw.replace(key, value)
                    out.append(inner.run(raw))
                return "".join(out), "", inner.status
            if name == "sleep":
                time.sleep(float(args[0]))
                return "", "", 0
            return "", f"/system/bin/sh: {name}: inaccessible or not found\n", 127
        except PermissionError:
            return "", f"{name}: Permission denied\n", 1
        except (OSError, ValueError, IndexError, KeyError) as exc:
            return "", f"{name}: {exc}\n", 1
