"""litert-torch export of the three text bundles with LiteRT-LM's signature conventions.

  text_core.tflite  prefill_<N>: embeddings [1,N,H], per_layer_embeddings [1,N,L,P], input_pos [N] i32,
                                 mask [1,1,N,C], kv_cache_{k,v}_<i>  ->  kv_cache_{k,v}_<i>
                                 (a sliding layer's cache: a ring of window + max N - 1 slots when
                                 that is shorter than C)
                    decode:      the same with N = 1            ->  logits [1,1,V], kv_cache_{k,v}_<i>
  embedder.tflite   prefill_embedder_<N> / decode_embedder: token_ids [1,N] i32 -> embeddings [1,N,H]
  ple.tflite        prefill_per_layer_embedder_<N> / decode_per_layer_embedder:
                                 token_ids [1,N] i32 -> embeddings [1,N,L,P]
  vision_encoder.tflite  vision_encoder: images [1,S,S,3] f32 in [0,1] -> embeddings [1,256,H]
  audio_encoder.tflite   audio_encoder: audio [1,F,512] f32 framed 16 kHz samples, mask [1,F] u8 (1 = real frame)
                                 -> features [1,188,D], mask [1,188] u8 (1 = a token of the clip)
  audio_adapter.tflite   audio_adapter: features [1,188,D], mask [1,188] u8 -> embeddings [1,188,H]
  end_of_vision.tflite / end_of_audio.tflite   end_of_vision / end_of_audio: no input -> embeddings [1,1,H]

Prefill writes the cache only (no lm_head over the whole prompt); a runner prefills all but the
last prompt token and decodes the last one to get the first logits, as LiteRT-LM does.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bundle import names
from bundle.errors import ExportError
from bundle.files import atomic_path
from bundle.manifest import AudioInput, EncoderEntry, ImageInput, Signature, TensorSpec
from converter.config import IMAGE_SIZE, EncoderConfig, TextConfig
from converter.encoders import build_adapter, build_encoder, encoder_frames
from converter.model import PerLayerEmbedder, TextDecoder, TokenEmbedder, empty_kv_cache, ring_length


def _tensor_spec(t: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))


class TextCoreSignature(nn.Module):
    """Keyword-in / dict-out adapter: names become the .tflite signature tensor names."""

    def __init__(self, decoder: TextDecoder, compute_logits: bool, span: int | None = None):
        super().__init__()
        self.decoder = decoder
        self.compute_logits = compute_logits
        self.span = span
        self.cache_names = names.kv_cache_names(len(decoder.cfg.kv_cache_layers))

    # The parameter names are the signature's input names (bundle.names.TEXT_CORE_INPUTS).
    def forward(self, embeddings, per_layer_embeddings, input_pos, mask, **kv_cache):
        cache = [kv_cache[name] for name in self.cache_names]
        logits, cache = self.decoder(embeddings, per_layer_embeddings, input_pos, mask, cache, self.compute_logits, self.span)
        out = dict(zip(self.cache_names, cache))
        if logits is not None:
            out[names.LOGITS] = logits
        return out


class TokenIdsSignature(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, token_ids):
        return {names.EMBEDDINGS: self.module(token_ids)}


class VisionSignature(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, images):
        return {names.EMBEDDINGS: self.module(images)}


class AudioSignature(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, audio, mask):
        features, valid = self.module(audio, mask)
        return {names.FEATURES: features, names.MASK: valid}


class AdapterSignature(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, features, mask):
        return {names.EMBEDDINGS: self.module(features, mask)}


class ConstantSignature(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self):
        return {names.EMBEDDINGS: self.module()}


SIGNATURE_WRAPPERS = {names.EMBEDDER: TokenIdsSignature, names.PLE: TokenIdsSignature,
                      names.VISION_ENCODER: VisionSignature, names.AUDIO_ENCODER: AudioSignature,
                      names.AUDIO_ADAPTER: AdapterSignature, names.END_OF_VISION: ConstantSignature,
                      names.END_OF_AUDIO: ConstantSignature}


def audio_framing(enc: EncoderConfig) -> tuple[int, int, int]:
    """(frame length, hop, sample rate) of the audio front end, in samples."""
    from transformers import Gemma3nAudioFeatureExtractor

    fe = Gemma3nAudioFeatureExtractor(**enc.feature_extractor)
    return fe.frame_length, fe.hop_length, fe.sampling_rate


def media_inputs(enc: EncoderConfig, bundle: str) -> dict[str, torch.Tensor]:
    """Sample inputs of one of the modality's bundles (names.MODALITY_PARTS)."""
    if bundle == names.VISION_ENCODER:
        return {names.IMAGES: torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, 3)}
    if bundle == names.AUDIO_ENCODER:
        frames = encoder_frames(enc)
        return {names.AUDIO: torch.zeros(1, frames, audio_framing(enc)[0]),
                names.MASK: torch.ones(1, frames, dtype=torch.uint8)}
    if bundle == names.AUDIO_ADAPTER:
        return {names.FEATURES: torch.zeros(1, enc.soft_tokens, enc.hf_config["hidden_size"]),
                names.MASK: torch.ones(1, enc.soft_tokens, dtype=torch.uint8)}
    return {}  # end_of_vision / end_of_audio


def encoder_manifest(enc: EncoderConfig, bundles) -> EncoderEntry:
    """What a runner needs to feed an encoder and place its soft tokens (manifest "encoders");
    `bundles`: the bundles converted, of which the modality's companions are named."""
    image = audio = None
    if enc.modality == "vision":
        image = ImageInput(size=IMAGE_SIZE, layout="NHWC RGB", range=(0.0, 1.0), resize="bilinear")
    else:
        frame_length, hop_length, rate = audio_framing(enc)
        audio = AudioInput(frames=encoder_frames(enc), frame_length=frame_length, hop_length=hop_length,
                           sample_rate=rate, mel_bins=enc.hf_config["input_feat_size"])
    adapter = names.AUDIO_ADAPTER if enc.modality == "audio" else None
    end = enc.parts[-1]
    return EncoderEntry(bundle=enc.bundle, soft_tokens=enc.soft_tokens, start_token_id=enc.start_token_id,
                        soft_token_id=enc.soft_token_id, end_token_id=enc.end_token_id, config=enc.hf_config,
                        image=image, audio=audio, adapter=adapter if adapter in bundles else None,
                        end_of_media=end if end in bundles else None)


def text_core_inputs(cfg: TextConfig, length: int, cache_length: int, ring: int | None = None) -> dict[str, torch.Tensor]:
    inputs = {
        names.EMBEDDINGS: torch.zeros(1, length, cfg.hidden_size),
        names.PER_LAYER_EMBEDDINGS: torch.zeros(1, length, cfg.num_layers, cfg.hidden_size_per_layer_input),
        names.INPUT_POS: torch.arange(length, dtype=torch.int32),
        names.MASK: torch.zeros(1, 1, length, cache_length),
    }
    cache = empty_kv_cache(cfg, cache_length, ring=ring)
    inputs.update(zip(names.kv_cache_names(len(cfg.kv_cache_layers)), cache))
    return inputs


def token_inputs(length: int) -> dict[str, torch.Tensor]:
    return {names.TOKEN_IDS: torch.zeros(1, length, dtype=torch.int32)}


@dataclass(frozen=True)
class BundlePlan:
    """What one .tflite holds: which module, which signatures."""

    name: str  # text_core / embedder / ple / vision_encoder / audio_encoder
    weights_prefix: str  # prefix of the module's parameters in the weight sources
    signatures: tuple[tuple[str, bool, dict], ...]  # (signature name, logits?, sample inputs)
    encoder: EncoderConfig | None = None
    spans: dict[str, int] = field(default_factory=dict)  # text core: context-bucket signature -> its span

    @property
    def file(self) -> str:
        return names.bundle_file(self.name)


def sliding_cache_length(cfg: TextConfig, prefill_lengths, cache_length: int, sliding_ring: bool = True) -> int:
    """Positions a sliding layer's cache holds: a ring (converter/model.py) when one is shorter."""
    ring = ring_length(cfg, prefill_lengths, cache_length) if sliding_ring else None
    return ring or cache_length


def context_spans(prefill_lengths, cache_length: int, spans=None) -> tuple[int, ...]:
    """The context buckets of a text core: `spans` as given, else a ladder doubling from 1,024
    below the cache length (cache 4,096: 1,024 and 2,048). Each must hold the longest prefill
    call and be shorter than the cache."""
    if spans is None:
        spans, span = [], DEFAULT_FIRST_SPAN
        while span < cache_length:
            spans.append(span)
            span *= 2
    spans = tuple(sorted(set(spans)))
    longest = max(prefill_lengths, default=1)
    bad = [s for s in spans if not longest <= s < cache_length]
    if bad:
        raise ExportError(f"context spans {list(bad)} must hold the longest prefill length ({longest}) and be shorter "
                          f"than --cache-length {cache_length}")
    return spans


DEFAULT_FIRST_SPAN = 1024  # below it a global layer's attention is a small part of a step


def text_bundle_plans(cfg: TextConfig, prefill_lengths: tuple[int, ...], cache_length: int,
                      sliding_ring: bool = True, spans: tuple[int, ...] = ()) -> list[BundlePlan]:
    """The text bundles; `spans`: the text core's context buckets (context_spans)."""
    if any(n < 1 or n > cache_length for n in prefill_lengths):
        raise ExportError(f"prefill lengths {list(prefill_lengths)} must be between 1 and --cache-length {cache_length}")
    lengths = sorted(set(prefill_lengths))
    ring = sliding_cache_length(cfg, lengths, cache_length, sliding_ring)
    ring = ring if ring < cache_length else None
    # The single-token signature comes first in the lookup bundles: LiteRT-LM's CPU executor looks
    # tokens up one at a time through a file's first signature.
    def lookup_plan(bundle: str) -> BundlePlan:
        return BundlePlan(
            bundle,
            f"{bundle}.",
            ((names.lookup_signature(bundle), False, token_inputs(1)),)
            + tuple((names.lookup_signature(bundle, n), False, token_inputs(n)) for n in lengths),
        )

    return [
        lookup_plan(names.EMBEDDER),
        lookup_plan(names.PLE),
        BundlePlan(
            names.TEXT_CORE,
            "decoder.",
            tuple((names.prefill(n), False, text_core_inputs(cfg, n, cache_length, ring)) for n in lengths)
            + ((names.DECODE, True, text_core_inputs(cfg, 1, cache_length, ring)),)
            + tuple(signature for span in spans for signature in (
                *((names.span_fill(span, n), False, text_core_inputs(cfg, n, cache_length, ring)) for n in lengths),
                (names.span_step(span), True, text_core_inputs(cfg, 1, cache_length, ring)))),
            spans={name: span for span in spans for name in (names.span_step(span), *(names.span_fill(span, n) for n in lengths))},
        ),
    ]


def media_bundle_plans(enc: EncoderConfig) -> list[BundlePlan]:
    """The modality's bundles: its encoder, the audio adapter, the end token's embedding."""
    return [BundlePlan(b, f"{b}.", ((names.encoder_signature(b), False, media_inputs(enc, b)),), enc) for b in enc.parts]


def build_module(plan: BundlePlan, cfg: TextConfig) -> nn.Module:
    """The bundle's PyTorch module with its parameters on the meta device (no memory until
    materialised). Not for end_of_vision / end_of_audio: converter/encoders.py end_of_media."""
    if plan.name == names.AUDIO_ADAPTER:
        return build_adapter(plan.encoder)
    if plan.encoder is not None:
        return build_encoder(plan.encoder)
    cls = {names.EMBEDDER: TokenEmbedder, names.PLE: PerLayerEmbedder, names.TEXT_CORE: TextDecoder}[plan.name]
    with torch.device("meta"):
        return cls(cfg)


def output_specs(bundle: str, sample: dict[str, torch.Tensor], logits: bool, module: nn.Module) -> dict[str, TensorSpec]:
    """Output names, shapes and dtypes of one signature, derived without running the model."""
    if bundle == names.AUDIO_ENCODER:
        tokens, width = module.soft_tokens, module.config.hidden_size
        return {names.FEATURES: TensorSpec((1, tokens, width), "float32"), names.MASK: TensorSpec((1, tokens), "uint8")}
    if bundle in names.MEDIA_BUNDLES:
        tokens = getattr(module, "soft_tokens", 1)
        width = module.value.shape[-1] if bundle in (names.END_OF_VISION, names.END_OF_AUDIO) else module.embed.embedding_projection.out_features
        return {names.EMBEDDINGS: TensorSpec((1, tokens, width), "float32")}
    if bundle == names.TEXT_CORE:
        out = {k: _tensor_spec(v) for k, v in sample.items() if k.startswith(names.KV_CACHE_PREFIX)}
        if logits:
            length = sample[names.EMBEDDINGS].shape[1]
            out[names.LOGITS] = TensorSpec((1, length, module.cfg.vocab_size), "float32")
        return out
    length = sample[names.TOKEN_IDS].shape[1]
    if bundle == names.EMBEDDER:
        width = (module.embed_tokens.embedding_dim,)
    else:
        width = (module.cfg.num_layers, module.cfg.hidden_size_per_layer_input)
    return {names.EMBEDDINGS: TensorSpec((1, length, *width), "float32")}


def convert_to_tflite(plan: BundlePlan, module: nn.Module, out_path: Path) -> dict[str, Signature]:
    """Convert `module` with every signature of `plan` and write it atomically to `out_path`.
    Returns the manifest's signature table (input / output names, shapes, dtypes)."""
    import litert_torch

    wrappers = {}
    builder = None
    for sig_name, logits, sample in plan.signatures:
        span = plan.spans.get(sig_name)
        key = (plan.name, logits, span)
        if key not in wrappers:
            wrapper = TextCoreSignature(module, logits, span) if plan.name == names.TEXT_CORE else SIGNATURE_WRAPPERS[plan.name](module)
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
                                         runtime_constant_folding=False if plan.name == names.AUDIO_ENCODER else None)
    except Exception as exc:  # litert-torch surfaces lowering failures as many exception types
        raise ExportError(f"litert-torch could not convert {plan.file}: {type(exc).__name__}: {exc}") from exc

    signatures = {
        sig_name: Signature(
            inputs={k: _tensor_spec(v) for k, v in sample.items()},
            outputs=output_specs(plan.name, sample, logits, module),
        )
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
