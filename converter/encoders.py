"""The vision and audio encoder modules: an image or a clip -> soft-token embeddings for the text core.

  VisionEncoder  image [1,S,S,3] in [0,1]  ->  embeddings [1,N,H]
                 timm's MobileNet-V5 (transformers' vision tower is timm's model) + embed_vision's
                 soft-token half.
  AudioEncoder   log-mel [1,F,M] + mask [1,F]  ->  embeddings [1,N,H], mask [1,N]
                 transformers' USM conformer blocks + embed_audio's soft-token half.

Both follow transformers' Gemma3nModel.get_image_features / get_audio_features. The audio encoder
takes a fixed window (F frames, padded, `mask` 1 on real frames), as transformers' processor does
(every clip becomes 188 soft tokens). Padded tokens come out with mask 0; the runner gives them
the embedding of the last audio id, as the reference does.
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


class AudioEncoder(nn.Module):
    # The relative-position projection runs on a constant timing signal: the converter folds it.
    CONSTANT_FOLDED_WEIGHTS = ("relative_position_embedding.pos_proj",)

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        from transformers import Gemma3nAudioConfig
        from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioAttention, Gemma3nAudioEncoder

        self.soft_tokens = cfg.soft_tokens
        self.config = Gemma3nAudioConfig(**cfg.hf_config)
        self.tower = Gemma3nAudioEncoder(self.config)
        ExportableAudioAttention = _exportable_audio_attention()
        for module in self.tower.modules():
            if isinstance(module, Gemma3nAudioAttention):
                module.__class__ = ExportableAudioAttention
        self.embed = SoftTokenEmbedder(self.config.hidden_size, cfg.text_width, self.config.rms_norm_eps)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B,F,M] log-mel, mask [B,F] int32 (1 = real frame) -> embeddings [B,N,H], mask [B,N]."""
        valid = mask > 0
        sscp = self.tower.subsample_conv_projection
        x = features.unsqueeze(1)  # [B,1,F,M]
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
        x = x * valid[..., None].to(x.dtype)
        return self.embed(x), valid.to(torch.int32)


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


def encoder_frames(cfg: EncoderConfig) -> int:
    """Log-mel frames in the audio encoder's window: exactly `soft_tokens` after subsampling."""
    hf = cfg.hf_config
    stride = math.prod(s[0] for s in hf["sscp_conv_stride_size"])
    return cfg.soft_tokens * stride * hf["conf_reduction_factor"]
