"""make bench, E4B part -> docs/E4B.md: E4B int4 at run time, every modality, random weights.

  1. `g3n-convert --variant e4b --random-weights --quant int4 --format both` (every bundle, and the
     .litertlm the main command writes), prefill lengths 128,512, cache 1,280; its wall time, peak
     RSS and sizes.
  2. g3n-run on the folder (bench/runtime_case.py) and LiteRT-LM's Python engine on the .litertlm
     (bench/litertlm.py run), interleaved, on text prompts of 128 and 512 random tokens; g3n-run with
     a random 768x1024 image and with a 10 s clip in a 128-word prompt, so the vision / audio
     encoder loads and runs. 32 new tokens each, 2 threads; one cold run per engine builds its
     weight cache and is reported apart.

    python bench/e4b.py [--work DIR] [--out docs/E4B.md] [--repeats 2]
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
from bench.context import cpu_features  # noqa: E402
from bench.run import CONVERT, machine, measured_run, medians, run_generation  # noqa: E402

TEXT_PROMPTS = (128, 512)
FIGURES = ("load_seconds", "time_to_first_token_seconds", "prefill_tokens_per_second", "decode_tokens_per_second", "peak_rss")


def convert(work: Path) -> tuple[Path, dict]:
    folder = work / "e4b-int4"
    figures_file = work / "conversion.json"
    if (folder / "manifest.json").is_file() and figures_file.is_file():
        return folder, json.loads(figures_file.read_text())
    tokenizer = work / "e4b-tokenizer.model"
    if not tokenizer.is_file():  # in a child process, so torch stays out of this one's RSS
        subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--full-vocab-tokenizer", str(tokenizer),
                        "--variant", "e4b"], cwd=ROOT, check=True)
    print("converting E4B int4, every bundle, --format both ...", flush=True)
    _, result = measured_run([*CONVERT, "--variant", "e4b", "--random-weights", "--quant", "int4", "--no-quality-report",
                              "--prefill-lengths", "128,512", "--cache-length", "1280", "--tokenizer", str(tokenizer),
                              "--format", "both", "--out", str(folder), "-q"])
    if "error" in result:
        raise SystemExit(f"g3n-convert failed: {result['error']}")
    manifest = json.loads((folder / "manifest.json").read_text())
    result["bundles"] = {name: entry["bytes"] for name, entry in manifest["bundles"].items()}
    result["litertlm_bytes"] = next(folder.glob("*.litertlm")).stat().st_size
    figures_file.write_text(json.dumps(result))
    return folder, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "g3n-e4b")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "E4B.md")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    folder, conversion = convert(work)
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    packed = scratch / f"{folder.name}.litertlm"  # where run_generation looks for the packed file
    if not packed.exists():
        os.link(next(folder.glob("*.litertlm")), packed)
    os.environ["G3N_CACHE_DIR"] = str(work / "g3n-cache")

    jobs = [("compiled", TEXT_PROMPTS[0]), ("litert-lm", TEXT_PROMPTS[0])]  # cold: builds the weight caches
    jobs += [(e, n) for _ in range(args.repeats) for n in TEXT_PROMPTS for e in ("compiled", "litert-lm")]
    jobs += [(e, TEXT_PROMPTS[0]) for _ in range(args.repeats) for e in ("compiled+image", "compiled+audio")]
    rows = []
    for engine, prompt in jobs:
        print(f"running {engine} prompt {prompt} ...", flush=True)
        r = run_generation(folder, prompt, engine, scratch)
        rows.append({"engine": engine, "prompt": prompt, "weight_cache": r.get("weight_cache"), "error": r.get("error"),
                     "prompt_tokens": r.get("prompt_tokens", prompt), **{k: r.get(k) for k in FIGURES}})
        print(json.dumps(rows[-1]), flush=True)
    data = {"rows": rows, "conversion": conversion, "machine": f"{machine()}; CPU flags {cpu_features()}",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    (work / "e4b.json").write_text(json.dumps(data, indent=1))
    render(data, args.out)


def render(data: dict, out: Path) -> None:
    c = data["conversion"]
    lines = [
        "# E4B int4 at run time: text, image, audio",
        "",
        "Produced by `python bench/e4b.py` (part of `make bench`); random weights at E4B's real shapes, so speed and "
        "memory are real and tokens are not.",
        f"Machine: {data['machine']}. Date: {data['date']}.",
        "",
        "## Conversion",
        "",
        "`g3n-convert --variant e4b --random-weights --quant int4 --no-quality-report --prefill-lengths 128,512 "
        "--cache-length 1280 --format both`:",
        f"{c['seconds']:.0f} s, peak RSS {c['peak_rss'] / 2**30:.2f} GiB; the .litertlm is {c['litertlm_bytes']:,} B.",
        "",
        "| bundle | bytes |",
        "|---|---:|",
        *(f"| {name} | {size:,} |" for name, size in c["bundles"].items()),
        "",
        "## Runs",
        "",
        "Each row: one process loads the model, prefills the prompt, decodes 32 tokens greedily on 2 threads. `compiled` is "
        "g3n-run on the folder; `litert-lm` is LiteRT-LM's Python engine on the .litertlm from the same conversion (its own "
        "Benchmark timings); `compiled+image` / `compiled+audio` put a 768x1024 image / a 10 s clip in a 128-word prompt "
        "(prompt tokens include the soft tokens; the encoder's time is inside time to first token). Warm rows are the "
        "median of their runs.",
        "",
        "| engine | prompt tokens | weight cache | runs | load | time to first token | prefill tok/s | decode tok/s | peak RSS |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['engine']} | {r['prompt']} | | 1 | failed: {r['error']} | | | | |" for r in data["rows"] if r["error"]]
    warm = {}
    for (engine, prompt, cache), m in medians(data["rows"], ("engine", "prompt", "weight_cache"), (*FIGURES, "prompt_tokens")).items():
        if cache != "built":
            warm[(engine, prompt)] = m
        lines.append(f"| {engine} | {m['prompt_tokens']:.0f} | {cache} | {m['runs']} | {m['load_seconds']:.2f} s | "
                     f"{m['time_to_first_token_seconds']:.3f} s | {m['prefill_tokens_per_second']:.1f} | "
                     f"{m['decode_tokens_per_second']:.2f} | {m['peak_rss'] / 2**20:,.0f} MiB |")
    lines += ["", "g3n-run / LiteRT-LM on the same weights (warm caches; speed above 1.00 and RSS below 1.00 favour g3n-run):", "",
              "| prompt tokens | load ratio (inverted) | prefill ratio | decode ratio | peak RSS ratio |", "|---:|---:|---:|---:|---:|"]
    for prompt in sorted({p for _, p in warm}):
        g, lm = warm.get(("compiled", prompt)), warm.get(("litert-lm", prompt))
        if g and lm:
            lines.append(f"| {prompt} | {lm['load_seconds'] / g['load_seconds']:.2f} | "
                         f"{g['prefill_tokens_per_second'] / lm['prefill_tokens_per_second']:.2f} | "
                         f"{g['decode_tokens_per_second'] / lm['decode_tokens_per_second']:.2f} | {g['peak_rss'] / lm['peak_rss']:.2f} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
