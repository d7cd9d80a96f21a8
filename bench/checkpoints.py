"""A random Gemma 3n text checkpoint in the Hugging Face layout, for benchmarks that need one at
real size: g3n's own random weights (converter/checkpoint.py RandomWeights, seeded), so a
checkpoint written here and `g3n-convert --random-weights` hold the same numbers.

    python bench/checkpoints.py OUT_DIR [--variant e2b|e4b] [--layers N] [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def text_config(variant: str, layers: int | None = None):
    """The variant's text config without the hard-token tables (a Gemma3nForCausalLM checkpoint has
    none); with `layers`, its first layers only, the last half of them KV-shared as in the full
    model (layers must be a multiple of 10, so each half ends on a global layer)."""
    from converter.config import variant_config

    cfg = variant_config(variant).replace(vision_tokens=None, audio_tokens=None)
    if layers is None:
        return cfg
    if layers % 10:
        raise ValueError("--layers must be a multiple of 10: each half ends on a global layer")
    return cfg.replace(name=f"{variant}-{layers}-layers", intermediate_sizes=cfg.intermediate_sizes[:layers],
                       layer_types=cfg.layer_types[:layers], activation_sparsity=cfg.activation_sparsity[:layers],
                       num_kv_shared_layers=layers // 2)


def write_random_checkpoint(folder: Path, cfg, seed: int = 0, shard_bytes: int = 4 << 30) -> int:
    """`cfg`'s random weights as a Gemma3nForCausalLM checkpoint in bf16, written a block of rows at
    a time. KV-shared layers' K/V projections and K norms, which nothing reads, are zeros: Google's
    published checkpoints carry them and llama.cpp's loader requires them, though transformers no
    longer builds them. Returns the bytes written."""
    import torch
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    from converter.checkpoint import KV_OWNER_TENSORS, RandomWeights, expected_shapes, text_name_map
    from converter.config import text_config_to_hf
    from converter.hf_slice import BLOCK_BYTES, INDEX_FILE, safetensors_header, shard, shard_files

    source = RandomWeights(cfg, seed, expected_shapes(cfg))
    hf = Gemma3nTextConfig(**text_config_to_hf(cfg))
    with torch.device("meta"):
        model = Gemma3nForCausalLM(hf)
    ours = {"model." + theirs: name for name, theirs in text_name_map(cfg).items()}
    state = model.state_dict()
    for i in range(cfg.first_kv_shared_layer, cfg.num_layers):
        for tensor in KV_OWNER_TENSORS:
            state.setdefault(f"model.layers.{i}.{tensor}", state[f"model.layers.0.{tensor}"])
    entries = [(n, "BF16", tuple(p.shape)) for n, p in state.items() if n != "lm_head.weight"]
    shards = shard(entries, lambda e: 2 * math.prod(e[2]), shard_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for file, group in zip(shard_files(len(shards)), shards):
        with open(folder / file, "wb") as fh:
            fh.write(safetensors_header(group))
            for name, _, shape in group:
                rows, row_elems = shape[0], math.prod(shape[1:])
                step = max(1, BLOCK_BYTES // (4 * row_elems))
                for r in range(0, rows, step):
                    stop = min(rows, r + step)
                    block = torch.from_numpy(source.read_rows(ours[name], r, stop)) if name in ours else torch.zeros((stop - r, *shape[1:]))
                    fh.write(block.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes())
                    total += 2 * block.numel()
                weight_map[name] = file
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = hf.to_dict()
    config.update(architectures=["Gemma3nForCausalLM"], model_type="gemma3n_text", torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", default="e2b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--tokenizer", type=Path, default=None, help="copied in as tokenizer.model")
    args = parser.parse_args()
    write_random_checkpoint(args.out, text_config(args.variant, args.layers))
    if args.tokenizer:
        shutil.copyfile(args.tokenizer, args.out / "tokenizer.model")


if __name__ == "__main__":
    main()
