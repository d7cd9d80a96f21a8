"""The conversion pipeline behind g3n-convert: config -> weights -> one bundle at a time -> manifest.

Each bundle's module is built on the meta device and converted with stand-ins for its big weights
(converter/standins.py), so litert-torch never holds the real ones; the bundle writer
(quant/streaming.py) then streams them, float or quantized, from the weight source into the file.
Peak memory is set by the converter's graph work and the largest linear layer, not by the model.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bundle import names
from bundle.errors import CheckpointError, G3nError, QualityError, read_json_object
from bundle.files import atomic_path, folder_lock
from bundle.manifest import BundleEntry, Manifest, Mask, MatformerEntry, Source, file_entry, prepare_output_dir, write_manifest
from converter import __version__
from converter.checkpoint import RandomWeights, SafetensorsCheckpoint, expected_shapes, materialize
from converter.config import VARIANTS, EncoderConfig, TextConfig, encoder_configs_from_hf, load_hf_config, variant_config, variant_encoders
from converter.export import (build_module, context_spans, convert_to_tflite, encoder_manifest, media_bundle_plans, sliding_cache_length,
                              text_bundle_plans)
from converter.encoders import end_of_media
from converter.matformer import MatformerSlice, SlicedWeights, load_matformer
from converter.standins import materialize_with_standins
from quant.recipes import BLOCK_SIZES, SCHEMES, bundle_scheme, plan_quantization
from quant.streaming import write_bundle

PREPROCESSOR_CONFIG = "preprocessor_config.json"  # a checkpoint's feature-extractor settings (the audio front end)
WORK_DIR = ".g3n-work"
END_OF_MEDIA = (names.END_OF_VISION, names.END_OF_AUDIO)  # converted graphs before their weights are written; float originals for the quality report


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
    sliding_ring: bool = True  # sliding layers' caches as window-sized rings (converter/model.py)
    context_spans: tuple[int, ...] | None = None  # the text core's context buckets; None: the default ladder
    tokenizer: Path | None = None
    bundles: tuple[str, ...] | None = None  # None: every bundle the model has (no encoders for text-only checkpoints)
    matformer: str | None = None  # a MatFormer configuration to slice to on the fly: a published name or a JSON file


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


def resolve_encoders(cfg: TextConfig, checkpoint: Path | None) -> dict[str, EncoderConfig]:
    """The model's vision / audio encoders: from a multimodal checkpoint's config.json, or the
    built-in variant's; none for a text-only checkpoint."""
    if checkpoint is None:
        return variant_encoders(cfg.name)
    hf, _ = load_hf_config(checkpoint)
    if hf.get("model_type") != "gemma3n":
        return {}
    from transformers import Gemma3nConfig

    preprocessor = None
    if (checkpoint / PREPROCESSOR_CONFIG).is_file():
        preprocessor = read_json_object(checkpoint / PREPROCESSOR_CONFIG, CheckpointError, "it is not valid JSON")
    try:
        return encoder_configs_from_hf(Gemma3nConfig.from_dict(hf), preprocessor)
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint}: {exc}") from exc


def choose_bundles(opts: ConvertOptions, encoders: dict[str, EncoderConfig]) -> tuple[str, ...]:
    available = names.TEXT_BUNDLES + tuple(e.bundle for e in encoders.values())
    if opts.bundles is None:
        return available
    missing = [b for b in opts.bundles if b in names.ENCODER_BUNDLES and b not in available]
    if missing:
        raise G3nError(f"the checkpoint has no {' or '.join(missing)} (a text-only Gemma3nForCausalLM); "
                       f"choose from {', '.join(available)}")
    return tuple(opts.bundles)


def find_tokenizer(opts: ConvertOptions, checkpoint: Path | None) -> Path | None:
    if opts.tokenizer is not None:
        if not Path(opts.tokenizer).is_file():
            raise G3nError(f"--tokenizer {opts.tokenizer} does not exist")
        return Path(opts.tokenizer)
    if checkpoint is not None:
        path = checkpoint / names.TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"{checkpoint} has no {names.TOKENIZER_FILE} (SentencePiece); pass --tokenizer PATH")
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
    return {b: bundle_scheme(b, opts.quant, opts.quant_overrides) for b in names.ALL_BUNDLES}


def convert(opts: ConvertOptions, on_stage: Callable[[str], None] = lambda s: None) -> dict:
    """Convert and write the bundle folder; returns the manifest as written (its JSON object)."""
    choosable = names.TEXT_BUNDLES + names.ENCODER_BUNDLES  # an encoder brings its companions (names.MODALITY_PARTS)
    unknown = set(opts.bundles or ()) - set(choosable)
    if unknown:
        raise G3nError(f"unknown bundle(s) {', '.join(sorted(unknown))}; choose from {', '.join(choosable)}")
    schemes = check_quant_options(opts)

    started = time.perf_counter()
    on_stage("reading config and weights")
    cfg, checkpoint_dir = resolve_config(opts)
    encoders = resolve_encoders(cfg, checkpoint_dir)
    wanted = choose_bundles(opts, encoders)
    encoders = {m: e for m, e in encoders.items() if e.bundle in wanted}
    matformer = MatformerSlice(cfg, load_matformer(opts.matformer)) if opts.matformer else None
    shapes = expected_shapes(cfg, encoders.values())
    if checkpoint_dir is not None:
        source = SafetensorsCheckpoint(checkpoint_dir, cfg, shapes)
    else:
        source = RandomWeights(cfg, opts.seed, shapes)
    if matformer is not None:  # the full model's weights, read as the slice's (no sliced copy anywhere)
        source = SlicedWeights(source, matformer)
        cfg = matformer.cfg.replace(name=f"{cfg.name}-{matformer.mf.name}")
        shapes = expected_shapes(cfg, encoders.values())
    tokenizer = find_tokenizer(opts, checkpoint_dir)
    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg)
    spans = context_spans(opts.prefill_lengths, opts.cache_length, opts.context_spans)
    plans = [p for p in text_bundle_plans(cfg, opts.prefill_lengths, opts.cache_length, opts.sliding_ring, spans)
             if p.name in wanted]
    plans += [plan for enc in encoders.values() for plan in media_bundle_plans(enc)]

    out = Path(opts.out)
    with folder_lock(out, "g3n-convert run"):  # one writer per folder; stale partial files removed
        prepare_output_dir(out)
        work = out / WORK_DIR
        float_files: dict[str, Path] = {}
        unscored: dict[str, str] = {}  # quantized bundles the report cannot score here, and why
        bundles = {}
        try:
            for plan in plans:
                on_stage(f"{plan.name}: loading weights")
                if plan.name in END_OF_MEDIA:  # a constant, computed here from the hard-token embedder
                    module, standins = end_of_media(plan.encoder, hard_token_embedder(cfg, plan.encoder.modality, source)), {}
                    params = module.value.numel()
                else:
                    module, standins = materialize_with_standins(build_module(plan, cfg), plan.weights_prefix, source)
                    params = sum(math.prod(shapes[plan.weights_prefix + name]) for name, _ in module.named_parameters())
                quant = plan_quantization(plan.name, schemes[plan.name], opts.block_size, module)
                on_stage(f"{plan.name}: converting with litert-torch ({len(plan.signatures)} signatures)")
                work.mkdir(exist_ok=True)
                converted = work / f"{plan.name}.converted.tflite"
                signatures = convert_to_tflite(plan, module, converted)
                del module
                release_freed_memory()
                if quant.scheme != "none" and opts.quality_report:  # the float original, for the report
                    unfit = reference_memory_problem(plan.name, params)
                    if unfit:
                        unscored[plan.name] = unfit
                    else:
                        on_stage(f"{plan.name}: writing float weights for the quality report")
                        float_files[plan.name] = work / plan.file
                        write_bundle(converted, float_files[plan.name], plan_quantization(plan.name, "none", opts.block_size, None), standins, source)
                on_stage(f"{plan.name}: writing weights" + (f" ({quant.scheme})" if quant.scheme != "none" else ""))
                with atomic_path(out / plan.file) as tmp:
                    write_bundle(converted, tmp, quant, standins, source)
                converted.unlink()
                release_freed_memory()
                entry = file_entry(out / plan.file)
                bundles[plan.name] = BundleEntry(
                    file=entry.file,
                    bytes=entry.bytes,
                    sha256=entry.sha256,
                    parameters=params,
                    bits_per_weight=round(8 * entry.bytes / params, 3),
                    quantization=quant.to_manifest(),
                    signatures=signatures,
                )

            files = {}
            if tokenizer is not None:
                on_stage(f"copying {names.TOKENIZER_FILE}")
                with atomic_path(out / names.TOKENIZER_FILE) as tmp:
                    shutil.copyfile(tokenizer, tmp)
                files[names.TOKENIZER] = file_entry(out / names.TOKENIZER_FILE)

            sliding = sliding_cache_length(cfg, opts.prefill_lengths, opts.cache_length, opts.sliding_ring)
            manifest = Manifest(
                variant=cfg.name,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                tool={"name": "g3n-convert", "version": __version__, **library_versions()},
                source=Source(
                    kind="checkpoint" if checkpoint_dir is not None else "random-weights",
                    path=str(checkpoint_dir) if checkpoint_dir is not None else None,
                    seed=opts.seed if checkpoint_dir is None else None,
                    sha256=source.fingerprint(),
                ),
                config=cfg.to_dict(),
                cache_length=opts.cache_length,
                prefill_lengths=tuple(sorted(set(opts.prefill_lengths))),
                kv_cache_layout=dict(names.KV_CACHE_LAYOUT),
                sliding_cache_length=sliding if sliding < opts.cache_length else None,
                context_spans=spans if spans and names.TEXT_CORE in wanted else None,
                mask=Mask(attend=names.MASK_ATTEND, blocked=names.MASK_BLOCKED,
                          note="full-attention mask; sliding layers narrow it in-graph"),
                bundles=bundles,
                encoders={m: encoder_manifest(e, bundles) for m, e in encoders.items()},
                files=files,
                matformer=MatformerEntry(**matformer.to_manifest()) if matformer is not None else None,
            )
            if (float_files or unscored) and opts.quality_report:
                from converter.quality import quality_report

                on_stage("measuring quantization quality against the float bundles")
                manifest.quality = quality_report(out, manifest, float_files, schemes,
                                                  out / names.TOKENIZER_FILE if files else None, unscored)
        finally:
            shutil.rmtree(work, ignore_errors=True)

        failures = (manifest.quality or {}).get("warnings", [])
        if failures and opts.strict:
            raise QualityError(
                "quantized quality is below the threshold (--strict), so no manifest.json was written:\n  "
                + "\n  ".join(failures)
                + "\nTry --quant int8, or a per-bundle override such as --quant-text int8"
            )
        manifest.conversion_seconds = round(time.perf_counter() - started, 1)
        on_stage(f"writing {names.MANIFEST}")
        write_manifest(out, manifest)
        return manifest.to_dict()


def hard_token_embedder(cfg: TextConfig, modality: str, source):
    """The token embedder's half for `modality`'s special ids (embed_vision / embed_audio), with
    its weights: what gives <end_of_image> / <end_of_audio> their embedding."""
    import torch

    from converter.model import HardTokenEmbedder

    tokens = cfg.vision_tokens if modality == "vision" else cfg.audio_tokens
    with torch.device("meta"):
        module = HardTokenEmbedder(tokens, cfg.hidden_size)
    return materialize(module, f"{names.EMBEDDER}.embed_{modality}.", source)


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def reference_memory_problem(bundle: str, params: int) -> str | None:
    """Why the quality report cannot score `bundle` on this machine, or None if it can.

    Scoring the text path runs the float32 text core, whose weights are all resident while it runs;
    above half the machine's memory (E4B: 18 GB) that would dwarf the rest of the conversion."""
    if bundle != names.TEXT_CORE:
        return None  # the embedder and PLE references read only the rows of the prompts' tokens
    need, total = 4 * params, physical_memory()
    if need <= total / 2:
        return None
    return (f"its float32 reference ({need / 2**30:.1f} GiB) needs more than half of this machine's "
            f"{total / 2**30:.0f} GiB RAM; score it on a machine with {2 * need / 2**30:.0f} GiB or more")


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
