"""Build tiny random Gemma 3n checkpoints in the Hugging Face layout, with a SentencePiece tokenizer.

No model hub is reachable from build machines, so tests and `make demo` make their own
checkpoint: a real `Gemma3nForConditionalGeneration` (tiny MobileNet-V5 and USM towers) or
`Gemma3nForCausalLM`, saved with `save_pretrained` (real safetensors, real key names), plus a
tokenizer trained on the spot with the Gemma special tokens at their usual names.

    python -m converter.tiny_checkpoint OUT_DIR [--text-only] [--seed N]
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch

from converter.checkpoint import RESIDUAL_BRANCH_GAIN, RESIDUAL_BRANCH_NORMS
from converter.config import FULL, SLIDING, TextConfig, tiny_config

TEXT_VOCAB = 512  # trained pieces; multimodal ids follow, as in the real 262144 + 128 + 128 layout
MODALITY_VOCAB = 8
SPECIAL_SYMBOLS = ["<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<start_of_audio>"]
MULTIMODAL_PIECES = (
    ["<end_of_image>", "<image_soft_token>"]
    + [f"<unused_vision_{i}>" for i in range(MODALITY_VOCAB - 2)]
    + ["<end_of_audio>", "<audio_soft_token>"]
    + [f"<unused_audio_{i}>" for i in range(MODALITY_VOCAB - 2)]
)


def hf_text_config(cfg: TextConfig) -> dict:
    """Our TextConfig as Gemma3nTextConfig keyword arguments."""
    return dict(
        vocab_size=cfg.vocab_size,
        vocab_size_per_layer_input=cfg.vocab_size_per_layer_input,
        hidden_size=cfg.hidden_size,
        hidden_size_per_layer_input=cfg.hidden_size_per_layer_input,
        intermediate_size=list(cfg.intermediate_sizes),
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        layer_types=list(cfg.layer_types),
        num_kv_shared_layers=cfg.num_kv_shared_layers,
        sliding_window=cfg.sliding_window,
        activation_sparsity_pattern=list(cfg.activation_sparsity),
        laurel_rank=cfg.laurel_rank,
        altup_num_inputs=cfg.altup_num_inputs,
        rms_norm_eps=cfg.rms_norm_eps,
        final_logit_softcapping=cfg.final_logit_softcap,
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": cfg.rope_theta_local},
            FULL: {"rope_type": "default", "rope_theta": cfg.rope_theta_global},
        },
        max_position_embeddings=4096,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_ids[0],
        bos_token_id=cfg.bos_token_id,
    )


def hf_config(cfg: TextConfig) -> dict:
    """Gemma3nConfig keyword arguments: `cfg` as the text model, with tiny MobileNet-V5 and USM
    towers and multimodal token ids laid out as in the real vocabulary."""
    v = cfg.vocab_size_per_layer_input
    return dict(
        text_config=hf_text_config(cfg),
        vision_config=dict(
            hidden_size=2048,  # timm's MobileNet-V5 MSFA output width is fixed at 2048
            vocab_size=MODALITY_VOCAB,
            vocab_offset=v,
            model_args={"channel_multiplier": 0.03125, "msfa_output_resolution": 2},
        ),
        audio_config=dict(
            input_feat_size=32, hidden_size=32, conf_num_attention_heads=4, conf_num_hidden_layers=1,
            sscp_conv_channel_size=[16, 8], conf_conv_kernel_size=3, conf_attention_chunk_size=4,
            conf_attention_context_left=5, vocab_size=MODALITY_VOCAB, vocab_offset=v + MODALITY_VOCAB,
        ),
        vision_soft_tokens_per_image=4,
        audio_soft_tokens_per_image=4,
        boi_token_id=SPECIAL_SYMBOLS.index("<start_of_image>") + 4,
        boa_token_id=SPECIAL_SYMBOLS.index("<start_of_audio>") + 4,
        eoi_token_id=v,
        image_token_id=v + 1,
        eoa_token_id=v + MODALITY_VOCAB,
        audio_token_id=v + MODALITY_VOCAB + 1,
    )


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
    text = hf_text_config(cfg)
    if text_only:
        model = Gemma3nForCausalLM(Gemma3nTextConfig(**text))
    else:
        model = Gemma3nForConditionalGeneration(Gemma3nConfig(**hf_config(cfg)))
    randomize_(model, seed)
    model.eval().save_pretrained(out)
    train_tokenizer(out / "tokenizer.model", seed)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--text-only", action="store_true", help="save a Gemma3nForCausalLM instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_checkpoint(args.out, text_only=args.text_only, seed=args.seed)
    print(f"tiny Gemma 3n checkpoint written to {path}")


if __name__ == "__main__":
    main()
