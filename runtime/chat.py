"""Gemma's chat turn format and tokenization with the bundle's SentencePiece model.

    <bos><start_of_turn>user\n{system}\n\n{text}<end_of_turn>\n<start_of_turn>model\n

A model turn ends with <end_of_turn>\n; the next user turn follows directly. `<bos>` opens the
conversation only. The markers are looked up by id, so this works whether or not a tokenizer
parses them out of text.
"""

from __future__ import annotations

import re
from pathlib import Path

from converter.errors import BundleError

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
_MARKERS = re.compile(f"({re.escape(START_OF_TURN)}|{re.escape(END_OF_TURN)})")


class Tokenizer:
    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(Path(path).read_bytes())
        except (OSError, RuntimeError) as exc:
            raise BundleError(f"cannot load the tokenizer {path}: {exc}") from exc
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.markers = {m: self.sp.piece_to_id(m) for m in (START_OF_TURN, END_OF_TURN)}
        if any(i == self.sp.unk_id() for i in self.markers.values()):
            self.markers = {}  # a tokenizer without chat markers: raw prompts only
        self.stop_ids = {self.eos_id} | ({self.markers[END_OF_TURN]} if self.markers else set())

    def encode(self, text: str) -> list[int]:
        """Text with any turn markers in it -> ids (the markers as their single ids)."""
        ids: list[int] = []
        for part in _MARKERS.split(text):
            if part in self.markers:
                ids.append(self.markers[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def user_turn(self, text: str, system: str | None = None, first: bool = True) -> list[int]:
        """Ids of one user turn plus the opening of the model's reply."""
        if not self.markers:
            raise BundleError("the bundle's tokenizer has no <start_of_turn>/<end_of_turn>; use raw prompts (--raw)")
        body = f"{system}\n\n{text}" if system else text
        ids = self.encode(f"{START_OF_TURN}user\n{body}{END_OF_TURN}\n{START_OF_TURN}model\n")
        return ([self.bos_id] if first else []) + ids

    def close_model_turn(self) -> list[int]:
        """What closes the model's turn in the history before the next user turn."""
        return self.encode(END_OF_TURN + "\n")


class TextStream:
    """Incremental detokenization: the text each new token adds (SentencePiece joins pieces, and
    byte-fallback pieces only form characters together, so decode the whole reply and diff)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return ""
        new, self.text = text[len(self.text):], text
        return new
