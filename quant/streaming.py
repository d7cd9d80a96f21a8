"""The bundle writer: a converted .tflite in, its final weights (float or quantized) streamed out.

Two jobs, one pass, a slice of rows at a time:

  * fill: the graph was converted with stand-in weights (StandIn, made by converter/standins.py); each stand-in's
    buffer is recognised by its key and replaced by the real weight, read row slice by row slice
    from the weight source. Where the converter folded a constant scale into a weight (an FC
    followed by a multiply, e.g. the logit soft-cap's 1/30), the scale is recovered exactly from
    the stand-in's values and replayed on the real weight;
  * quantize: the weights of the bundle's FULLY_CONNECTED and EMBEDDING_LOOKUP ops become int8
    per-channel or int4 blockwise (CONV_2D filters, in the vision encoder: int8 per output channel), as ai-edge-quantizer's dynamic-range recipe would make them:
    scales from its own `tensor_zp_scale_from_min_max`, values rounded and clipped with its
    `_round_and_clip_inplace` and packed with its `pack_data`, the same tensor types and
    quantization parameters (tests/test_quantization.py compares the two tensor by tensor).
    ai-edge-quantizer itself quantizes each tensor in one piece with full-size float temporaries
    (about 2.8x the tensor): over 24 GB for E2B's 8 GB PLE table.

Large buffers are written after the flatbuffer body at 16-byte aligned offsets (the TFLite
buffer-offset convention for models over 2 GB). Peak memory is about one 64 MB slice plus the
scales, whatever the model size.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bundle.errors import ExportError
from quant.recipes import BUNDLE_OPS, BundleQuant

KEY_BYTES = 16  # a stand-in is recognised by its first four float32 values: unique per pool offset
PROBE_VALUES = 1024  # stand-in values kept to recover a scale the converter folded into a weight
CHUNK_BYTES = 64 << 20  # float rows processed at a time
EXTERNAL_MIN_BYTES = 1024  # buffers at least this big go after the flatbuffer body, as ai-edge-quantizer does


@dataclass(frozen=True, eq=False)
class StandIn:
    """A weight the graph was converted with in place of the real one (converter/standins.py)."""

    name: str  # the weight's name in the weight source ("decoder.layers.0.mlp.up_proj.weight")
    shape: tuple[int, int]  # its real shape
    standin_shape: tuple[int, int]  # the shape it was converted with (fewer rows for a table)
    probe: np.ndarray  # its first PROBE_VALUES values

    @property
    def key(self) -> bytes:
        return self.probe[: KEY_BYTES // 4].tobytes()

    @property
    def standin_bytes(self) -> int:
        return 4 * self.standin_shape[0] * self.standin_shape[1]


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


def _floats(buffer) -> np.ndarray:
    return np.asarray(buffer.data).view(np.uint8).view(np.float32)


def folded_scale(converted: np.ndarray, standin: np.ndarray) -> np.float32 | None:
    """The float32 constant c with float32(standin * c) == converted, if there is one.

    The converter folds `linear(x) * c` into the linear's weight; it computes in float32, so c is
    pinned down exactly by a few hundred values: try the float32 values around the ratio's median."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.median(converted.astype(np.float64) / standin.astype(np.float64))
    if not np.isfinite(ratio) or ratio == 0:
        return None
    guess = np.float32(ratio)
    for step in range(-8, 9):
        c = np.float32(guess + step * np.spacing(guess))  # neighbours one ulp apart
        if np.array_equal(standin * c, converted):
            return c
    return None


@dataclass
class _Weight:
    """One weight buffer of the output: where its float rows come from and how it is stored."""

    shape: tuple[int, int]
    read: Callable[[int, int], np.ndarray]  # rows [start, stop) as float32
    bits: int = 32  # 32: float; 8: int8 per-channel; 4: int4 blockwise
    block: int | None = None
    scale: np.ndarray | None = None  # [rows, blocks] float32, known once written
    scales_buffer: int | None = None  # model buffer index of the int4 block scales
    quantized_tensors: list = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return self.shape[1] // self.block if self.block else 1

    @property
    def nbytes(self) -> int:
        return (self.shape[0] * self.shape[1] * self.bits + 7) // 8

    def write(self, fh) -> None:
        from ai_edge_quantizer import qtyping
        from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt
        from ai_edge_quantizer.transformations import transformation_utils

        rows, cols = self.shape
        step = max(1, CHUNK_BYTES // (4 * cols))
        if self.bits == 32:
            for r in range(0, rows, step):
                fh.write(np.ascontiguousarray(self.read(r, min(rows, r + step)), np.float32).tobytes())
            return
        granularity = getattr(qtyping.QuantGranularity, f"BLOCKWISE_{self.block}") if self.block else qtyping.QuantGranularity.CHANNELWISE
        qtype = uqt.IntType(self.bits, signed=True)
        narrow = self.bits >= 8  # ai-edge-quantizer: symmetric int8 uses [-127, 127], int4 the full [-8, 7]
        self.scale = np.empty((rows, self.blocks), np.float32)
        for r in range(0, rows, step):
            chunk = self.read(r, min(rows, r + step)).reshape(-1, self.blocks, cols // self.blocks)
            zero_point, scale = uqt.tensor_zp_scale_from_min_max(chunk.min(axis=2), chunk.max(axis=2), self.bits, True, granularity)
            if np.any(zero_point):
                raise ExportError("symmetric quantization produced a non-zero zero point")
            self.scale[r:r + len(chunk)] = scale
            q = uqt._round_and_clip_inplace(np.divide(chunk, scale[:, :, None]), qtype, narrow).astype(np.int8).reshape(-1)
            fh.write(transformation_utils.pack_data(self.bits, q).tobytes() if self.bits < 8 else q.tobytes())

    def scales_bytes(self) -> np.ndarray:
        import ml_dtypes

        # ai-edge-quantizer stores blockwise scales as fp16 after rounding them through bfloat16.
        return self.scale.astype(ml_dtypes.bfloat16).astype(np.float16).view(np.uint8).ravel()


def _inline_reader(data: np.ndarray) -> Callable[[int, int], np.ndarray]:
    def read(start: int, stop: int) -> np.ndarray:
        rows = np.array(data[start:stop])
        _release_pages(data[start:stop])
        return rows

    return read


def _standin_reader(source, name: str, scale: np.float32 | None) -> Callable[[int, int], np.ndarray]:
    def read(start: int, stop: int) -> np.ndarray:
        rows = source.read_rows(name, start, stop)
        return rows if scale is None else rows * scale  # float32 x float32, as the converter folded it

    return read


def _op_names(model) -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return {i: names.get(flatbuffer_utils.get_builtin_code_from_operator_code(c), "?") for i, c in enumerate(model.operatorCodes)}


def _find_standins(model, standins: dict, op_names: dict[int, str]) -> dict[int, tuple[object, np.float32 | None]]:
    """Buffer index -> (stand-in, folded scale or None) for every stand-in in the converted model."""
    found: dict[int, tuple[object, np.float32 | None]] = {}
    for index, buffer in enumerate(model.buffers):
        if buffer.data is not None and len(buffer.data) >= KEY_BYTES:
            standin = standins.get(np.asarray(buffer.data[:KEY_BYTES]).tobytes())
            if standin is not None and len(buffer.data) == standin.standin_bytes:
                found[index] = (standin, None)
    # Weights the converter scaled: match them by size and by a constant ratio to a stand-in.
    placed = {id(s) for s, _ in found.values()}
    unmatched = [s for s in standins.values() if id(s) not in placed]
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if op_names[op.opcodeIndex] != "FULLY_CONNECTED" or len(op.inputs) < 2:
                continue
            index = subgraph.tensors[op.inputs[1]].buffer
            buffer = model.buffers[index]
            if index in found or buffer.data is None:
                continue
            values = _floats(buffer)[:PROBE_VALUES]
            for standin in unmatched:
                if len(buffer.data) == standin.standin_bytes:
                    scale = folded_scale(values, standin.probe)
                    if scale is not None:
                        found[index] = (standin, scale)
                        placed.add(id(standin))
                        break
    missing = [s.name for s in standins.values() if id(s) not in placed]
    if missing:
        raise ExportError(
            f"the converter transformed {len(missing)} weight(s) in a way the bundle writer cannot replay "
            f"({', '.join(missing[:5])}); convert them with real values (a higher MIN_STANDIN_ELEMENTS)"
        )
    return found


def _fold_weight_scalings(model, op_names: dict[int, str], found: dict) -> None:
    """A stand-in multiplied by a scalar constant on its way into a FULLY_CONNECTED op (what the
    converter leaves of `linear(x) * c` when it does not fold the product): do the multiply while
    writing the real weight, wire the FC to the weight and drop the MUL, so the weight stays a
    constant that can be quantized and nothing is scaled at run time."""
    for subgraph in model.subgraphs:
        consumers: dict[int, list] = {}
        for op in subgraph.operators:
            for position, t in enumerate(op.inputs):
                consumers.setdefault(t, []).append((op, position))
        dropped = []
        for op in subgraph.operators:
            if op_names[op.opcodeIndex] != "MUL" or len(op.inputs) != 2:
                continue
            weight, scalar = (op.inputs if subgraph.tensors[op.inputs[0]].buffer in found else op.inputs[::-1])
            index = subgraph.tensors[weight].buffer
            data = model.buffers[subgraph.tensors[scalar].buffer].data
            users = consumers.get(op.outputs[0], [])
            if (index not in found or found[index][1] is not None or data is None or len(data) != 4
                    or subgraph.tensors[scalar].type != 0  # FLOAT32
                    or not users or any(op_names[u.opcodeIndex] != "FULLY_CONNECTED" or pos != 1 for u, pos in users)):
                continue
            found[index] = (found[index][0], np.asarray(data).view(np.float32)[0])
            for user, position in users:
                user.inputs[position] = weight
            dropped.append(op)
        subgraph.operators = [op for op in subgraph.operators if not any(op is d for d in dropped)]


def write_bundle(src: Path, dst: Path, plan: BundleQuant, standins: dict | None = None, source=None) -> None:
    """Write `dst` from the converted `src`: stand-ins filled from `source`, weights quantized per `plan`."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils, mmap_utils

    model = flatbuffer_utils.read_model_from_bytearray(mmap_utils.get_file_contents(src))
    op_names = _op_names(model)
    filled = _find_standins(model, standins, op_names) if standins else {}
    _fold_weight_scalings(model, op_names, filled)

    weights: dict[int, _Weight] = {}
    for index, (standin, scale) in filled.items():
        weights[index] = _Weight(standin.shape, _standin_reader(source, standin.name, scale))
    quantized_ops = BUNDLE_OPS[plan.bundle] if plan.scheme in ("int8", "int4") else ()
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            kind = op_names[op.opcodeIndex]
            scope = ";".join(subgraph.tensors[i].name.decode() for i in op.outputs if i >= 0)
            for position, tensor_index in enumerate(op.inputs):
                if tensor_index < 0:
                    continue
                tensor = subgraph.tensors[tensor_index]
                weight = weights.get(tensor.buffer)
                is_weight = kind in ("FULLY_CONNECTED", "EMBEDDING_LOOKUP", "CONV_2D") and position == 1
                if tensor.buffer in filled:
                    if not is_weight or kind == "CONV_2D":
                        raise ExportError(f"stand-in {filled[tensor.buffer][0].name} feeds a {kind} op, not a weight input")
                    tensor.shape = list(weight.shape)  # a table was converted with fewer rows
                rank = 4 if kind == "CONV_2D" else 2  # a convolution's filter: [out, h, w, in]
                if not is_weight or kind not in quantized_ops or tensor.type != schema.TensorType.FLOAT32 or len(tensor.shape) != rank:
                    continue
                if plan.keeps_float(scope):
                    continue
                if weight is None and model.buffers[tensor.buffer].data is None:
                    continue  # an activation, e.g. attention's matmul lowered to FULLY_CONNECTED
                if weight is None:  # a weight converted with its real values, as [out, everything else]
                    data = _floats(model.buffers[tensor.buffer]).reshape(tensor.shape[0], -1)
                    weight = weights[tensor.buffer] = _Weight(data.shape, _inline_reader(data))
                if weight.bits == 32:
                    weight.bits, weight.block = plan.storage(kind, weight.shape[1])
                weight.quantized_tensors.append((subgraph, tensor))

    scales_tensors: dict[int, int] = {}  # id(quantized int4 tensor) -> index of its scales tensor

    def set_quantization(placeholder: bool) -> None:
        for weight in weights.values():
            scale = np.zeros((weight.shape[0], weight.blocks), np.float32) if placeholder else weight.scale
            for subgraph, tensor in weight.quantized_tensors:
                params = schema.QuantizationParametersT()
                params.quantizedDimension = 0
                if weight.bits == 4:
                    if placeholder:  # one scales tensor per quantized tensor, one buffer per weight
                        scales = schema.TensorT()
                        scales.name, scales.shape, scales.type = tensor.name + b"_scales", list(scale.shape), schema.TensorType.FLOAT16
                        if weight.scales_buffer is None:
                            weight.scales_buffer = len(model.buffers)
                            model.buffers.append(schema.BufferT())
                        scales.buffer = weight.scales_buffer
                        subgraph.tensors.append(scales)
                        scales_tensors[id(tensor)] = len(subgraph.tensors) - 1
                    details = schema.BlockwiseQuantizationT()
                    details.scales, details.zeroPoints, details.blockSize = scales_tensors[id(tensor)], -1, weight.block
                    params.detailsType, params.details = schema.QuantizationDetails.BlockwiseQuantization, details
                    tensor.type = schema.TensorType.INT4
                else:
                    params.scale = scale.ravel()
                    params.zeroPoint = np.zeros(scale.size, np.int64)  # the runtime wants one per channel
                    tensor.type = schema.TensorType.INT8
                tensor.quantization = params

    set_quantization(placeholder=True)
    # Everything over 1 kB goes after the body: the weights, their int4 scales, other constants.
    external: dict[int, tuple[int, Callable]] = {}
    for index, buffer in enumerate(model.buffers):
        if index in weights:
            external[index] = (weights[index].nbytes, weights[index].write)
        elif buffer.data is not None and len(buffer.data) >= EXTERNAL_MIN_BYTES:
            data = memoryview(np.ascontiguousarray(buffer.data).view(np.uint8))
            external[index] = (len(data), lambda fh, data=data: fh.write(data))
    for weight in weights.values():
        if weight.scales_buffer is not None:
            size = weight.shape[0] * weight.blocks * 2
            external[weight.scales_buffer] = (size, lambda fh, w=weight: fh.write(w.scales_bytes()))
    for index in external:
        model.buffers[index].data, model.buffers[index].offset, model.buffers[index].size = None, 1, 1

    def body() -> bytearray:
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytearray(builder.Output())

    # The body carries the int8 scales, known only once the weights are written; its size does
    # not depend on their values, so the layout is planned with placeholders and the body redone.
    planned = len(body())
    layout, offset = [], _round16(planned)
    for index, (size, writer) in external.items():
        layout.append((index, offset, size, writer))
        offset = _round16(offset + size)
    with open(dst, "wb") as fh:
        for index, start, size, writer in layout:  # scales buffers come last: after their weights
            fh.seek(start)
            writer(fh)
            if fh.tell() != start + size:
                raise ExportError(f"bundle writer wrote {fh.tell() - start} bytes for a {size}-byte buffer")
        fh.truncate(offset)
        set_quantization(placeholder=False)
        final = body()
        if len(final) != planned:
            raise ExportError("flatbuffer body changed size between planning and writing")
        packed = schema.Model.GetRootAs(final, 0)
        for index, start, size, _ in layout:
            flatbuffer_utils.update_packed_buffer(packed.Buffers(index), offset=start, size=size)
        fh.seek(0)
        fh.write(final)
