"""Where a g3n-run text session's resident bytes go: a breakdown of /proc/self/smaps at the peak.

    python bench/memory.py FOLDER [--prompt-tokens 1024] [--new-tokens 32] [--threads 2] [--json]

Runs one Session over FOLDER in this process (a prompt of random token ids, greedy decoding) while
a thread samples /proc/self/smaps every 50 ms; the sample with the most resident bytes is broken
down by what is mapped: each bundle file (weights read in place), XNNPACK's packed-weight cache
file, shared libraries, and anonymous memory (the KV cache, XNNPACK's activation arenas, heap).
VmHWM, the kernel's own peak, is printed next to it. The KV cache's size comes from the manifest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def smaps_breakdown(folder: Path, cache_dir: Path) -> dict[str, int]:
    """Resident bytes by category, from /proc/self/smaps."""
    out: dict[str, int] = {}
    name = None
    with open("/proc/self/smaps") as fh:
        for line in fh:
            first = line.split(maxsplit=5)
            if len(first) >= 5 and "-" in first[0] and ":" not in first[0]:
                path = first[5].strip() if len(first) > 5 else ""
                if path.endswith(".tflite"):
                    name = f"bundle file {Path(path).name}" if str(folder) in path else "other .tflite"
                elif str(cache_dir) in path:
                    name = "XNNPACK weight cache file"
                elif ".so" in path:
                    name = "shared libraries"
                elif path in ("", "[heap]") or path.startswith("[anon"):
                    name = "anonymous (KV cache, arenas, heap)"
                elif path.startswith("["):
                    name = "stack and kernel"
                else:
                    name = "other files"
            elif line.startswith("Rss:") and name is not None:
                out[name] = out.get(name, 0) + int(line.split()[1]) * 1024
    return out


def vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import numpy as np

    from bundle import names
    from bundle.manifest import read_manifest
    from runtime.session import Session

    folder = args.folder.resolve()
    cache_dir = Path(os.environ.get("G3N_CACHE_DIR", Path.home() / ".cache" / "g3n")).resolve()
    peak: dict = {"total": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            parts = smaps_breakdown(folder, cache_dir)
            total = sum(parts.values())
            if total > peak["total"]:
                peak.update(total=total, parts=parts, at=round(time.perf_counter() - started, 2))
            stop.wait(0.05)

    started = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    session = Session(folder, num_threads=args.threads)
    prompt = np.random.default_rng(0).integers(3, session.manifest.config["vocab_size_per_layer_input"], args.prompt_tokens).tolist()
    result = session.generate(prompt, max_new_tokens=args.new_tokens)
    stop.set()
    sampler.join()

    manifest = read_manifest(folder)
    inputs = manifest.bundles[names.TEXT_CORE].signatures[names.DECODE].inputs
    kv = sum(4 * math.prod(s.shape) for n, s in inputs.items() if n.startswith(names.KV_CACHE_PREFIX))
    report = {"folder": str(folder), "cache_length": manifest.cache_length, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "vm_hwm": vm_hwm(), "sampled_peak": peak["total"],
              "sampled_peak_at_s": peak.get("at"), "parts": dict(sorted(peak.get("parts", {}).items(), key=lambda kv: -kv[1])),
              "kv_cache_bytes": kv, "bundle_bytes": {b: e.bytes for b, e in manifest.bundles.items()},
              "decode_tokens_per_second": result.stats.get("decode_tokens_per_second")}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{folder}: cache {manifest.cache_length}, prompt {args.prompt_tokens}, {args.new_tokens} new tokens")
    print(f"VmHWM {report['vm_hwm'] / 2**20:,.0f} MiB; sampled peak {peak['total'] / 2**20:,.0f} MiB at {peak.get('at')} s:")
    for part, size in report["parts"].items():
        print(f"  {part:<40} {size / 2**20:>9,.0f} MiB")
    print(f"  (KV cache by the manifest: {kv / 2**20:,.0f} MiB; bundle files: "
          + ", ".join(f"{b} {n / 2**20:,.0f} MiB" for b, n in report["bundle_bytes"].items()) + ")")


if __name__ == "__main__":
    main()
