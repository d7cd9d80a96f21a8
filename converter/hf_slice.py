"""`g3n-convert slice`: write a MatFormer slice of a Gemma 3n checkpoint as a Hugging Face checkpoint.

The output is what transformers loads as a smaller Gemma 3n: safetensors shards and their index,
the sliced config.json, and the source's tokenizer and processor files. E4B in bf16 is about
16 GB, so nothing is held whole: each output shard's header is written first (every shape is
known from the slicing plan), then its tensors are streamed a block of rows at a time, read through
a safetensors handle opened for that block alone (a long-lived memory map would keep every page it
touched resident). The whole folder is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bundle.errors import CheckpointError, G3nError
from bundle.files import explain_os_error
from converter.checkpoint import PICKLE_SUFFIXES, SafetensorsCheckpoint, expected_shapes
from converter.config import load_hf_config
from converter.matformer import MatformerSlice, load_matformer, take

SHARD_BYTES = 4 << 30  # as transformers' save_pretrained shards by default (its "5GB" is 5e9 bytes)
BLOCK_BYTES = 64 << 20  # rows read per step
INDEX_FILE = "model.safetensors.index.json"
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class OutputTensor:
    name: str
    source_file: Path
    source_name: str
    dtype: str
    source_shape: tuple[int, ...]
    rows: list[tuple[int, int]] | None
    cols: list[tuple[int, int]] | None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.source_shape)
        if self.rows is not None:
            shape[0] = sum(b - a for a, b in self.rows)
        if self.cols is not None:
            shape[1] = sum(b - a for a, b in self.cols)
        return tuple(shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def sliced_hf_config(hf: dict, plan: MatformerSlice) -> dict:
    """config.json of the slice: the text config's layer fields follow the kept layers."""
    out = json.loads(json.dumps(hf))
    text = out["text_config"] if out.get("model_type") == "gemma3n" else out
    cfg = plan.cfg
    text.update(
        num_hidden_layers=cfg.num_layers,
        intermediate_size=list(cfg.intermediate_sizes),
        num_kv_shared_layers=cfg.num_kv_shared_layers,
        activation_sparsity_pattern=list(cfg.activation_sparsity),
        layer_types=list(cfg.layer_types),
    )
    return out


def tensor_plan(checkpoint: SafetensorsCheckpoint, plan: MatformerSlice) -> list[OutputTensor]:
    """Every output tensor and where its values come from, in the source's name order."""
    from safetensors import safe_open

    prefix = checkpoint.prefix
    kept = {old: new for new, old in enumerate(plan.kept)}
    out = []
    for path in checkpoint.files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                info = handle.get_slice(name)
                rel = name[len(prefix):] if name.startswith(prefix) else None
                target = name
                if rel is not None:
                    match = re.match(r"^layers\.(\d+)\.(.*)$", rel)
                    if match:
                        old = int(match.group(1))
                        if old not in kept:
                            continue  # a skipped layer
                        target = f"{prefix}layers.{kept[old]}.{match.group(2)}"
                    _, rows, cols = plan.source_of(target[len(prefix):])
                else:
                    rows = cols = None
                if info.get_dtype() not in DTYPE_BYTES:
                    raise CheckpointError(f"{name} in {path.name} has dtype {info.get_dtype()}, which g3n cannot copy")
                out.append(OutputTensor(target, path, name, info.get_dtype(), tuple(info.get_shape()), rows, cols))
    return sorted(out, key=lambda t: _natural(t.name))


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def shard(items: list, nbytes: Callable[[object], int], limit: int) -> list[list]:
    """Items, in order, grouped into shards of at most `limit` bytes (a bigger item alone)."""
    shards, size = [[]], 0
    for item in items:
        if shards[-1] and size + nbytes(item) > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes(item)
    return shards


def shard_files(count: int) -> list[str]:
    """transformers' names for `count` weight files."""
    return ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """The header of a safetensors file holding (name, dtype, shape) entries, in that order; the
    tensors' bytes follow it back to back."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-len(data) % 8)  # the data that follows starts 8-byte aligned
    return len(data).to_bytes(8, "little") + data


def _stream(t: OutputTensor, fh, on_bytes: Callable[[int], None]) -> None:
    """Write `t`'s sliced values, reading the source a block of rows at a time."""
    import torch
    from safetensors import safe_open

    if len(t.source_shape) == 0:
        pieces = [(None, None)]
    else:
        row_bytes = math.prod(t.source_shape[1:]) * DTYPE_BYTES[t.dtype]
        step = max(1, BLOCK_BYTES // max(1, row_bytes))
        wanted = t.rows if t.rows is not None else [(0, t.source_shape[0])]
        pieces = [(r, min(b, r + step)) for a, b in wanted for r in range(a, b, step)]
    for start, stop in pieces:
        with safe_open(str(t.source_file), framework="pt") as handle:
            block = handle.get_tensor(t.source_name) if stop is None else handle.get_slice(t.source_name)[start:stop]
        block = take(block, None, t.cols).contiguous()
        data = block.reshape(-1).view(torch.uint8).numpy() if block.dtype != torch.bool else block.reshape(-1).numpy()
        fh.write(memoryview(data))
        on_bytes(data.nbytes)
        del block, data


COPIED_SKIP = {INDEX_FILE, "config.json"}


def slice_checkpoint(source: Path, matformer: str | Path, out: Path, shard_bytes: int = SHARD_BYTES,
                     on_progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """Write the slice of `source` named by `matformer` (a published name or a JSON file) to `out`.
    Returns a summary: the configuration, tensor and byte counts, the shards."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise CheckpointError(f"checkpoint folder {source} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise G3nError(f"{out} already exists and is not empty; choose a new --out folder or remove it")
    hf, full = load_hf_config(source)
    plan = MatformerSlice(full, load_matformer(matformer))
    # The same strict check conversion makes (names, shapes, no pickles); it reads headers only.
    checkpoint = SafetensorsCheckpoint(source, full, expected_shapes(full))
    tensors = tensor_plan(checkpoint, plan)
    del checkpoint
    shards = shard(tensors, lambda t: t.nbytes, shard_bytes)
    total = sum(t.nbytes for t in tensors)
    files = shard_files(len(shards))

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        on_progress(done, total)

    try:
        weight_map = {}
        for file, group in zip(files, shards):
            with open(work / file, "wb") as fh:
                fh.write(safetensors_header([(t.name, t.dtype, t.shape) for t in group]))
                for t in group:
                    _stream(t, fh, advance)
                    weight_map[t.name] = file
                fh.flush()
                os.fsync(fh.fileno())
        if len(shards) > 1:
            (work / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        (work / "config.json").write_text(json.dumps(sliced_hf_config(hf, plan), indent=2) + "\n")
        for f in sorted(source.iterdir()):  # tokenizer, processor, generation and chat-template files
            if f.is_file() and not f.name.startswith(".") and f.name not in COPIED_SKIP \
                    and f.suffix != ".safetensors" and f.suffix not in PICKLE_SUFFIXES:
                shutil.copyfile(f, work / f.name)
        os.chmod(work, 0o755)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(work, out)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise explain_os_error(exc, out / "model.safetensors") from exc
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "matformer": plan.to_manifest(),
        "tensors": len(tensors),
        "bytes": total,
        "shards": files,
    }
