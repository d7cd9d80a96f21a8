"""make bench, last step: the ratios of every side-by-side comparison in one table at the top of
docs/BENCHMARKS.md, read from the other benchmarks' JSON (bench/context.py, bench/llamacpp.py,
bench/export_hf.py, bench/e4b.py, bench/litertlm_settings.py, each measured in one run on one machine). Ratios are g3n over the other
engine or setting: above 1 is faster (tok/s) or bigger (bytes, seconds).

    python bench/summary.py [--page docs/BENCHMARKS.md] [--context DIR] [--llamacpp DIR] [--export-hf DIR] [--e4b DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TMP = Path(os.environ.get("TMPDIR", "/tmp"))
BEGIN, END = "<!-- ratios: bench/summary.py -->", "<!-- /ratios -->"


def median(rows: list[dict], key: str, **where) -> float | None:
    values = [r[key] for r in rows if all(r.get(k) == v for k, v in where.items()) and r.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def context_rows(data: dict) -> list[str]:
    rows, out = data["rows"], []
    for r in rows:
        r["buckets"] = bool(r.get("spans"))
    where = f"{data['machine']}, {data['date']}"
    for cache in (4096, 8192):
        for prompt in (1024, 2048):
            g = {k: median(rows, k, engine="compiled", cache=cache, prompt=prompt, buckets=True) for k in ("prefill", "decode", "peak_rss")}
            lm = {k: median(rows, k, engine="litert-lm", cache=cache, prompt=prompt) for k in ("prefill", "decode", "peak_rss")}
            if g["decode"] and lm["decode"]:
                out.append(f"| g3n-run / LiteRT-LM, E2B int4, cache {cache:,}, {prompt:,}-token prompt | {ratio(g['prefill'], lm['prefill'])} | "
                           f"{ratio(g['decode'], lm['decode'])} | {ratio(g['peak_rss'], lm['peak_rss'])} | CONTEXT.md | {where} |")
    base = {k: median(rows, k, engine="compiled", cache=min(data["caches"]), prompt=1024) for k in ("prefill", "decode")}
    for cache, buckets in ((4096, True), (8192, True), (8192, False)):
        here = {k: median(rows, k, engine="compiled", cache=cache, prompt=1024, buckets=buckets) for k in ("prefill", "decode")}
        if here["decode"]:
            label = "with context buckets" if buckets else "without context buckets"
            out.append(f"| g3n-run cache {cache:,} / cache {min(data['caches']):,}, {label}, 1,024-token prompt | "
                       f"{ratio(here['prefill'], base['prefill'])} | {ratio(here['decode'], base['decode'])} | | CONTEXT.md | {where} |")
    return out


def llamacpp_rows(data: dict) -> list[str]:
    rows, out = data["rows"], []
    where = f"{data['machine']}, {data['date']}"
    for quant in ("Q4_0", "Q4_K_M"):
        for prompt in sorted({r["prompt"] for r in rows}):
            g = {k: median(rows, k, engine="g3n-run int4", prompt=prompt) for k in ("prefill_tokens_per_second", "decode_tokens_per_second", "peak_rss")}
            q = {k: median(rows, k, engine=f"llama.cpp {quant}", prompt=prompt) for k in ("prefill_tokens_per_second", "decode_tokens_per_second", "peak_rss")}
            out.append(f"| g3n-run int4 / llama.cpp {quant}, E2B, {prompt:,}-token prompt | {ratio(g['prefill_tokens_per_second'], q['prefill_tokens_per_second'])} | "
                       f"{ratio(g['decode_tokens_per_second'], q['decode_tokens_per_second'])} | {ratio(g['peak_rss'], q['peak_rss'])} | LLAMACPP.md | {where} |")
    return out


def export_rows(data: dict) -> list[str]:
    g3n, theirs = data["results"]["g3n-convert"], data["results"]["litert-torch export_hf"]
    if "error" in g3n or "error" in theirs:
        return []
    return [f"| g3n-convert / litert-torch export_hf, E2B width, 10 layers, int8 | wall time {ratio(g3n['seconds'], theirs['seconds'])} | "
            f"file {ratio(g3n['bytes'], theirs['bytes'])} | {ratio(g3n['peak_rss'], theirs['peak_rss'])} | EXPORT_HF.md | "
            f"{data['machine']}, {data['date']} |"]


def e4b_rows(data: dict) -> list[str]:
    rows = [r for r in data["rows"] if not r.get("error") and r.get("weight_cache") != "built"]
    out = []
    for prompt in sorted({r["prompt"] for r in rows if r["engine"] == "litert-lm"}):
        g = {k: median(rows, k, engine="compiled", prompt=prompt) for k in ("prefill_tokens_per_second", "decode_tokens_per_second", "peak_rss")}
        lm = {k: median(rows, k, engine="litert-lm", prompt=prompt) for k in ("prefill_tokens_per_second", "decode_tokens_per_second", "peak_rss")}
        out.append(f"| g3n-run / LiteRT-LM, E4B int4, cache 1,280, {prompt:,}-token prompt | {ratio(g['prefill_tokens_per_second'], lm['prefill_tokens_per_second'])} | "
                   f"{ratio(g['decode_tokens_per_second'], lm['decode_tokens_per_second'])} | {ratio(g['peak_rss'], lm['peak_rss'])} | E4B.md | "
                   f"{data['machine']}, {data['date']} |")
    return out


def settings_rows(data: dict) -> list[str]:
    rows = [r for r in data["rows"] if "error" not in r]
    g = {k: median(rows, k, engine="g3n-run") for k in ("prefill", "decode", "peak_rss")}
    out = []
    for engine in dict.fromkeys(r["engine"] for r in rows if r["engine"] != "g3n-run"):
        lm = {k: median(rows, k, engine=engine) for k in ("prefill", "decode", "peak_rss")}
        out.append(f"| g3n-run / {engine}, E2B int4, cache 4,096, 1,024-token prompt | {ratio(g['prefill'], lm['prefill'])} | "
                   f"{ratio(g['decode'], lm['decode'])} | {ratio(g['peak_rss'], lm['peak_rss'])} | LITERTLM_SETTINGS.md | "
                   f"{data['machine']}, {data['date']} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--context", type=Path, default=TMP / "g3n-context")
    parser.add_argument("--llamacpp", type=Path, default=TMP / "g3n-llamacpp")
    parser.add_argument("--export-hf", type=Path, default=TMP / "g3n-export-hf")
    parser.add_argument("--e4b", type=Path, default=TMP / "g3n-e4b")
    args = parser.parse_args()
    table = []
    for name, folder, rows in (("context.json", args.context, context_rows), ("litertlm_settings.json", args.context, settings_rows),
                               ("llamacpp.json", args.llamacpp, llamacpp_rows),
                               ("export_hf.json", args.export_hf, export_rows), ("e4b.json", args.e4b, e4b_rows)):
        path = folder / name
        if path.is_file():
            table += rows(json.loads(path.read_text()))
    # Every row ends with its machine and date; when they are all one, say it once.
    places = {row.rstrip(" |").rsplit("|", 1)[1].strip() for row in table}
    one_place = len(places) == 1
    if one_place:
        table = [row.rstrip(" |").rsplit("|", 1)[0] + "|" for row in table]
    lines = [BEGIN, "## Ratios at a glance", "",
             "g3n over the other engine or setting, each pair measured side by side in one run on one machine "
             "(medians of its runs; the page named holds every figure and its command). Speed: above 1 is g3n faster. "
             "Memory, file size and wall time: above 1 is g3n bigger or slower." + (f" All measured on {places.pop()}." if one_place else ""), "",
             "| comparison | prefill (or wall time) | decode (or file size) | peak RSS | page |" + ("" if one_place else " machine, date |"),
             "|---|---:|---:|---:|---|" + ("" if one_place else "---|"), *table]
    lines += ["", END]
    page = args.page.read_text()
    if BEGIN in page:
        head, rest = page.split(BEGIN, 1)
        page = head + "\n".join(lines) + rest.split(END, 1)[1]
    else:
        title, _, body = page.partition("\n")
        page = f"{title}\n\n" + "\n".join(lines) + "\n" + body
    args.page.write_text(page)
    print(f"wrote the ratios into {args.page}")


if __name__ == "__main__":
    main()
