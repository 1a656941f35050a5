"""Data: byte tokenizer, token sources, deterministic batches; packed documents in
`disttrain.data.documents` (reading, tokenizing, cache) and `disttrain.data.packing`."""

from disttrain.data.sources import Batches, DataError, build_batches
from disttrain.data.tokenizer import decode, encode

__all__ = ["Batches", "DataError", "build_batches", "decode", "encode"]
