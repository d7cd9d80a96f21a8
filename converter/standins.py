"""Stand-in weights: convert a bundle's graph without holding its weights in memory.

litert-torch holds every weight of a module while it converts (E2B's text core is 9.6 GB in
float32, E4B's 17.8 GB), and the graph it produces does not depend on the weights' values. So each
big weight is converted as a *stand-in*:

  * a linear layer's weight becomes a view, at its own offset, into one shared random pool (the
    size of the largest such weight), so all of them together cost one pool of memory;
  * an embedding table keeps only a few rows: a lookup's output does not depend on the row count.

Every stand-in is recognised in the converted flatbuffer by its first 16 bytes, which are unique
within the pool. The bundle writer (quant/streaming.py) then streams the real weights, float or
quantized, from the weight source into the stand-ins' places, a slice of rows at a time.
Small weights (norms, AltUp's coefficient layers) are loaded for real and converted as they are.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bundle.errors import ExportError
from converter.checkpoint import init_buffers
from quant.streaming import PROBE_VALUES, StandIn

MIN_STANDIN_ELEMENTS = 1 << 16  # smaller weights are converted with their real values
TABLE_STANDIN_ROWS = 16


def materialize_with_standins(
    module: nn.Module, prefix: str, source, min_elements: int = MIN_STANDIN_ELEMENTS
) -> tuple[nn.Module, dict[bytes, StandIn]]:
    """Fill a meta-device module: weights with at least `min_elements` get stand-ins, the rest
    their real values from `source`. Returns the module and its stand-ins by key."""
    tables = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    linears = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    params = list(module.named_parameters())
    # A module may name weights the converter folds into constants (a linear over a constant
    # input); those must be converted with their real values.
    real = tuple(getattr(module, "CONSTANT_FOLDED_WEIGHTS", ()))
    chosen = [
        (name, p)
        for name, p in params
        if p.dim() == 2 and p.numel() >= min_elements and (id(p) in tables or id(p) in linears)
        and not any(part in name for part in real)
    ]
    standin_shapes = {
        name: (min(TABLE_STANDIN_ROWS, p.shape[0]), p.shape[1]) if id(p) in tables else tuple(p.shape)
        for name, p in chosen
    }
    pool_size = max((int(np.prod(s)) for s in standin_shapes.values()), default=0) + len(chosen)
    # Random, so no two offsets share a key; float32, the dtype every weight is converted in.
    pool = torch.rand(pool_size, generator=torch.Generator().manual_seed(0)) - 0.5

    state, standins = {}, {}
    for offset, (name, p) in enumerate(chosen):
        shape = standin_shapes[name]
        view = pool[offset:offset + int(np.prod(shape))].view(shape)
        standin = StandIn(f"{prefix}{name}", tuple(p.shape), shape, view.reshape(-1)[:PROBE_VALUES].numpy().copy())
        if standin.key in standins:  # four equal random floats; refuse rather than mix weights up
            raise ExportError(f"stand-in keys of {standins[standin.key].name} and {standin.name} collide")
        standins[standin.key] = standin
        state[name] = view
    for name, _ in params:
        if name not in state:
            state[name] = source.tensor(f"{prefix}{name}")
    # Assigned one by one rather than through load_state_dict, which refuses a table's fewer rows.
    for name, value in state.items():
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, nn.Parameter(value, requires_grad=False))
    return init_buffers(module).eval(), standins
