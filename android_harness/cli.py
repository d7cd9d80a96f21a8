"""g3n-push: put bundle folders and .litertlm files on Android devices with adb, verified there."""

from __future__ import annotations

import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from android_harness.adb import Adb, Device, check_ready, choose_device, quote
from android_harness.push import DEVICE_ROOT, default_dest, push_source, read_source, verify_on_device
from bundle.errors import DeviceError, G3nError

EPILOG = f"""\b
Examples:
  g3n-push ./e2b-int4                       # the only attached device, {DEVICE_ROOT}/e2b-int4/
  g3n-push ./e2b-int4.litertlm --serial R5CT1234ABC
  g3n-push ./e2b-int4 --all                 # every attached device, in parallel
  g3n-push verify ./e2b-int4                # re-hash every file on the device
  g3n-push run ./e2b-int4.litertlm --prompt "Hello"
"""


class _DefaultPush(click.Group):
    """`g3n-push SOURCE ...` is `g3n-push push SOURCE ...`; `verify` and `run` are subcommands."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["push", *args]
        return super().parse_args(ctx, args)


def _fail(message: str, code: int = 1):
    click.echo(f"g3n-push: error: {message}", err=True)
    sys.exit(code)


def _source(source: Path, dest: str | None):
    """The checked source and its folder on the device."""
    try:
        src = read_source(source)
    except G3nError as exc:
        _fail(str(exc))
    return src, (dest or default_dest(src)).rstrip("/")


def _adb(adb_path: str | None) -> Adb:
    try:
        return Adb(adb_path)
    except DeviceError as exc:
        _fail(str(exc))


ADB_OPTION = click.option("--adb", "adb_path", default=None, metavar="PATH", help="The adb client  [default: $ADB, or adb on PATH]")
SERIAL_OPTION = click.option("--serial", "-s", default=None, help="The device's serial (adb devices); needed when several are attached.")
DEST_OPTION = click.option("--dest", default=None, metavar="DIR", help=f"Folder on the device  [default: {DEVICE_ROOT}/<name>]")


@click.group(cls=_DefaultPush, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Push a bundle folder or a .litertlm to Android devices with adb, verified on the device.

    Each file goes to NAME.partial, is hashed on the device (sha256sum) against the manifest and only
    then renamed; a folder's manifest.json goes last. Files already there with the right hash are
    skipped, so an interrupted push resumes where it stopped.
    """


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@SERIAL_OPTION
@DEST_OPTION
@ADB_OPTION
@click.option("--all", "all_devices", is_flag=True, help="Push to every attached device at once.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a list with --all) instead of progress.")
def push(source, serial, dest, adb_path, all_devices, as_json):
    """Push SOURCE (a bundle folder or a .litertlm) to a device (the default command)."""
    if all_devices and serial:
        _fail("give either --serial or --all, not both")
    src, dest = _source(source, dest)
    with _adb(adb_path) as adb:
        try:
            devices = adb.devices()
            targets = devices if all_devices and devices else [choose_device(devices, serial)]
        except G3nError as exc:
            _fail(str(exc))
        results = _push_all(adb, targets, src, dest, as_json)
    failed = [r for r in results if "error" in r]
    if as_json:
        click.echo(json.dumps(results if all_devices else results[0], indent=2))
    else:
        for r in results:
            if "error" in r:
                if all_devices:  # one device: its error is the final line below
                    click.echo(f"FAIL {r['serial']}: {r['error']}", err=True)
            else:
                d = r["device"]
                click.echo(f"{r['serial']} ({d['model']}, {d['abi']}, Android {d['android']}): {r['dest']}/ — "
                           f"{len(r['sent'])} sent, {len(r['skipped'])} already there, {r['bytes_sent'] / 1e6:,.2f} MB "
                           f"in {r['seconds']:.1f} s; all verified by sha256 on the device")
    if failed:
        if not all_devices and not as_json:
            _fail(failed[0]["error"])
        sys.exit(1)


def _push_all(adb: Adb, targets: list[Device], src, dest: str, quiet: bool) -> list[dict]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), disable=quiet, transient=False)
    prefix = len(targets) > 1

    def one(device: Device) -> dict:
        try:
            check_ready(device)

            def on_file(f):
                task = progress.add_task(f"{device.serial} {f.name}" if prefix else f.name, total=f.bytes)
                return lambda done: progress.update(task, completed=done)

            result = push_source(adb, device, src, dest, on_file)
            return {"serial": device.serial, **result.to_dict()}
        except G3nError as exc:
            return {"serial": device.serial, "error": str(exc)}

    with progress:
        with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
            return list(pool.map(one, targets))


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@SERIAL_OPTION
@DEST_OPTION
@ADB_OPTION
def verify(source, serial, dest, adb_path):
    """Re-hash every file of SOURCE on the device against its manifest."""
    src, dest = _source(source, dest)
    with _adb(adb_path) as adb:
        try:
            device = choose_device(adb.devices(), serial)
            problems = verify_on_device(adb, device, src, dest)
        except G3nError as exc:
            _fail(str(exc))
    if problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
        _fail(f"{len(problems)} of {len(src.files)} files under {dest} on {device.serial} do not match; "
              f"run `g3n-push {source}{f' --serial {serial}' if serial else ''}` to send them again")
    click.echo(f"OK {len(src.files)} files under {dest} on {device.serial} match the manifest (sha256 on the device)")


SPEED = re.compile(r"(Prefill|Decode) Speed:\s*([0-9.]+)\s*tokens/sec")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="The prompt to run.")
@click.option("--runner", default=None, metavar="PATH", help="LiteRT-LM's runner binary on the device  [default: litert_lm_main in the dest folder]")
@click.option("--backend", default="cpu", show_default=True, help="LiteRT-LM backend (cpu, gpu).")
@SERIAL_OPTION
@DEST_OPTION
@ADB_OPTION
def run(source, prompt, runner, backend, serial, dest, adb_path):
    """Run PROMPT on the device with LiteRT-LM's runner, on the pushed .litertlm; print its reply and speed."""
    src, dest = _source(source, dest)
    if src.kind != "litertlm":
        _fail(f"LiteRT-LM's runner takes a .litertlm; pack the folder (g3n-convert pack {source}) and push that")
    runner = runner or f"{dest}/litert_lm_main"
    model = f"{dest}/{src.files[0].name}"
    with _adb(adb_path) as adb:
        try:
            device = choose_device(adb.devices(), serial)
            problems = verify_on_device(adb, device, src, dest)
            if problems:
                raise DeviceError(f"{model} on {device.serial} is not the pushed file ({problems[0]}); run `g3n-push {source}` first")
            _, status = adb.shell(device.serial, f"test -x {quote(runner)}")
            if status != 0:
                raise DeviceError(
                    f"no LiteRT-LM runner at {runner} on {device.serial}: push one built for the device's ABI "
                    "(LiteRT-LM's releases ship litert_lm_main.android_arm64, or `bazel build --config=android_arm64 "
                    f"//runtime/engine:litert_lm_main`) with `adb push litert_lm_main {runner}` and "
                    f"`adb shell chmod 755 {runner}`, or pass --runner PATH")
            started = time.perf_counter()
            out, status = adb.shell(device.serial, f"{quote(runner)} --backend={quote(backend)} --model_path={quote(model)} "
                                                   f"--input_prompt={quote(prompt)} --benchmark")
            seconds = time.perf_counter() - started
        except G3nError as exc:
            _fail(str(exc))
    speeds = {kind.lower(): float(value) for kind, value in SPEED.findall(out)}
    click.echo(out.rstrip())
    if status != 0:
        _fail(f"the runner exited with status {status} on {device.serial}")
    line = f"{device.serial}: {seconds:.1f} s wall"
    if speeds:
        line += "".join(f", {kind} {value:.2f} tok/s" for kind, value in speeds.items())
    click.echo(line)


if __name__ == "__main__":
    main()
