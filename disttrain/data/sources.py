"""Token streams and deterministic batches.

A batch is a pure function of (seed, step, microbatch index, data-parallel rank): a resumed
run, or a run on a different number of processes with the same global batch, sees exactly the
same sequences. Nothing is downloaded: text comes from files (the bundled corpus by default)
and synthetic data is generated from the seed.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from disttrain.data.tokenizer import EOS_ID, encode
from disttrain.spec import SpecError

BUNDLED_CORPUS = "corpus.txt"


class DataError(SpecError):
    """A data problem the user can fix (message starts with the spec path `data.…`)."""


def text_tokens(path: Path | None) -> np.ndarray:
    """Byte tokens of a text file, or of every *.txt under a directory, documents joined by EOS."""
    if path is None:
        docs = [resources.files("disttrain.data").joinpath(BUNDLED_CORPUS).read_text("utf-8")]
    elif path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"data.path: no *.txt files under {path}")
        docs = [f.read_text("utf-8", errors="replace") for f in files]
    else:
        docs = [path.read_text("utf-8", errors="replace")]
    ids: list[int] = []
    for doc in docs:
        ids.extend(encode(doc, eos=True))
    return np.asarray(ids, dtype=np.int32)


def token_file(path: Path, vocab_size: int) -> np.ndarray:
    """Memory-map a .npy (any integer dtype) or raw .bin (uint16, or uint32 past 65535 ids)."""
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
    elif path.suffix == ".bin":
        dtype = np.uint16 if vocab_size <= 65536 else np.uint32
        arr = np.memmap(path, dtype=dtype, mode="r")
    else:
        raise DataError(f"data.path: token files must end in .npy or .bin, got {path.name}")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"data.path: {path.name} must hold a 1-D array of integer token ids")
    if arr.size and int(arr.max()) >= vocab_size:
        raise DataError(f"data.path: {path.name} has token id {int(arr.max())} >= "
                        f"model.vocab_size ({vocab_size})")
    return arr


def synthetic_tokens(vocab_size: int, num_tokens: int, seed: int) -> np.ndarray:
    """A learnable stream: seeded random 'words' (3-9 tokens) drawn from a fixed lexicon."""
    rng = np.random.default_rng([seed, 0x5EED])
    lexicon = [rng.integers(0, vocab_size, size=int(n)) for n in rng.integers(3, 10, size=512)]
    picks = rng.zipf(1.3, size=num_tokens // 3 + 1) % len(lexicon)
    stream = np.concatenate([lexicon[i] for i in picks])[:num_tokens]
    return stream.astype(np.int32)


class Batches:
    """Deterministic (inputs, targets) batches of shape (B, S) from a token stream."""

    def __init__(self, stream: np.ndarray, *, seq_len: int, micro_batch_size: int, seed: int):
        if len(stream) < seq_len + 2:
            raise DataError(f"data.path: the data holds {len(stream)} tokens, fewer than "
                            f"train.seq_len + 2 ({seq_len + 2})")
        self.stream, self.seq_len, self.batch, self.seed = stream, seq_len, micro_batch_size, seed

    def get(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro, rank])
        starts = rng.integers(0, len(self.stream) - self.seq_len - 1, size=self.batch)
        rows = np.stack([np.asarray(self.stream[s:s + self.seq_len + 1], dtype=np.int64)
                         for s in starts])
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def build_batches(kind: str, path: Path | None, *, vocab_size: int, seq_len: int,
                  micro_batch_size: int, seed: int) -> Batches:
    if kind == "text":
        stream = text_tokens(path)
    elif kind == "tokens":
        assert path is not None, "spec validation requires data.path for tokens"
        stream = token_file(path, vocab_size)
    else:
        stream = synthetic_tokens(vocab_size, max(1 << 20, 4 * (seq_len + 1)), seed)
    return Batches(stream, seq_len=seq_len, micro_batch_size=micro_batch_size, seed=seed)


__all__ = ["Batches", "DataError", "EOS_ID", "build_batches", "synthetic_tokens",
           "text_tokens", "token_file"]
