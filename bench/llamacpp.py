"""make bench, llama.cpp part -> docs/LLAMACPP.md: g3n-run against llama.cpp, what desktop users run
Gemma 3n with, on the same random E2B weights, on this machine, in one run.

  1. A random E2B text checkpoint in transformers' Gemma3nForCausalLM layout (bf16), written by
     bench/checkpoints.py from g3n's RandomWeights (seed 0): the weights `g3n-convert --variant e2b
     --random-weights` uses.
  2. g3n: `g3n-convert --checkpoint CK --quant int4` (text bundles), run by g3n-run
     (bench/runtime_case.py): prefill N random tokens, decode 32.
  3. llama.cpp, built in its own folder from the llama-cpp-python sdist on PyPI (its vendored
     llama.cpp: cmake, the llama-bench and llama-quantize tools only): its own converter
     (convert_hf_to_gguf.py with the vendored gguf-py) writes an f16 GGUF, llama-quantize makes
     Q4_0 and Q4_K_M, and llama-bench runs `-p N -n 32 -t 2`.

Every process's peak RSS comes from wait4. Nothing here is installed into g3n's environment.

    python bench/llamacpp.py [--work DIR] [--out docs/LLAMACPP.md] [--prompts 128,1024] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.context import cpu_features  # noqa: E402
from bench.run import CONVERT, NEW_TOKENS, machine, measured_run, medians, run_generation  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist vendors llama.cpp with Gemma 3n support
QUANTS = ("Q4_0", "Q4_K_M")
THREADS = 2


def write_checkpoint(folder: Path, variant: str, layers: int | None = None) -> None:
    """bench/checkpoints.py in child processes (torch stays out of this one, whose image every
    child's ru_maxrss would include), with the full-vocabulary test tokenizer."""
    tokenizer = folder.parent / f"{variant}-tokenizer.model"
    if not tokenizer.is_file():
        subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--full-vocab-tokenizer", str(tokenizer),
                        "--variant", variant], cwd=ROOT, check=True)
    subprocess.run([sys.executable, str(ROOT / "bench" / "checkpoints.py"), str(folder), "--variant", variant,
                    "--tokenizer", str(tokenizer), *(["--layers", str(layers)] if layers else [])], cwd=ROOT, check=True)


def build_llama_cpp(work: Path) -> tuple[Path, Path]:
    """llama.cpp's tools and converter from the llama-cpp-python sdist: (bin folder, source folder)."""
    src_root = work / "llama-cpp-python"
    bin_dir = src_root / "build" / "bin"
    if (bin_dir / "llama-bench").is_file() and (bin_dir / "llama-quantize").is_file():
        return bin_dir, next(src_root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    src_root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", LLAMA_CPP_PYTHON, "--no-deps", "--no-binary", ":all:",
                    "-d", str(src_root), "-q"], check=True)
    (archive,) = src_root.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(src_root, filter="data")
    source = next(src_root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    build = src_root / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "llama-quantize", "-j", str(os.cpu_count())],
                   check=True, stdout=subprocess.DEVNULL)
    return bin_dir, source


def llama_gguf(checkpoint: Path, bin_dir: Path, source: Path, work: Path) -> dict[str, tuple[Path, dict]]:
    """f16 GGUF by llama.cpp's converter, then each of QUANTS: name -> (file, conversion figures)."""
    out = {}
    f16 = work / "e2b-f16.gguf"
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    if not f16.is_file():
        _, result = measured_run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(checkpoint),
                                  "--outtype", "f16", "--outfile", str(f16)], env)
        if "error" in result:
            raise SystemExit(f"llama.cpp's converter failed: {result['error']}")
        out["f16"] = (f16, result)
    for quant in QUANTS:
        path = work / f"e2b-{quant}.gguf"
        if not path.is_file():
            _, result = measured_run([str(bin_dir / "llama-quantize"), str(f16), str(path), quant, str(THREADS)])
            if "error" in result:
                raise SystemExit(f"llama-quantize {quant} failed: {result['error']}")
            out[quant] = (path, result)
        else:
            out[quant] = (path, {"reused": True})
    return out


def llama_bench(bin_dir: Path, model: Path, prompt: int) -> dict:
    """llama-bench's prompt-processing and generation tok/s for one prompt length, and its peak RSS."""
    stdout, result = measured_run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(prompt), "-n", str(NEW_TOKENS),
                                   "-t", str(THREADS), "-r", "1", "-o", "json"])
    if "error" in result:
        return result
    tests = json.loads(stdout)
    speed = {("prefill" if t["n_prompt"] else "decode"): t["avg_ts"] for t in tests}
    return {"prefill_tokens_per_second": speed["prefill"], "decode_tokens_per_second": speed["decode"],
            "peak_rss": result["peak_rss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "g3n-llamacpp")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "LLAMACPP.md")
    parser.add_argument("--prompts", default="128,1024")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prepare-only", action="store_true", help="build, write and convert, but run nothing (timed runs later)")
    args = parser.parse_args()
    prompts = [int(p) for p in args.prompts.split(",")]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    checkpoint = work / "e2b-random-bf16"
    if not (checkpoint / "config.json").is_file():
        print("writing the random E2B checkpoint ...", flush=True)
        write_checkpoint(checkpoint, "e2b")
    conversions = {}
    folder = work / "g3n-e2b-int4"
    if not (folder / "manifest.json").is_file():
        print("converting with g3n ...", flush=True)
        _, conversions["g3n int4"] = measured_run([*CONVERT, "--checkpoint", str(checkpoint), "--quant", "int4",
                                                   "--no-quality-report", "--bundles", "embedder,ple,text_core",
                                                   "--cache-length", "1280", "--out", str(folder), "-q"])
    print("building llama.cpp ...", flush=True)
    bin_dir, source = build_llama_cpp(work)
    print("converting with llama.cpp ...", flush=True)
    ggufs = llama_gguf(checkpoint, bin_dir, source, work)
    conversions.update({f"llama.cpp {name}": figures for name, (_, figures) in ggufs.items()})
    previous = work / "conversions.json"  # figures of conversions an earlier --prepare-only run made
    measured = {name: figures for name, figures in conversions.items() if "seconds" in figures}
    conversions = {**(json.loads(previous.read_text()) if previous.is_file() else {}), **measured}
    previous.write_text(json.dumps(conversions))
    if args.prepare_only:
        return

    os.environ["G3N_CACHE_DIR"] = str(work / "g3n-cache")
    run_generation(folder, prompts[0], "compiled", work)  # builds g3n-run's weight cache: not counted
    rows = []
    for _ in range(args.repeats):
        for prompt in prompts:
            r = run_generation(folder, prompt, "compiled", work)
            rows.append({"engine": "g3n-run int4", "prompt": prompt, **{k: r.get(k) for k in
                         ("prefill_tokens_per_second", "decode_tokens_per_second", "peak_rss", "error")}})
            print(json.dumps(rows[-1]), flush=True)
            for quant in QUANTS:
                r = llama_bench(bin_dir, ggufs[quant][0], prompt)
                rows.append({"engine": f"llama.cpp {quant}", "prompt": prompt, **r})
                print(json.dumps(rows[-1]), flush=True)
    sizes = {"g3n int4 text bundles": sum(e["bytes"] for e in json.loads((folder / "manifest.json").read_text())["bundles"].values()),
             **{f"llama.cpp {q}": ggufs[q][0].stat().st_size for q in QUANTS}}
    data = {"rows": rows, "conversions": conversions, "sizes": sizes, "llama_cpp": LLAMA_CPP_PYTHON,
            "machine": f"{machine()}; CPU flags {cpu_features()}", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    (work / "llamacpp.json").write_text(json.dumps(data, indent=1))
    render(data, args.out)


def render(data: dict, out: Path) -> None:
    rows = data["rows"]
    figures = medians(rows, ("engine", "prompt"), ("prefill_tokens_per_second", "decode_tokens_per_second", "peak_rss"))
    med = {key: figures[key] for key in sorted(figures, key=lambda k: (k[1], k[0]))}
    lines = [
        "# g3n-run against llama.cpp",
        "",
        f"Produced by `python bench/llamacpp.py` (part of `make bench`) on {data['machine']}, {data['date']}. "
        f"llama.cpp is the one vendored by {data['llama_cpp']} (PyPI), built here with cmake (`-DGGML_NATIVE=ON`, Release).",
        "",
        "Same weights: g3n's random E2B weights (seed 0) written as a Hugging Face Gemma3nForCausalLM checkpoint in bf16; "
        "g3n-convert turns it into int4 text bundles (blockwise, 32 weights a scale; cache 1,280), llama.cpp's "
        "convert_hf_to_gguf.py into an f16 GGUF that llama-quantize makes Q4_0 and Q4_K_M. Both engines run 2 threads on "
        f"the same prompt lengths and decode {NEW_TOKENS} tokens; g3n-run counts prefill LiteRT-LM's way (prompt tokens over "
        "the time to prefill all but the last), llama-bench its own (`pp` and `tg` tests, each alone). Peak RSS is each "
        "process's (wait4).",
        "",
        "| prompt tokens | engine | runs | prefill tok/s | decode tok/s | peak RSS | prefill vs g3n-run | decode vs g3n-run |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (engine, prompt), m in med.items():
        base = med.get(("g3n-run int4", prompt))
        ratios = (f"{m['prefill_tokens_per_second'] / base['prefill_tokens_per_second']:.2f} | "
                  f"{m['decode_tokens_per_second'] / base['decode_tokens_per_second']:.2f}") if base else " | "
        lines.append(f"| {prompt:,} | {engine} | {m['runs']} | {m['prefill_tokens_per_second']:.1f} | "
                     f"{m['decode_tokens_per_second']:.2f} | {m['peak_rss'] / 2**20:,.0f} MiB | {ratios} |")
    failures = [r for r in rows if r.get("error")]
    if failures:
        lines += ["", "Runs that failed:", "", *(f"- {r['engine']}, prompt {r['prompt']}: {r['error']}" for r in failures)]
    lines += ["", "| files | bytes |", "|---|---:|", *(f"| {k} | {v:,} |" for k, v in data["sizes"].items()), "",
              "| conversion | wall time | peak RSS |", "|---|---:|---:|"]
    for name, r in data["conversions"].items():
        if "seconds" in r:
            lines.append(f"| {name} | {r['seconds']:.0f} s | {r['peak_rss'] / 2**30:.2f} GiB |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
