"""Streaming quantization of embedding tables too large for ai-edge-quantizer's in-memory path.

ai-edge-quantizer 0.10 quantizes each tensor in one piece and, for blockwise int4, builds
full-size float temporaries of it (about 2.8x the tensor in all). E2B's PLE table is 8 GB in
float32, so that path needs over 24 GB. This module does the same rewrite row chunk by row chunk:

  * the float file is memory-mapped (ai_edge_litert's reader gives zero-copy views of its buffers);
  * scales come from ai-edge-quantizer's own `tensor_zp_scale_from_min_max`, values are rounded
    and clipped with its `_round_and_clip_inplace` and packed with its `pack_data`, and tensors
    get the same types and quantization parameters, so the result matches ai-edge-quantizer's
    (tests/test_quantization.py compares them tensor by tensor);
  * large buffers are written after the flatbuffer body at 16-byte aligned offsets (the TFLite
    buffer-offset convention for models over 2 GB), streamed chunk by chunk, and the pages of the
    float file already read are released as it goes.

Peak memory is about one 64 MB chunk plus the scales, whatever the table size. Only the
EMBEDDING_LOOKUP tables of a bundle are handled (the PLE bundle holds nothing else).
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import numpy as np

from converter.errors import ExportError
from quant.recipes import BundleQuant

CHUNK_BYTES = 64 << 20  # float rows processed at a time
EXTERNAL_MIN_BYTES = 1024  # buffers at least this big go after the flatbuffer body, as ai-edge-quantizer does


def _round16(n: int) -> int:
    return (n + 15) & ~15


def _release_pages(view: np.ndarray) -> None:
    """Drop the page-cache mapping under a view of a private file mapping once it has been read,
    so resident memory stays at one chunk (the pages are clean and re-readable from the file)."""
    root = view
    while root is not None and not isinstance(root, mmap.mmap):
        root = root.base if isinstance(root, np.ndarray) else getattr(root, "obj", None)
    if root is None:
        return
    start = view.ctypes.data - ctypes.addressof(ctypes.c_char.from_buffer(root))
    first = (start + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
    last = (start + view.nbytes) & ~(mmap.PAGESIZE - 1)
    if last > first:
        root.madvise(mmap.MADV_DONTNEED, first, last - first)


class _Table:
    """One float table to quantize: its rows, the chosen scheme, and its scales."""

    def __init__(self, data: np.ndarray, bits: int, block: int | None):
        from ai_edge_quantizer import qtyping
        from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt

        self.data, self.bits = data, bits
        self.scales_buffer: int | None = None  # model buffer index of the fp16 block scales
        rows, cols = data.shape
        self.blocks = cols // block if block else 1
        self.granularity = getattr(qtyping.QuantGranularity, f"BLOCKWISE_{block}") if block else qtyping.QuantGranularity.CHANNELWISE
        self.qtype = uqt.IntType(bits, signed=True)
        self.step = max(1, CHUNK_BYTES // max(1, data.strides[0]))
        self.scale = np.empty((rows, self.blocks), np.float32)
        for r in range(0, rows, self.step):
            chunk = data[r:r + self.step].reshape(-1, self.blocks, cols // self.blocks)
            zero_point, self.scale[r:r + self.step] = uqt.tensor_zp_scale_from_min_max(
                chunk.min(axis=2), chunk.max(axis=2), bits, True, self.granularity
            )
            if np.any(zero_point):
                raise ExportError("symmetric quantization produced a non-zero zero point")
            _release_pages(data[r:r + self.step])

    @property
    def nbytes(self) -> int:
        return (self.data.size * self.bits + 7) // 8

    def write(self, fh) -> None:
        from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt
        from ai_edge_quantizer.transformations import transformation_utils

        rows, cols = self.data.shape
        narrow = self.bits >= 8  # ai-edge-quantizer: symmetric int8 uses [-127, 127], int4 the full [-8, 7]
        for r in range(0, rows, self.step):
            chunk = self.data[r:r + self.step]
            q = np.divide(chunk.reshape(-1, self.blocks, cols // self.blocks), self.scale[r:r + self.step, :, None])
            q = uqt._round_and_clip_inplace(q, self.qtype, narrow).astype(np.int8).reshape(-1)
            fh.write(transformation_utils.pack_data(self.bits, q).tobytes() if self.bits < 8 else q.tobytes())
            _release_pages(chunk)


def quantize_tables_streaming(src: Path, dst: Path, plan: BundleQuant) -> None:
    """Quantize the EMBEDDING_LOOKUP tables of the float .tflite `src` into `dst` per `plan`."""
    import flatbuffers
    import ml_dtypes
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils, mmap_utils

    if plan.scheme not in ("int8", "int4"):
        raise ValueError(f"nothing to stream for scheme {plan.scheme!r}")
    bits, block = (8, None) if plan.scheme == "int8" else (4, plan.table_block_size)
    if plan.scheme == "int4" and block is None:
        bits = 8  # the rows are not divisible by any block size: per-channel int8, as the recipe does
    model = flatbuffer_utils.read_model_from_bytearray(mmap_utils.get_file_contents(src))
    lookup_codes = {i for i, code in enumerate(model.operatorCodes)
                    if flatbuffer_utils.get_builtin_code_from_operator_code(code) == schema.BuiltinOperator.EMBEDDING_LOOKUP}

    tables: dict[int, _Table] = {}  # buffer index -> table (signatures share one buffer)
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if op.opcodeIndex not in lookup_codes:
                continue
            tensor = subgraph.tensors[op.inputs[1]]
            if tensor.type != schema.TensorType.FLOAT32 or len(tensor.shape) != 2:
                continue
            if tensor.buffer not in tables:
                raw = model.buffers[tensor.buffer].data
                tables[tensor.buffer] = _Table(np.frombuffer(raw, np.float32).reshape(tensor.shape), bits, block)
            table = tables[tensor.buffer]
            params = schema.QuantizationParametersT()
            params.quantizedDimension = 0
            if block:
                scales = schema.TensorT()
                scales.name, scales.shape, scales.type = tensor.name + b"_scales", list(table.scale.shape), schema.TensorType.FLOAT16
                if table.scales_buffer is None:  # one scales buffer per table, shared by every signature
                    buffer = schema.BufferT()
                    # ai-edge-quantizer stores blockwise scales as fp16 after rounding them through bfloat16.
                    buffer.data = table.scale.astype(ml_dtypes.bfloat16).astype(np.float16).view(np.uint8).ravel()
                    table.scales_buffer = len(model.buffers)
                    model.buffers.append(buffer)
                scales.buffer = table.scales_buffer
                subgraph.tensors.append(scales)
                details = schema.BlockwiseQuantizationT()
                details.scales, details.zeroPoints, details.blockSize = len(subgraph.tensors) - 1, -1, block
                params.detailsType, params.details = schema.QuantizationDetails.BlockwiseQuantization, details
                tensor.type = schema.TensorType.INT4
            else:
                params.scale = table.scale.ravel()
                params.zeroPoint = np.zeros(table.scale.size, np.int64)  # the runtime wants one per channel
                tensor.type = schema.TensorType.INT8
            tensor.quantization = params
    if not tables:
        raise ExportError(f"{src} has no float EMBEDDING_LOOKUP table to quantize")

    # Big buffers (the quantized tables, and anything else over 1 kB) go after the body.
    external: dict[int, tuple[int, object]] = {}
    for index, buffer in enumerate(model.buffers):
        if index in tables:
            external[index] = (tables[index].nbytes, tables[index].write)
        elif buffer.data is not None and len(buffer.data) >= EXTERNAL_MIN_BYTES:
            data = memoryview(np.ascontiguousarray(buffer.data).view(np.uint8))
            external[index] = (len(data), lambda fh, data=data: fh.write(data))
    for index in external:
        model.buffers[index].data, model.buffers[index].offset, model.buffers[index].size = None, 1, 1
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    body = bytearray(builder.Output())
    packed = schema.Model.GetRootAs(body, 0)
    layout, offset = [], _round16(len(body))
    for index, (size, writer) in external.items():
        flatbuffer_utils.update_packed_buffer(packed.Buffers(index), offset=offset, size=size)
        layout.append((offset, size, writer))
        offset = _round16(offset + size)
    with open(dst, "wb") as fh:
        fh.write(body)
        for start, size, writer in layout:
            fh.seek(start)
            writer(fh)
            if fh.tell() != start + size:
                raise ExportError(f"streaming writer wrote {fh.tell() - start} bytes for a {size}-byte buffer")
        fh.truncate(offset)
