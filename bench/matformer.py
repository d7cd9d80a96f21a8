"""make bench, MatFormer part -> docs/MATFORMER.md (+ a PNG plot).

For a spread of published configurations of E4B, at int4 with random weights: the text bundles'
sizes (measured) and the whole folder's (estimated), g3n-run's prefill and decode speed and a text
session's peak RSS, the conversion's peak RSS, next to the published MMLU. Then `g3n-convert slice`
at real size: a random bf16 E4B checkpoint (bench/checkpoints.py, streamed) sliced to the official E2B, with
its peak RSS.

    python bench/matformer.py [--out docs/MATFORMER.md] [--configs a,b,c] [--skip-slice]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import CONVERT, machine, measured_run, run_generation, text_weights_and_cache  # noqa: E402
from bundle import names  # noqa: E402
from bundle.manifest import read_manifest  # noqa: E402

# The smallest published model, three between (the cheapest 35-layer one, the midpoint, and the
# one with the best pre-trained MMLU, above E4B's own), and E4B itself.
CONFIGS = ["official-e2b-model", "e2.49b-block-level", "e2.98b-block-level", "e3.39b-layer-level", "main-model"]
PROMPT_TOKENS = 128
CONVERT_ARGS = ["--variant", "e4b", "--random-weights", "--quant", "int4", "--no-quality-report",
                "--bundles", ",".join(names.TEXT_BUNDLES), "--prefill-lengths", "128", "--cache-length", "1280"]
MEMORY_TARGET = 16 * 2**30


def slice_case(tmp: Path) -> dict:
    """`g3n-convert slice` at real size, in its own process (peak RSS from wait4). The random
    checkpoint is written by a child too: torch stays out of this process, whose image a child's
    ru_maxrss would otherwise include."""
    source, out = tmp / "e4b-random-bf16", tmp / "e2b-sliced"
    print("writing a random bf16 E4B checkpoint ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "bench" / "checkpoints.py"), str(source), "--variant", "e4b"], cwd=ROOT, check=True)
    print("slicing it to official-e2b-model ...", flush=True)
    stdout, result = measured_run([*CONVERT, "slice", "--checkpoint", str(source), "--matformer", "official-e2b-model",
                                   "--out", str(out), "-q"])
    if "error" in result:
        return result
    source_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    shutil.rmtree(source, ignore_errors=True)
    return {**result, "source_bytes": source_bytes, "out": out, "summary": stdout.strip()}


def check_slice(sliced: dict) -> None:
    """The sliced folder against its config.json, by g3n's strict reader (every name and shape)."""
    from converter.checkpoint import SafetensorsCheckpoint, expected_shapes
    from converter.config import load_hf_config

    out = sliced.pop("out")
    _, cfg = load_hf_config(out)
    SafetensorsCheckpoint(out, cfg, expected_shapes(cfg))
    sliced.update(sliced_bytes=sum(f.stat().st_size for f in out.glob("*.safetensors")), layers=cfg.num_layers)
    shutil.rmtree(out, ignore_errors=True)


def convert_case(name: str, tmp: Path, tokenizer: Path) -> dict:
    out = tmp / name
    _, result = measured_run([*CONVERT, *CONVERT_ARGS, "--matformer", name, "--tokenizer", str(tokenizer),
                              "--out", str(out), "-q"])
    if "error" in result:
        return {"convert": result}
    manifest = read_manifest(out)
    case = {
        "convert": result,
        "text_bytes": sum(b.bytes for b in manifest.bundles.values()),
        "text_core_bytes": manifest.bundles[names.TEXT_CORE].bytes,
        "effective": manifest.matformer.effective_parameters,
        "layers": manifest.matformer.layers_kept,
        "budget": text_weights_and_cache(out),
    }
    runs = []
    for _ in range(2):  # the first run builds the XNNPACK weight cache; the second maps it
        runs.append(run_generation(out, PROMPT_TOKENS, "compiled", tmp))
        print(f"  {runs[-1]}", flush=True)
    case["runs"] = runs
    shutil.rmtree(out, ignore_errors=True)
    return case


def add_estimates(name: str, case: dict) -> None:
    """Estimated sizes and the published MMLU (after every measured run: these import torch)."""
    from converter.config import variant_config
    from converter.estimate import encoder_bytes, estimated_folder_bytes
    from converter.matformer import MatformerSlice, load_matformer

    plan = MatformerSlice(variant_config("e4b"), load_matformer(name))
    case.update(estimated_text_bytes=estimated_folder_bytes(plan.cfg, None, "int4"),
                encoder_bytes=sum(encoder_bytes("e4b", "int4").values()), mmlu=plan.mf.mmlu)


def table(cases: dict, sliced: dict | None) -> list[str]:
    lines = [
        "# MatFormer: the sizes inside E4B",
        "",
        "Produced by `make bench` (bench/matformer.py). Numbers are from the machine and date below; re-run to refresh.",
        "",
        f"Machine: {machine()}. Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d')}.",
        "",
    ]
    if cases:
        lines += conversion_table(cases)
    if sliced is not None:
        lines += slice_table(sliced)
    return lines


def conversion_table(cases: dict) -> list[str]:
    lines = [
        "## Configurations at int4: size, speed, memory",
        "",
        "Each configuration is converted from E4B's random weights, sliced on the fly: "
        f"`g3n-convert {' '.join(CONVERT_ARGS)} --matformer NAME` (text bundles: embedder, PLE, text core). "
        f"g3n-run then prefills {PROMPT_TOKENS} random tokens and decodes 32, 2 threads, with a warm XNNPACK weight cache "
        "(the second of two runs). Folder size = the measured text bundles + the vision and audio encoders (int8), "
        "whose size is the same for every configuration (estimated from their shapes). Configurations: the smallest "
        "published one (the official E2B), three between (e2.49b-block-level, the cheapest that keeps all 35 layers; "
        "e2.98b-block-level, the midpoint; e3.39b-layer-level, the best pre-trained MMLU of the table, above E4B's own) "
        "and E4B itself.",
        "",
        "| configuration | layers | effective params | MMLU PT | folder (int4) | text bundles | text core | estimate / measured | "
        "prefill tok/s | decode tok/s | session peak RSS | RSS / (text bundles + KV cache) | conversion peak RSS | conversion time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in cases.items():
        conv = c["convert"]
        if "error" in conv:
            lines.append(f"| {name} | | | | failed: {conv['error']} | | | | | | | | {conv['peak_rss'] / 2**30:.2f} GiB | |")
            continue
        warm = c["runs"][-1]
        speed = ("failed", "failed", f"{warm.get('error', '')}", "") if "error" in warm else (
            f"{warm['prefill_tokens_per_second']:.1f}", f"{warm['decode_tokens_per_second']:.2f}",
            f"{warm['peak_rss'] / 2**30:.2f} GiB", f"{warm['peak_rss'] / c['budget']:.2f}")
        lines.append(
            f"| {name} | {c['layers']} | {c['effective'] / 1e9:.3f} B | {c['mmlu']:.1f}% | "
            f"{(c['text_bytes'] + c['encoder_bytes']) / 1e9:.2f} GB | {c['text_bytes'] / 1e9:.3f} GB | "
            f"{c['text_core_bytes'] / 1e9:.3f} GB | {c['estimated_text_bytes'] / c['text_bytes']:.4f} | "
            f"{speed[0]} | {speed[1]} | {speed[2]} | {speed[3]} | {conv['peak_rss'] / 2**30:.2f} GiB | {conv['seconds']:.0f} s |"
        )
    within = all("error" not in c["convert"] and c["convert"]["peak_rss"] < MEMORY_TARGET for c in cases.values())
    lines += ["", f"Every conversion within the 16 GiB peak RSS target: {'yes' if within else 'no'}.", ""]
    return lines


def slice_table(sliced: dict) -> list[str]:
    lines = ["## `g3n-convert slice` at real size", ""]
    if "error" in sliced:
        lines.append(f"failed: {sliced['error']}")
    else:
        lines += [
            "A random E4B text checkpoint in bf16 (transformers' Gemma3nForCausalLM names and shapes, "
            f"{sliced['source_bytes'] / 1e9:.2f} GB in 4 GiB shards) sliced to `official-e2b-model` by "
            "`g3n-convert slice --checkpoint E4B --matformer official-e2b-model --out DIR`, in its own process. "
            "The output is checked against its config.json by g3n's strict checkpoint reader (every tensor, every shape).",
            "",
            "| source | output | layers | wall time | peak RSS | target |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {sliced['source_bytes'] / 1e9:.2f} GB | {sliced['sliced_bytes'] / 1e9:.2f} GB | {sliced['layers']} | "
            f"{sliced['seconds']:.0f} s | {sliced['peak_rss'] / 2**30:.2f} GiB | under 4 GiB: "
            f"{'yes' if sliced['peak_rss'] < 4 * 2**30 else 'no'} |",
        ]
    lines.append("")
    return lines


def plot(cases: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: c for n, c in cases.items() if "error" not in c["convert"] and "error" not in c["runs"][-1]}
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in ok.items():
        size = (c["text_bytes"] + c["encoder_bytes"]) / 1e9
        axes[0].scatter(size, c["mmlu"])
        axes[0].annotate(name, (size, c["mmlu"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axes[1].scatter(c["runs"][-1]["decode_tokens_per_second"], c["mmlu"])
        axes[1].annotate(name, (c["runs"][-1]["decode_tokens_per_second"], c["mmlu"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xlabel("int4 folder size (GB)")
    axes[1].set_xlabel("g3n-run decode tok/s (2 threads)")
    for ax in axes:
        ax.set_ylabel("published MMLU (pre-trained, %)")
        ax.grid(alpha=0.3)
    fig.suptitle("MatFormer configurations of E4B at int4")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "MATFORMER.md")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--skip-slice", action="store_true", help="skip the real-size `g3n-convert slice` run")
    parser.add_argument("--skip-convert", action="store_true", help="only the real-size slice")
    args = parser.parse_args()

    cases, sliced = {}, None
    with tempfile.TemporaryDirectory(prefix="g3n-matformer-") as tmp:
        tmp = Path(tmp)
        os.environ["G3N_CACHE_DIR"] = str(tmp / "g3n-cache")
        if not args.skip_convert:
            tokenizer = tmp / "e4b-tokenizer.model"
            subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--full-vocab-tokenizer", str(tokenizer),
                            "--variant", "e4b"], cwd=ROOT, check=True)
            for name in args.configs.split(","):
                print(f"converting e4b --matformer {name} ...", flush=True)
                cases[name] = convert_case(name, tmp, tokenizer)
                print(f"  {cases[name]['convert']}", flush=True)
        if not args.skip_slice:
            sliced = slice_case(tmp)
            print(f"  {sliced}", flush=True)
            if "error" not in sliced:
                check_slice(sliced)
    for name, case in cases.items():
        if "error" not in case["convert"]:
            add_estimates(name, case)
    lines = table(cases, sliced)
    if cases:
        plots = args.out.parent / "bench"
        plots.mkdir(parents=True, exist_ok=True)
        plot(cases, plots / "matformer.png")
        lines += ["![MatFormer configurations: size and speed against MMLU](bench/matformer.png)", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
