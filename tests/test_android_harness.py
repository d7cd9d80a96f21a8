"""g3n-push through the real adb client and server, against stand-in devices that speak adb's wire
protocol over loopback TCP (tests/support/standin_adbd.py). What is real: adb (client and server),
the protocol on the wire, the harness. What stands in: the device (a sandbox folder with a quota,
a small shell, the sync service)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from android_harness.cli import main
from converter.pack import pack
from tests.support.standin_adbd import StandinDevice

ADB = shutil.which("adb")
pytestmark = pytest.mark.skipif(ADB is None, reason="no adb client: `make setup` installs it (Debian package adb)")
DEST = "/data/local/tmp/g3n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Bench:
    """An adb server of the tests' own (its own port) and the stand-in devices attached to it."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.env = {**os.environ, "ANDROID_ADB_SERVER_PORT": str(self.port)}
        self.devices: list[StandinDevice] = []
        self.adb("start-server")

    def adb(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([ADB, *args], env=self.env, capture_output=True, text=True, timeout=60)

    def attach(self, device: StandinDevice, state: str = "device") -> StandinDevice:
        self.adb("connect", device.serial)
        self.wait_for(device, state)
        if device not in self.devices:
            self.devices.append(device)
        return device

    def device(self, name: str = "phone", state: str = "device", **kwargs) -> StandinDevice:
        return self.attach(StandinDevice(self.root / name, **kwargs), state)

    def reattach(self, device: StandinDevice) -> None:
        """As a user re-plugs a cable: adb forgets the lost connection, then connects again."""
        self.adb("disconnect", device.serial)
        self.attach(device)

    def wait_for(self, device: StandinDevice, state: str) -> None:
        for _ in range(100):
            listed = self.adb("devices").stdout
            if f"{device.serial}\t{state}" in listed:
                return
            time.sleep(0.1)
        raise AssertionError(f"{device.serial} never became {state}: {listed}")

    def push(self, *args: str):
        return CliRunner().invoke(main, list(args), env=self.env)

    def close(self) -> None:
        self.adb("kill-server")
        for d in self.devices:
            d.close()


@pytest.fixture()
def bench(tmp_path):
    b = Bench(tmp_path / "devices")
    yield b
    b.close()
    assert not listening(b.port), "the adb server is gone"


@pytest.fixture(scope="module")
def litertlm_file(tiny_bundle, tmp_path_factory) -> Path:
    return pack(tiny_bundle, tmp_path_factory.mktemp("push") / "tiny.litertlm")


def folder_files(folder: Path) -> list[str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [*(b["file"] for b in manifest["bundles"].values()), *(f["file"] for f in manifest["files"].values()), "manifest.json"]


def test_folder_and_litertlm_push_verify_and_skip(bench, tiny_bundle, litertlm_file):
    phone = bench.device()
    result = bench.push(str(tiny_bundle), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    files = folder_files(tiny_bundle)
    assert report["sent"] == files and report["skipped"] == [] and report["dest"] == f"{DEST}/{tiny_bundle.name}"
    assert report["bytes_sent"] == sum((tiny_bundle / f).stat().st_size for f in files)
    assert report["device"]["abi"] == "arm64-v8a" and report["device"]["android"] == "14"
    copy = Path(DEST) / tiny_bundle.name
    for f in files:
        assert phone.path(str(copy / f)).read_bytes() == (tiny_bundle / f).read_bytes(), f
    assert not list(phone.root.rglob("*.partial"))

    verify = bench.push("verify", str(tiny_bundle))
    assert verify.exit_code == 0 and verify.output.startswith(f"OK {len(files)} files"), verify.output
    again = json.loads(bench.push(str(tiny_bundle), "--json").stdout)
    assert again["sent"] == [] and again["skipped"] == files and again["bytes_sent"] == 0

    packed = bench.push(str(litertlm_file), "--json")
    assert packed.exit_code == 0, packed.output
    assert json.loads(packed.stdout)["sent"] == [litertlm_file.name]
    assert phone.path(f"{DEST}/{litertlm_file.stem}/{litertlm_file.name}").read_bytes() == litertlm_file.read_bytes()
    assert bench.push("verify", str(litertlm_file)).exit_code == 0
    # Each file went to NAME.partial, was hashed on the device, then renamed.
    text_core = f"{DEST}/{tiny_bundle.name}/text_core.tflite"
    order = [c for c in phone.commands if "text_core.tflite" in c]
    assert any(c.startswith(f"sha256sum {text_core}.partial") for c in order)
    assert order.index(next(c for c in order if c.startswith("sha256sum " + text_core + ".partial"))) < \
        order.index(next(c for c in order if c.startswith("mv -f")))


def test_connection_dropped_mid_file_then_resumed(bench, tiny_bundle):
    files = folder_files(tiny_bundle)
    first = (tiny_bundle / files[0]).stat().st_size
    second = (tiny_bundle / files[1]).stat().st_size
    phone = bench.device(drop_after=first + second // 2)  # the cable goes halfway through the second file

    cut = bench.push(str(tiny_bundle))
    assert cut.exit_code == 1
    message = cut.output.strip().splitlines()[-1]
    assert message.startswith("g3n-push: error: ") and "adb push to" in message and "couldn't read from device" in message, message
    assert f"it was left as {files[1]}.partial, never under its final name" in message and "run again" in message
    folder = f"{DEST}/{tiny_bundle.name}"
    assert phone.path(f"{folder}/{files[0]}").read_bytes() == (tiny_bundle / files[0]).read_bytes()
    assert not phone.path(f"{folder}/{files[1]}").exists(), "nothing unverified under a final name"
    assert not phone.path(f"{folder}/manifest.json").exists()

    bench.reattach(phone)
    resumed = bench.push(str(tiny_bundle), "--json")
    assert resumed.exit_code == 0, resumed.output
    report = json.loads(resumed.stdout)
    assert report["skipped"] == [files[0]] and report["sent"] == files[1:]
    for f in files:
        assert phone.path(f"{folder}/{f}").read_bytes() == (tiny_bundle / f).read_bytes(), f
    assert not list(phone.root.rglob("*.partial"))


def test_device_full(bench, tiny_bundle):
    total = sum((tiny_bundle / f).stat().st_size for f in folder_files(tiny_bundle))
    phone = bench.device(quota=total // 2)
    result = bench.push(str(tiny_bundle))
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert f"not enough space on {phone.serial} for {tiny_bundle.name}: {total / 1e6:,.1f} MB to send" in line, line
    assert "MB more" in line and "run again" in line
    assert not [p for p in phone.root.rglob("*") if p.is_file()], "not a byte moved"


def test_byte_flipped_on_the_device(bench, tiny_bundle):
    phone = bench.device()
    assert bench.push(str(tiny_bundle)).exit_code == 0
    target = phone.path(f"{DEST}/{tiny_bundle.name}/text_core.tflite")
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x10
    target.write_bytes(bytes(data))

    verify = bench.push("verify", str(tiny_bundle))
    assert verify.exit_code == 1
    assert "FAIL text_core.tflite: sha256 on the device differs from the manifest" in verify.output
    assert "1 of" in verify.output.strip().splitlines()[-1]
    fixed = json.loads(bench.push(str(tiny_bundle), "--json").stdout)
    assert fixed["sent"] == ["text_core.tflite", "manifest.json"]  # the manifest is withdrawn, then sent last again
    assert bench.push("verify", str(tiny_bundle)).exit_code == 0


def test_which_device(bench, tiny_bundle):
    none = bench.push(str(tiny_bundle))
    assert none.exit_code == 1 and "no Android device attached" in none.output

    locked = bench.device("locked", state="unauthorized", auth=True)
    refused = bench.push(str(tiny_bundle))
    assert refused.exit_code == 1
    assert f"device {locked.serial} is unauthorized: unlock it and accept the 'Allow USB debugging?' prompt" in refused.output
    assert not [p for p in locked.root.rglob("*") if p.is_file()]

    a = bench.device("a")
    two = bench.push(str(tiny_bundle))
    assert two.exit_code == 1 and "2 devices attached" in two.output and "--serial" in two.output and "--all" in two.output
    missing = bench.push(str(tiny_bundle), "--serial", "R5CT0000")
    assert missing.exit_code == 1 and "no device R5CT0000" in missing.output
    chosen = bench.push(str(tiny_bundle), "--serial", a.serial, "--json")
    assert chosen.exit_code == 0, chosen.output


def test_all_devices_in_parallel(bench, tiny_bundle):
    phones = [bench.device("a"), bench.device("b")]
    result = bench.push(str(tiny_bundle), "--all", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert sorted(r["serial"] for r in rows) == sorted(p.serial for p in phones)
    files = folder_files(tiny_bundle)
    for phone, row in zip(sorted(phones, key=lambda p: p.serial), sorted(rows, key=lambda r: r["serial"])):
        assert row["sent"] == files
        for f in files:
            assert phone.path(f"{DEST}/{tiny_bundle.name}/{f}").read_bytes() == (tiny_bundle / f).read_bytes()
    table = bench.push(str(tiny_bundle), "--all")
    assert table.exit_code == 0 and table.output.count("already there") == 2


def test_run_with_and_without_a_runner(bench, litertlm_file, tmp_path):
    phone = bench.device()
    assert bench.push(str(litertlm_file)).exit_code == 0
    folder = f"{DEST}/{litertlm_file.stem}"
    missing = bench.push("run", str(litertlm_file), "--prompt", "Hello")
    assert missing.exit_code == 1
    assert f"no LiteRT-LM runner at {folder}/litert_lm_main on {phone.serial}: push one" in missing.output
    assert "litert_lm_main.android_arm64" in missing.output

    # A stand-in runner (a shell script: the stand-in runs no ARM binaries) that prints what
    # LiteRT-LM's litert_lm_main prints, pushed with adb as a user pushes the real one.
    script = tmp_path / "litert_lm_main"
    script.write_text("#!/system/bin/sh\necho reply from $2\necho Prefill Speed: 41.50 tokens/sec.\n"
                      "echo Decode Speed: 7.25 tokens/sec.\n")
    assert bench.adb("-s", phone.serial, "push", str(script), f"{folder}/litert_lm_main").returncode == 0
    bench.adb("-s", phone.serial, "shell", f"chmod 755 {folder}/litert_lm_main")
    ran = bench.push("run", str(litertlm_file), "--prompt", "Hello there")
    assert ran.exit_code == 0, ran.output
    assert f"reply from --model_path={folder}/{litertlm_file.name}" in ran.output
    assert "prefill 41.50 tok/s, decode 7.25 tok/s" in ran.output
    assert any("--input_prompt='Hello there'" in c for c in phone.commands)


def test_no_adb_and_the_server_left_as_found(tmp_path, tiny_bundle):
    port = free_port()
    env = {**os.environ, "ANDROID_ADB_SERVER_PORT": str(port)}
    result = CliRunner().invoke(main, [str(tiny_bundle)], env=env)
    assert result.exit_code == 1 and "no Android device attached" in result.output
    assert not listening(port), "g3n-push started the adb server, so it stopped it"

    missing = CliRunner().invoke(main, [str(tiny_bundle), "--adb", str(tmp_path / "nope")], env=env)
    assert missing.exit_code == 1 and "apt install adb" in missing.output

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bundle, damaged)
    (damaged / "ple.tflite").write_bytes(b"\0" * 10)
    refused = CliRunner().invoke(main, [str(damaged)], env=env)
    assert refused.exit_code == 1 and "does not match its manifest.json" in refused.output
