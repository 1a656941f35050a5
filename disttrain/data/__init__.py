"""Data: byte tokenizer, token sources, deterministic batches."""

from disttrain.data.sources import Batches, DataError, build_batches
from disttrain.data.tokenizer import decode, encode

__all__ = ["Batches", "DataError", "build_batches", "decode", "encode"]
