"""Seeded fuzzing of g3n's inputs through its real commands, each case in its own process.

Families: bundle folders (bytes of a listed file changed, truncated, grown, removed; and bytes
changed with --no-verify, so that LiteRT's own loader meets them), manifests
(keys dropped, values of other types, absurd numbers, deep nesting, damaged JSON), tokenizers
(damaged bytes, with the manifest updated so verification passes), media (damaged WAV headers and
bodies, damaged images) and checkpoints (config.json values, safetensors bytes).

Every case runs `g3n-run` or `g3n-convert` in a child process with a time limit and is judged:

  clean error  exit status 1 / 2 with one error line and no traceback
  ran          exit status 0
  failure      a traceback, a signal (native crash), a time-out, or "ran" where that is wrong:
               a bundle file whose bytes changed must never run, and a converted folder must
               pass `verify`

    python -m tests.support.fuzz --per-family 200 --seed 1 --report docs/RELIABILITY.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, "-m", "runtime.cli"]
CONVERT = [sys.executable, "-m", "converter.cli"]
TIMEOUT = 120
ODD_VALUES = [None, True, -1, 0, 2**70, 1e308, 3.5, "x", "", "../../etc/passwd", [], {}, [[[]]], {"a": {}}]


@dataclass
class Case:
    family: str
    label: str
    command: list[str]
    may_run: bool  # whether exit 0 is an acceptable outcome
    verify_after: Path | None = None  # a converted folder that must then pass verify


@dataclass
class Outcome:
    case: Case
    verdict: str  # "clean error" / "ran" / "failure"
    detail: str


def judge(case: Case, env: dict) -> Outcome:
    try:
        proc = subprocess.run(case.command, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Outcome(case, "failure", f"no answer in {TIMEOUT} s")
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    if proc.returncode < 0:
        return Outcome(case, "failure", f"killed by signal {-proc.returncode}")
    if "Traceback (most recent call last)" in proc.stderr:
        return Outcome(case, "failure", "traceback: " + proc.stderr.strip().splitlines()[-1][:200])
    if proc.returncode == 0:
        if not case.may_run:
            return Outcome(case, "failure", "ran on a changed file")
        if case.verify_after is not None:
            check = subprocess.run([*CONVERT, "verify", str(case.verify_after)], capture_output=True, text=True, cwd=ROOT, env=env)
            if check.returncode != 0:
                return Outcome(case, "failure", "converted folder fails verify")
        return Outcome(case, "ran", "")
    if proc.returncode in (1, 2) and len(errors) == 1:
        return Outcome(case, "clean error", errors[0][:200])
    return Outcome(case, "failure", f"exit {proc.returncode} with {len(errors)} error lines: {proc.stderr.strip()[-200:]}")


# ---- case makers: each returns a Case built in `work` from a seeded random generator -----------------
def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns(".g3n-lock"))
    return dest


def _run_command(folder: Path, *extra: str) -> list[str]:
    return [*RUN, str(folder), "--prompt", "Hi", "--max-new-tokens", "2", *extra]


def bundle_case(rng: random.Random, bundle: Path, work: Path) -> Case:
    folder = _copy(bundle, work / "bundle")
    manifest = json.loads((folder / "manifest.json").read_text())
    entries = [*manifest["bundles"].values(), *manifest["files"].values()]
    target = folder / rng.choice(entries)["file"]
    data = bytearray(target.read_bytes())
    how = rng.choice(["flip", "flips", "zero range", "truncate", "append", "empty", "remove"])
    if how == "flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "flips":
        for _ in range(rng.randint(2, 64)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == "zero range":
        start = rng.randrange(len(data))
        end = min(len(data), start + rng.randint(1, 4096))
        data[start:end] = bytes(end - start)
    elif how == "truncate":
        data = data[: rng.randrange(len(data))]
    elif how == "append":
        data += rng.randbytes(rng.randint(1, 64))
    if how == "remove":
        target.unlink()
    else:
        target.write_bytes(bytes(data))
    changed = how == "remove" or target.read_bytes() != (bundle / target.name).read_bytes()
    return Case("bundle folders", f"{how} {target.name}", _run_command(folder), may_run=not changed)


def unverified_bundle_case(rng: random.Random, bundle: Path, work: Path) -> Case:
    """Bytes changed inside a bundle file of the same size, run with --no-verify: LiteRT itself
    meets the damage, and must refuse it or run, never crash."""
    folder = _copy(bundle, work / "bundle")
    manifest = json.loads((folder / "manifest.json").read_text())
    target = folder / rng.choice(list(manifest["bundles"].values()))["file"]
    data = bytearray(target.read_bytes())
    head = rng.random() < 0.5  # the flatbuffer's tables, or anywhere (mostly weights)
    for _ in range(rng.randint(1, 16)):
        data[rng.randrange(min(len(data), 4096) if head else len(data))] = rng.randrange(256)
    target.write_bytes(bytes(data))
    return Case("bundle folders, --no-verify", f"{'head' if head else 'body'} bytes of {target.name}",
                _run_command(folder, "--no-verify"), may_run=True)


def _mutate_json(rng: random.Random, value, depth: int = 0):
    """One random change somewhere in a parsed JSON value."""
    if isinstance(value, dict) and value and depth < 8 and rng.random() < 0.8:
        key = rng.choice(list(value))
        choice = rng.random()
        if choice < 0.2:
            del value[key]
        elif choice < 0.45:
            value[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        else:
            value[key] = _mutate_json(rng, value[key], depth + 1)
        return value
    if isinstance(value, list) and value and depth < 8 and rng.random() < 0.8:
        i = rng.randrange(len(value))
        value[i] = _mutate_json(rng, value[i], depth + 1) if rng.random() < 0.6 else copy.deepcopy(rng.choice(ODD_VALUES))
        return value
    return copy.deepcopy(rng.choice(ODD_VALUES))


def manifest_case(rng: random.Random, bundle: Path, work: Path) -> Case:
    folder = _copy(bundle, work / "bundle")
    path = folder / "manifest.json"
    text = path.read_text()
    how = rng.choice(["value", "value", "value", "nesting", "bytes", "truncate"])
    if how == "value":
        text = json.dumps(_mutate_json(rng, json.loads(text)))
    elif how == "nesting":
        data, depth = json.loads(text), rng.choice([100, 5000, 200000])
        data[rng.choice(list(data))] = "@nested@"
        text = json.dumps(data).replace('"@nested@"', "[" * depth + "]" * depth)
    elif how == "bytes":
        chars = list(text)
        for _ in range(rng.randint(1, 8)):
            chars[rng.randrange(len(chars))] = chr(rng.randrange(32, 127))
        text = "".join(chars)
    else:
        text = text[: rng.randrange(len(text))]
    path.write_text(text)
    return Case("manifests", how, _run_command(folder), may_run=True)


def tokenizer_case(rng: random.Random, bundle: Path, work: Path) -> Case:
    from bundle.files import sha256_file

    folder = _copy(bundle, work / "bundle")
    path = folder / "tokenizer.model"
    data = bytearray(path.read_bytes())
    how = rng.choice(["flips", "truncate", "garbage"])
    if how == "flips":
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == "truncate":
        data = data[: rng.randrange(len(data))]
    else:
        data = bytearray(rng.randbytes(rng.randint(0, 4096)))
    path.write_bytes(bytes(data))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["tokenizer"].update(bytes=len(data), sha256=sha256_file(path))  # it verifies: only the contents are bad
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return Case("tokenizers", how, _run_command(folder), may_run=True)


def _wav(rate: int = 16000, channels: int = 1, bits: int = 16, tag: int = 1, frames: int = 4000) -> bytes:
    width = bits // 8
    data = bytes(frames * channels * width)
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, tag, channels, rate,
                       rate * channels * width, channels * width, bits, b"data", len(data)) + data


def media_case(rng: random.Random, bundle: Path, work: Path) -> Case:
    work.mkdir(parents=True, exist_ok=True)
    if rng.random() < 0.6:
        how = rng.choice(["rate", "channels", "bits", "tag", "truncate", "flips", "huge data size"])
        wav = bytearray(_wav())
        if how == "rate":
            wav[24:28] = rng.choice([0, 1, 999, 384001, 2**32 - 1, 8000, 44100]).to_bytes(4, "little")
        elif how == "channels":
            wav[22:24] = rng.choice([0, 2, 7, 65535]).to_bytes(2, "little")
        elif how == "bits":
            wav[34:36] = rng.choice([0, 4, 12, 24, 32, 64, 65535]).to_bytes(2, "little")
        elif how == "tag":
            wav[20:22] = rng.choice([0, 2, 3, 6, 0xFFFE, 0xFFFF]).to_bytes(2, "little")
        elif how == "truncate":
            wav = wav[: rng.randrange(len(wav))]
        elif how == "huge data size":
            wav[40:44] = (2**32 - 1).to_bytes(4, "little")
        else:
            for _ in range(rng.randint(1, 32)):
                wav[rng.randrange(len(wav))] = rng.randrange(256)
        path = work / "clip.wav"
        path.write_bytes(bytes(wav))
        return Case("media", f"wav {how}", _run_command(bundle, "--audio", str(path)), may_run=True)
    from PIL import Image

    path = work / "picture.png"
    Image.new("RGB", (rng.randint(1, 64), rng.randint(1, 64)), (rng.randrange(256), 0, 0)).save(path)
    data = bytearray(path.read_bytes())
    for _ in range(rng.randint(0, 16)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    path.write_bytes(bytes(data[: rng.randint(len(data) // 2, len(data))]))
    return Case("media", "image bytes", _run_command(bundle, "--image", str(path)), may_run=True)


def checkpoint_case(rng: random.Random, checkpoint: Path, work: Path) -> Case:
    folder = work / "checkpoint"
    shutil.copytree(checkpoint, folder)
    if rng.random() < 0.7:
        config = json.loads((folder / "config.json").read_text())
        section = config["text_config"] if rng.random() < 0.8 else config
        key = rng.choice(sorted(section))
        section[key] = copy.deepcopy(rng.choice(ODD_VALUES + [0, -7, 1, 3, 99]))
        (folder / "config.json").write_text(json.dumps(config))
        how = f"config {key}"
    else:
        path = folder / "model.safetensors"
        data = bytearray(path.read_bytes())
        header = int.from_bytes(data[:8], "little")
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(min(len(data), header + 8))] = rng.randrange(256)  # the header: names, shapes, offsets
        path.write_bytes(bytes(data))
        how = "safetensors header"
    out = work / "out"
    command = [*CONVERT, "--checkpoint", str(folder), "--out", str(out), "--bundles", "embedder",
               "--prefill-lengths", "4", "--cache-length", "16", "-q"]
    return Case("checkpoints", how, command, may_run=True, verify_after=out)


FAMILIES = {
    "bundle folders": (bundle_case, "bundle"),
    "bundle folders, --no-verify": (unverified_bundle_case, "bundle"),
    "manifests": (manifest_case, "bundle"),
    "tokenizers": (tokenizer_case, "bundle"),
    "media": (media_case, "bundle"),
    "checkpoints": (checkpoint_case, "checkpoint"),
}


def run(bundle: Path, checkpoint: Path, per_family: int, seed: int, workers: int = 2) -> list[Outcome]:
    """`per_family` cases of every family, seeded: the same seed gives the same cases."""
    env = dict(os.environ, G3N_CACHE_DIR=tempfile.mkdtemp(prefix="g3n-fuzz-cache-"))
    scratch = Path(tempfile.mkdtemp(prefix="g3n-fuzz-"))
    cases = []
    for f, (family, (make, source)) in enumerate(FAMILIES.items()):
        for i in range(per_family):
            rng = random.Random(f"{seed}:{family}:{i}")
            cases.append(make(rng, bundle if source == "bundle" else checkpoint, scratch / f"{f}-{i}"))
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda c: judge(c, env), cases))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(env["G3N_CACHE_DIR"], ignore_errors=True)


def table(outcomes: list[Outcome]) -> list[str]:
    counts = Counter((o.case.family, o.verdict) for o in outcomes)
    lines = ["| family | cases | clean error | ran | failures |", "|---|---:|---:|---:|---:|"]
    for family in FAMILIES:
        total = sum(v for (f, _), v in counts.items() if f == family)
        lines.append(f"| {family} | {total} | {counts[family, 'clean error']} | {counts[family, 'ran']} | {counts[family, 'failure']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-family", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--report", type=Path, default=None, help="write the table of counts here (Markdown)")
    args = parser.parse_args()
    from converter.pipeline import ConvertOptions, convert
    from tests.support.tiny_checkpoint import build_tiny_checkpoint

    base = Path(tempfile.mkdtemp(prefix="g3n-fuzz-base-"))
    checkpoint = build_tiny_checkpoint(base / "checkpoint")
    bundle = base / "bundle"
    convert(ConvertOptions(out=bundle, checkpoint=checkpoint, prefill_lengths=(4, 8), cache_length=64))
    started = time.perf_counter()
    outcomes = run(bundle, checkpoint, args.per_family, args.seed)
    seconds = time.perf_counter() - started
    failures = [o for o in outcomes if o.verdict == "failure"]
    lines = ["# Reliability: fuzzing g3n's inputs", "",
             f"`make fuzz` ({args.per_family} cases per family, seed {args.seed}, {len(outcomes)} cases in {seconds:.0f} s, "
             f"{time.strftime('%Y-%m-%d')}). Each case runs `g3n-run` or `g3n-convert` in its own process; a failure is a "
             "traceback, a native crash, a time-out, a changed bundle file that ran, or a converted folder that fails "
             "verify (tests/support/fuzz.py).", "", *table(outcomes), ""]
    if failures:
        lines += ["## Failures", ""] + [f"- {o.case.family}: {o.case.label}: {o.detail}" for o in failures] + [""]
    text = "\n".join(lines)
    print(text)
    if args.report:
        args.report.write_text(text)
    shutil.rmtree(base, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
