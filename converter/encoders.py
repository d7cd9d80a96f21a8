"""The vision and audio encoder modules: an image or a clip -> soft-token embeddings for the text core.

  VisionEncoder  image [1,S,S,3] in [0,1]  ->  embeddings [1,N,H]
                 timm's MobileNet-V5 (transformers' vision tower is timm's model) + embed_vision's
                 soft-token half.
  AudioEncoder   frames [1,F,512] of 16 kHz samples + mask [1,F]  ->  features [1,N,D], mask [1,N]
                 transformers' Gemma3nAudioFeatureExtractor in-graph (AudioFrontEnd), then its USM
                 conformer blocks.
  AudioAdapter   features [1,N,D] + mask [1,N]  ->  embeddings [1,N,H]: embed_audio's soft-token half.
  EndOfMedia     ()  ->  [1,1,H]: the <end_of_image> / <end_of_audio> embedding, a constant.

They follow transformers' Gemma3nModel.get_image_features / get_audio_features. The audio encoder
takes a fixed window (F frames, zero-padded, `mask` 1 on real frames); a clip's tokens equal the
reference's, and tokens past the clip come out with mask 0. g3n-run gives those the embedding of
the last audio id, as transformers' processor layout does (188 soft tokens a clip); LiteRT-LM
keeps only the clip's tokens. The front end in-graph is what lets LiteRT-LM (which hands the
encoder framed samples when told to skip its own log-mel) give transformers' features.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from converter.config import EncoderConfig
from converter.model import RMSNorm


class SoftTokenEmbedder(nn.Module):
    """The soft-token half of transformers' Gemma3nMultimodalEmbedder: RMSNorm, projection to the
    text width, unscaled RMSNorm. (The hard-token half lives in the token embedder.)"""

    def __init__(self, width: int, text_width: int, eps: float):
        super().__init__()
        self.soft_embedding_norm = RMSNorm(width, eps)
        self.embedding_projection = nn.Linear(width, text_width, bias=False)
        self.embedding_post_projection_norm = RMSNorm(text_width, eps, with_scale=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_post_projection_norm(self.embedding_projection(self.soft_embedding_norm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        import timm

        hf = cfg.hf_config
        self.soft_tokens = cfg.soft_tokens
        self.width = hf["hidden_size"]
        self.tower = timm.create_model(hf["architecture"], pretrained=False, **(hf.get("model_args") or {}))
        for module in self.tower.modules():
            if hasattr(module, "fused_attn"):
                # litert-torch lowers scaled_dot_product_attention with MobileNet-V5's single shared
                # K/V head wrongly (a 500x error); timm's explicit matmul path is the same math.
                module.fused_attn = False
        self.embed = SoftTokenEmbedder(self.width, cfg.text_width, hf["rms_norm_eps"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B,S,S,3] -> [B,N,H]
        features = self.tower.forward_features(images.permute(0, 3, 1, 2))  # [B,C,h,w]
        tokens = features.flatten(2).transpose(1, 2)  # [B, h*w, C], row-major over the feature map
        return self.embed(tokens * self.width**0.5)


class AudioFrontEnd(nn.Module):
    """transformers' Gemma3nAudioFeatureExtractor as a graph: frames [B,F,L] of 16 kHz samples
    (frame k starts at sample k * hop) -> log-mel [B,F,M].

    The extractor's HTK pre-emphasis (first sample x (1 - p), the rest differenced within the
    frame), its periodic Hann window and the zero-padded FFT are all linear in the frame, so they
    fold into one [L, 2 x bins] matrix (real and imaginary parts); then the magnitude, its HTK mel
    filters, log(max(., floor)) and the optional per-bin normalisation, as the extractor does.
    Computed in float64 and stored as float32 constants; the quantizer leaves this scope float
    (quant/recipes.py FLOAT_SCOPES)."""

    def __init__(self, extractor: dict):
        super().__init__()
        from transformers import Gemma3nAudioFeatureExtractor

        fe = Gemma3nAudioFeatureExtractor(**extractor)
        if not fe.preemphasis_htk_flavor or fe.dither:
            raise ValueError("g3n builds the audio front end for the HTK pre-emphasis without dither (Gemma 3n's settings)")
        length, p = fe.frame_length, fe.preemphasis
        emphasis = torch.eye(length, dtype=torch.float64)  # y = x @ emphasis
        emphasis[0, 0] = 1.0 - p
        emphasis[torch.arange(length - 1), torch.arange(1, length)] = -p
        n = torch.arange(length, dtype=torch.float64)[:, None]
        k = torch.arange(fe.fft_length // 2 + 1, dtype=torch.float64)[None, :]
        angle = 2 * math.pi * n * k / fe.fft_length
        window = torch.from_numpy(fe.window.astype("float64"))[:, None]
        dft = fe.input_scale_factor * emphasis @ torch.cat([window * torch.cos(angle), -window * torch.sin(angle)], dim=1)
        self.bins = k.shape[1]
        self.register_buffer("dft", dft.float())
        self.register_buffer("mel_filters", torch.from_numpy(fe.mel_filters).float())
        self.register_buffer("mel_floor", torch.tensor(float(fe.mel_floor)))
        shift, scale = fe.per_bin_mean, fe.per_bin_stddev
        self.register_buffer("shift", torch.zeros(()) if shift is None else torch.from_numpy(shift.reshape(-1)).float())
        self.register_buffer("scale", torch.ones(()) if scale is None else torch.from_numpy(scale.reshape(-1)).float())

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        spectrum = torch.matmul(frames, self.dft)
        real, imag = spectrum[..., : self.bins], spectrum[..., self.bins:]
        magnitude = torch.sqrt(real * real + imag * imag)
        mel = torch.matmul(magnitude, self.mel_filters)
        return (torch.log(torch.maximum(mel, self.mel_floor)) - self.shift) / self.scale


class AudioEncoder(nn.Module):
    """Framed samples [B,F,L] + mask [B,F] (uint8, 1 = a frame of the clip) -> features [B,N,D]
    (the conformer's output, every reduction-th frame) + mask [B,N] (uint8, 1 = a token of the clip).
    The soft-token projection is the AudioAdapter, a bundle of its own: LiteRT-LM runs the two as
    its audio encoder and adapter."""

    # The relative-position projection runs on a constant timing signal: the converter folds it.
    CONSTANT_FOLDED_WEIGHTS = ("relative_position_embedding.pos_proj",)

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        from transformers import Gemma3nAudioConfig
        from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioAttention, Gemma3nAudioEncoder

        self.soft_tokens = cfg.soft_tokens
        self.config = Gemma3nAudioConfig(**cfg.hf_config)
        self.front = AudioFrontEnd(cfg.feature_extractor)
        self.tower = Gemma3nAudioEncoder(self.config)
        ExportableAudioAttention = _exportable_audio_attention()
        for module in self.tower.modules():
            if isinstance(module, Gemma3nAudioAttention):
                module.__class__ = ExportableAudioAttention

    def forward(self, audio: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = mask.to(torch.int32) > 0  # TFLite compares no uint8
        sscp = self.tower.subsample_conv_projection
        x = self.front(audio).unsqueeze(1)  # [B,1,F,M]
        for conv in (sscp.conv_0, sscp.conv_1):
            x = conv(x)  # [B,C,T,F'] with T halved
            valid = valid[:, :: conv.conv.stride[0]]
            # The reference sees a clip's end as the end of its input: zero past it, as F.pad does
            # there, so that the window's padding does not reach the last real frames.
            x = x * valid[:, None, :, None].to(x.dtype)
        b, c, t, f = x.shape
        x = sscp.input_proj_linear(x.permute(0, 2, 3, 1).reshape(b, t, f * c))
        padded = ~valid
        for block in self.tower.conformer:
            x = block(x, padded)
        step = self.config.conf_reduction_factor
        x, valid = x[:, ::step], valid[:, ::step]
        return x * valid[..., None].to(x.dtype), valid.to(torch.uint8)


class AudioAdapter(nn.Module):
    """The audio encoder's features [B,N,D] + mask [B,N] -> soft-token embeddings [B,N,H]:
    embed_audio's soft-token half. Tokens past the clip come out zero."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        hf = cfg.hf_config
        self.soft_tokens = cfg.soft_tokens
        self.embed = SoftTokenEmbedder(hf["hidden_size"], cfg.text_width, hf["rms_norm_eps"])

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.embed(features) * (mask.to(torch.int32) > 0)[..., None].to(features.dtype)


class EndOfMedia(nn.Module):
    """No input -> the [1,1,H] embedding of <end_of_image> / <end_of_audio>, as the token embedder
    gives it: the constant LiteRT-LM writes after an image's or a clip's soft tokens."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value.reshape(1, 1, -1).float())

    def forward(self) -> torch.Tensor:
        return self.value * 1.0  # something to trace; the converter folds it back into the constant


def _exportable_audio_attention():
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioAttention

    class ExportableAudioAttention(Gemma3nAudioAttention):
        """transformers' chunked local attention with its block-context extraction as one gather:
        its Tensor.unfold lowers to a 6-D pad that TFLite does not have. Same values."""

        def _extract_block_context(self, hidden_states: torch.Tensor) -> torch.Tensor:
            # [B,T,...] -> [B, blocks, context, ...]: block i sees [i*chunk - left, i*chunk + chunk + right).
            padded = self._pad_dim1(hidden_states, self.max_past_horizon, self.max_future_horizon + self.chunk_size - 1)
            blocks = (padded.shape[1] - self.context_size) // self.chunk_size + 1
            index = torch.arange(blocks)[:, None] * self.chunk_size + torch.arange(self.context_size)[None, :]
            return padded[:, index]

    return ExportableAudioAttention


ENCODER_MODULES = {"vision": VisionEncoder, "audio": AudioEncoder}


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory) while buffers (masks,
    position tables computed in __init__) stay real: what materialising then needs."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    with parameters_on_meta():
        return ENCODER_MODULES[cfg.modality](cfg)


def build_adapter(cfg: EncoderConfig) -> nn.Module | None:
    """The modality's adapter (audio), or None (the vision encoder projects in the same model)."""
    if cfg.modality != "audio":
        return None
    with parameters_on_meta():
        return AudioAdapter(cfg)


def end_of_media(cfg: EncoderConfig, hard_embedder: nn.Module) -> EndOfMedia:
    """The end token's embedding, computed by the modality's hard-token embedder (materialised)."""
    with torch.no_grad():
        return EndOfMedia(hard_embedder(torch.tensor([[cfg.end_token_id]])))


def encoder_frames(cfg: EncoderConfig) -> int:
    """Log-mel frames in the audio encoder's window: exactly `soft_tokens` after subsampling."""
    hf = cfg.hf_config
    stride = math.prod(s[0] for s in hf["sscp_conv_stride_size"])
    return cfg.soft_tokens * stride * hf["conf_reduction_factor"]
