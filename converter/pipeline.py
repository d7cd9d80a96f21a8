"""The conversion pipeline behind g3n-convert: config -> weights -> one bundle at a time -> manifest.

Each bundle's module is built on the meta device and materialised from the weight source just
before its conversion, then dropped, so peak memory is set by the largest bundle, not the model.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from converter import __version__
from converter.bundle import FORMAT, FORMAT_VERSION, atomic_path, file_entry, prepare_output_dir, write_manifest
from converter.checkpoint import RandomWeights, SafetensorsCheckpoint, expected_shapes, materialize
from converter.config import VARIANTS, TextConfig, load_hf_config, variant_config
from converter.errors import CheckpointError, G3nError, QualityError
from converter.export import build_module, convert_to_tflite, text_bundle_plans
from converter.model import MASK_VALUE
from quant.recipes import BLOCK_SIZES, SCHEMES, bundle_scheme, plan_quantization, quantize_file
from quant.streaming import quantize_tables_streaming

TEXT_BUNDLES = ("embedder", "ple", "text_core")
FLOAT_WORK_DIR = ".g3n-float"  # float originals of quantized bundles, kept for the quality report


@dataclass
class ConvertOptions:
    out: Path
    variant: str | None = None
    checkpoint: Path | None = None
    random_weights: bool = False
    seed: int = 0
    quant: str = "none"
    quant_overrides: dict[str, str] = field(default_factory=dict)  # bundle -> scheme
    block_size: int = 32
    quality_report: bool = True
    strict: bool = False
    prefill_lengths: tuple[int, ...] = (32, 128)
    cache_length: int = 1024
    tokenizer: Path | None = None
    bundles: tuple[str, ...] = TEXT_BUNDLES


def resolve_config(opts: ConvertOptions) -> tuple[TextConfig, Path | None]:
    """The model config, from the checkpoint's config.json or the named variant."""
    if opts.checkpoint is not None and opts.random_weights:
        raise G3nError("give either --checkpoint DIR or --random-weights, not both")
    if opts.checkpoint is None and not opts.random_weights:
        raise G3nError(
            "no weights: pass --checkpoint DIR (a Hugging Face Gemma 3n folder) "
            "or --random-weights to convert the variant's architecture with random weights"
        )
    if opts.checkpoint is not None:
        folder = Path(opts.checkpoint)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder {folder} does not exist")
        _, cfg = load_hf_config(folder)
        if opts.variant is None:  # name it after the built-in variant it matches, if any
            # (TextConfig equality ignores the name)
            cfg = cfg.replace(name=next((n for n in VARIANTS if variant_config(n) == cfg), cfg.name))
        else:
            if variant_config(opts.variant) != cfg:
                raise CheckpointError(
                    f"{folder} is not a Gemma 3n {opts.variant} checkpoint (its config.json has "
                    f"{cfg.num_layers} layers, hidden {cfg.hidden_size}); drop --variant or pick the right one"
                )
            cfg = cfg.replace(name=opts.variant)
        return cfg, folder
    return variant_config(opts.variant or "e2b"), None


def find_tokenizer(opts: ConvertOptions, checkpoint: Path | None) -> Path | None:
    if opts.tokenizer is not None:
        if not Path(opts.tokenizer).is_file():
            raise G3nError(f"--tokenizer {opts.tokenizer} does not exist")
        return Path(opts.tokenizer)
    if checkpoint is not None:
        path = checkpoint / "tokenizer.model"
        if not path.is_file():
            raise CheckpointError(f"{checkpoint} has no tokenizer.model (SentencePiece); pass --tokenizer PATH")
        return path
    return None


def check_tokenizer(path: Path, cfg: TextConfig) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(path.read_bytes())
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a SentencePiece model: {exc}") from exc
    if sp.get_piece_size() > cfg.vocab_size:
        raise CheckpointError(
            f"{path} has {sp.get_piece_size()} pieces but the model's vocabulary is {cfg.vocab_size}"
        )


def check_quant_options(opts: ConvertOptions) -> dict[str, str]:
    """Validate the quantization options; returns each requested bundle's scheme."""
    for scheme in [opts.quant, *opts.quant_overrides.values()]:
        if scheme not in SCHEMES:
            raise G3nError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if opts.block_size not in BLOCK_SIZES:
        raise G3nError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}")
    return {b: bundle_scheme(b, opts.quant, opts.quant_overrides) for b in opts.bundles}


def convert(opts: ConvertOptions, on_stage: Callable[[str], None] = lambda s: None) -> dict:
    """Convert and write the bundle folder; returns the manifest."""
    unknown = set(opts.bundles) - set(TEXT_BUNDLES)
    if unknown:
        raise G3nError(f"unknown bundle(s) {', '.join(sorted(unknown))}; choose from {', '.join(TEXT_BUNDLES)}")
    schemes = check_quant_options(opts)

    started = time.perf_counter()
    on_stage("reading config and weights")
    cfg, checkpoint_dir = resolve_config(opts)
    shapes = expected_shapes(cfg)
    if checkpoint_dir is not None:
        source = SafetensorsCheckpoint(checkpoint_dir, cfg, shapes)
    else:
        source = RandomWeights(cfg, opts.seed, shapes)
    tokenizer = find_tokenizer(opts, checkpoint_dir)
    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg)
    plans = [p for p in text_bundle_plans(cfg, opts.prefill_lengths, opts.cache_length) if p.name in opts.bundles]

    out = Path(opts.out)
    prepare_output_dir(out)
    work = out / FLOAT_WORK_DIR
    float_files: dict[str, Path] = {}
    bundles = {}
    try:
        for plan in plans:
            on_stage(f"{plan.name}: loading weights")
            module = materialize(build_module(plan, cfg), plan.weights_prefix, source)
            params = sum(p.numel() for p in module.parameters())
            quant = plan_quantization(plan.name, schemes[plan.name], opts.block_size, module)
            on_stage(f"{plan.name}: converting with litert-torch ({len(plan.signatures)} signatures)")
            target = out / plan.file
            if quant.scheme != "none":
                work.mkdir(exist_ok=True)
                target = float_files[plan.name] = work / plan.file
            signatures = convert_to_tflite(plan, module, target)
            del module
            release_freed_memory()
            if quant.scheme != "none":
                # The PLE table (8 GB float at E2B) is too big for ai-edge-quantizer's in-memory
                # path, so it is quantized in streaming row chunks with the quantizer's own maths.
                streaming = plan.name == "ple"
                on_stage(f"{plan.name}: quantizing to {quant.scheme}" + (" (streaming)" if streaming else " with ai-edge-quantizer"))
                with atomic_path(out / plan.file) as tmp:
                    (quantize_tables_streaming if streaming else quantize_file)(target, tmp, quant)
                if not opts.quality_report:  # nothing will read the float original again
                    target.unlink()
                    del float_files[plan.name]
                release_freed_memory()
            entry = file_entry(out / plan.file)
            bundles[plan.name] = {
                **entry,
                "parameters": params,
                "bits_per_weight": round(8 * entry["bytes"] / params, 3),
                "quantization": quant.to_manifest(),
                "signatures": signatures,
            }

        files = {}
        if tokenizer is not None:
            on_stage("copying tokenizer.model")
            with atomic_path(out / "tokenizer.model") as tmp:
                shutil.copyfile(tokenizer, tmp)
            files["tokenizer"] = file_entry(out / "tokenizer.model")

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "variant": cfg.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tool": {"name": "g3n-convert", "version": __version__, **library_versions()},
            "source": {
                "kind": "checkpoint" if checkpoint_dir is not None else "random-weights",
                "path": str(checkpoint_dir) if checkpoint_dir is not None else None,
                "seed": opts.seed if checkpoint_dir is None else None,
                "sha256": source.fingerprint(),
            },
            "config": cfg.to_dict(),
            "cache_length": opts.cache_length,
            "prefill_lengths": sorted(set(opts.prefill_lengths)),
            "kv_cache_layout": {"k": "[1, kv_heads, cache_length, head_dim]", "v": "[1, kv_heads, head_dim, cache_length]"},
            "mask": {"attend": 0.0, "blocked": MASK_VALUE, "note": "full-attention mask; sliding layers narrow it in-graph"},
            "bundles": bundles,
            "files": files,
        }
        if float_files and opts.quality_report:
            from quant.quality import quality_report

            on_stage("measuring quantization quality against the float bundles")
            manifest["quality"] = quality_report(out, manifest, float_files, schemes, out / "tokenizer.model" if files else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    failures = manifest.get("quality", {}).get("warnings", [])
    if failures and opts.strict:
        raise QualityError(
            "quantized quality is below the threshold (--strict), so no manifest.json was written:\n  "
            + "\n  ".join(failures)
            + "\nTry --quant int8, or a per-bundle override such as --quant-text int8"
        )
    manifest["conversion_seconds"] = round(time.perf_counter() - started, 1)
    on_stage("writing manifest.json")
    write_manifest(out, manifest)
    return manifest


def release_freed_memory() -> None:
    """Collect garbage and hand glibc's freed heap back to the OS, so the next, separate step
    (quantizing, the next bundle) does not stack its peak on memory the last one left behind."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for dist in ("torch", "litert-torch", "ai-edge-litert", "transformers"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return versions
