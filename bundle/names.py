"""Every name of the bundle contract, defined once: bundle files, signatures, tensors.

The converter writes these names into the .tflite files and manifest.json; the runtime, the
packers and the device harness read them back. They follow Google's LiteRT-LM conventions, so a
folder can be packed into a .litertlm without renaming anything.
"""

from __future__ import annotations

# ---- bundles (manifest "bundles" keys) and files ------------------------------------------------
EMBEDDER = "embedder"
PLE = "ple"
TEXT_CORE = "text_core"
VISION_ENCODER = "vision_encoder"
AUDIO_ENCODER = "audio_encoder"
AUDIO_ADAPTER = "audio_adapter"  # the audio encoder's features -> text-width soft-token embeddings
# One constant each: the embedding of <end_of_image> / <end_of_audio>, for runners (LiteRT-LM)
# that place it from a model rather than from the token embedder.
END_OF_VISION = "end_of_vision"
END_OF_AUDIO = "end_of_audio"

TEXT_BUNDLES = (EMBEDDER, PLE, TEXT_CORE)  # every prompt needs these three (conversion order)
ENCODER_BUNDLES = (VISION_ENCODER, AUDIO_ENCODER)  # what --bundles names; loaded only for image / audio prompts

# Manifest "encoders" keys (a modality), the encoder bundle each one names, and every bundle the
# modality brings (the encoder first): converting an encoder converts its companions too.
MODALITY_BUNDLES = {"vision": VISION_ENCODER, "audio": AUDIO_ENCODER}
MODALITY_PARTS = {"vision": (VISION_ENCODER, END_OF_VISION), "audio": (AUDIO_ENCODER, AUDIO_ADAPTER, END_OF_AUDIO)}
MEDIA_BUNDLES = tuple(b for parts in MODALITY_PARTS.values() for b in parts)
ALL_BUNDLES = TEXT_BUNDLES + MEDIA_BUNDLES

MANIFEST = "manifest.json"
LITERTLM_SUFFIX = ".litertlm"  # LiteRT-LM's one-file form of a bundle (bundle/litertlm.py)
TOKENIZER = "tokenizer"  # manifest "files" key
TOKENIZER_FILE = "tokenizer.model"  # the checkpoint's SentencePiece model, copied as is


def bundle_file(bundle: str) -> str:
    return f"{bundle}.tflite"


# ---- signatures ----------------------------------------------------------------------------------
DECODE = "decode"  # text core, one token: logits + cache


def prefill(length: int) -> str:
    """Text core, `length` tokens: cache only."""
    return f"prefill_{length}"


# Context buckets: the same calls attending over the caches' first `span` positions only, for
# calls whose positions all lie below `span` (converter/model.py TextDecoder). Named so that
# LiteRT-LM, which picks its signatures by the "prefill" prefix and the exact name "decode",
# leaves them alone.
def span_step(span: int) -> str:
    """Text core, one token within the first `span` positions: logits + cache (decode's twin)."""
    return f"context_{span}_step"


def span_fill(span: int, length: int) -> str:
    """Text core, `length` tokens within the first `span` positions: cache only (prefill's twin)."""
    return f"context_{span}_fill_{length}"


_LOOKUP_STEMS = {EMBEDDER: "embedder", PLE: "per_layer_embedder"}


def lookup_signature(bundle: str, length: int | None = None) -> str:
    """The embedder's / PLE's signature for `length` tokens; None for the single-token one
    (decode_embedder / decode_per_layer_embedder), which LiteRT-LM's CPU executor expects first."""
    stem = _LOOKUP_STEMS[bundle]
    return f"decode_{stem}" if length is None else f"prefill_{stem}_{length}"


def encoder_signature(bundle: str) -> str:
    """An encoder bundle has one signature, named after the bundle."""
    return bundle


# ---- tensors -------------------------------------------------------------------------------------
TOKEN_IDS = "token_ids"  # lookups: [1, N] int32
EMBEDDINGS = "embeddings"  # lookups, encoders and the text core's input: [1, N, H] (PLE: [1, N, L, P])
PER_LAYER_EMBEDDINGS = "per_layer_embeddings"
INPUT_POS = "input_pos"
MASK = "mask"  # text core: [1, 1, N, C] float; audio encoder / adapter: [1, F] / [1, N] uint8, 1 = real
LOGITS = "logits"
IMAGES = "images"
AUDIO = "audio"  # audio encoder: [1, F, frame_length] float32, 16 kHz samples in [-1, 1], frame k from sample k * hop
FEATURES = "features"  # audio encoder -> adapter: [1, N, D] float32
TEXT_CORE_INPUTS = (EMBEDDINGS, PER_LAYER_EMBEDDINGS, INPUT_POS, MASK)  # besides the cache

KV_CACHE_PREFIX = "kv_cache_"
KV_KINDS = ("k", "v")


def kv_cache(kind: str, slot: int) -> str:
    """The cache tensor of cache slot `slot` (the slot-th cache-owning layer), kind "k" or "v"."""
    return f"{KV_CACHE_PREFIX}{kind}_{slot}"


def kv_cache_names(slots: int) -> list[str]:
    """k_0, v_0, k_1, v_1, ...: the order the text core takes and returns its cache in."""
    return [kv_cache(kind, i) for i in range(slots) for kind in KV_KINDS]


# Layouts of the cache tensors (manifest "kv_cache_layout"), and the mask's values.
KV_CACHE_LAYOUT = {"k": "[1, kv_heads, cache_length, head_dim]", "v": "[1, kv_heads, head_dim, cache_length]",
                   "sliding": "a sliding-window layer's cache holds sliding_cache_length positions when the manifest "
                              "gives one: a ring, position p at slot p mod sliding_cache_length"}
MASK_ATTEND = 0.0
MASK_BLOCKED = -1e9  # finite, so that fp16 accelerators and softmax never see inf - inf
