"""Build tiny random Gemma 3n checkpoints in the Hugging Face layout, with a SentencePiece tokenizer.

No model hub is reachable from build machines, so tests and `make demo` make their own
checkpoint: a real `Gemma3nForConditionalGeneration` (tiny MobileNet-V5 and USM towers) or
`Gemma3nForCausalLM`, saved with `save_pretrained` (real safetensors, real key names), plus a
tokenizer trained on the spot with the Gemma special tokens at their usual names. A test and dev
helper: nothing in the product imports it.

    python -m tests.support.tiny_checkpoint OUT_DIR [--text-only] [--seed N] [--e4b-shaped]
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
import torch

from converter.checkpoint import RESIDUAL_BRANCH_GAIN, RESIDUAL_BRANCH_NORMS
from converter.config import (FULL, SLIDING, TINY_MODALITY_VOCAB, TINY_START_OF_AUDIO, TINY_START_OF_IMAGE,
                              TextConfig, text_config_to_hf, tiny_config, tiny_multimodal_hf_config)

TEXT_VOCAB = 512  # trained pieces; multimodal ids follow, as in the real 262144 + 128 + 128 layout
MODALITY_VOCAB = TINY_MODALITY_VOCAB
SPECIAL_SYMBOLS = ["<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<start_of_audio>"]
MULTIMODAL_PIECES = (
    ["<end_of_image>", "<image_soft_token>"]
    + [f"<unused_vision_{i}>" for i in range(MODALITY_VOCAB - 2)]
    + ["<end_of_audio>", "<audio_soft_token>"]
    + [f"<unused_audio_{i}>" for i in range(MODALITY_VOCAB - 2)]
)


def tiny_e4b_config() -> TextConfig:
    """E4B's structure in miniature, for MatFormer slicing: blocks of two layers (sliding, full)
    stand for E4B's blocks of five, the last 4 of 8 layers are KV-shared (E4B: 15 of 35), so layers
    2 and 3 hold the caches the shared ones read (E4B: 18 and 19); per-layer FFN widths; activation
    sparsity on the first two layers (E4B: ten)."""
    return tiny_config().replace(
        name="tiny-e4b",
        intermediate_sizes=(128, 128, 96, 128, 128, 128, 96, 128),
        layer_types=(SLIDING, FULL) * 4,
        activation_sparsity=(0.95, 0.95) + (0.0,) * 6,
        num_kv_shared_layers=4,
    )


MAX_POSITIONS = 4096  # config.json's max_position_embeddings (the RoPE tables are computed, not stored)


def train_tokenizer(path: Path, seed: int = 0) -> None:
    """A 528-piece SentencePiece model: 512 trained (pad/eos/bos/unk = 0/1/2/3, chat and
    modality start tokens as user symbols) + 16 multimodal pieces at ids 512..527."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    rng = random.Random(seed)
    words = "the a model user token gemma turn image audio hello world cat dog runs fast is of and to in".split()
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    lines = [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 15))).capitalize()
        + rng.choice(".?!,")
        + f" {rng.randint(0, 9999)}"
        for _ in range(3000)
    ]
    prefix = path.with_suffix("")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        vocab_size=TEXT_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=SPECIAL_SYMBOLS,
        minloglevel=2,
        num_threads=1,  # deterministic output for a given seed
    )
    model = pb.ModelProto()
    model.ParseFromString(prefix.with_suffix(".model").read_bytes())
    for piece in MULTIMODAL_PIECES:
        model.pieces.add(piece=piece, score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    # The config's modality start ids must land on their pieces (user symbols follow the 4 specials).
    starts = {piece.piece: i for i, piece in enumerate(model.pieces) if piece.piece in ("<start_of_image>", "<start_of_audio>")}
    assert starts == {"<start_of_image>": TINY_START_OF_IMAGE, "<start_of_audio>": TINY_START_OF_AUDIO}, starts
    path.write_bytes(model.SerializeToString())
    prefix.with_suffix(".vocab").unlink(missing_ok=True)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Replace the default init (which zeroes the AltUp output scale and gives near-flat logits)
    with weights that exercise every path and give clearly peaked next-token distributions."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2 and "embed" in name:
                p.copy_(noise * 0.5)
            elif p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))  # unit gain over each output's fan-in (convs too)
            elif any(norm in name for norm in RESIDUAL_BRANCH_NORMS):
                p.copy_(RESIDUAL_BRANCH_GAIN * (1.0 + 0.5 * noise))
            else:
                p.copy_(1.0 + 0.5 * noise)


def build_tiny_checkpoint(out: Path, text_only: bool = False, seed: int = 0, cfg: TextConfig | None = None) -> Path:
    from transformers import Gemma3nConfig, Gemma3nForCausalLM, Gemma3nForConditionalGeneration, Gemma3nTextConfig

    cfg = cfg or tiny_config()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if text_only:
        model = Gemma3nForCausalLM(Gemma3nTextConfig(**text_config_to_hf(cfg), max_position_embeddings=MAX_POSITIONS))
    else:
        hf = tiny_multimodal_hf_config(cfg)
        hf["text_config"]["max_position_embeddings"] = MAX_POSITIONS
        model = Gemma3nForConditionalGeneration(Gemma3nConfig(**hf))
    randomize_(model, seed)
    model.eval().save_pretrained(out)
    train_tokenizer(out / "tokenizer.model", seed)
    return out


def vary_final_norm(folder: Path, seed: int = 0) -> Path:
    """Give the checkpoint in `folder` a random final norm, in place. With tied embeddings a tiny
    random model greedily repeats its last token, which a broken KV cache would not change; a
    random final norm makes it say varied tokens, so greedy text tests every step of the cache."""
    from safetensors.numpy import load_file, save_file

    path = Path(folder) / "model.safetensors"
    weights = load_file(path)
    (name,) = [k for k in ("model.norm.weight", "model.language_model.norm.weight") if k in weights]
    weights[name] = np.random.default_rng(seed).normal(0, 3, weights[name].shape).astype(np.float32)
    save_file(weights, path, metadata={"format": "pt"})
    return Path(folder)


def louden_attention(folder: Path, gain: float = 6.0) -> Path:
    """Scale every layer's attention branch (post_attention_layernorm) by `gain`, in place. The
    tiny random model's residual branches are quiet (RESIDUAL_BRANCH_GAIN), so a token's own
    embedding all but decides the next one and an image or clip barely moves a reply; louder
    attention lets what the soft tokens say change it."""
    from safetensors.numpy import load_file, save_file

    path = Path(folder) / "model.safetensors"
    weights = load_file(path)
    for name in [k for k in weights if "post_attention_layernorm" in k]:
        weights[name] = weights[name] * np.float32(gain)
    save_file(weights, path, metadata={"format": "pt"})
    return Path(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--text-only", action="store_true", help="save a Gemma3nForCausalLM instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--e4b-shaped", action="store_true", help="E4B's layer structure in miniature (MatFormer slicing)")
    args = parser.parse_args(argv)
    path = build_tiny_checkpoint(args.out, text_only=args.text_only, seed=args.seed,
                                 cfg=tiny_e4b_config() if args.e4b_shaped else None)
    print(f"tiny Gemma 3n checkpoint written to {path}")


if __name__ == "__main__":
    main()
