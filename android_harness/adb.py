"""The platform's `adb` client, driven as a subprocess: devices, shell commands, pushes.

Every Android developer has adb, and its server already handles USB, TCP devices and
authorization; g3n only runs it. Two things are made reliable here:

  * exit status: an old device's shell (no shell_v2) returns no exit code, so each command is
    followed by `echo <marker>$?` and the status is read from the output;
  * progress: adb prints its push percentage only to a terminal, so a push runs on a
    pseudo-terminal and its `[ NN%]` updates drive g3n's progress bar.

The adb server is left as it was found: if this process had to start it, it is killed when done.
"""

from __future__ import annotations

import os
import pty
import re
import select
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bundle.errors import DeviceError

DEFAULT_SERVER_PORT = 5037
STATUS_MARKER = "__g3n_status="
SHELL_TIMEOUT = 600  # sha256sum of a 4 GB file on a phone takes seconds; a hung device is cut off
INSTALL_HINT = ("install Android's platform tools (Debian / Ubuntu: `apt install adb`; otherwise the Android SDK's "
                "platform-tools) or pass --adb PATH / set $ADB")


@dataclass
class Device:
    serial: str
    state: str  # "device", "unauthorized", "offline", ...
    details: dict[str, str] = field(default_factory=dict)  # adb devices -l: model, product, transport_id


def parse_devices(text: str) -> list[Device]:
    """`adb devices -l` output -> devices."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*")):
            continue
        parts = line.split()
        if len(parts) < 2:
            continue
        details = dict(p.split(":", 1) for p in parts[2:] if ":" in p)
        out.append(Device(parts[0], parts[1], details))
    return out


def choose_device(devices: list[Device], serial: str | None) -> Device:
    """The one device to use, or one clear error for each way there is none."""
    if serial is not None:
        matches = [d for d in devices if d.serial == serial]
        if not matches:
            attached = ", ".join(d.serial for d in devices) or "none"
            raise DeviceError(f"no device {serial} (attached: {attached}); check `adb devices`")
        device = matches[0]
    elif not devices:
        raise DeviceError("no Android device attached: plug one in with USB debugging on (it must show in "
                          "`adb devices`), or attach one over the network with `adb connect HOST:PORT`")
    elif len(devices) > 1:
        raise DeviceError(f"{len(devices)} devices attached ({', '.join(d.serial for d in devices)}): "
                          "pick one with --serial, or push to every one with --all")
    else:
        device = devices[0]
    check_ready(device)
    return device


def check_ready(device: Device) -> None:
    if device.state == "device":
        return
    if device.state == "unauthorized":
        raise DeviceError(f"device {device.serial} is unauthorized: unlock it and accept the 'Allow USB debugging?' "
                          "prompt (if there is none, revoke USB debugging authorizations in Developer options "
                          "and reconnect), then run again")
    if device.state == "offline":
        raise DeviceError(f"device {device.serial} is offline: reconnect its cable (or run `adb reconnect`) and run again")
    raise DeviceError(f"device {device.serial} is in state '{device.state}', not ready for adb; "
                      "wait for it to boot or reconnect it")


class Adb:
    """A handle on the adb client; use as a context manager to leave the server as it was."""

    def __init__(self, path: str | Path | None = None, env: dict | None = None):
        self.env = dict(os.environ if env is None else env)
        chosen = path or self.env.get("ADB") or shutil.which("adb", path=self.env.get("PATH"))
        if not chosen:
            raise DeviceError(f"no adb client found: {INSTALL_HINT}")
        if not (Path(chosen).is_file() and os.access(chosen, os.X_OK)):
            raise DeviceError(f"adb client {chosen} is not an executable file: {INSTALL_HINT}")
        self.path = str(chosen)
        self.port = int(self.env.get("ANDROID_ADB_SERVER_PORT", DEFAULT_SERVER_PORT))
        self.started_server = False

    # ---- the server ------------------------------------------------------------------------------
    def server_running(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def __enter__(self) -> "Adb":
        self.started_server = not self.server_running()
        return self

    def __exit__(self, *exc) -> None:
        if self.started_server:
            subprocess.run([self.path, "kill-server"], env=self.env, capture_output=True, timeout=30)

    # ---- commands --------------------------------------------------------------------------------
    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self.path, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"`adb {' '.join(args)}` did not answer within {timeout:.0f} s; "
                              "check the device's connection (adb devices)") from None
        except OSError as exc:
            raise DeviceError(f"cannot run {self.path}: {exc.strerror or exc}; {INSTALL_HINT}") from None

    def devices(self) -> list[Device]:
        result = self.run("devices", "-l")
        if result.returncode != 0:
            raise DeviceError(f"`adb devices` failed: {last_line(result.stderr or result.stdout)}")
        return parse_devices(result.stdout)

    def shell(self, serial: str, command: str, timeout: float = SHELL_TIMEOUT) -> tuple[str, int]:
        """Run `command` in the device's shell; returns its output (stdout and stderr together, as
        the shell gives them) and exit status."""
        result = self.run("-s", serial, "shell", f"{command}; echo {STATUS_MARKER}$?", timeout=timeout)
        text = result.stdout.replace("\r\n", "\n")
        match = re.search(rf"^{re.escape(STATUS_MARKER)}(\d+)\s*$", text, re.MULTILINE)
        if result.returncode != 0 or match is None:
            raise DeviceError(f"lost {serial} while running `{command.split()[0]}` on it: "
                              f"{last_line(result.stderr or result.stdout) or 'no answer'}; check `adb devices` and run again")
        return text[:match.start()], int(match.group(1))

    def push(self, serial: str, local: Path, remote: str, on_percent: Callable[[int], None] = lambda p: None) -> None:
        """`adb push LOCAL REMOTE`, on a pseudo-terminal so that adb reports its progress."""
        master, slave = pty.openpty()
        try:
            proc = subprocess.Popen([self.path, "-s", serial, "push", str(local), remote], env=dict(self.env, TERM="dumb"),
                                    stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        except OSError as exc:
            os.close(master)
            os.close(slave)
            raise DeviceError(f"cannot run {self.path}: {exc.strerror or exc}") from None
        os.close(slave)
        output = b""
        try:
            while True:
                ready, _, _ = select.select([master], [], [], 1.0)
                if not ready:
                    if proc.poll() is not None:
                        break
                    continue
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal closes when adb exits
                    break
                if not chunk:
                    break
                output += chunk
                percents = re.findall(rb"\[\s*(\d+)%\]", chunk)
                if percents:
                    on_percent(int(percents[-1]))
        finally:
            os.close(master)
            proc.wait()
        if proc.returncode != 0:
            text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output.decode(errors="replace"))
            lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
            # adb's reason is its "adb: error: ..." line; its summary line ("0 files pushed") says nothing.
            reason = next((line for line in reversed(lines) if "error" in line.lower()),
                          lines[-1] if lines else f"exit status {proc.returncode}")
            raise DeviceError(f"adb push to {serial} failed ({reason.removeprefix('adb: error: ')})")


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def quote(path: str) -> str:
    return shlex.quote(path)
