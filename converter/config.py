"""Gemma 3n configuration: built-in variants and the Hugging Face config.json mapping.

`TextConfig` is the single source of truth for shapes used by the model, the checkpoint
name map and the bundle manifest. It is frozen and JSON-serialisable so it can be stored
in manifest.json and rebuilt by the runtime without transformers. `HF_TEXT_FIELDS` is the one
table between its fields and Gemma3nTextConfig's, read in both directions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from bundle import names
from bundle.errors import CheckpointError, read_json_object

MAX_SIZE = 1 << 24  # no dimension or vocabulary of a Gemma 3n comes near it
SLIDING = "sliding_attention"
FULL = "full_attention"

# Special token ids shared by every Gemma 3n checkpoint (DESIGN.md).
PAD_ID, EOS_ID, BOS_ID, END_OF_TURN_ID = 0, 1, 2, 106


@dataclass(frozen=True)
class HardTokens:
    """Ids [offset, offset + size) are embedded by a modality's own table (embed_vision /
    embed_audio), RMS-normed and projected to the text width, not by embed_tokens."""

    offset: int
    size: int
    width: int
    eps: float = 1e-6


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    vocab_size_per_layer_input: int
    hidden_size: int
    hidden_size_per_layer_input: int
    intermediate_sizes: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_kv_shared_layers: int
    layer_types: tuple[str, ...]
    activation_sparsity: tuple[float, ...]
    sliding_window: int = 512
    rope_theta_local: float = 10_000.0
    rope_theta_global: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    final_logit_softcap: float | None = 30.0
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_correct_scale: bool = True
    laurel_rank: int = 64
    pad_token_id: int = PAD_ID
    bos_token_id: int = BOS_ID
    eos_token_ids: tuple[int, ...] = (EOS_ID, END_OF_TURN_ID)
    vision_tokens: HardTokens | None = None  # None for text-only (Gemma3nForCausalLM) checkpoints
    audio_tokens: HardTokens | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        n = self.num_layers
        sizes = {f: getattr(self, f) for f in ("vocab_size", "vocab_size_per_layer_input", "hidden_size",
                                                "hidden_size_per_layer_input", "num_heads", "num_kv_heads", "head_dim",
                                                "sliding_window", "altup_num_inputs")}
        sizes.update((f"intermediate_sizes[{i}]", v) for i, v in enumerate(self.intermediate_sizes))
        for what, value in sizes.items():  # a Gemma 3n is at most a few 100k wide anywhere
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE:
                raise ValueError(f"{what} must be a whole number from 1 to {MAX_SIZE}, not {value!r}")
        if n == 0 or not 0 <= self.laurel_rank <= MAX_SIZE:
            raise ValueError("the model needs at least one layer and a LAuReL rank from 0 up")
        if not 0 <= self.altup_active_idx < self.altup_num_inputs:
            raise ValueError("altup_active_idx must index one of the AltUp streams")
        if not all(0.0 <= s < 1.0 for s in self.activation_sparsity):
            raise ValueError("activation sparsity values must lie in [0, 1)")
        if len(self.layer_types) != n or len(self.activation_sparsity) != n:
            raise ValueError("layer_types, intermediate_sizes and activation_sparsity need one entry per layer")
        if not set(self.layer_types) <= {SLIDING, FULL}:
            raise ValueError(f"unknown layer types {set(self.layer_types) - {SLIDING, FULL}}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if not 0 <= self.num_kv_shared_layers < n:
            raise ValueError(f"num_kv_shared_layers must be in [0, {n}) for {n} layers, not {self.num_kv_shared_layers}")
        owners = self.layer_types[: self.first_kv_shared_layer]
        missing = set(self.layer_types[self.first_kv_shared_layer :]) - set(owners)
        if missing:
            raise ValueError(f"KV-shared layers of type {missing} have no earlier layer of that type to read from")

    # ---- derived structure -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.intermediate_sizes)

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    def is_kv_shared(self, layer: int) -> bool:
        return layer >= self.first_kv_shared_layer and self.num_kv_shared_layers > 0

    def kv_source_layer(self, layer: int) -> int:
        """The layer whose K/V `layer` attends to: itself, or for a shared layer the last
        non-shared layer of the same attention type."""
        if not self.is_kv_shared(layer):
            return layer
        owners = self.layer_types[: self.first_kv_shared_layer]
        return max(i for i, t in enumerate(owners) if t == self.layer_types[layer])

    @property
    def kv_cache_layers(self) -> tuple[int, ...]:
        """Layers that own a KV cache, in cache-slot order (slot i <-> kv_cache_k_i / kv_cache_v_i)."""
        return tuple(range(self.first_kv_shared_layer))

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    @property
    def per_layer_embed_scale(self) -> float:
        return self.hidden_size_per_layer_input**0.5

    @property
    def per_layer_width(self) -> int:
        return self.num_layers * self.hidden_size_per_layer_input

    # ---- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        tuples = {"intermediate_sizes", "layer_types", "activation_sparsity", "eos_token_ids"}
        d = {k: tuple(v) if k in tuples else v for k, v in d.items()}
        for key in ("vision_tokens", "audio_tokens"):
            if d.get(key) is not None:
                d[key] = HardTokens(**d[key])
        return cls(**d)

    def replace(self, **changes) -> "TextConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class EncoderConfig:
    """One modality encoder (vision or audio): transformers' sub-config, kept as its JSON dict so
    the runtime can read it without transformers, and how its soft tokens enter a prompt."""

    modality: str  # "vision" / "audio"
    hf_config: dict  # Gemma3nVisionConfig / Gemma3nAudioConfig .to_dict()
    text_width: int
    soft_tokens: int  # per image / per clip: 256 / 188
    start_token_id: int  # <start_of_image> / <start_of_audio>
    soft_token_id: int  # <image_soft_token> / <audio_soft_token>, one per soft token
    end_token_id: int  # <end_of_image> / <end_of_audio>
    # Audio: Gemma3nAudioFeatureExtractor's keyword arguments, the front end the encoder computes in-graph.
    feature_extractor: dict | None = None

    @property
    def bundle(self) -> str:
        return names.MODALITY_BUNDLES[self.modality]

    @property
    def parts(self) -> tuple[str, ...]:
        """Every bundle of the modality, the encoder first (names.MODALITY_PARTS)."""
        return names.MODALITY_PARTS[self.modality]


# Gemma3nAudioFeatureExtractor's settings a checkpoint's preprocessor_config.json may give.
FEATURE_EXTRACTOR_KEYS = ("feature_size", "sampling_rate", "frame_length_ms", "hop_length_ms", "min_frequency",
                          "max_frequency", "preemphasis", "preemphasis_htk_flavor", "fft_overdrive", "dither",
                          "input_scale_factor", "mel_floor", "per_bin_mean", "per_bin_stddev")


def audio_feature_extractor(mel_bins: int, preprocessor: dict | None = None) -> dict:
    """The audio front end's settings: transformers' defaults (Gemma 3n's published ones), with
    what the checkpoint's preprocessor_config.json says, if it has one."""
    settings = {"feature_size": mel_bins}
    settings.update({k: v for k, v in (preprocessor or {}).items() if k in FEATURE_EXTRACTOR_KEYS})
    if settings["feature_size"] != mel_bins:
        raise ValueError(f"preprocessor_config.json gives {settings['feature_size']} mel bins, the audio tower takes {mel_bins}")
    return settings


IMAGE_SIZE = 768  # transformers' Gemma 3n image processor resizes every image to 768 x 768


def encoder_configs_from_hf(full, preprocessor: dict | None = None) -> dict[str, EncoderConfig]:
    """The vision / audio encoder configs of a transformers Gemma3nConfig (`preprocessor`: the
    checkpoint's preprocessor_config.json, if any)."""
    text_width = full.get_text_config().hidden_size
    # The sub-configs' transformers bookkeeping (version, label maps) is not part of the model.
    keep = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("transformers_version", "id2label", "label2id", "_name_or_path", "architectures", "dtype")}
    return {
        "vision": EncoderConfig(
            "vision", keep(full.vision_config), text_width, full.vision_soft_tokens_per_image,
            full.boi_token_id, full.image_token_id, full.eoi_token_id,
        ),
        "audio": EncoderConfig(
            "audio", keep(full.audio_config), text_width, full.audio_soft_tokens_per_image,
            full.boa_token_id, full.audio_token_id, full.eoa_token_id,
            audio_feature_extractor(full.audio_config.input_feat_size, preprocessor),
        ),
    }


def variant_encoders(name: str) -> dict[str, EncoderConfig]:
    """The encoders of a built-in variant: transformers' defaults are the published E2B / E4B
    towers (MobileNet-V5-300M, the 12-layer USM conformer); the tiny variant's are tiny."""
    from transformers import Gemma3nConfig

    if name == "tiny":
        return encoder_configs_from_hf(Gemma3nConfig(**tiny_multimodal_hf_config(tiny_config())))
    return encoder_configs_from_hf(Gemma3nConfig(text_config=dict(hidden_size=variant_config(name).hidden_size)))


def _default_layer_types(num_layers: int) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % 5 == 0 else SLIDING for i in range(num_layers))


def _real_variant(name: str, num_layers: int, ffn: int, num_kv_shared: int) -> TextConfig:
    return TextConfig(
        name=name,
        vocab_size=262_400,
        vocab_size_per_layer_input=262_144,
        hidden_size=2048,
        hidden_size_per_layer_input=256,
        intermediate_sizes=(ffn,) * num_layers,
        num_heads=8,
        num_kv_heads=2,
        head_dim=256,
        num_kv_shared_layers=num_kv_shared,
        layer_types=_default_layer_types(num_layers),
        activation_sparsity=(0.95,) * 10 + (0.0,) * (num_layers - 10),
        vision_tokens=HardTokens(offset=262_144, size=128, width=2048),
        audio_tokens=HardTokens(offset=262_272, size=128, width=1536),
    )


def tiny_config() -> TextConfig:
    """A few-layer model that still exercises every mechanism: both attention types in the
    KV-shared region, a sliding window shorter than test prompts, activation sparsity."""
    return TextConfig(
        name="tiny",
        vocab_size=528,  # 512 text + 8 vision + 8 audio ids, as in the real layout
        vocab_size_per_layer_input=512,
        hidden_size=64,
        hidden_size_per_layer_input=32,  # PLE rows 7 x 32: divisible by int4's 32-wide blocks
        intermediate_sizes=(128, 128, 96, 128, 128, 128, 96),
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        num_kv_shared_layers=3,
        # slots 0..3 own caches; 4 (full), 5 (sliding) and 6 (full) read layer 3 / 2 / 3.
        layer_types=(SLIDING, SLIDING, SLIDING, FULL, FULL, SLIDING, FULL),
        activation_sparsity=(0.95, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0),
        sliding_window=8,
        laurel_rank=4,
        vision_tokens=HardTokens(offset=512, size=8, width=2048),
        audio_tokens=HardTokens(offset=520, size=8, width=32),
    )


# The tiny variant's multimodal layout: 8 vision and 8 audio ids after the 512 text ids, as in the
# real 262144 + 128 + 128 layout; <start_of_image> / <start_of_audio> are text pieces 7 and 8.
TINY_MODALITY_VOCAB = 8
TINY_START_OF_IMAGE, TINY_START_OF_AUDIO = 7, 8


def tiny_multimodal_hf_config(cfg: TextConfig) -> dict:
    """Gemma3nConfig keyword arguments: `cfg` as the text model, with tiny MobileNet-V5 and USM
    towers and the multimodal token ids laid out as in the real vocabulary."""
    v, m = cfg.vocab_size_per_layer_input, TINY_MODALITY_VOCAB
    return dict(
        text_config=text_config_to_hf(cfg),
        vision_config=dict(
            hidden_size=2048,  # timm's MobileNet-V5 MSFA output width is fixed at 2048
            vocab_size=m,
            vocab_offset=v,
            model_args={"channel_multiplier": 0.03125, "msfa_output_resolution": 2},
        ),
        audio_config=dict(
            input_feat_size=128, hidden_size=32, conf_num_attention_heads=4, conf_num_hidden_layers=1,
            sscp_conv_channel_size=[16, 8], conf_conv_kernel_size=3, conf_attention_chunk_size=4,
            conf_attention_context_left=5, vocab_size=m, vocab_offset=v + m,
        ),
        vision_soft_tokens_per_image=4,
        audio_soft_tokens_per_image=4,
        boi_token_id=TINY_START_OF_IMAGE,
        boa_token_id=TINY_START_OF_AUDIO,
        eoi_token_id=v,
        image_token_id=v + 1,
        eoa_token_id=v + m,
        audio_token_id=v + m + 1,
    )


VARIANTS = {
    "tiny": tiny_config,
    "e2b": lambda: _real_variant("e2b", num_layers=30, ffn=8192, num_kv_shared=10),
    "e4b": lambda: _real_variant("e4b", num_layers=35, ffn=16384, num_kv_shared=15),
}


def variant_config(name: str) -> TextConfig:
    try:
        return VARIANTS[name]()
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}") from None


# TextConfig field -> Gemma3nTextConfig attribute, for the fields that map one to one (tuples are
# lists there). The rest is mapped below by hand: RoPE thetas (rope_parameters), the layer count
# (from intermediate_sizes), the token ids (defaults, eos as a list) and the hard-token tables.
HF_TEXT_FIELDS = {
    "vocab_size": "vocab_size",
    "vocab_size_per_layer_input": "vocab_size_per_layer_input",
    "hidden_size": "hidden_size",
    "hidden_size_per_layer_input": "hidden_size_per_layer_input",
    "intermediate_sizes": "intermediate_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "num_kv_shared_layers": "num_kv_shared_layers",
    "layer_types": "layer_types",
    "activation_sparsity": "activation_sparsity_pattern",
    "sliding_window": "sliding_window",
    "rms_norm_eps": "rms_norm_eps",
    "final_logit_softcap": "final_logit_softcapping",
    "altup_num_inputs": "altup_num_inputs",
    "altup_active_idx": "altup_active_idx",
    "altup_correct_scale": "altup_correct_scale",
    "laurel_rank": "laurel_rank",
}
_TUPLE_FIELDS = {"intermediate_sizes", "layer_types", "activation_sparsity"}


def text_config_to_hf(cfg: TextConfig) -> dict:
    """`cfg` as Gemma3nTextConfig keyword arguments."""
    hf = {theirs: list(getattr(cfg, ours)) if ours in _TUPLE_FIELDS else getattr(cfg, ours)
          for ours, theirs in HF_TEXT_FIELDS.items()}
    return dict(
        hf,
        num_hidden_layers=cfg.num_layers,
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": cfg.rope_theta_local},
            FULL: {"rope_type": "default", "rope_theta": cfg.rope_theta_global},
        },
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_ids[0],
        bos_token_id=cfg.bos_token_id,
    )


def text_config_from_hf(hf: dict, name: str = "custom") -> TextConfig:
    """Build a TextConfig from a parsed Hugging Face config.json (Gemma3nConfig or Gemma3nTextConfig).

    transformers' own config classes do the parsing so that every historical spelling
    (rope_theta / rope_local_base_freq vs rope_parameters, int vs per-layer intermediate_size)
    is handled exactly as the reference model handles it.
    """
    from transformers import Gemma3nConfig, Gemma3nTextConfig

    model_type = hf.get("model_type")
    vision_tokens = audio_tokens = None
    try:
        if model_type == "gemma3n":
            full = Gemma3nConfig.from_dict(hf)
            text = full.get_text_config()
            vision_tokens, audio_tokens = (
                HardTokens(offset=c.vocab_offset, size=c.vocab_size, width=c.hidden_size, eps=c.rms_norm_eps)
                for c in (full.vision_config, full.audio_config)
            )
        elif model_type == "gemma3n_text":
            text = Gemma3nTextConfig.from_dict(hf)
        else:
            raise CheckpointError(
                f"config.json has model_type {model_type!r}; g3n converts Gemma 3n checkpoints "
                "(model_type 'gemma3n' or 'gemma3n_text')"
            )
    except CheckpointError:
        raise
    except Exception as exc:  # transformers raises many types for malformed configs
        raise CheckpointError(f"config.json is not a valid Gemma 3n config: {' '.join(str(exc).split())}") from exc

    eos = text.eos_token_id if isinstance(text.eos_token_id, list) else [text.eos_token_id]
    rope = text.rope_parameters
    for layer_type in (SLIDING, FULL):
        if rope[layer_type].get("rope_type", "default") != "default":
            raise CheckpointError(f"unsupported RoPE type {rope[layer_type]['rope_type']!r} for {layer_type}")
    if text.hidden_activation != "gelu_pytorch_tanh":
        raise CheckpointError(f"unsupported hidden_activation {text.hidden_activation!r}")
    try:
        fields = {ours: tuple(getattr(text, theirs)) if ours in _TUPLE_FIELDS else getattr(text, theirs)
                  for ours, theirs in HF_TEXT_FIELDS.items()}
        fields["activation_sparsity"] = tuple(float(s) for s in fields["activation_sparsity"])
        return TextConfig(
            name=name,
            **fields,
            rope_theta_local=float(rope[SLIDING]["rope_theta"]),
            rope_theta_global=float(rope[FULL]["rope_theta"]),
            pad_token_id=text.pad_token_id if text.pad_token_id is not None else PAD_ID,
            bos_token_id=text.bos_token_id if text.bos_token_id is not None else BOS_ID,
            eos_token_ids=tuple(dict.fromkeys([*eos, END_OF_TURN_ID])),
            vision_tokens=vision_tokens,
            audio_tokens=audio_tokens,
        )
    except (TypeError, ValueError, OverflowError) as exc:  # a field of the wrong type or out of range
        raise CheckpointError(f"config.json does not describe a Gemma 3n model g3n can build: {exc}") from exc


def load_hf_config(checkpoint_dir: Path) -> tuple[dict, TextConfig]:
    hf = read_json_object(
        Path(checkpoint_dir) / "config.json", CheckpointError, "is it a Hugging Face checkpoint folder?"
    )
    return hf, text_config_from_hf(hf, name=Path(checkpoint_dir).name)


def gaussian_topk_multiplier(sparsity: float) -> float:
    """z such that P(N(0,1) < z) = sparsity, computed in float32 exactly as the reference does."""
    import torch

    with torch.device("cpu"):  # also when the model is being built on the meta device
        z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(sparsity, dtype=torch.float32))
    return float(z)

