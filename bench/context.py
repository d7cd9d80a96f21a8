"""make bench, context part -> docs/CONTEXT.md (+ PNG plots).

What a text session costs as a function of the context in use and of the cache's capacity: E2B
int4 text bundles (random weights) converted at several cache lengths with the sliding layers'
ring and the default context buckets (and the largest cache once more without buckets, for
comparison), each run by g3n-run and by LiteRT-LM (the same files
packed as .litertlm) at several prompt lengths, interleaved, on one machine in one run. Then each
folder's resident memory at a 1,024-token prompt, broken down (bench/memory.py), against the 2 GB
that a phone's E2B text session is given; with --e4b also E4B's against 3 GB.

    python bench/context.py [--out docs/CONTEXT.md] [--work DIR] [--caches 1280,4096,8192]
                            [--prompts 128,512,1024,2048] [--repeats 2] [--e4b] [--no-ring-folder] [--render-only]

Folders already in --work are reused. Every figure, the conversions' wall time and peak RSS
included, goes to --work's context.json; --render-only rewrites the page from it. The speed rows
are also kept in --work's speed.json: --reuse-speed adds a run's rows to an earlier run's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import CONVERT, NEW_TOKENS, machine, measured_run, run_generation  # noqa: E402

# The default prefill lengths (32, 128): per token, a 512-token call is no faster than four of
# 128 at these cache lengths, and its activation arena stays allocated (bench/NOTES.md).
TEXT_ONLY = ["--random-weights", "--quant", "int4", "--no-quality-report", "--bundles", "embedder,ple,text_core"]
TARGETS = {"e2b": 2.0e9, "e4b": 3.0e9}  # peak RSS of a text session: the announced on-device memory
ENGINES = ("compiled", "litert-lm")
ENGINE_NAMES = {"compiled": "g3n-run", "litert-lm": "LiteRT-LM"}


def convert(variant: str, cache: int, ring: bool, work: Path, spans: bool = True) -> tuple[Path, dict]:
    """E2B / E4B int4 text bundles at `cache`; `spans`: with the default context buckets."""
    folder = work / f"{variant}-{cache}-{'ring' if ring else 'full'}{'' if spans else '-nospans'}"
    if (folder / "manifest.json").is_file():
        return folder, {"reused": True}
    tokenizer = work / f"{variant}-tokenizer.model"
    if not tokenizer.exists():  # in its own process, as bench/run.py writes it
        subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--full-vocab-tokenizer", str(tokenizer),
                        "--variant", variant], cwd=ROOT, check=True)
    args = ["--variant", variant, *TEXT_ONLY, "--cache-length", str(cache), "--tokenizer", str(tokenizer),
            "--out", str(folder), "-q", *([] if ring else ["--no-sliding-ring"]), *([] if spans else ["--context-spans", "none"])]
    print(f"converting {folder.name}", flush=True)
    _, result = measured_run([*CONVERT, *args])
    if "error" in result:
        raise SystemExit(f"{folder.name}: {result['error']}")
    return folder, result


def cpu_features() -> str:
    """The vector extensions XNNPACK's kernels depend on, as /proc/cpuinfo lists them."""
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags) or "no AVX2"


def drop_page_cache() -> bool:
    """Start a memory measurement from a cold page cache (root only): a file just written sits in
    large folios, and a random-row lookup then maps a whole folio (bench/NOTES.md)."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def memory(folder: Path, prompt: int) -> dict:
    cold = drop_page_cache()
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), str(folder), "--prompt-tokens", str(prompt),
                          "--new-tokens", str(NEW_TOKENS), "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "cold_page_cache": cold}


def speed_table(rows: list[dict], base_cache: int) -> list[str]:
    """Median of each point, and each point's ratio to the smallest cache's at the same prompt."""
    med: dict[tuple, dict] = {}
    for key in sorted({(r["folder"], r["engine"], r["prompt"]) for r in rows}):
        runs = [r for r in rows if (r["folder"], r["engine"], r["prompt"]) == key]
        med[key] = {k: statistics.median(r[k] for r in runs) for k in ("prefill", "decode", "peak_rss")} | {
            "runs": len(runs), "cache": runs[0]["cache"], "ring": runs[0]["ring"], "spans": runs[0].get("spans", [])}
    lines = ["| cache length | sliding ring | context buckets | engine | prompt tokens | runs | prefill tok/s | decode tok/s | prefill / base | decode / base | peak RSS |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (folder, engine, prompt), m in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[1]["cache"], not kv[1]["ring"], not kv[1]["spans"])):
        base = next((v for (f, e, p), v in med.items() if e == engine and p == prompt and v["cache"] == base_cache and v["ring"]), None)
        ratio = (f"{m['prefill'] / base['prefill']:.2f} | {m['decode'] / base['decode']:.2f}" if base else " | ")
        buckets = ", ".join(f"{s:,}" for s in m["spans"]) or "none"
        lines.append(f"| {m['cache']:,} | {'yes' if m['ring'] else 'no'} | {buckets} | {ENGINE_NAMES[engine]} | {prompt:,} | {m['runs']} | "
                     f"{m['prefill']:.1f} | {m['decode']:.2f} | {ratio} | {m['peak_rss'] / 2**20:,.0f} MiB |")
    return lines


def memory_table(results: list[dict]) -> list[str]:
    parts = sorted({p for r in results for p in r["parts"]}, key=lambda p: -max(r["parts"].get(p, 0) for r in results))
    heads = [f"{r['variant'].upper()} cache {r['cache_length']:,}{'' if r['ring'] else ', no ring'}" for r in results]
    lines = ["| resident at the peak | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(results)]
    for part in parts:
        if max(r["parts"].get(part, 0) for r in results) >= 2**20:
            lines.append(f"| {part} | " + " | ".join(f"{r['parts'].get(part, 0) / 2**20:,.0f} MiB" for r in results) + " |")
    lines.append("| KV cache (by the manifest) | " + " | ".join(f"{r['kv_cache_bytes'] / 2**20:,.0f} MiB" for r in results) + " |")
    lines.append("| **VmHWM (peak RSS)** | " + " | ".join(f"**{r['vm_hwm'] / 2**20:,.0f} MiB ({r['vm_hwm'] / 1e9:.2f}e9 B)**" for r in results) + " |")
    lines.append("| target | " + " | ".join(f"{TARGETS[r['variant']]:.1e} B: {'met' if r['vm_hwm'] <= TARGETS[r['variant']] else 'missed'}"
                                          for r in results) + " |")
    return lines


def plot(rows: list[dict], mem_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    series: dict[str, dict[int, list]] = {}
    for r in rows:
        name = f"{ENGINE_NAMES[r['engine']]}, cache {r['cache']:,}{'' if r['ring'] else ' (no ring)'}"
        series.setdefault(name, {}).setdefault(r["prompt"] + NEW_TOKENS, []).append(r["decode"])
    for name, points in sorted(series.items()):
        xs = sorted(points)
        axes[0].plot(xs, [statistics.median(points[x]) for x in xs], marker="o", label=name,
                     linestyle="-" if name.startswith("g3n") else "--")
    axes[0].set(xlabel="context in use (tokens)", title="E2B int4 decode tok/s", ylim=(0, None))
    axes[0].legend(fontsize=7)
    for variant, target in TARGETS.items():
        points = sorted((r["prompt"], r["peak_rss"]) for r in mem_rows if r["variant"] == variant)
        if points:
            (line,) = axes[1].plot([p for p, _ in points], [v / 1e9 for _, v in points], marker="o", label=f"{variant.upper()} g3n-run")
            axes[1].axhline(target / 1e9, color=line.get_color(), linestyle=":", label=f"{variant.upper()} target {target / 1e9:.0f} GB")
    axes[1].set(xlabel="prompt tokens", ylabel="GB (1e9 B)", title="peak RSS, cache 4,096, 32 new tokens", ylim=(0, None))
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "CONTEXT.md")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "g3n-context")
    parser.add_argument("--caches", default="1280,4096,8192")
    parser.add_argument("--prompts", default="128,512,1024,2048")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--e4b", action="store_true", help="also E4B's memory at cache 4,096 (a 9-minute conversion)")
    parser.add_argument("--no-ring-folder", action="store_true", help="also a cache-4,096 folder without the sliding ring")
    parser.add_argument("--reuse-speed", action="store_true", help="keep the speed rows of an earlier run in --work and add this run's (--repeats 0: none)")
    parser.add_argument("--render-only", action="store_true", help="rewrite --out from --work's context.json, measuring nothing")
    args = parser.parse_args()
    if args.render_only:
        render(json.loads((args.work / "context.json").read_text()), args.out)
        return
    caches = [int(c) for c in args.caches.split(",")]
    prompts = [int(p) for p in args.prompts.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    scratch = args.work / "scratch"
    scratch.mkdir(exist_ok=True)

    # Every cache with its default context buckets, the largest also without them (what the
    # buckets buy), and optionally one without the sliding ring.
    variants = [(c, True, True) for c in caches] + [(max(caches), True, False)] + ([(4096, False, True)] if args.no_ring_folder else [])
    folders, conversions = [], {}
    for cache, ring, spans in variants:
        folder, result = convert("e2b", cache, ring, args.work, spans)
        folders.append((folder, cache, ring))
        conversions[folder.name] = result

    speed = args.work / "speed.json"  # the speed runs' rows, kept so that a later step's failure loses none of them
    rows, failures = [], []
    if args.reuse_speed and speed.is_file():  # this run's rows are added to them
        rows, failures = json.loads(speed.read_text())
    for folder, _, _ in folders if args.repeats else []:  # the first run of each engine builds its weight cache: not counted
        for engine in ENGINES:
            run_generation(folder, prompts[0], engine, scratch)
    for repeat in range(args.repeats):
        for prompt in prompts:
            for folder, cache, ring in folders:
                if prompt + NEW_TOKENS > cache:
                    continue
                for engine in ENGINES:
                    r = run_generation(folder, prompt, engine, scratch)
                    if "error" in r:
                        failures.append(f"{ENGINE_NAMES[engine]}, cache {cache:,}, prompt {prompt:,}: {r['error']}")
                        print(failures[-1], flush=True)
                        continue
                    spans = json.loads((folder / "manifest.json").read_text()).get("context_spans") or []
                    rows.append({"folder": folder.name, "cache": cache, "ring": ring, "spans": spans, "engine": engine, "prompt": prompt,
                                 "prefill": r["prefill_tokens_per_second"], "decode": r["decode_tokens_per_second"],
                                 "peak_rss": r["peak_rss"]})
                    print(json.dumps(rows[-1]), flush=True)

    speed.write_text(json.dumps([rows, failures]))
    memory_folders = [(args.work / name, "e2b", ring) for name, ring in (("e2b-4096-ring", True), ("e2b-4096-full", False))
                      if (args.work / name / "manifest.json").is_file()]
    if args.e4b:
        memory_folders.append((convert("e4b", 4096, True, args.work)[0], "e4b", True))
    mem, sweep = [], []
    for folder, variant, ring in memory_folders:
        memory(folder, prompts[0])  # builds g3n-run's weight cache if no run has: a first load packs on the heap
        mem.append({**memory(folder, 1024), "variant": variant, "ring": ring})
        if ring:
            for prompt in prompts:
                r = memory(folder, prompt)
                sweep.append({"variant": variant, "prompt": prompt, "peak_rss": r["vm_hwm"]})

    data = {"rows": rows, "failures": failures, "memory": mem, "sweep": sweep, "conversions": conversions,
            "caches": caches, "machine": f"{machine()}; CPU flags {cpu_features()}", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    (args.work / "context.json").write_text(json.dumps(data))
    render(data, args.out)


def render(data: dict, out: Path) -> None:
    rows, mem, sweep, caches = data["rows"], data["memory"], data["sweep"], data["caches"]
    plot_path = out.parent / "bench" / "context.png"  # next to BENCHMARKS.md's plots
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, sweep, plot_path)
    lines = [
        "# Context: cost against the context in use and the cache's capacity",
        "",
        f"Produced by `python bench/context.py` (part of `make bench`) on {data['machine']}, {data['date']}. "
        "Re-run to refresh; the machine shares its CPU, so repeated runs vary by about 10%.",
        "",
        "## Speed: g3n-run and LiteRT-LM at several cache lengths",
        "",
        "E2B int4 text bundles, random weights: `g3n-convert --variant e2b " + " ".join(TEXT_ONLY) + " --cache-length N` "
        "(the sliding layers keep a ring of window + longest prefill - 1 slots; `--no-sliding-ring` keeps the whole "
        "cache; the default context buckets add signatures that attend over the cache's first 1,024 / 2,048 / ... "
        "positions, which g3n-run picks while the context fits and LiteRT-LM leaves alone; `--context-spans none` "
        f"leaves them out). Each run is one process: load, prefill a prompt of random token ids, decode {NEW_TOKENS} tokens greedily, "
        "2 threads, weight caches warm; LiteRT-LM (litert-lm-api) runs the same files packed as .litertlm. Prefill tok/s "
        "counts LiteRT-LM's way (prompt tokens over the time to prefill all but the last). Ratios are against the "
        f"{caches[0]:,}-token cache at the same prompt and engine: 1.00 means the larger capacity costs nothing.",
        "",
        *speed_table(rows, caches[0]),
        "",
        *(["Points that did not run:", "", *(f"- {f}" for f in dict.fromkeys(data["failures"])), ""] if data["failures"] else []),
        f"![decode speed against context in use, and peak RSS against prompt length](bench/{plot_path.name})",
        "",
        "## Memory: a text session at a 1,024-token prompt, cache 4,096",
        "",
        f"`python bench/memory.py FOLDER --prompt-tokens 1024 --new-tokens {NEW_TOKENS}` on the folders above "
        "(page cache dropped first" + ("" if all(r["cold_page_cache"] for r in mem) else "; not possible here: not root") +
        "), broken down from /proc/self/smaps at the sampled peak; VmHWM is the kernel's own peak.",
        "",
        *memory_table(mem),
        "",
    ]
    notes = ROOT / "bench" / "CONTEXT_NOTES.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out} and {plot_path}")


if __name__ == "__main__":
    main()
