"""make bench, LiteRT-LM settings part -> docs/LITERTLM_SETTINGS.md: LiteRT-LM at each of its CPU
settings against g3n-run, on the same weights, interleaved in one run.

The folder: E2B int4 text bundles, random weights, cache 4,096 (bench/context.py's convert, shared
with that benchmark's work folder), packed as .litertlm. LiteRT-LM's Python engine runs it with
its defaults, with `use_ringbuffers_local_attention` on, with `enable_ynnpack` on, and with both;
g3n-run runs the folder. 2 threads (the machine's cores), a 1,024-token prompt, 32 new tokens.
The first run of each setting builds its weight cache and is not counted.

    python bench/litertlm_settings.py [--work DIR] [--out docs/LITERTLM_SETTINGS.md] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.context import convert, cpu_features  # noqa: E402
from bench.run import CONVERT, LITERTLM_PYTHON, NEW_TOKENS, machine, measured_run, medians, run_generation  # noqa: E402

CACHE, PROMPT, THREADS = 4096, 1024, 2
SETTINGS = {  # name -> bench/litertlm.py run flags
    "defaults": [],
    "ring buffers": ["--ringbuffers", "on"],
    "YNNPACK": ["--ynnpack", "on"],
    "ring buffers + YNNPACK": ["--ringbuffers", "on", "--ynnpack", "on"],
}


def litertlm_run(packed: Path, flags: list[str], cache_dir: Path) -> dict:
    stdout, result = measured_run([str(LITERTLM_PYTHON), str(ROOT / "bench" / "litertlm.py"), "run", str(packed),
                                   "--prompt-tokens", str(PROMPT), "--new-tokens", str(NEW_TOKENS), "--threads", str(THREADS),
                                   "--cache-dir", str(cache_dir), "--json", *flags],
                                  reason="Failed to create engine: ")
    if "error" in result:
        return {"error": result["error"]}
    lm = json.loads(stdout.strip().splitlines()[-1])
    return {"load": lm["load_s"], "prefill": lm["prefill_tok_s"], "decode": lm["decode_tok_s"], "peak_rss": result["peak_rss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "g3n-context")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "LITERTLM_SETTINGS.md")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--render-only", action="store_true", help="rewrite --out from --work's litertlm_settings.json")
    args = parser.parse_args()
    if args.render_only:
        render(json.loads((args.work / "litertlm_settings.json").read_text()), args.out)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    folder, _ = convert("e2b", CACHE, True, args.work)
    scratch = args.work / "scratch"
    scratch.mkdir(exist_ok=True)
    packed = scratch / f"{folder.name}.litertlm"
    if not packed.is_file():
        subprocess.run([*CONVERT, "pack", str(folder), "--out", str(packed)],
                       cwd=ROOT, check=True)
    os.environ["G3N_CACHE_DIR"] = str(args.work / "g3n-cache")
    caches = {name: scratch / f"litertlm-cache-{i}" for i, name in enumerate(SETTINGS)}  # one per setting: none shares packing
    for path in caches.values():
        path.mkdir(exist_ok=True)

    rows = []
    run_generation(folder, 128, "compiled", scratch)  # weight caches: built, not counted
    for name, flags in SETTINGS.items():
        first = litertlm_run(packed, flags, caches[name])
        if "error" in first:
            rows.append({"engine": f"LiteRT-LM, {name}", "error": first["error"]})
    refused = {r["engine"] for r in rows}
    for _ in range(args.repeats):
        r = run_generation(folder, PROMPT, "compiled", scratch)
        rows.append({"engine": "g3n-run", **({"error": r["error"]} if "error" in r else
                     {"load": r["load_seconds"], "prefill": r["prefill_tokens_per_second"],
                      "decode": r["decode_tokens_per_second"], "peak_rss": r["peak_rss"]})})
        print(json.dumps(rows[-1]), flush=True)
        for name, flags in SETTINGS.items():
            if f"LiteRT-LM, {name}" in refused:
                continue
            rows.append({"engine": f"LiteRT-LM, {name}", **litertlm_run(packed, flags, caches[name])})
            print(json.dumps(rows[-1]), flush=True)
    data = {"rows": rows, "machine": f"{machine()}; CPU flags {cpu_features()}",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    (args.work / "litertlm_settings.json").write_text(json.dumps(data, indent=1))
    render(data, args.out)


def render(data: dict, out: Path) -> None:
    lines = [
        "# LiteRT-LM at its CPU settings, against g3n-run",
        "",
        f"Produced by `python bench/litertlm_settings.py` (part of `make bench`) on {data['machine']}, {data['date']}.",
        "",
        f"E2B int4 text bundles, random weights, cache {CACHE:,} (with g3n's context buckets and sliding ring), packed with "
        f"`g3n-convert pack`; LiteRT-LM's Python engine (litert-lm-api, `Benchmark`) runs the .litertlm with each setting, "
        f"g3n-run the folder. {THREADS} threads (the machine's cores), a {PROMPT:,}-token prompt of random text, {NEW_TOKENS} new "
        "tokens, warm weight caches; runs interleaved, medians shown. Ratios: g3n-run over the row (speed above 1.00 and "
        "RSS above 1.00 mean g3n-run is faster / bigger).",
        "",
        "| engine, settings | runs | load | prefill tok/s | decode tok/s | peak RSS | g3n-run prefill / this | g3n-run decode / this |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    med = {engine: m for (engine,), m in medians(data["rows"], ("engine",), ("load", "prefill", "decode", "peak_rss")).items()}
    g = med.get("g3n-run")
    for engine in dict.fromkeys(r["engine"] for r in data["rows"]):
        if engine not in med:
            error = next(r["error"] for r in data["rows"] if r["engine"] == engine)
            lines.append(f"| {engine} | 0 | failed: {error} | | | | | |")
            continue
        m = med[engine]
        ratios = (f"{g['prefill'] / m['prefill']:.2f} | {g['decode'] / m['decode']:.2f}" if g else " | ")
        lines.append(f"| {engine} | {m['runs']} | {m['load']:.2f} s | {m['prefill']:.1f} | {m['decode']:.2f} | "
                     f"{m['peak_rss'] / 2**20:,.0f} MiB | {ratios} |")
    best = max((e for e in med if e != "g3n-run"), key=lambda e: med[e]["decode"], default=None)
    if best and g:
        lines += ["", f"LiteRT-LM's best setting here is **{best.removeprefix('LiteRT-LM, ')}** (fastest decode); against it "
                      f"g3n-run prefills at {g['prefill'] / med[best]['prefill']:.2f}x, decodes at {g['decode'] / med[best]['decode']:.2f}x, "
                      f"loads in {g['load'] / med[best]['load']:.2f}x the time and peaks at {g['peak_rss'] / med[best]['peak_rss']:.2f}x the RSS."]
    if any("UNIMPLEMENTED" in r.get("error", "") for r in data["rows"]):
        lines += ["", "A setting with YNNPACK does not start: LiteRT-LM logs `UNIMPLEMENTED` while it creates the compiled "
                      "model, so this litert-lm-api build has no YNNPACK on the CPU and XNNPACK serves every setting."]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
