"""Byte-level tokenizer: ids 0-255 are the UTF-8 bytes, then three specials."""

from __future__ import annotations

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259


def encode(text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])


def decode(ids) -> str:
    """Inverse of `encode`; specials are dropped, invalid UTF-8 is replaced."""
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")
