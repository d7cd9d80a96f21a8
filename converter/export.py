"""litert-torch export of the three text bundles with LiteRT-LM's signature conventions.

  text_core.tflite  prefill_<N>: embeddings [1,N,H], per_layer_embeddings [1,N,L,P], input_pos [N] i32,
                                 mask [1,1,N,C], kv_cache_{k,v}_<i>  ->  kv_cache_{k,v}_<i>
                    decode:      the same with N = 1            ->  logits [1,1,V], kv_cache_{k,v}_<i>
  embedder.tflite   prefill_embedder_<N> / decode_embedder: token_ids [1,N] i32 -> embeddings [1,N,H]
  ple.tflite        prefill_per_layer_embedder_<N> / decode_per_layer_embedder:
                                 token_ids [1,N] i32 -> embeddings [1,N,L,P]
  vision_encoder.tflite  vision_encoder: images [1,S,S,3] f32 in [0,1] -> embeddings [1,256,H]
  audio_encoder.tflite   audio_encoder: features [1,F,M] f32 log-mel, mask [1,F] i32 (1 = real frame)
                                 -> embeddings [1,188,H], mask [1,188] i32 (1 = a soft token of the clip)

Prefill writes the cache only (no lm_head over the whole prompt); a runner prefills all but the
last prompt token and decodes the last one to get the first logits, as LiteRT-LM does.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from converter.bundle import atomic_path
from converter.config import IMAGE_SIZE, EncoderConfig, TextConfig
from converter.encoders import build_encoder, encoder_frames
from converter.errors import ExportError
from converter.model import PerLayerEmbedder, TextDecoder, TokenEmbedder, empty_kv_cache


def _tensor_spec(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


class TextCoreSignature(nn.Module):
    """Keyword-in / dict-out adapter: names become the .tflite signature tensor names."""

    def __init__(self, decoder: TextDecoder, compute_logits: bool):
        super().__init__()
        self.decoder = decoder
        self.compute_logits = compute_logits
        self.slots = range(len(decoder.cfg.kv_cache_layers))

    def forward(self, embeddings, per_layer_embeddings, input_pos, mask, **kv_cache):
        cache = [kv_cache[f"kv_cache_{kind}_{i}"] for i in self.slots for kind in ("k", "v")]
        logits, cache = self.decoder(embeddings, per_layer_embeddings, input_pos, mask, cache, self.compute_logits)
        out = {f"kv_cache_{kind}_{i}": cache[2 * i + j] for i in self.slots for j, kind in enumerate(("k", "v"))}
        if logits is not None:
            out["logits"] = logits
        return out


class TokenIdsSignature(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, token_ids):
        return {"embeddings": self.module(token_ids)}


class VisionSignature(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, images):
        return {"embeddings": self.module(images)}


class AudioSignature(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, features, mask):
        embeddings, valid = self.module(features, mask)
        return {"embeddings": embeddings, "mask": valid}


SIGNATURE_WRAPPERS = {"embedder": TokenIdsSignature, "ple": TokenIdsSignature, "vision_encoder": VisionSignature,
                      "audio_encoder": AudioSignature}


def encoder_inputs(enc: EncoderConfig) -> dict[str, torch.Tensor]:
    if enc.modality == "vision":
        return {"images": torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, 3)}
    frames = encoder_frames(enc)
    return {"features": torch.zeros(1, frames, enc.hf_config["input_feat_size"]),
            "mask": torch.ones(1, frames, dtype=torch.int32)}


def encoder_manifest(enc: EncoderConfig) -> dict:
    """What a runner needs to feed an encoder and place its soft tokens (manifest "encoders")."""
    entry = {
        "bundle": enc.bundle,
        "soft_tokens": enc.soft_tokens,
        "start_token_id": enc.start_token_id,
        "soft_token_id": enc.soft_token_id,
        "end_token_id": enc.end_token_id,
        "config": enc.hf_config,
    }
    if enc.modality == "vision":
        entry["image"] = {"size": IMAGE_SIZE, "layout": "NHWC RGB", "range": [0.0, 1.0], "resize": "bilinear"}
    else:
        entry["audio"] = {"frames": encoder_frames(enc), "mel_bins": enc.hf_config["input_feat_size"],
                          "sample_rate": 16000, "frame_ms": 32.0, "hop_ms": 10.0}
    return entry


def text_core_inputs(cfg: TextConfig, length: int, cache_length: int) -> dict[str, torch.Tensor]:
    inputs = {
        "embeddings": torch.zeros(1, length, cfg.hidden_size),
        "per_layer_embeddings": torch.zeros(1, length, cfg.num_layers, cfg.hidden_size_per_layer_input),
        "input_pos": torch.arange(length, dtype=torch.int32),
        "mask": torch.zeros(1, 1, length, cache_length),
    }
    cache = empty_kv_cache(cfg, cache_length)
    for i in range(len(cfg.kv_cache_layers)):
        inputs[f"kv_cache_k_{i}"], inputs[f"kv_cache_v_{i}"] = cache[2 * i], cache[2 * i + 1]
    return inputs


def token_inputs(length: int) -> dict[str, torch.Tensor]:
    return {"token_ids": torch.zeros(1, length, dtype=torch.int32)}


@dataclass(frozen=True)
class BundlePlan:
    """What one .tflite holds: which module, which signatures."""

    name: str  # text_core / embedder / ple / vision_encoder / audio_encoder
    weights_prefix: str  # prefix of the module's parameters in the weight sources
    signatures: tuple[tuple[str, bool, dict], ...]  # (signature name, logits?, sample inputs)
    encoder: EncoderConfig | None = None

    @property
    def file(self) -> str:
        return f"{self.name}.tflite"


def text_bundle_plans(cfg: TextConfig, prefill_lengths: tuple[int, ...], cache_length: int) -> list[BundlePlan]:
    if any(n < 1 or n > cache_length for n in prefill_lengths):
        raise ExportError(f"prefill lengths {list(prefill_lengths)} must be between 1 and --cache-length {cache_length}")
    lengths = sorted(set(prefill_lengths))
    # The single-token signature comes first in the lookup bundles: LiteRT-LM's CPU executor looks
    # tokens up one at a time through a file's first signature.
    return [
        BundlePlan(
            "embedder",
            "embedder.",
            (("decode_embedder", False, token_inputs(1)),)
            + tuple((f"prefill_embedder_{n}", False, token_inputs(n)) for n in lengths),
        ),
        BundlePlan(
            "ple",
            "ple.",
            (("decode_per_layer_embedder", False, token_inputs(1)),)
            + tuple((f"prefill_per_layer_embedder_{n}", False, token_inputs(n)) for n in lengths),
        ),
        BundlePlan(
            "text_core",
            "decoder.",
            tuple((f"prefill_{n}", False, text_core_inputs(cfg, n, cache_length)) for n in lengths)
            + (("decode", True, text_core_inputs(cfg, 1, cache_length)),),
        ),
    ]


def encoder_bundle_plan(enc: EncoderConfig) -> BundlePlan:
    return BundlePlan(enc.bundle, f"{enc.bundle}.", ((enc.bundle, False, encoder_inputs(enc)),), enc)


def build_module(plan: BundlePlan, cfg: TextConfig) -> nn.Module:
    """The bundle's PyTorch module with its parameters on the meta device (no memory until materialised)."""
    if plan.encoder is not None:
        return build_encoder(plan.encoder)
    cls = {"embedder": TokenEmbedder, "ple": PerLayerEmbedder, "text_core": TextDecoder}[plan.name]
    with torch.device("meta"):
        return cls(cfg)


def output_specs(bundle: str, sample: dict[str, torch.Tensor], logits: bool, module: nn.Module) -> dict:
    """Output names, shapes and dtypes of one signature, derived without running the model."""
    if bundle in ("vision_encoder", "audio_encoder"):
        tokens, width = module.soft_tokens, module.embed.embedding_projection.out_features
        out = {"embeddings": {"shape": [1, tokens, width], "dtype": "float32"}}
        if bundle == "audio_encoder":
            out["mask"] = {"shape": [1, tokens], "dtype": "int32"}
        return out
    if bundle == "text_core":
        out = {k: _tensor_spec(v) for k, v in sample.items() if k.startswith("kv_cache_")}
        if logits:
            length = sample["embeddings"].shape[1]
            out["logits"] = {"shape": [1, length, module.cfg.vocab_size], "dtype": "float32"}
        return out
    length = sample["token_ids"].shape[1]
    if bundle == "embedder":
        width = [module.embed_tokens.embedding_dim]
    else:
        width = [module.cfg.num_layers, module.cfg.hidden_size_per_layer_input]
    return {"embeddings": {"shape": [1, length, *width], "dtype": "float32"}}


def convert_to_tflite(plan: BundlePlan, module: nn.Module, out_path: Path) -> dict:
    """Convert `module` with every signature of `plan` and write it atomically to `out_path`.
    Returns the manifest's signature table (input / output names, shapes, dtypes)."""
    import litert_torch

    wrappers = {}
    builder = None
    for sig_name, logits, sample in plan.signatures:
        key = (plan.name, logits)
        if key not in wrappers:
            wrapper = TextCoreSignature(module, logits) if plan.name == "text_core" else SIGNATURE_WRAPPERS[plan.name](module)
            wrappers[key] = wrapper.eval()
        builder = (litert_torch if builder is None else builder).signature(sig_name, wrappers[key], sample_kwargs=sample)
    try:
        with torch.no_grad():
            # lightweight_conversion keeps large weights as references instead of copies while
            # lowering: same flatbuffer, much lower peak memory for real-size bundles.
            # Its runtime constant folding writes folded BOOL constants empty (the audio encoder's
            # attention mask), an invalid file. Without it, a weight times a constant stays a MUL
            # in the graph; the bundle writer folds the audio encoder's (quant/streaming.py).
            edge_model = builder.convert(lightweight_conversion=True,
                                         runtime_constant_folding=False if plan.name == "audio_encoder" else None)
    except Exception as exc:  # litert-torch surfaces lowering failures as many exception types
        raise ExportError(f"litert-torch could not convert {plan.file}: {type(exc).__name__}: {exc}") from exc

    signatures = {
        sig_name: {
            "inputs": {k: _tensor_spec(v) for k, v in sample.items()},
            "outputs": output_specs(plan.name, sample, logits, module),
        }
        for sig_name, logits, sample in plan.signatures
    }
    with atomic_path(out_path) as tmp:
        write_flatbuffer(edge_model, tmp)
    return signatures


def write_flatbuffer(edge_model, path: Path) -> None:
    """Serialise a converted model to `path`.

    litert's writer streams the flatbuffer to disk (no second in-memory copy of the weights),
    but on an I/O error it ends the whole process (LLVM report_fatal_error). It runs in a forked
    child, which shares the parent's memory copy-on-write, so a full disk becomes an OSError here.
    """
    with warnings.catch_warnings():
        # The child only runs the C++ flatbuffer writer; it never touches JAX's or torch's threads.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        pid = os.fork()
    if pid == 0:  # child: write, then leave without running the parent's cleanup handlers
        code = 1
        try:
            edge_model.export(str(path))
            code = 0
        finally:
            os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    if os.waitstatus_to_exitcode(status) != 0:
        free = shutil.disk_usage(path.parent).free
        if free < max(path.stat().st_size, 1) // 100 + (1 << 20):
            raise OSError(errno.ENOSPC, "no space left on device", str(path))
        raise OSError(errno.EIO, f"the LiteRT flatbuffer writer failed (exit status {status})", str(path))
