"""Gemma's chat turn format and tokenization with the bundle's SentencePiece model.

    <bos><start_of_turn>user\n{system}\n\n{text}<end_of_turn>\n<start_of_turn>model\n

A model turn ends with <end_of_turn>\n; the next user turn follows directly. `<bos>` opens the
conversation only. The markers are looked up by id, so this works whether or not a tokenizer
parses them out of text.

An image or a clip enters a user turn before its text as transformers' Gemma3nProcessor writes it:
"\n\n<start_of_image>" + one <image_soft_token> per soft token + "<end_of_image>\n\n" (audio alike).
Special pieces split the text, and the runs between them are tokenized whole, as there. The media
markers go in as ids (a prompt is a list of text runs and ids), so a tokenizer needs no pieces for
them.
"""

from __future__ import annotations

import re
from pathlib import Path

from bundle.errors import BundleError

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

    @property
    def has_chat(self) -> bool:
        return START_OF_TURN in self.markers

    def encode_parts(self, parts: list[str | int]) -> list[int]:
        """Text runs and ids -> ids: adjacent runs are joined and encoded as one, ids kept."""
        ids: list[int] = []
        run = ""
        for part in [*parts, None]:
            if isinstance(part, str):
                run += part
                continue
            ids += self.encode(run)
            run = ""
            if part is not None:
                ids.append(int(part))
        return ids

    def encode(self, text: str) -> list[int]:
        """Text with any special pieces in it -> ids (the pieces as their single ids)."""
        ids: list[int] = []
        for part in _MARKERS.split(text):
            if part in self.markers:
                ids.append(self.markers[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    @staticmethod
    def media_parts(start_id: int, soft_id: int, count: int, end_id: int) -> list[str | int]:
        """One image / clip in a prompt: its markers around `count` soft-token placeholders."""
        return ["\n\n", start_id, *[soft_id] * count, end_id, "\n\n"]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def user_turn(self, text: str, system: str | None = None, first: bool = True, media: list[str | int] = ()) -> list[int]:
        """Ids of one user turn plus the opening of the model's reply; `media` (from media_parts)
        goes before the text."""
        if not self.has_chat:
            raise BundleError("the bundle's tokenizer has no <start_of_turn>/<end_of_turn>; use raw prompts (--raw)")
        opening = f"{START_OF_TURN}user\n" + (f"{system}\n\n" if system else "")
        ids = self.encode_parts([opening, *media, f"{text}{END_OF_TURN}\n{START_OF_TURN}model\n"])
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
