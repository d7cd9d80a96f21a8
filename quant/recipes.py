"""Quantization plans for g3n bundles, as ai-edge-quantizer recipes.

The bundle writer (quant/streaming.py) carries a plan out while it streams the weights;
`quantize_file` runs the same recipe through ai-edge-quantizer itself, the reference the tests
hold the writer to.

ai-edge-quantizer's per-operation recipes let the embedding tables (EMBEDDING_LOOKUP) and the
linear layers (FULLY_CONNECTED) get different schemes; litert-torch's convert-time quant_config
cannot tell them apart on our modules. Only *dynamic-range* recipes are used: the kernels then
read int8 / int4 weights directly, whereas weight-only recipes insert a DEQUANTIZE of the whole
table (fatal for the 2 GB PLE table).

Blockwise int4 needs the block to divide each weight's quantized (input / row) dimension. Where
it does not (AltUp's 4-wide coefficient layers in every variant; LAuReL's 64-wide layer at block
128/256), that layer falls back to per-channel int8; an embedding table falls back to the largest
block that divides its rows. The bundle's manifest entry records every such fallback.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bundle import names
from bundle.errors import ExportError

SCHEMES = ("none", "int8", "int4")
BLOCK_SIZES = (32, 64, 128, 256)  # what ai-edge-quantizer's blockwise granularity offers

# Which ops carry a bundle's weights (everything else in the graph stays float).
BUNDLE_OPS = {
    names.EMBEDDER: ("EMBEDDING_LOOKUP", "FULLY_CONNECTED"),  # + the hard-token projections
    names.PLE: ("EMBEDDING_LOOKUP",),
    names.TEXT_CORE: ("FULLY_CONNECTED",),
    names.VISION_ENCODER: ("CONV_2D", "FULLY_CONNECTED"),  # MobileNet-V5's weights are mostly 1x1 convolutions
    names.AUDIO_ENCODER: ("FULLY_CONNECTED",),  # the conformer's projections and feed-forwards
    names.AUDIO_ADAPTER: ("FULLY_CONNECTED",),  # embed_audio's projection
    names.END_OF_VISION: (),  # a constant embedding
    names.END_OF_AUDIO: (),
}

# Op scopes (output tensor names, as ai-edge-quantizer matches them) whose weights stay float
# under any scheme: the audio front end's DFT and mel matrices are transformers' feature
# extractor, exact constants rather than learned weights.
FLOAT_SCOPES = {names.AUDIO_ENCODER: ("AudioFrontEnd",)}

# A companion bundle takes its encoder's scheme (--quant-audio covers the adapter too).
SCHEME_OWNER = {names.AUDIO_ADAPTER: names.AUDIO_ENCODER}


def bundle_scheme(bundle: str, default: str, overrides: dict[str, str] | None = None) -> str:
    """The scheme a bundle gets: its own override, else the default (int4 -> int8 for the conv /
    conformer encoders, which int4 costs too much). The end-of-media constants stay float."""
    if not BUNDLE_OPS[bundle]:
        return "none"
    owner = SCHEME_OWNER.get(bundle, bundle)
    if overrides and overrides.get(owner):
        return overrides[owner]
    if owner in names.ENCODER_BUNDLES and default == "int4":
        return "int8"
    return default


def _weight_rule(operation: str, bits: int, granularity: str, regex: str = ".*") -> dict:
    return {
        "regex": regex,
        "operation": operation,
        "algorithm_key": "min_max_uniform_quantize",
        "op_config": {
            "weight_tensor_config": {"num_bits": bits, "symmetric": True, "granularity": granularity, "dtype": "INT"},
            "compute_precision": "INTEGER",  # dynamic range: activations stay float, weights stay quantized
            "explicit_dequantize": False,
            "skip_checks": False,
            "min_weight_elements": 0,
        },
    }


@dataclass(frozen=True)
class BundleQuant:
    """How one bundle is quantized, and the ai-edge-quantizer recipe that does it."""

    bundle: str
    scheme: str  # none / int8 / int4
    block_size: int | None = None  # int4: block of the linear layers (along their input dim)
    table_block_size: int | None = None  # int4: block of the embedding tables (None: int8 fallback)
    int8_linears: tuple[str, ...] = field(default_factory=tuple)  # layers whose input width the block does not divide

    def storage(self, op: str, width: int) -> tuple[int, int | None]:
        """How a weight feeding `op`, whose quantized (input / row) dimension is `width`, is
        stored: (bits, int4 block). The one place the per-tensor int4-or-int8 choice is made."""
        if self.scheme == "none" or op not in BUNDLE_OPS[self.bundle]:
            return 32, None
        if self.scheme == "int4" and op != "CONV_2D":
            block = self.table_block_size if op == "EMBEDDING_LOOKUP" else self.block_size
            if block and width % block == 0:
                return 4, block
        return 8, None  # int8, or an int4 layer / table whose width the block does not divide

    @property
    def float_scopes(self) -> tuple[str, ...]:
        return FLOAT_SCOPES.get(self.bundle, ())

    def keeps_float(self, scope: str) -> bool:
        """Whether the op with this scope (its output tensor names) keeps a float weight."""
        return any(re.search(pattern, scope) for pattern in self.float_scopes)

    def recipe(self) -> list[dict]:
        if self.scheme == "none":
            return []
        # Later rules win in ai-edge-quantizer: the float scopes come last.
        keep_float = [{"regex": pattern, "operation": "*", "algorithm_key": "no_quantize", "op_config": {}}
                      for pattern in self.float_scopes]
        if self.scheme == "int8":
            return [_weight_rule(op, 8, "CHANNELWISE") for op in BUNDLE_OPS[self.bundle]] + keep_float
        rules = []
        for op in BUNDLE_OPS[self.bundle]:
            block = self.table_block_size if op == "EMBEDDING_LOOKUP" else None if op == "CONV_2D" else self.block_size
            rules.append(_weight_rule(op, 4, f"BLOCKWISE_{block}") if block else _weight_rule(op, 8, "CHANNELWISE"))
        # Later rules win in ai-edge-quantizer; op scope names end in "Linear_<attribute name>".
        rules += [
            _weight_rule("FULLY_CONNECTED", 8, "CHANNELWISE", rf"Linear_{re.escape(name)}(?![A-Za-z0-9_])")
            for name in self.int8_linears
        ]
        return rules + keep_float

    def to_manifest(self) -> dict:
        if self.scheme == "none":
            return {"scheme": "float32"}
        entry = {"scheme": self.scheme, "activations": "float32 (dynamic range)"}
        if self.scheme == "int8":
            entry["granularity"] = "per-channel"
        else:
            entry.update(granularity="blockwise", block_size=self.block_size)
            if "EMBEDDING_LOOKUP" in BUNDLE_OPS[self.bundle]:
                entry["table_block_size"] = self.table_block_size  # null: tables fell back to int8
            if self.int8_linears:
                entry["int8_fallback_layers"] = list(self.int8_linears)
        return entry


def plan_quantization(bundle: str, scheme: str, block_size: int, module) -> BundleQuant:
    """Pick the recipe for `bundle` from its PyTorch module's layer shapes (meta tensors are fine)."""
    from torch import nn  # imported here so that `g3n-convert --help` does not load torch

    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}")
    if scheme != "int4":
        return BundleQuant(bundle, scheme)
    widths = [m.embedding_dim for m in module.modules() if isinstance(m, nn.Embedding)]
    table_block = next((b for b in sorted(BLOCK_SIZES, reverse=True) if b <= block_size and all(w % b == 0 for w in widths)), None)
    plan = BundleQuant(bundle, scheme, block_size, table_block)
    narrow = sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules()
                     if isinstance(m, nn.Linear) and plan.storage("FULLY_CONNECTED", m.in_features)[0] == 8})
    return dataclasses.replace(plan, int8_linears=tuple(narrow))


def quantize_file(src: Path, dst: Path, plan: BundleQuant) -> None:
    """Quantize the float flatbuffer at `src` into `dst`.

    Given paths, ai-edge-quantizer maps the float file instead of copying it and writes the
    result through a mapped output file: about half the peak memory of the in-memory API.
    """
    from ai_edge_quantizer import quantizer

    rules = plan.recipe()
    if not rules:
        shutil.copyfile(src, dst)
        return
    try:
        q = quantizer.Quantizer(str(src))
        q.load_quantization_recipe(rules)
        # g3n draws its own progress.
        q.quantize(serialize_to_path=str(dst), enable_progress_bar=False, enable_progress_report=False)
    except (ValueError, RuntimeError) as exc:
        raise ExportError(f"ai-edge-quantizer could not quantize {plan.bundle} to {plan.scheme}: {exc}") from exc
