"""make bench: conversion time, peak RSS and sizes, and g3n-run speed -> docs/BENCHMARKS.md (+ PNG plots).

Each bundle is converted in its own `g3n-convert --bundles NAME` process, so the peak RSS
(from wait4's rusage) belongs to that bundle alone; the main command then runs whole, as a user
runs it, for E2B and E4B.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bundle import names  # noqa: E402
from bundle.manifest import Manifest, read_manifest  # noqa: E402

CONVERT = [sys.executable, "-m", "converter.cli"]

# (label, g3n-convert arguments, bundles): one process per bundle, so each peak belongs to one
# bundle; the runtime cases run on the folder assembled from these.
ALL = list(names.TEXT_BUNDLES + names.ENCODER_BUNDLES)  # an encoder's companions come with it
CASES = [
    ("tiny (checkpoint)", ["--prefill-lengths", "8,32", "--cache-length", "256"], ALL),
    ("e2b int4 (random weights)", ["--variant", "e2b", "--random-weights", "--quant", "int4", "--no-quality-report",
                                   "--prefill-lengths", "128,512", "--cache-length", "1280", "--tokenizer", "<e2b tokenizer>"],
     ALL),
]
# The main command as a user runs it: every bundle in one process, quality report included.
WHOLE_CASES = [
    ("e2b int4", ["--variant", "e2b", "--random-weights", "--quant", "int4"]),
    ("e4b int4", ["--variant", "e4b", "--random-weights", "--quant", "int4"]),
]
MEMORY_TARGET = 16 * 2**30  # conversion peak RSS target on this 24 GiB machine
# Generation measurements: (case label, prompt lengths, engines), 32 new tokens each time.
# `compiled` is g3n-run; `litert-lm` is the same folder packed as .litertlm and run by LiteRT-LM's
# Python engine; `interpreter` is g3n's whole-cache-through-Python loop. Engines with an XNNPACK
# weight cache get one extra first run that builds it (the "cold" row).
# `compiled+image` / `compiled+audio`: g3n-run with an image / a 10 s clip in the prompt as well,
# so the encoder is loaded and run (its soft tokens add 256 / 188 prompt tokens).
RUN_CASES = [
    ("tiny (checkpoint)", [64, 200], ["compiled", "interpreter"]),
    ("tiny (checkpoint)", [64], ["compiled+image", "compiled+audio"]),
    ("e2b int4 (random weights)", [128, 512, 1024], ["compiled", "litert-lm"]),
    ("e2b int4 (random weights)", [128], ["interpreter", "compiled+image", "compiled+audio"]),
]
CACHED_ENGINES = ("compiled", "litert-lm")
PAIRED_REPEATS = 3  # interleaved runs per point when g3n-run and LiteRT-LM are compared
LITERTLM_PYTHON = Path(sys.executable)  # litert-lm-api is installed with g3n (make setup)
NEW_TOKENS = 32
INT4_IDEAL_BITS = 4 + 16 / 32  # 4-bit weights plus one fp16 scale per block of 32


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return f"{os.cpu_count()} cores ({cpu}), {mem_kb / 2**20:.0f} GiB RAM, Python {platform.python_version()}"


def measured_run(cmd: list[str], env: dict | None = None, reason: str | None = None) -> tuple[str, dict]:
    """Run `cmd` as its own process; returns its stdout and {seconds, peak_rss} (from wait4),
    plus "error" (its last stderr line, after the first line holding `reason` if one does) when it
    failed. Output goes through temporary files so that wait4, not communicate(), reaps the
    process and reports its rusage."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        result = {"seconds": time.perf_counter() - start, "peak_rss": usage.ru_maxrss * 1024}
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read().strip()
    if os.waitstatus_to_exitcode(status) != 0:
        result["error"] = stderr.splitlines()[-1] if stderr else f"exit status {status}"
        logged = [line for line in stderr.splitlines() if reason and reason in line]
        if logged:
            result["error"] += f"; logged: {logged[0][logged[0].index(reason):]}"
    return stdout, result


def run_case(args: list[str], bundle: str, out: Path) -> dict:
    """Convert one bundle; an encoder's row counts its companions too (the audio adapter, the
    end-of-media constant), which the same process converts."""
    _, result = measured_run([*CONVERT, *args, "--bundles", bundle, "--out", str(out), "-q"])
    if "error" in result:
        return result
    manifest = read_manifest(out)
    encoder = next((e for e in manifest.encoders.values() if e.bundle == bundle), None)
    entries = [manifest.bundles[b] for b in (encoder.parts() if encoder else [bundle])]
    return {**result, "bytes": sum(e.bytes for e in entries), "parameters": sum(e.parameters for e in entries),
            "scheme": entries[0].quantization["scheme"]}


def assemble(parts: list[Path], dest: Path) -> Path:
    """One bundle folder from per-bundle conversions of the same model (same config and
    signatures): hard links to the .tflite files and a manifest with every bundle."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest: Manifest | None = None
    for part in parts:
        m = read_manifest(part)
        for entry in m.listed_files():
            if not (dest / entry.file).exists():
                os.link(part / entry.file, dest / entry.file)
        if manifest is None:
            manifest = m
        else:
            manifest.bundles.update(m.bundles)
            manifest.encoders.update(m.encoders)
    (dest / names.MANIFEST).write_bytes(manifest.to_json())
    return dest


def run_whole(args: list[str], out: Path) -> dict:
    _, result = measured_run([*CONVERT, *args, "--out", str(out), "-q"])
    if "error" in result:
        return result
    manifest = read_manifest(out)
    bundles = manifest.bundles.values()
    return {**result, "bytes": sum(b.bytes for b in bundles), "parameters": sum(b.parameters for b in bundles),
            "quality": manifest.quality or {}}


def whole_table(results: list) -> list[str]:
    lines = [
        "## The main command: every bundle in one process",
        "",
        "`g3n-convert --variant VARIANT --random-weights --quant int4 --out DIR`: every bundle (embedder, PLE, text core, vision and audio "
        "encoders), then the quality report against the float bundles, as a user runs it. Peak RSS is the whole process's "
        f"maximum resident set (wait4); the target is {MEMORY_TARGET / 2**30:.0f} GiB.",
        "",
        "| variant | parameters | folder size | wall time | peak RSS | within target | quality report |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for label, r in results:
        if "error" in r:
            lines.append(f"| {label} | | failed: {r['error']} | {r['seconds']:.0f} s | {r['peak_rss'] / 2**30:.2f} GiB | no | |")
            continue
        quality = r["quality"]
        path = quality.get("text_path")
        if path:
            report = f"top-1 {path['top1_agreement']:.1%}, KL {path['mean_kl']:.3f}"
        else:
            report = "not scored: " + "; ".join(f"{k}" for k in quality.get("not_scored", {})) if quality else "off"
        lines.append(
            f"| {label} | {r['parameters']:,} | {r['bytes'] / 1e9:.3f} GB | {r['seconds']:.0f} s | "
            f"{r['peak_rss'] / 2**30:.2f} GiB | {'yes' if r['peak_rss'] <= MEMORY_TARGET else 'no'} | {report} |"
        )
    for label, r in results:
        for name, reason in r.get("quality", {}).get("not_scored", {}).items():
            lines.append(f"\n{label}, {name} not scored: {reason}.")
    return lines + [""]


def plot_conversion(rows: list, whole: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{label.split(' (')[0]}\n{bundle}", r["peak_rss"] / 2**30) for label, bundle, _, r in rows
            if not label.startswith("tiny")]
    bars += [(f"{label}\nall bundles", r["peak_rss"] / 2**30) for label, r in whole]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color="#4c72b0")
    ax.axhline(MEMORY_TARGET / 2**30, color="#c44e52", linestyle="--", label="16 GiB target")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("g3n-convert peak memory, random weights at real shape")
    for i, (_, value) in enumerate(bars):
        ax.text(i, value + 0.2, f"{value:.1f}", ha="center", fontsize=8)
    ax.legend(loc="upper left")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_runtime(runs: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list] = {}
    for label, engine, n, r in runs:
        if "error" not in r and not label.startswith("tiny") and r.get("weight_cache") != "built":
            name = {"compiled": "g3n-run", "litert-lm": "LiteRT-LM"}.get(engine, f"g3n {engine}")
            series.setdefault(f"{label.split(' (')[0]} {name}", []).append((n, r))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for name, points in series.items():
        points.sort()
        for ax, key in zip(axes, ("prefill_tokens_per_second", "decode_tokens_per_second")):
            ax.plot([n for n, _ in points], [r[key] for _, r in points], marker="o", label=name)
    for ax, title in zip(axes, ("prefill tok/s", "decode tok/s")):
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def full_vocab_tokenizer(path: Path, vocab_size: int) -> Path:
    """The tiny test tokenizer padded with unused pieces to the model's vocabulary, so that
    LiteRT-LM can detokenize any id a random-weight model samples."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from tests.support.tiny_checkpoint import train_tokenizer

    train_tokenizer(path)
    model = pb.ModelProto()
    model.ParseFromString(path.read_bytes())
    for i in range(len(model.pieces), vocab_size):
        model.pieces.add(piece=f"<unused{i}>", score=0.0, type=pb.ModelProto.SentencePiece.UNUSED)
    path.write_bytes(model.SerializeToString())
    return path


def run_generation(folder: Path, prompt_tokens: int, engine: str, scratch: Path) -> dict:
    if engine == "litert-lm":
        packed = scratch / f"{folder.name}.litertlm"
        if not packed.exists():  # packed in main for the real-size folders
            subprocess.run([str(LITERTLM_PYTHON), str(ROOT / "bench" / "litertlm.py"), "pack", str(folder), str(packed)],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        cache_dir = scratch / "litertlm-cache"
        cache_dir.mkdir(exist_ok=True)
        stdout, result = measured_run([str(LITERTLM_PYTHON), str(ROOT / "bench" / "litertlm.py"), "run", str(packed),
                                       "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(NEW_TOKENS),
                                       "--threads", "2", "--cache-dir", str(cache_dir), "--json"])
        if "error" in result:
            return result
        lm = json.loads(stdout.strip().splitlines()[-1])
        return {"load_seconds": lm["load_s"], "time_to_first_token_seconds": lm["ttft_s"],
                "prefill_tokens_per_second": lm["prefill_tok_s"], "decode_tokens_per_second": lm["decode_tok_s"],
                "weight_cache": "loaded" if lm["weight_cache_warm"] else "built", "peak_rss": result["peak_rss"]}
    backend, _, medium = engine.partition("+")
    stdout, result = measured_run([sys.executable, str(ROOT / "bench" / "runtime_case.py"), str(folder),
                                   "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(NEW_TOKENS), "--backend", backend,
                                   *(["--media", medium] if medium else [])])
    if "error" in result:
        return result
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss": result["peak_rss"]}


def summarize(runs: list) -> list:
    """One row per (case, engine, prompt length): a cold (cache-building) run as it was, repeated
    warm runs as the median of each figure, with "repeats" saying how many."""
    groups: dict[tuple, list] = {}
    out = []
    for label, engine, n, r in runs:
        if "error" in r or r.get("weight_cache") == "built":
            out.append((label, engine, n, r))
        else:
            groups.setdefault((label, engine, n), []).append(r)
    for (label, engine, n), results in groups.items():
        merged = dict(results[0])
        for key, value in results[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = statistics.median(r[key] for r in results)
        merged["repeats"] = len(results)
        out.append((label, engine, n, merged))
    return out


def medians(rows: list[dict], by: tuple[str, ...], figures: tuple[str, ...]) -> dict[tuple, dict]:
    """Rows that did not fail, grouped by their `by` fields in the order first seen: each group's
    median of every figure, and "runs", how many rows it has."""
    groups: dict[tuple, list] = {}
    for r in rows:
        if not r.get("error"):
            groups.setdefault(tuple(r[k] for k in by), []).append(r)
    return {key: {f: statistics.median(r[f] for r in rs) for f in figures} | {"runs": len(rs)} for key, rs in groups.items()}


def text_weights_and_cache(folder: Path) -> int:
    """Bytes of the text bundles plus the KV cache: what a text-only session must hold."""
    manifest = read_manifest(folder)
    inputs = manifest.bundles[names.TEXT_CORE].signatures[names.DECODE].inputs
    kv = sum(4 * math.prod(spec.shape) for name, spec in inputs.items() if name.startswith(names.KV_CACHE_PREFIX))
    return kv + sum(manifest.bundles[b].bytes for b in names.TEXT_BUNDLES)


def runtime_table(results: list, budgets: dict[str, int]) -> list[str]:
    lines = [
        "## g3n-run and LiteRT-LM: load, time to first token, prefill and decode speed, peak RSS",
        "",
        f"Each row is one process: load the folder, prefill a prompt of random token ids, decode {NEW_TOKENS} tokens "
        "greedily, 2 threads. `compiled` is g3n-run (bench/runtime_case.py: CompiledModel, KV cache updated in "
        "place); `litert-lm` is the same folder packed as .litertlm (g3n-convert pack) and run by LiteRT-LM's "
        "Python engine (litert-lm-api 0.18.1, its own Benchmark timings); `interpreter` passes the whole cache "
        "through Python each call (for comparison). Both g3n-run and LiteRT-LM keep XNNPACK's packed weights in a "
        "cache file: the first load builds it (`built`), later loads map it (`loaded`). `compiled+image` / "
        "`compiled+audio` add a random 768x768 image / a 10 s clip to the prompt, so the vision / audio encoder "
        "loads and runs (its encode time is inside time to first token; prompt tokens count the soft tokens); "
        "every other row loads no encoder. Prefill tok/s is the prompt's tokens over the time to prefill all but "
        "the last (which the first decode call takes), as LiteRT-LM counts it; time to first token is wall time for "
        "g3n-run and, for LiteRT-LM, its own figure (prefill plus one mean decode step). Rows with warm caches "
        "are the median of their runs (`runs`); g3n-run "
        f"and LiteRT-LM run interleaved, {PAIRED_REPEATS} times per prompt length. RSS / budget: peak RSS over (text "
        "bundle bytes + KV cache, plus the loaded encoder's bytes).",
        "",
        "| bundle | engine | prompt tokens | weight cache | runs | load | time to first token | prefill tok/s | decode tok/s | ms/token | peak RSS | RSS / budget |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, engine, n, r in results:
        if "error" in r:
            lines.append(f"| {label} | {engine} | {n} | | | failed: {r['error']} | | | | | | |")
            continue
        rate = r["decode_tokens_per_second"]
        budget = budgets.get(label)
        if budget and "+" in engine:
            budget += r.get("encoder_bytes", 0)
        ratio = f"{r['peak_rss'] / budget:.2f}" if budget and not label.startswith("tiny") else ""
        lines.append(
            f"| {label} | {engine} | {r.get('prompt_tokens', n):.0f} | {r.get('weight_cache', 'off')} | {r.get('repeats', 1)} | {r['load_seconds']:.2f} s | "
            f"{r['time_to_first_token_seconds']:.3f} s | {r['prefill_tokens_per_second']:.1f} | {rate:.2f} | "
            f"{1000 / rate:.1f} | {r['peak_rss'] / 2**20:,.0f} MiB | {ratio} |"
        )
    warm = {(label, engine, n): r for label, engine, n, r in results if "error" not in r and r.get("weight_cache") != "built"}
    keys = dict.fromkeys((label, n) for label, engine, n, _ in results if engine == "compiled")  # ordered, unique
    pairs = [(label, n, warm[(label, "compiled", n)], warm[(label, "litert-lm", n)])
             for label, n in keys if (label, "compiled", n) in warm and (label, "litert-lm", n) in warm]
    if pairs:
        lines += [
            "",
            "g3n-run against LiteRT-LM on the same model, machine and run (warm weight caches). Speed ratios are "
            "g3n-run / LiteRT-LM (above 1.00 g3n-run is faster; time to first token inverted so the same holds); "
            "the RSS ratio is g3n-run / LiteRT-LM (below 1.00 g3n-run uses less). Both sides are counted LiteRT-LM's "
            "way: prefill speed is the prompt's tokens over the time to prefill all but the last one (embedding "
            "lookups included), and time to first token is that time plus one mean decode step. Load + first token "
            "is what a user waits from starting the engine to the first token (g3n-run's wall time; LiteRT-LM's "
            "initialisation plus its time to first token):",
            "",
            "| bundle | prompt tokens | prefill ratio | decode ratio | time to first token ratio | load + first token ratio | peak RSS ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label, n, g, lm in pairs:
            lines.append(
                f"| {label} | {n} | {g['prefill_tokens_per_second'] / lm['prefill_tokens_per_second']:.2f} | "
                f"{g['decode_tokens_per_second'] / lm['decode_tokens_per_second']:.2f} | "
                f"{lm['time_to_first_token_seconds'] / (g['prefill_seconds'] + 1 / g['decode_tokens_per_second']):.2f} | "
                f"{(lm['load_seconds'] + lm['time_to_first_token_seconds']) / (g['load_seconds'] + g['time_to_first_token_seconds']):.2f} | "
                f"{g['peak_rss'] / lm['peak_rss']:.2f} |"
            )
    return lines + [""]


GOOGLE_E2B_INT4_LITERTLM = 3_655_827_456  # bytes of Google's gemma-3n-E2B-it-int4.litertlm


def litertlm_table(packed: dict[str, Path]) -> list[str]:
    """The .litertlm of each real-size folder, section by section, next to Google's E2B int4 file."""
    from bundle.litertlm import verify_litertlm

    lines = [
        "## The .litertlm against Google's",
        "",
        "`g3n-convert pack` of the e2b int4 folder above (every bundle, random weights): text core, embedder, "
        "per-layer embedder, vision encoder and end_of_vision, audio encoder, adapter and end_of_audio, tokenizer, "
        f"metadata and g3n's manifest section. Google's gemma-3n-E2B-it-int4.litertlm is {GOOGLE_E2B_INT4_LITERTLM:,} bytes.",
        "",
        "| file | section | LiteRT-LM model type | bytes |",
        "|---|---|---|---:|",
    ]
    for label, path in packed.items():
        record, _ = verify_litertlm(path)
        for section in record.sections:
            lines.append(f"| {label} | {section['holds']} | {section['model_type'] or ''} | {section['bytes']:,} |")
        size = path.stat().st_size
        lines.append(f"| {label} | **whole file** | | **{size:,}** ({size / GOOGLE_E2B_INT4_LITERTLM:.3f} of Google's) |")
    return lines + [""]


def size_table(rows: list) -> list[str]:
    """Quantized bundle sizes against the ideal: int4 = 4 bits + an fp16 scale per 32; int8 = 8 bits."""
    lines = [
        "## Bundle sizes against the ideal",
        "",
        f"Ideal = parameters x {INT4_IDEAL_BITS} bits for int4 (4-bit weights, one fp16 scale per 32), x 8 bits for "
        "int8 (the encoders under `--quant int4`). The text core also keeps its norms in float32 and AltUp's 4-input "
        "layers at int8; the vision encoder keeps its depthwise filters and norms in float32.",
        "",
        "| variant | bundle | scheme | parameters | size | ideal | size / ideal | bits per weight |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    totals: dict[tuple[str, str], list[int]] = {}
    for label, bundle, _, r in rows:
        if r.get("scheme") not in ("int4", "int8"):
            continue
        ideal = r["parameters"] * (INT4_IDEAL_BITS if r["scheme"] == "int4" else 8) / 8
        for part in ("text bundles", "all bundles") if "encoder" not in bundle else ("all bundles",):
            total = totals.setdefault((label, part), [0, 0, 0])
            total[0] += r["parameters"]
            total[1] += r["bytes"]
            total[2] += ideal
        lines.append(f"| {label} | {bundle} | {r['scheme']} | {r['parameters']:,} | {r['bytes'] / 1e9:.3f} GB | {ideal / 1e9:.3f} GB | "
                     f"{r['bytes'] / ideal:.3f} | {8 * r['bytes'] / r['parameters']:.2f} |")
    for (label, part), (params, size, ideal) in totals.items():
        lines.append(f"| {label} | **folder, {part}** | | {params:,} | **{size / 1e9:.3f} GB** | {ideal / 1e9:.3f} GB | "
                     f"{size / ideal:.3f} | {8 * size / params:.2f} |")
    return lines + ["", "Target: the whole E2B int4 folder at most 3.2 GB (Google's E2B int4 .litertlm is 3.66 GB).", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--tiny-only", action="store_true", help="skip the real-size cases")
    parser.add_argument("--full-vocab-tokenizer", type=Path, help=argparse.SUPPRESS)  # internal: write it and exit
    parser.add_argument("--variant", default="e2b", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.full_vocab_tokenizer:
        from converter.config import variant_config

        full_vocab_tokenizer(args.full_vocab_tokenizer, variant_config(args.variant).vocab_size)
        return

    rows, runs, folders = [], [], {}
    with tempfile.TemporaryDirectory(prefix="g3n-bench-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "tests.support.tiny_checkpoint", str(tmp / "tiny")], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for label, case_args, bundles in CASES:
            if args.tiny_only and not label.startswith("tiny"):
                continue
            if label.startswith("tiny"):
                case_args = ["--checkpoint", str(tmp / "tiny"), *case_args]
            if "<e2b tokenizer>" in case_args:
                # In a child process: torch stays out of this one, whose RSS every child it
                # starts would otherwise report as its own peak (ru_maxrss counts the pre-exec image).
                tokenizer = tmp / "e2b-tokenizer.model"
                subprocess.run([sys.executable, __file__, "--full-vocab-tokenizer", str(tokenizer), "--variant", "e2b"],
                               cwd=ROOT, check=True)
                case_args = [str(tokenizer) if a == "<e2b tokenizer>" else a for a in case_args]
            parts = []
            for bundle in bundles:
                print(f"converting {label} {bundle} ...", flush=True)
                parts.append(tmp / f"{label.replace(' ', '_')}-{bundle}")
                result = run_case(case_args, bundle, parts[-1])
                rows.append((label, bundle, " ".join(case_args).replace(str(tmp), "<tmp>"), result))
                print(f"  {result}", flush=True)
            if all("error" not in r for lab, _, _, r in rows if lab == label):
                folders[label] = assemble(parts, tmp / f"{label.replace(' ', '_')}-all")
        whole = []
        for label, case_args in WHOLE_CASES if not args.tiny_only else []:
            print(f"converting {label}, all bundles in one process ...", flush=True)
            result = run_whole(case_args, tmp / f"{label.replace(' ', '_')}-whole")
            whole.append((label, result))
            print(f"  {result}", flush=True)
            shutil.rmtree(tmp / f"{label.replace(' ', '_')}-whole", ignore_errors=True)
        packed = {}
        for label, folder in folders.items():
            if not label.startswith("tiny"):
                print(f"packing {label} ...", flush=True)
                packed[label] = tmp / f"{folder.name}.litertlm"  # run_generation's LiteRT-LM runs use this file too
                subprocess.run([str(LITERTLM_PYTHON), str(ROOT / "bench" / "litertlm.py"), "pack", str(folder), str(packed[label])],
                               cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        litertlm_sizes = litertlm_table(packed) if packed else []
        os.environ["G3N_CACHE_DIR"] = str(tmp / "g3n-cache")  # g3n-run's weight caches, gone with the run
        budgets = {label: text_weights_and_cache(folder) for label, folder in folders.items()}
        for label, lengths, engines in RUN_CASES:
            if label not in folders:
                continue
            jobs = [(e, lengths[0]) for e in engines if e in CACHED_ENGINES]  # cold: builds the weight cache
            # Engines compared side by side run interleaved, several times: the median is what counts.
            repeats = PAIRED_REPEATS if "litert-lm" in engines else 1
            jobs += [(e, n) for _ in range(repeats) for n in lengths for e in engines]
            for engine, n in jobs:
                print(f"running {label} {engine} prompt {n} ...", flush=True)
                result = run_generation(folders[label], n, engine, tmp)
                runs.append((label, engine, n, result))
                print(f"  {result}", flush=True)
        runs = summarize(runs)

    lines = [
        "# Benchmarks",
        "",
        "MatFormer configurations of E4B (sizes, speed, memory next to MMLU) are in [MATFORMER.md](MATFORMER.md). "
        "Speed against the context in use at several cache lengths (g3n-run and LiteRT-LM), and a text session's "
        "memory against the 2 GB / 3 GB targets, are in [CONTEXT.md](CONTEXT.md); LiteRT-LM at each of its CPU settings in "
        "[LITERTLM_SETTINGS.md](LITERTLM_SETTINGS.md); llama.cpp in [LLAMACPP.md](LLAMACPP.md); litert-torch's export_hf in "
        "[EXPORT_HF.md](EXPORT_HF.md); E4B with images and audio in [E4B.md](E4B.md).",
        "",
        "Produced by `make bench` (bench/run.py). Numbers are from the machine and date below; re-run to refresh.",
        "",
        "## Conversion: wall time, peak RSS and size per bundle",
        "",
        f"Machine: {machine()}. Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d')}.",
        "Each row is one `g3n-convert ... --bundles NAME` process; peak RSS is that process's maximum resident set.",
        "",
        "| variant | bundle | scheme | parameters | .tflite size | wall time | peak RSS | bytes of RSS per parameter |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, bundle, _, r in rows:
        if "error" in r:
            lines.append(f"| {label} | {bundle} | | | failed: {r['error']} | {r['seconds']:.1f} s | {r['peak_rss'] / 2**30:.2f} GiB | |")
            continue
        lines.append(
            f"| {label} | {bundle} | {r['scheme']} | {r['parameters']:,} | {r['bytes'] / 1e6:,.1f} MB | {r['seconds']:.1f} s | "
            f"{r['peak_rss'] / 2**30:.2f} GiB | {r['peak_rss'] / r['parameters']:.1f} |"
        )
    lines += ["", "Commands (plus `--bundles NAME --out DIR -q`):", ""]
    for label, case_args, _ in CASES:
        source = "--checkpoint <tiny checkpoint> " if label.startswith("tiny") else ""
        lines.append(f"- {label}: `g3n-convert {source}{' '.join(case_args)}`")
    lines += ["", *(whole_table(whole) if whole else []), *size_table(rows), *litertlm_sizes, *runtime_table(runs, budgets)]
    plots = args.out.parent / "bench"
    plots.mkdir(parents=True, exist_ok=True)
    if whole:
        plot_conversion(rows, whole, plots / "conversion_memory.png")
        at = lines.index("## The main command: every bundle in one process") + 1
        lines[at:at] = ["", "![conversion peak RSS](bench/conversion_memory.png)"]
    if any(not label.startswith("tiny") for label, *_ in runs):
        plot_runtime(runs, plots / "runtime_speed.png")
        lines += ["![g3n-run prefill and decode speed](bench/runtime_speed.png)", ""]
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
