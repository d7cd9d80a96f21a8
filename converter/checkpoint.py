"""Weights for the text bundles: a strict Hugging Face safetensors reader, or seeded random weights.

Both sources answer `tensor(name)` for our parameter names ("decoder.layers.3.mlp.up_proj.weight"),
so a bundle materialises only the weights it owns, one tensor at a time.

Safety: only safetensors are ever opened. Pickle-based files (.bin/.pt/...) are refused, never
unpickled. The name map below is the single declaration of how Hugging Face names map to ours;
opening a checkpoint fails, naming every tensor, if anything is missing, unmapped or misshapen.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from converter.config import TextConfig
from bundle.errors import CheckpointError
from bundle.names import AUDIO_ADAPTER

FLOAT16_MAX = 65504.0


class CheckpointWarning(UserWarning):
    """A checkpoint that converts, but holds something a healthy one does not."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# Language-model prefixes: Gemma3nForConditionalGeneration, then Gemma3nForCausalLM / TextModel.
LM_PREFIXES = ("model.language_model.", "model.", "")

# --- The name map: our name -> Hugging Face name (relative to the language-model prefix). ---
GLOBAL_TENSORS = {
    "embedder.embed_tokens.weight": "embed_tokens.weight",
    "ple.embed_tokens_per_layer.weight": "embed_tokens_per_layer.weight",
    "decoder.per_layer_model_projection.weight": "per_layer_model_projection.weight",
    "decoder.per_layer_projection_norm.weight": "per_layer_projection_norm.weight",
    "decoder.norm.weight": "norm.weight",
    "decoder.lm_head.weight": "embed_tokens.weight",  # tied; an explicit lm_head.weight wins
}
# Hard-token embedders of the multimodal checkpoint (outside the language-model prefix).
HARD_TOKEN_TENSORS = ("embedding.weight", "hard_embedding_norm.weight", "embedding_projection.weight")
ALTUP_PROJECTIONS = ("altup_projections.{j}.weight", "altup_unembed_projections.{j}.weight")
LAYER_TENSORS = (
    "self_attn.q_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight",
    "altup.correct_output_scale",
    "altup.correction_coefs.weight",
    "altup.prediction_coefs.weight",
    "altup.modality_router.weight",
    "altup.router_norm.weight",
    "laurel.linear_left.weight",
    "laurel.linear_right.weight",
    "laurel.post_laurel_norm.weight",
    "per_layer_input_gate.weight",
    "per_layer_projection.weight",
    "post_per_layer_input_norm.weight",
)
KV_OWNER_TENSORS = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight")

# Present in checkpoints but not part of the text bundles. Shared layers' K/V weights are
# never used (those layers read another layer's cache); encoders belong to their own bundles.
IGNORED_PATTERNS = (
    r"^model\.(vision_tower|audio_tower)\.",
    r"^model\.embed_(vision|audio)\.soft_embedding_norm\.weight$",  # encoder bundles' soft-token path
    r"^lm_head\.weight$",
)


# Where each encoder module's parameters live in a checkpoint (our prefix -> Hugging Face prefix).
ENCODER_PREFIXES = {
    "vision": {"vision_encoder.tower.": "model.vision_tower.timm_model.", "vision_encoder.embed.": "model.embed_vision."},
    "audio": {"audio_encoder.tower.": "model.audio_tower.", "audio_adapter.embed.": "model.embed_audio."},
}


def encoder_name_map(modality: str, names: Iterable[str]) -> dict[str, str]:
    """Our encoder parameter name -> its absolute Hugging Face name."""
    out = {}
    for name in names:
        ours = next(p for p in ENCODER_PREFIXES[modality] if name.startswith(p))
        out[name] = ENCODER_PREFIXES[modality][ours] + name[len(ours):]
    return out


def text_name_map(cfg: TextConfig) -> dict[str, str]:
    """Our name -> Hugging Face name relative to the language-model prefix; hard-token
    embedder names start with "/" because they are absolute (model.embed_vision.*)."""
    names = dict(GLOBAL_TENSORS)
    for modality, tokens in (("vision", cfg.vision_tokens), ("audio", cfg.audio_tokens)):
        if tokens is not None:
            for t in HARD_TOKEN_TENSORS:
                names[f"embedder.embed_{modality}.{t}"] = f"/model.embed_{modality}.{t}"
    for j in range(cfg.altup_num_inputs - 1):
        for template in ALTUP_PROJECTIONS:
            names[f"decoder.{template.format(j=j)}"] = template.format(j=j)
    for i in range(cfg.num_layers):
        owned = LAYER_TENSORS + (KV_OWNER_TENSORS if not cfg.is_kv_shared(i) else ())
        for t in owned:
            names[f"decoder.layers.{i}.{t}"] = f"layers.{i}.{t}"
    return names


def shared_kv_names(cfg: TextConfig) -> set[str]:
    return {f"layers.{i}.{t}" for i in range(cfg.num_layers) if cfg.is_kv_shared(i) for t in KV_OWNER_TENSORS}


def _fmt(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class SafetensorsCheckpoint:
    """A Hugging Face checkpoint folder, memory-mapped, validated against `cfg` on open."""

    def __init__(self, folder: Path, cfg: TextConfig, expected_shapes: dict[str, tuple[int, ...]]):
        """`expected_shapes` names every tensor to map: the text modules' and, for the encoders to
        convert, theirs ("vision_encoder.*", "audio_encoder.*"); other encoder tensors are skipped."""
        self.folder = Path(folder)
        self.cfg = cfg
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise CheckpointError(
                    f"{folder} holds only pickle weights ({_fmt(pickles)}); g3n never unpickles files. "
                    "Re-save the model with save_pretrained(..., safe_serialization=True)"
                )
            raise CheckpointError(f"{folder} has no *.safetensors weight files")
        self.files = files
        self._warned: set[str] = set()
        self._handles = {}
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
                keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{f.name} is not a readable safetensors file ({exc})") from exc
            self._handles[f] = handle
            for k in keys:
                self._where[k] = f

        self.prefix = next(
            (p for p in LM_PREFIXES if f"{p}embed_tokens.weight" in self._where),
            None,
        )
        if self.prefix is None:
            raise CheckpointError(
                f"{folder} has no embed_tokens.weight under any of {LM_PREFIXES}; "
                "is this a Gemma 3n checkpoint?"
            )
        self.name_map = {
            ours: hf[1:] if hf.startswith("/") else self.prefix + hf for ours, hf in text_name_map(cfg).items()
        }
        if "lm_head.weight" in self._where:
            self.name_map["decoder.lm_head.weight"] = "lm_head.weight"
        self.encoders = set()
        for modality in ENCODER_PREFIXES:
            names = [n for n in expected_shapes if n.startswith(tuple(ENCODER_PREFIXES[modality]))]
            if names:
                self.encoders.add(modality)
                self.name_map.update(encoder_name_map(modality, names))
        self._validate(expected_shapes)

    def _validate(self, expected_shapes: dict[str, tuple[int, ...]]) -> None:
        mapped = set(self.name_map.values())
        shared = {self.prefix + n for n in shared_kv_names(self.cfg)}
        missing = {hf for hf in mapped if hf not in self._where}
        # An encoder being converted is checked as strictly as the text model: none of its tensors skipped.
        converted = tuple(hf for m in self.encoders for hf in ENCODER_PREFIXES[m].values() if "tower" in hf)
        unmapped = {
            k
            for k in self._where
            if k not in mapped and k not in shared
            and (k.startswith(converted) or not any(re.search(p, k) for p in IGNORED_PATTERNS))
        }
        problems = []
        if missing:
            problems.append(f"missing tensors: {_fmt(missing)}")
        if unmapped:
            problems.append(f"unexpected tensors (not in the Gemma 3n name map): {_fmt(unmapped)}")
        bad_shapes = []
        for ours, hf in self.name_map.items():
            if hf in missing:
                continue
            shape = tuple(self._handles[self._where[hf]].get_slice(hf).get_shape())
            if shape != expected_shapes[ours]:
                bad_shapes.append(f"{hf} is {list(shape)}, config needs {list(expected_shapes[ours])}")
        if bad_shapes:
            problems.append("shape mismatch: " + "; ".join(bad_shapes[:10]))
        if problems:
            raise CheckpointError(f"{self.folder} does not match its config.json: " + " | ".join(problems))

    def tensor(self, name: str) -> torch.Tensor:
        hf = self.name_map[name]
        try:
            values = self._handles[self._where[hf]].get_tensor(hf).to(torch.float32)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {hf} from {self._where[hf].name}: {exc}") from exc
        self._check_values(hf, values.numpy())
        return values

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a weight as float32: a big table is read a slice at a time."""
        hf = self.name_map[name]
        try:
            rows = self._handles[self._where[hf]].get_slice(hf)[start:stop]
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {hf} from {self._where[hf].name}: {exc}") from exc
        rows = rows.to(torch.float32).numpy()
        self._check_values(hf, rows, start)
        return rows

    def _check_values(self, hf: str, values: np.ndarray, first_row: int = 0) -> None:
        """Refuse NaN / Inf (a broken checkpoint converts into a bundle that outputs garbage);
        warn once per tensor on values past float16's range, which no trained weight reaches."""
        finite = np.isfinite(values)
        if not finite.all():
            row = first_row + int(np.argwhere(~finite)[0][0]) if values.ndim else 0
            raise CheckpointError(f"{hf} in {self._where[hf].name} holds NaN or infinite values (first in row {row}); "
                                  "the checkpoint is damaged: re-download or re-save it")
        if values.size and hf not in self._warned and float(np.abs(values).max()) > FLOAT16_MAX:
            self._warned.add(hf)
            warnings.warn(f"{hf} holds values up to {float(np.abs(values).max()):.3g}, beyond float16's range; "
                          "the checkpoint may be damaged", CheckpointWarning, stacklevel=2)

    def fingerprint(self) -> str:
        """sha256 over the safetensors files and config.json: identifies the source in manifests."""
        digest = hashlib.sha256()
        for f in [*self.files, self.folder / "config.json"]:
            digest.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
        return digest.hexdigest()


# The norms that close each residual branch. Trained transformers add small updates to the
# residual stream; a random network whose every branch is as loud as the stream is chaotic, and any
# rounding (int8 included) flips its argmax, too unlike a real checkpoint to judge quantization by.
RESIDUAL_BRANCH_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm", "post_per_layer_input_norm", "post_laurel_norm")
RESIDUAL_BRANCH_GAIN = 0.2


class RandomWeights:
    """Deterministic random weights at any scale. Each tensor is drawn in blocks of rows, each block
    from its own generator seeded by (seed, name, block), so bundles can be built independently, in
    any order, and a 2 GB table a slice at a time. The lm_head is tied to embed_tokens, as in the
    checkpoints."""

    BLOCK_ELEMENTS = 1 << 22

    def __init__(self, cfg: TextConfig, seed: int, expected_shapes: dict[str, tuple[int, ...]]):
        self.cfg, self.seed, self.shapes = cfg, seed, expected_shapes

    def _block(self, name: str, index: int, rows: int, row_shape: tuple[int, ...]) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}:{name}:{index}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        values = torch.randn((rows, *row_shape), generator=gen)
        if any(norm in name for norm in RESIDUAL_BRANCH_NORMS):
            return RESIDUAL_BRANCH_GAIN * (1.0 + 0.1 * values)
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * values
        return values * (0.02 if row_shape else 0.1)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        if name == "decoder.lm_head.weight":
            name = "embedder.embed_tokens.weight"
        shape = self.shapes[name]
        row_shape = tuple(shape[1:])
        per_block = max(1, self.BLOCK_ELEMENTS // max(1, math.prod(row_shape)))
        first, last = start // per_block, (stop - 1) // per_block
        blocks = [
            self._block(name, b, min(per_block, shape[0] - b * per_block), row_shape) for b in range(first, last + 1)
        ]
        offset = start - first * per_block
        return torch.cat(blocks)[offset:offset + stop - start].numpy()

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.read_rows(name, 0, self.shapes[name][0]))

    def fingerprint(self) -> str:
        return f"random-weights:seed={self.seed}"


def expected_shapes(cfg: TextConfig, encoders: Iterable = ()) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter of the three text modules and of the given encoders
    (EncoderConfigs), computed on the meta device (no memory)."""
    from converter.encoders import build_adapter, build_encoder
    from converter.model import Gemma3nText

    with torch.device("meta"):
        model = Gemma3nText(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for enc in encoders:
        shapes.update({f"{enc.bundle}.{n}": tuple(p.shape) for n, p in build_encoder(enc).named_parameters()})
        adapter = build_adapter(enc)
        if adapter is not None:
            shapes.update({f"{AUDIO_ADAPTER}.{n}": tuple(p.shape) for n, p in adapter.named_parameters()})
    return shapes


def materialize(module: nn.Module, prefix: str, source) -> nn.Module:
    """Fill a module built on the meta device with weights from `source`, tensor by tensor."""
    state = {name: source.tensor(f"{prefix}{name}") for name, _ in module.named_parameters()}
    module.load_state_dict(state, strict=True, assign=True)
    return init_buffers(module).eval()


def init_buffers(module: nn.Module) -> nn.Module:
    """Compute the non-persistent buffers (RoPE frequencies) that meta-device construction skipped."""
    for sub in module.modules():
        if hasattr(sub, "init_buffers"):
            sub.init_buffers()
    return module


def load_text_model(folder: Path):
    """Our PyTorch Gemma 3n text model (embedder + PLE + decoder) from a Hugging Face folder."""
    from converter.config import load_hf_config
    from converter.model import Gemma3nText

    _, cfg = load_hf_config(folder)
    with torch.device("meta"):
        model = Gemma3nText(cfg)
    return materialize(model, "", SafetensorsCheckpoint(folder, cfg, expected_shapes(cfg)))
