"""Run a g3n bundle folder through Google's LiteRT-LM engine, for side-by-side speed numbers.

  python bench/litertlm.py pack BUNDLE OUT.litertlm
  python bench/litertlm.py run OUT.litertlm --prompt-tokens 128 --new-tokens 32 --threads 2 --json

`pack` is `g3n-convert pack` (converter/pack.py). `run` loads that file with LiteRT-LM's Python engine (litert-lm-api) on
the CPU, prefills N tokens, decodes M, and reports LiteRT-LM's own timings.

`run` needs only `litert-lm-api` (installed with g3n, 0.18.1); it does not import torch.

Caveats when comparing with g3n-run:
  - LiteRT-LM keeps an XNNPACK weight cache next to the .litertlm (or under --cache-dir). The first
    load packs the weights and writes it; later loads map it, so their load time is much shorter.
    The output says which case a run was (`weight_cache_warm`).
  - LiteRT-LM's CPU executor turns on XNNPACK's dynamic fully-connected quantization (int8
    activations), so its logits are close to g3n-run's but not bit-identical.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import string
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # g3n, from this checkout

# --- pack ---------------------------------------------------------------------------------------


def pack(bundle_dir, out_file) -> Path:
    """g3n-convert pack (converter/pack.py): the product's packer."""
    from converter.pack import pack as pack_folder

    return pack_folder(Path(bundle_dir), Path(out_file))


# --- run ----------------------------------------------------------------------------------------


def prompt_text(tokens: int) -> str:
    """Deterministic gibberish long enough for `tokens` tokens with any tokenizer. LiteRT-LM's
    benchmark truncates the tokenized prompt to the requested length (and pads a short one with
    token 0); varied text keeps the per-layer-embedding lookups touching many table rows, as
    g3n's benchmark does with random token ids."""
    rng = random.Random(0)
    words = ("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(tokens * 2))
    return " ".join(words)


def _weight_cache_warm(litertlm_file: Path, cache_dir: str | None) -> bool:
    """Whether LiteRT-LM will find a weight cache for this exact file: it names the cache
    `<file name>_<mtime>_<size>.xnnpack_cache` and replaces a stale one (e.g. after a re-pack)."""
    folder = litertlm_file.parent if not cache_dir else Path(cache_dir)
    stat = litertlm_file.stat()
    return (folder / f"{litertlm_file.name}_{int(stat.st_mtime)}_{stat.st_size}.xnnpack_cache").is_file()


def run(litertlm_file, prompt_tokens: int, new_tokens: int, threads: int, cache_dir: str | None = None,
        ringbuffers: bool | None = None, ynnpack: bool | None = None) -> dict:
    """Load `litertlm_file` with LiteRT-LM on the CPU, prefill `prompt_tokens`, decode `new_tokens`.

    Returns {load_s, ttft_s, prefill_tok_s, decode_tok_s} as LiteRT-LM measures them (load_s is
    its engine + session initialisation), plus the token counts it actually ran, whether the
    XNNPACK weight cache already existed, and this process's peak RSS. `ringbuffers` / `ynnpack`:
    LiteRT-LM's use_ringbuffers_local_attention / enable_ynnpack settings (None: its default)."""
    import litert_lm

    litertlm_file = Path(litertlm_file)
    if not litertlm_file.is_file():
        raise SystemExit(f"{litertlm_file} does not exist")
    warm = _weight_cache_warm(litertlm_file, cache_dir)
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    info = litert_lm.Benchmark(
        model_path=str(litertlm_file),
        backend=litert_lm.Backend.CPU(thread_count=threads),
        prefill_tokens=prompt_tokens,
        decode_tokens=new_tokens,
        cache_dir=cache_dir,
        prompt=prompt_text(prompt_tokens),
        use_ringbuffers_local_attention=ringbuffers,
        enable_ynnpack=ynnpack,
    ).run()
    # Benchmark.run() does not raise when generation fails part way (LiteRT-LM logs the reason,
    # e.g. a sampled id the tokenizer cannot detokenize); it reports no decode turn instead.
    if info.last_decode_token_count == 0:
        raise RuntimeError(f"LiteRT-LM decoded no token from {litertlm_file}; its error is logged above")
    return {
        "load_s": round(info.init_time_in_second, 3),
        "ttft_s": round(info.time_to_first_token_in_second, 4),
        "prefill_tok_s": round(info.last_prefill_tokens_per_second, 2),
        "decode_tok_s": round(info.last_decode_tokens_per_second, 2),
        "prefill_tokens": info.last_prefill_token_count,
        "decode_tokens": info.last_decode_token_count,
        "threads": threads,
        "ringbuffers": ringbuffers,
        "ynnpack": ynnpack,
        "weight_cache_warm": warm,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="build a .litertlm from a g3n bundle folder")
    p.add_argument("bundle", type=Path)
    p.add_argument("out", type=Path)
    r = commands.add_parser("run", help="benchmark a .litertlm with LiteRT-LM's CPU engine")
    r.add_argument("litertlm", type=Path)
    r.add_argument("--prompt-tokens", type=int, default=128)
    r.add_argument("--new-tokens", type=int, default=32)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--cache-dir", default=None,
                   help="where LiteRT-LM keeps its XNNPACK weight cache (default: next to the file; ':nocache' for none)")
    for flag, setting in (("ringbuffers", "use_ringbuffers_local_attention"), ("ynnpack", "enable_ynnpack")):
        r.add_argument(f"--{flag}", choices=["on", "off"], default=None, help=f"LiteRT-LM's {setting} (default: its own)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    if args.command == "pack":
        out = pack(args.bundle, args.out)
        print(f"{out} ({out.stat().st_size / 2**20:,.1f} MiB)")
        return
    setting = {"on": True, "off": False, None: None}
    stats = run(args.litertlm, args.prompt_tokens, args.new_tokens, args.threads, args.cache_dir,
                setting[args.ringbuffers], setting[args.ynnpack])
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"load {stats['load_s']:.2f}s (weight cache {'warm' if stats['weight_cache_warm'] else 'cold'}) | "
              f"{stats['prefill_tokens']} prompt tokens, time to first token {stats['ttft_s']:.3f}s, "
              f"prefill {stats['prefill_tok_s']:.1f} tok/s | {stats['decode_tokens']} decoded, "
              f"decode {stats['decode_tok_s']:.2f} tok/s | peak RSS {stats['peak_rss_mib']:.0f} MiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
