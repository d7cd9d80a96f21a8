"""Export-first PyTorch definition of the Gemma 3n text path.

Three modules, one per bundle, so that each bundle only ever materialises its own weights:

  TokenEmbedder     token ids -> embed_tokens(ids) * sqrt(hidden)                 (embedder.tflite)
  PerLayerEmbedder  token ids -> embed_tokens_per_layer(ids') * sqrt(256), [B,T,L,256] (ple.tflite)
  TextDecoder       embeddings + per-layer embeddings + input_pos + mask + KV cache
                    -> logits (decode only) + updated KV cache                      (text_core.tflite)

Export rules followed throughout: static shapes, no data-dependent Python control flow, the
KV cache passed in and returned explicitly (it becomes named signature tensors), cache writes
via dynamic_update_slice (an in-place update on device). The maths mirrors transformers'
modeling_gemma3n.py line for line; the parity tests hold it to 1e-5.

Cache layout (LiteRT-LM's default): K [1, kv_heads, cache_len, head_dim],
V [1, kv_heads, head_dim, cache_len]. `mask` is the additive full-attention mask
[1, 1, T, cache_len] (0 = attend, MASK_VALUE = blocked); sliding layers narrow it in-graph.

Sliding-window ring: a sliding layer only ever reads the last `sliding_window` positions, so its
cache may be a ring of R < cache_len slots (position p in slot p mod R; `ring_length`). A call
writes its T positions first and then attends, so R must leave room for a whole call's writes
next to the window: R >= window + T - 1. Which position a slot holds follows from the call's
positions alone (positions are written in order), so the ring needs no mask from the runner
and no extra state. Whether a slot is a ring is read from its cache tensor's shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice
from torch import nn

from bundle.names import MASK_BLOCKED as MASK_VALUE
from converter.config import HardTokens, TextConfig, gaussian_topk_multiplier


class RMSNorm(nn.Module):
    """x * (mean(x^2) + eps)^-0.5 * w  (Gemma 3n scales by w, not 1 + w)."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return out * self.weight if self.weight is not None else out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, T, heads, D]; cos/sin [T, D]
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


class HardTokenEmbedder(nn.Module):
    """The token half of transformers' Gemma3nMultimodalEmbedder (embed_vision / embed_audio):
    ids in [offset, offset + size) -> table row, RMSNorm, projection, unscaled RMSNorm."""

    def __init__(self, tokens: HardTokens, text_width: int):
        super().__init__()
        self.offset, self.size = tokens.offset, tokens.size
        self.embedding = nn.Embedding(tokens.size, tokens.width)
        self.hard_embedding_norm = RMSNorm(tokens.width, tokens.eps)
        self.embedding_projection = nn.Linear(tokens.width, text_width, bias=False)
        self.embedding_post_projection_norm = RMSNorm(text_width, tokens.eps, with_scale=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding_post_projection_norm(
            self.embedding_projection(self.hard_embedding_norm(self.embedding(token_ids - self.offset)))
        )


class TokenEmbedder(nn.Module):
    """Token ids -> the text core's input embeddings. Text ids read embed_tokens x sqrt(H);
    image / audio special ids read their modality's hard-token embedder, as in the reference."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.scale = cfg.embed_scale
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.vision_end = cfg.audio_tokens.offset if cfg.audio_tokens else cfg.vocab_size
        self.embed_vision = HardTokenEmbedder(cfg.vision_tokens, cfg.hidden_size) if cfg.vision_tokens else None
        self.embed_audio = HardTokenEmbedder(cfg.audio_tokens, cfg.hidden_size) if cfg.audio_tokens else None

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:  # [B,T] -> [B,T,H]
        out = self.embed_tokens(token_ids) * self.scale
        for table, end in ((self.embed_vision, self.vision_end), (self.embed_audio, None)):
            if table is None:
                continue
            in_range = token_ids >= table.offset
            if end is not None:
                in_range = in_range & (token_ids < end)
            # Out-of-range ids read the table's last row; the where() discards them.
            ids = torch.where(in_range, token_ids, torch.full_like(token_ids, table.offset + table.size - 1))
            out = torch.where(in_range[..., None], table(ids), out)
        return out


class PerLayerEmbedder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, cfg.per_layer_width)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:  # [B,T] -> [B,T,L,P]
        # Image/audio ids (>= the per-layer vocabulary) read row 0, as in the reference.
        in_table = (token_ids >= 0) & (token_ids < self.cfg.vocab_size_per_layer_input)
        ids = torch.where(in_table, token_ids, torch.zeros_like(token_ids))
        out = self.embed_tokens_per_layer(ids) * self.cfg.per_layer_embed_scale
        return out.reshape(*token_ids.shape, self.cfg.num_layers, self.cfg.hidden_size_per_layer_input)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.owns_kv = not cfg.is_kv_shared(layer)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        if self.owns_kv:  # KV-shared layers carry no K/V weights at all
            self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
            self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, with_scale=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def update_cache(self, x, cos, sin, input_pos, k_cache, v_cache, ring: bool):
        B, T, _ = x.shape
        k = rope(self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)), cos, sin).permute(0, 2, 1, 3)
        v = self.v_norm(self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).permute(0, 2, 3, 1)
        start = input_pos[0]  # 0-d: positions of one call are contiguous
        if ring and T > 1:  # the call's slots may wrap past the ring's end: gather, then select
            slots = k_cache.shape[2]
            offset = torch.remainder(torch.arange(slots, dtype=start.dtype) - start, slots)  # slot -> index in the call
            written = offset < T
            index = torch.clamp(offset, max=T - 1)
            k_cache = torch.where(written[None, None, :, None], k.index_select(2, index), k_cache)
            v_cache = torch.where(written[None, None, None, :], v.index_select(3, index), v_cache)
            return k_cache, v_cache
        if ring:  # one position never wraps: an in-place write at its slot
            start = torch.remainder(start, k_cache.shape[2])
        zero = torch.zeros_like(start)
        k_cache = dynamic_update_slice(k_cache, k, [zero, zero, start, zero])
        v_cache = dynamic_update_slice(v_cache, v, [zero, zero, zero, start])
        return k_cache, v_cache

    def forward(self, x, cos, sin, mask, input_pos, k_cache, v_cache, ring: bool = False, span: int | None = None):
        # x [B,T,H]; k_cache [B,KVH,C,D]; v_cache [B,KVH,D,C]; mask [1,1,T,C] (C: the ring's R for a ring)
        # Owners write this step's K/V first; KV-shared layers get their source's updated cache.
        # `span`: attend over the cache's first `span` positions only (a call whose positions all
        # lie below it); the write still goes to the whole cache.
        if self.owns_kv:
            k_cache, v_cache = self.update_cache(x, cos, sin, input_pos, k_cache, v_cache, ring)
        keys, values = k_cache, v_cache
        if span is not None:
            keys, values, mask = k_cache[:, :, :span], v_cache[..., :span], mask[..., :span]
        B, T, _ = x.shape
        groups = self.num_heads // self.num_kv_heads
        q = rope(self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)), cos, sin)
        # Query head h reads kv head h // groups: fold each kv head's query group next to T.
        q = q.permute(0, 2, 1, 3).reshape(B, self.num_kv_heads, groups * T, self.head_dim)
        scores = torch.matmul(q, keys.transpose(2, 3))  # attention scale is 1.0 (q_norm does it)
        scores = scores.view(B, self.num_kv_heads, groups, T, -1) + mask[:, :, None]
        probs = torch.softmax(scores, dim=-1).view(B, self.num_kv_heads, groups * T, -1)
        out = torch.matmul(probs, values.transpose(2, 3))  # [B,KVH,G*T,D]
        out = out.view(B, self.num_heads, T, self.head_dim).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out), k_cache, v_cache


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        width = cfg.intermediate_sizes[layer]
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=False)
        sparsity = cfg.activation_sparsity[layer]
        self.std_multiplier = gaussian_topk_multiplier(sparsity) if sparsity > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.std_multiplier is not None:
            # Gaussian top-k: keep only activations above mean + z * std (z = 1.645 for 95%).
            mean = torch.mean(gate, dim=-1, keepdim=True)
            std = torch.std(gate, dim=-1, keepdim=True, unbiased=False)
            gate = F.relu(gate - (mean + std * self.std_multiplier))
        return self.down_proj(F.gelu(gate, approximate="tanh") * self.up_proj(x))


class AltUp(nn.Module):
    """Alternating updates over `n` residual streams ([n, B, T, H]); only stream 0 is computed."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        n, h = cfg.altup_num_inputs, cfg.hidden_size
        self.n, self.active = n, cfg.altup_active_idx
        self.router_scale = 1.0 / h
        self.correct_output_scale = nn.Parameter(torch.zeros(h))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(h, n, bias=False)
        self.router_norm = RMSNorm(h, cfg.rms_norm_eps)

    def router(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.modality_router(self.router_norm(x) * self.router_scale))

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        modalities = self.router(streams[self.active])  # [B,T,n]
        coefs = self.prediction_coefs(modalities).reshape(*modalities.shape[:-1], self.n, self.n).permute(0, 1, 3, 2)
        predictions = torch.matmul(streams.permute(1, 2, 3, 0), coefs).permute(3, 0, 1, 2)
        return predictions + streams

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        innovation = activated - predictions[self.active]  # [B,T,H]
        coefs = self.correction_coefs(self.router(activated)) + 1.0  # [B,T,n]
        return innovation.unsqueeze(0) * coefs.permute(2, 0, 1).unsqueeze(-1) + predictions


class Laurel(nn.Module):
    """Learned augmented residual: x + norm(right(left(x))), low rank."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.linear_left = nn.Linear(cfg.hidden_size, cfg.laurel_rank, bias=False)
        self.linear_right = nn.Linear(cfg.laurel_rank, cfg.hidden_size, bias=False)
        self.post_laurel_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.correct_scale = cfg.altup_correct_scale
        self.active = cfg.altup_active_idx
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg, layer)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.altup = AltUp(cfg)
        self.laurel = Laurel(cfg)
        self.per_layer_input_gate = nn.Linear(h, cfg.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = nn.Linear(cfg.hidden_size_per_layer_input, h, bias=False)
        self.post_per_layer_input_norm = RMSNorm(h, eps)

    def forward(self, streams, per_layer_input, cos, sin, mask, input_pos, k_cache, v_cache, ring: bool = False,
                span: int | None = None):
        predictions = self.altup.predict(streams)
        active = predictions[self.active]
        normed = self.input_layernorm(active)
        laurel = self.laurel(normed)
        attn, k_cache, v_cache = self.self_attn(normed, cos, sin, mask, input_pos, k_cache, v_cache, ring, span)
        attn = self.post_attention_layernorm(attn)
        attn_laurel = (active + attn + laurel) / math.sqrt(2)
        ffw = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(attn_laurel)))
        corrected = self.altup.correct(predictions, attn_laurel + ffw)

        # Per-layer embedding injection into the non-active streams.
        first = corrected[self.active]
        if self.correct_scale:
            first = first * self.altup.correct_output_scale
        gated = F.gelu(self.per_layer_input_gate(first), approximate="tanh") * per_layer_input
        injected = self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return torch.cat([corrected[:1], corrected[1:] + injected], dim=0), k_cache, v_cache


class TextDecoder(nn.Module):
    """The text core: everything between the embedding lookups and the logits."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        h, L, P = cfg.hidden_size, cfg.num_layers, cfg.hidden_size_per_layer_input
        self.per_layer_model_projection = nn.Linear(h, L * P, bias=False)
        self.per_layer_projection_norm = RMSNorm(P, cfg.rms_norm_eps)
        self.altup_projections = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(cfg.altup_num_inputs - 1))
        self.altup_unembed_projections = nn.ModuleList(
            nn.Linear(h, h, bias=False) for _ in range(cfg.altup_num_inputs - 1)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(L))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.vocab_size, bias=False)  # tied to embed_tokens in checkpoints
        # Slot of the cache each layer reads (KV-shared layers read their source layer's slot).
        self.cache_slot = [cfg.kv_cache_layers.index(cfg.kv_source_layer(i)) for i in range(L)]
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the RoPE frequency tables; called again after weights are materialised
        on a model that was built on the meta device."""
        cfg = self.cfg
        for name, theta in (("inv_freq_local", cfg.rope_theta_local), ("inv_freq_global", cfg.rope_theta_global)):
            inv_freq = 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
            self.register_buffer(name, inv_freq, persistent=False)

    # -- helpers -------------------------------------------------------------------------
    def _rope_tables(self, input_pos: torch.Tensor, inv_freq: torch.Tensor):
        freqs = input_pos.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    @staticmethod
    def _match_magnitude(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        magnitude = torch.sqrt(torch.clamp(torch.mean(x**2, dim=-1, keepdim=True), min=1e-5))
        return x * target / magnitude

    def _sliding_mask(self, mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        cache_pos = torch.arange(mask.shape[-1], dtype=input_pos.dtype, device=mask.device)
        in_window = cache_pos[None, :] > (input_pos[:, None] - self.cfg.sliding_window)  # [T,C]
        return torch.where(in_window[None, None], mask, torch.full_like(mask, MASK_VALUE))

    def _ring_mask(self, input_pos: torch.Tensor, slots: int) -> torch.Tensor:
        """[1,1,T,R] for a ring of R slots after this call's writes: slot j holds the newest
        position q <= the call's last with q = j (mod R); p attends to it when p - window < q <= p."""
        # The call's slots run from input_pos[0] (a runner may pad input_pos past its real positions
        # with anything: LiteRT-LM pads with zeros), so the last written position is start + T - 1.
        last = input_pos[0] + (input_pos.shape[0] - 1)
        slot = torch.arange(slots, dtype=input_pos.dtype, device=input_pos.device)
        held = last - torch.remainder(last - slot, slots)  # [R]; negative: never written
        p = input_pos[:, None]
        allowed = (held[None, :] >= 0) & (held[None, :] <= p) & (held[None, :] > p - self.cfg.sliding_window)
        return torch.where(allowed, 0.0, MASK_VALUE)[None, None].to(torch.float32)

    # -- forward -------------------------------------------------------------------------
    def forward(
        self,
        embeddings: torch.Tensor,  # [B,T,H], already scaled by sqrt(H)
        per_layer_embeddings: torch.Tensor,  # [B,T,L,P], already scaled by sqrt(P)
        input_pos: torch.Tensor,  # [T] int32, contiguous positions
        mask: torch.Tensor,  # [1,1,T,C] additive
        kv_cache: list[torch.Tensor],  # [k_0, v_0, k_1, v_1, ...] per cache slot
        compute_logits: bool = True,
        span: int | None = None,  # attend over the first `span` positions of the full-length caches
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """`span`: a context bucket. Every position of the call lies below it, so nothing past it
        could be attended to; reading only that prefix makes the full-length (global) layers cost
        what the context in use costs, not the cache's capacity. Rings are read whole."""
        cfg = self.cfg
        B, T, H = embeddings.shape
        kv_cache = list(kv_cache)

        projected = self.per_layer_model_projection(embeddings) * (H**-0.5)
        projected = self.per_layer_projection_norm(projected.reshape(B, T, cfg.num_layers, -1))
        per_layer_inputs = (projected + per_layer_embeddings) * (2.0**-0.5)

        target = torch.mean(embeddings**2, dim=-1, keepdim=True) ** 0.5
        streams = torch.stack(
            [embeddings] + [self._match_magnitude(p(embeddings), target) for p in self.altup_projections]
        )

        rope_local = self._rope_tables(input_pos, self.inv_freq_local)
        rope_global = self._rope_tables(input_pos, self.inv_freq_global)
        sliding_mask = self._sliding_mask(mask, input_pos)
        ring_masks = {}  # ring length -> its mask, built once per call

        for i, layer in enumerate(self.layers):
            cos, sin = rope_local if cfg.is_sliding(i) else rope_global
            slot = self.cache_slot[i]
            slots = kv_cache[2 * slot].shape[2]
            ring = slots != mask.shape[-1]
            if ring:
                if not cfg.is_sliding(i) or slots < cfg.sliding_window + T - 1:
                    raise ValueError(f"layer {i}: a {slots}-slot cache needs a sliding layer and at least "
                                     f"{cfg.sliding_window + T - 1} slots for {T}-position calls")
                if slots not in ring_masks:
                    ring_masks[slots] = self._ring_mask(input_pos, slots)
                layer_mask = ring_masks[slots]
            else:
                layer_mask = sliding_mask if cfg.is_sliding(i) else mask
            streams, kv_cache[2 * slot], kv_cache[2 * slot + 1] = layer(
                streams, per_layer_inputs[:, :, i, :], cos, sin, layer_mask, input_pos,
                kv_cache[2 * slot], kv_cache[2 * slot + 1], ring, None if ring or span is None or span >= slots else span,
            )

        if not compute_logits:
            return None, kv_cache
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        unembedded = [streams[0]] + [
            self._match_magnitude(p(streams[i + 1]), target) for i, p in enumerate(self.altup_unembed_projections)
        ]
        hidden = self.norm(torch.stack(unembedded).mean(dim=0))
        logits = self.lm_head(hidden)
        if cfg.final_logit_softcap is not None:
            logits = torch.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits, kv_cache


def ring_length(cfg: TextConfig, prefill_lengths, cache_len: int) -> int | None:
    """Slots of a sliding layer's ring for calls of up to max(prefill_lengths) positions, or None
    when a ring would be no shorter than the cache."""
    slots = cfg.sliding_window + max([1, *prefill_lengths]) - 1
    return slots if slots < cache_len else None


def kv_slot_lengths(cfg: TextConfig, cache_len: int, ring: int | None = None) -> list[int]:
    """Positions each cache slot holds: `ring` for sliding layers' slots when given, else cache_len."""
    return [ring if ring is not None and cfg.is_sliding(layer) else cache_len for layer in cfg.kv_cache_layers]


def empty_kv_cache(cfg: TextConfig, cache_len: int, batch: int = 1, dtype=torch.float32,
                   ring: int | None = None) -> list[torch.Tensor]:
    """Zeroed cache tensors in slot order: [k_0, v_0, k_1, v_1, ...]; sliding slots hold `ring`
    positions when it is given (see ring_length)."""
    out = []
    for length in kv_slot_lengths(cfg, cache_len, ring):
        out.append(torch.zeros((batch, cfg.num_kv_heads, length, cfg.head_dim), dtype=dtype))
        out.append(torch.zeros((batch, cfg.num_kv_heads, cfg.head_dim, length), dtype=dtype))
    return out


def causal_mask(input_pos: torch.Tensor, cache_len: int) -> torch.Tensor:
    """Full-attention mask [1,1,T,C]: position p attends to cache entries 0..p."""
    allowed = torch.arange(cache_len)[None, :] <= input_pos[:, None].long()
    return torch.where(allowed, 0.0, MASK_VALUE)[None, None].float()


class Gemma3nText(nn.Module):
    """The three text bundles composed: token ids in, logits out (tests and reference runs)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embedder = TokenEmbedder(cfg)
        self.ple = PerLayerEmbedder(cfg)
        self.decoder = TextDecoder(cfg)

    def forward(self, token_ids, input_pos, kv_cache, compute_logits: bool = True):
        mask = causal_mask(input_pos, max(k.shape[2] for k in kv_cache[::2]))
        return self.decoder(
            self.embedder(token_ids), self.ple(token_ids), input_pos.int(), mask, kv_cache, compute_logits
        )
