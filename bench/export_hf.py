"""make bench, converter part -> docs/EXPORT_HF.md: g3n-convert against litert-torch's own Hugging
Face export (`litert-torch export_hf`, the generative export Google's LiteRT-LM models come from),
on one checkpoint both convert here, on this machine, in one run.

The checkpoint: E2B's width and vocabulary with its first 10 layers (5 of them KV-shared, as in
the full model), g3n's random weights in bf16 (bench/checkpoints.py). The full E2B is out of
reach for export_hf on 24 GiB: it loads the whole model in float32 (18 GB of weights) before
converting. Both convert to int8 weights with float activations (export_hf's default recipe,
dynamic_wi8_afp32; g3n's --quant int8), prefill 128, cache 4,096, into one .litertlm each.

litert-torch's export_hf imports `tensorflow.lite.python.schema_py_generated` at module level (for
an image-generation model it also exports); nothing else of TensorFlow runs. That one module is
given ai_edge_litert's identical flatbuffer schema here instead of installing TensorFlow.

    python bench/export_hf.py [--work DIR] [--out docs/EXPORT_HF.md]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import json
import os
import sys
import types
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.context import cpu_features  # noqa: E402
from bench.llamacpp import write_checkpoint  # noqa: E402
from bench.run import CONVERT, machine, measured_run  # noqa: E402

LAYERS = 10
PREFILL, CACHE = 128, 4096


def run_litert_torch_export(argv: list[str]) -> None:
    """litert-torch's CLI (`litert-torch export_hf ...`) with the TensorFlow schema module aliased."""
    importlib.import_module("litert_torch")  # torch._dynamo looks for tensorflow: load it before the alias exists
    from ai_edge_litert import schema_py_generated

    for name in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python"):
        module = types.ModuleType(name)
        module.__path__ = []
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module
    sys.modules["tensorflow.lite.python"].schema_py_generated = schema_py_generated
    sys.modules["tensorflow.lite.python.schema_py_generated"] = schema_py_generated
    from litert_torch.cli import main

    sys.argv = ["litert-torch", *argv]
    sys.exit(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "g3n-export-hf")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "EXPORT_HF.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite --out from --work's export_hf.json, converting nothing")
    parser.add_argument("--litert-torch", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # internal: run its CLI
    args = parser.parse_args()
    if args.litert_torch is not None:
        run_litert_torch_export(args.litert_torch)
        return
    work = args.work
    if args.render_only:
        data = json.loads((work / "export_hf.json").read_text())
        for name, out in (("g3n-convert", work / "g3n"), ("litert-torch export_hf", work / "litert-torch")):
            if "sections" not in data["results"][name] and data["results"][name].get("file"):
                data["results"][name]["sections"] = sections(out / data["results"][name]["file"])
        (work / "export_hf.json").write_text(json.dumps(data, indent=1))
        render(data, args.out)
        return
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / f"e2b-{LAYERS}-layers"
    if not (checkpoint / "config.json").is_file():
        print("writing the checkpoint ...", flush=True)
        write_checkpoint(checkpoint, "e2b", LAYERS)
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs = {
        "g3n-convert": ([*CONVERT, "--checkpoint", str(checkpoint), "--quant", "int8", "--no-quality-report",
                         "--prefill-lengths", str(PREFILL), "--cache-length", str(CACHE), "--context-spans", "none",
                         "--format", "litertlm", "--out", str(work / "g3n"), "-q"], work / "g3n"),
        "litert-torch export_hf": ([sys.executable, __file__, "--litert-torch", "export_hf", f"--model={checkpoint}",
                                    f"--output_dir={work / 'litert-torch'}", f"--prefill_lengths={PREFILL}",
                                    f"--cache_length={CACHE}"], work / "litert-torch"),
    }
    results = {}
    for name, (cmd, out) in runs.items():
        print(f"converting with {name} ...", flush=True)
        _, result = measured_run(cmd, offline)
        files = sorted(out.glob("*.litertlm"))
        results[name] = {**result, "bytes": files[0].stat().st_size if files else None, "file": files[0].name if files else None,
                         "sections": sections(files[0]) if files else []}
        print(f"  {results[name]}", flush=True)
    data = {"results": results, "checkpoint_bytes": sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")),
            "machine": f"{machine()}; CPU flags {cpu_features()}", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    (work / "export_hf.json").write_text(json.dumps(data, indent=1))
    render(data, args.out)


def sections(path: Path) -> list[list]:
    """[model type (or "tokenizer / metadata"), bytes] for each section of a .litertlm."""
    from bundle.litertlm import read_sections

    return [[s.model_type or "tokenizer / metadata", s.bytes] for s in read_sections(path)]


def render(data: dict, out: Path) -> None:
    results = data["results"]
    g3n, theirs = results["g3n-convert"], results["litert-torch export_hf"]
    lines = [
        "# g3n-convert against litert-torch's export_hf",
        "",
        f"Produced by `python bench/export_hf.py` (part of `make bench`) on {data['machine']}, {data['date']}.",
        "",
        f"One checkpoint both convert here: E2B's width (2,048) and vocabulary (262,400; per-layer 262,144) with its first "
        f"{LAYERS} layers, 5 of them KV-shared, g3n's random weights in bf16 ({data['checkpoint_bytes'] / 1e9:.2f} GB, "
        "bench/checkpoints.py). Both write one .litertlm with int8 weights and float activations, prefill 128, cache 4,096:",
        "",
        f"- g3n-convert: `g3n-convert --checkpoint CK --quant int8 --no-quality-report --prefill-lengths {PREFILL} "
        f"--cache-length {CACHE} --context-spans none --format litertlm` (embedder, per-layer embedder and text core as sections)",
        f"- litert-torch 0.10.0: `litert-torch export_hf --model=CK --prefill_lengths={PREFILL} --cache_length={CACHE}` "
        "(its default recipe dynamic_wi8_afp32; a text-only checkpoint becomes one model with the tables inside)",
        "",
        "Peak RSS is each process's maximum resident set (wait4).",
        "",
        "| converter | wall time | peak RSS | .litertlm bytes |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed after {r['seconds']:.0f} s: {r['error']} | {r['peak_rss'] / 2**30:.2f} GiB | |")
        else:
            lines.append(f"| {name} | {r['seconds']:.0f} s | {r['peak_rss'] / 2**30:.2f} GiB | {r['bytes']:,} |")
    if "error" not in g3n and "error" not in theirs:
        lines += ["", f"g3n-convert / export_hf: wall time {g3n['seconds'] / theirs['seconds']:.2f}, "
                      f"peak RSS {g3n['peak_rss'] / theirs['peak_rss']:.2f}, file size {g3n['bytes'] / theirs['bytes']:.2f}."]
    if g3n.get("sections") and theirs.get("sections"):
        lines += ["", "| converter | section | bytes |", "|---|---|---:|"]
        for name in ("g3n-convert", "litert-torch export_hf"):
            lines += [f"| {name} | {kind} | {size:,} |" for kind, size in results[name]["sections"]]
        embedder = sum(size for kind, size in g3n["sections"] if kind == "tf_lite_embedder")
        lines += ["", f"Where the file sizes part: export_hf's single model holds the 262,400 x 2,048 token table once and "
                      "uses it both to look tokens up and as the LM head. g3n writes the embedder as its own section, as "
                      "Google's Gemma 3n .litertlm files do (LiteRT-LM's Gemma 3n executor loads it apart, and g3n-run reads "
                      "only the rows a prompt looks up), and its text core keeps the LM head: the table is stored twice. "
                      f"The embedder section is {embedder:,} B; the files differ by {g3n['bytes'] - theirs['bytes']:,} B."]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
