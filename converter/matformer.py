"""MatFormer Mix-n-Match: the smaller models nested inside Gemma 3n E4B.

A configuration keeps some of E4B's layers and, in each kept layer, the first N units of its FFN:

  * skipped layers are dropped and the kept ones renumbered;
  * gate_proj / up_proj keep their first N rows, down_proj its first N columns;
  * per_layer_model_projection (rows) and embed_tokens_per_layer (columns) keep only the kept
    layers' 256-wide slices;
  * config: num_hidden_layers, per-layer intermediate_size, num_kv_shared_layers less the skipped
    layers at or after the first KV-shared one, and activation_sparsity_pattern and layer_types
    sliced with the kept layers (a shared layer reads the last earlier non-shared layer of its
    type, so the types must move with their layers).

Layers that KV-shared layers read their cache from (18 and 19 in E4B) cannot be skipped.

`MatformerSlice` applies a configuration to a model config and answers, for every tensor of the
sliced model, where it comes from in the full one: `SlicedWeights` (our names, for converting on
the fly) and `hf_tensor_plan` (Hugging Face names, for `g3n-convert slice`) use that one answer.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from bundle.errors import MatformerError, read_json_object
from converter.config import TextConfig, variant_config

PUBLISHED_TABLE = "matformer_slicing_configs.csv"  # Google's gemma3n-slicing-configs table, in converter/data/
PUBLISHED_SOURCE = "e4b"  # the model every published configuration slices
CUSTOM_KEYS = {"ffn_hidden_dims", "layers_skipped", "name"}


@dataclass(frozen=True)
class MatformerConfig:
    """One Mix-n-Match configuration: the FFN width of every kept layer and the skipped layers."""

    name: str
    ffn_hidden_dims: tuple[int, ...]
    layers_skipped: tuple[int, ...]
    published: bool = False
    published_effective_b: float | None = None  # the table's "effective parameters" (billions)
    mmlu: float | None = None  # the table's pre-trained MMLU (%)

    @property
    def num_layers(self) -> int:
        """The layer count of the model this configuration slices."""
        return len(self.ffn_hidden_dims) + len(self.layers_skipped)


def published_configs() -> dict[str, MatformerConfig]:
    """The 16 published configurations, by name, in the table's order."""
    text = resources.files("converter").joinpath("data", PUBLISHED_TABLE).read_text()
    out = {}
    for row in csv.DictReader(text.splitlines()):
        out[row["name"]] = MatformerConfig(
            name=row["name"],
            ffn_hidden_dims=tuple(int(v) for v in row["ffn_hidden_dims"].split()),
            layers_skipped=tuple(int(v) for v in row["layers_skipped"].split()),
            published=True,
            published_effective_b=float(row["effective_params_b"]),
            mmlu=float(row["mmlu_pt_percent"]),
        )
    return out


def _int_list(data: dict, key: str, path: Path) -> tuple[int, ...]:
    values = data.get(key)
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise MatformerError(f"{path}: {key!r} must be a list of integers")
    return tuple(values)


def load_matformer(name_or_file: str | Path) -> MatformerConfig:
    """A published configuration by name, or a custom one from a JSON file:
    {"ffn_hidden_dims": [one width per kept layer], "layers_skipped": [layer indices], "name": optional}."""
    published = published_configs()
    if str(name_or_file) in published:
        return published[str(name_or_file)]
    path = Path(name_or_file)
    if not path.is_file():
        raise MatformerError(
            f"{name_or_file!r} is neither a published MatFormer configuration nor a JSON file; "
            f"see `g3n-convert matformer list` for the {len(published)} names"
        )
    data = read_json_object(path, MatformerError, "give a JSON file with ffn_hidden_dims and layers_skipped")
    unknown = set(data) - CUSTOM_KEYS
    if unknown:
        raise MatformerError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"a configuration has {', '.join(sorted(CUSTOM_KEYS))}")
    for key in ("ffn_hidden_dims", "layers_skipped"):
        if key not in data:
            raise MatformerError(f"{path}: {key!r} is missing")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise MatformerError(f"{path}: 'name' must be 1-64 letters, digits, '.', '_' or '-'")
    return MatformerConfig(name, _int_list(data, "ffn_hidden_dims", path), _int_list(data, "layers_skipped", path))


def kv_sources(cfg: TextConfig) -> dict[int, str]:
    """The layers whose KV cache the KV-shared layers read, with their attention type."""
    shared = range(cfg.first_kv_shared_layer, cfg.num_layers) if cfg.num_kv_shared_layers else ()
    return {cfg.kv_source_layer(i): cfg.layer_types[i] for i in shared}


def layer_ranges(indices: list[int]) -> str:
    """[20, 21, 22, 34] -> "20-22, 34"."""
    out, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            out.append(f"{start}-{v}" if v != start else f"{v}")
            start = None
    return ", ".join(out)


class MatformerSlice:
    """A validated configuration applied to the full model's config."""

    def __init__(self, full: TextConfig, mf: MatformerConfig):
        self.full, self.mf = full, mf
        skipped = set(mf.layers_skipped)
        self.kept = tuple(i for i in range(full.num_layers) if i not in skipped)  # new index -> old index
        self._validate()
        shared_skipped = sum(1 for i in skipped if full.is_kv_shared(i))
        try:
            self.cfg = full.replace(
                intermediate_sizes=tuple(mf.ffn_hidden_dims),
                layer_types=tuple(full.layer_types[i] for i in self.kept),
                activation_sparsity=tuple(full.activation_sparsity[i] for i in self.kept),
                num_kv_shared_layers=full.num_kv_shared_layers - shared_skipped,
            )
        except ValueError as exc:
            raise MatformerError(f"configuration {mf.name!r} leaves no valid model: {exc}") from exc

    def _validate(self) -> None:
        full, mf, n = self.full, self.mf, self.full.num_layers
        if mf.published and (n != mf.num_layers or any(w > full.intermediate_sizes[i] for i, w in
                                                          zip(self.kept, mf.ffn_hidden_dims))):
            e4b = variant_config(PUBLISHED_SOURCE)
            raise MatformerError(
                f"{mf.name!r} is a published configuration of E4B ({e4b.num_layers} layers, FFN {e4b.intermediate_sizes[0]}); "
                f"this model ({n} layers, FFN widths {_widths(full)}) does not nest it: slice an E4B checkpoint, "
                "or give a custom JSON configuration for this model"
            )
        out_of_range = sorted({i for i in mf.layers_skipped if not 0 <= i < n})
        if out_of_range:
            raise MatformerError(f"layers_skipped has layer {out_of_range[0]}, out of range: the model has {n} layers (0-{n - 1})")
        if len(set(mf.layers_skipped)) != len(mf.layers_skipped):
            raise MatformerError("layers_skipped lists a layer more than once")
        kept = n - len(mf.layers_skipped)
        if len(mf.ffn_hidden_dims) != kept:
            raise MatformerError(f"ffn_hidden_dims has {len(mf.ffn_hidden_dims)} widths; the model keeps {kept} layers "
                                 f"({n} less {len(mf.layers_skipped)} skipped), one width each")
        sources = kv_sources(full)
        for layer in sorted(set(mf.layers_skipped) & set(sources)):
            readers = [i for i in range(full.first_kv_shared_layer, n) if full.kv_source_layer(i) == layer]
            kind = sources[layer].replace("_attention", "-attention")
            raise MatformerError(f"layer {layer} cannot be skipped: it holds the {kind} KV cache that the "
                                 f"KV-shared layers {layer_ranges(readers)} read")
        for new, (old, width) in enumerate(zip(self.kept, mf.ffn_hidden_dims)):
            if not 1 <= width <= full.intermediate_sizes[old]:
                raise MatformerError(f"ffn_hidden_dims[{new}] is {width}: layer {old}'s FFN has "
                                     f"{full.intermediate_sizes[old]} units, so a width must be 1-{full.intermediate_sizes[old]}")

    # ---- where each sliced tensor comes from ----------------------------------------------
    def ple_columns(self) -> list[tuple[int, int]]:
        """The full model's PLE columns (or per_layer_model_projection rows) of the kept layers."""
        p = self.full.hidden_size_per_layer_input
        return [(old * p, (old + 1) * p) for old in self.kept]

    def source_of(self, name: str) -> tuple[str, list[tuple[int, int]] | None, list[tuple[int, int]] | None]:
        """For a tensor name of the sliced model (ours or Hugging Face's, relative to the text
        model): the full model's name, and the row and column ranges to keep (None: all)."""
        match = re.match(r"^(.*layers\.)(\d+)(\..*)$", name)
        if match:
            head, new, tail = match.group(1), int(match.group(2)), match.group(3)
            old, width = self.kept[new], self.mf.ffn_hidden_dims[new]
            rows = [(0, width)] if tail in (".mlp.gate_proj.weight", ".mlp.up_proj.weight") else None
            cols = [(0, width)] if tail == ".mlp.down_proj.weight" else None
            return f"{head}{old}{tail}", rows, cols
        if name.endswith("embed_tokens_per_layer.weight"):
            return name, None, self.ple_columns()
        if name.endswith("per_layer_model_projection.weight"):
            return name, self.ple_columns(), None
        return name, None, None

    def to_manifest(self) -> dict:
        return {
            "name": self.mf.name,
            "published": self.mf.published,
            "source_layers": self.full.num_layers,
            "layers_kept": len(self.kept),
            "layers_skipped": list(self.mf.layers_skipped),
            "ffn_hidden_dims": list(self.mf.ffn_hidden_dims),
            "effective_parameters": effective_parameters(self.cfg),
        }


def _widths(cfg: TextConfig) -> str:
    widths = sorted(set(cfg.intermediate_sizes))
    return "/".join(map(str, widths))


def _cat(parts: list, axis: int):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=axis)
    import torch

    return torch.cat(parts, dim=axis)


def take(values, rows: list[tuple[int, int]] | None, cols: list[tuple[int, int]] | None):
    """The kept row and column ranges of an array (numpy or torch)."""
    if rows is not None:
        values = _cat([values[a:b] for a, b in rows], 0) if len(rows) > 1 else values[rows[0][0]:rows[0][1]]
    if cols is not None:
        values = _cat([values[:, a:b] for a, b in cols], 1) if len(cols) > 1 else values[:, cols[0][0]:cols[0][1]]
    return values


def row_pieces(rows: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """Rows [start, stop) of the sliced tensor as ranges of the full one's rows."""
    pieces, offset = [], 0
    for a, b in rows:
        lo, hi = max(start, offset), min(stop, offset + b - a)
        if lo < hi:
            pieces.append((a + lo - offset, a + hi - offset))
        offset += b - a
    return pieces


class SlicedWeights:
    """A weight source (SafetensorsCheckpoint, RandomWeights) of the full model, read as the
    sliced one: the same `tensor` / `read_rows` / `fingerprint`, a slice of rows at a time."""

    def __init__(self, source, plan: MatformerSlice):
        self.source, self.plan = source, plan

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        full, rows, cols = self.plan.source_of(name)
        pieces = row_pieces(rows, start, stop) if rows is not None else [(start, stop)]
        parts = [self.source.read_rows(full, a, b) for a, b in pieces]
        values = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return take(values, None, cols)

    def tensor(self, name: str):
        import torch

        full, rows, cols = self.plan.source_of(name)
        values = self.source.tensor(full)
        if values.dim() < 2:
            return values
        return torch.from_numpy(np.ascontiguousarray(take(values.numpy(), rows, cols)))

    def fingerprint(self) -> str:
        return self.source.fingerprint()


def effective_parameters(cfg: TextConfig) -> int:
    """Gemma 3n's "effective" parameter count, as Google publishes it: the text decoder (every
    layer, AltUp and the per-layer projections), without the embedding tables (embed_tokens,
    whose transpose is the tied lm_head, and the PLE table, both read a row per token from flash)
    and without the vision and audio towers. It includes the K/V projections of KV-shared layers,
    which checkpoints carry but no shared layer runs (our text core leaves them out).
    Counted on the meta device: no memory."""
    import torch

    from converter.model import TextDecoder

    with torch.device("meta"):
        decoder = TextDecoder(cfg)
    total = sum(p.numel() for p in decoder.parameters()) - decoder.lm_head.weight.numel()
    shared = sum(cfg.is_kv_shared(i) for i in range(cfg.num_layers))
    return total + shared * (2 * cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim + cfg.head_dim)


def published_table() -> list[dict]:
    """Every published configuration applied to E4B, with g3n's own counts next to the table's."""
    from converter.estimate import estimated_folder_bytes

    e4b = variant_config(PUBLISHED_SOURCE)
    rows = []
    for mf in published_configs().values():
        plan = MatformerSlice(e4b, mf)
        rows.append({
            "name": mf.name,
            "layers_kept": len(plan.kept),
            "layers_skipped": list(mf.layers_skipped),
            "ffn_hidden_dims": list(mf.ffn_hidden_dims),
            "effective_parameters": effective_parameters(plan.cfg),
            "published_effective_b": mf.published_effective_b,
            "mmlu_pt_percent": mf.mmlu,
            "estimated_int4_folder_bytes": estimated_folder_bytes(plan.cfg, PUBLISHED_SOURCE, "int4"),
        })
    return rows
