"""Packing tokenized documents into training rows with their boundaries kept.

Each epoch shuffles the documents (seeded by (seed, epoch)) and lays them back to back in one
stream; row r of the epoch is stream[r*S, (r+1)*S) (S = train.seq_len; the tail is dropped).
A document cut by a row boundary continues as a new *piece* in the next row; a piece is a
document for attention and positions. Inside a row:

    tokens     the piece tokens (pad tokens fill `pad_to_multiple_of`)
    targets    the next token of the same piece; IGNORE at a piece's last token and on pads
    positions  0, 1, ... restarting at every piece (RoPE uses them)
    doc_ids    0, 1, ... one id per piece

A microbatch of B rows is returned as ONE row of B*S tokens (documents never span rows, so
with document masking this is exactly B separate rows): tokens (1, B*S), positions (B*S,),
doc_ids (1, B*S) as the attention cores take them.

Global row index of row b of global microbatch g of step t: t * global_batch_size + g * B + b.
It depends on the step only, not on dp or the number of microbatches: a run resumed on
another layout (same global batch) sees the same rows at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from disttrain.data.documents import TokenizedDocuments
from disttrain.data.sources import DataError
from disttrain.tiling import IGNORE


@dataclass(frozen=True)
class PackedBatch:
    tokens: torch.Tensor
    """(1, T) int64 input ids."""
    targets: torch.Tensor
    """(1, T) int64 next-token ids, IGNORE where a token predicts nothing."""
    positions: torch.Tensor
    """(T,) int64 position of each token in its document piece."""
    doc_ids: torch.Tensor
    """(1, T) int32 piece of each token (consecutive, distinct across rows)."""


class DocumentBatches:
    """Deterministic packed batches of documents (see module doc)."""

    def __init__(self, docs: TokenizedDocuments, *, seq_len: int, micro_batch_size: int,
                 global_batch_size: int, seed: int, pad_to_multiple_of: int = 0,
                 doc_indices: np.ndarray | None = None):
        self.docs, self.seq_len, self.batch = docs, seq_len, micro_batch_size
        self.global_batch_size, self.seed = global_batch_size, seed
        self.pad_to = max(1, pad_to_multiple_of)
        self.doc_indices = (np.arange(docs.num_documents) if doc_indices is None
                            else np.asarray(doc_indices))
        lengths = docs.lengths[self.doc_indices]
        self.padded = -(-lengths // self.pad_to) * self.pad_to
        self.rows_per_epoch = int(self.padded.sum()) // seq_len
        if self.rows_per_epoch < 1:
            raise DataError(f"data.path: the documents hold {int(self.padded.sum())} tokens, "
                            f"fewer than one train.seq_len ({seq_len})")
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, end offset of each in the stream) of `epoch` (cached)."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng([self.seed, epoch, 0xD0C]).permutation(
                len(self.doc_indices))
            self._epoch = (epoch, order, np.cumsum(self.padded[order]))
        return self._epoch[1], self._epoch[2]

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, targets, positions, piece ids) of global row `index`, each (S,)."""
        epoch, r = divmod(index, self.rows_per_epoch)
        order, ends = self._layout(epoch)
        s = self.seq_len
        start, stop = r * s, (r + 1) * s
        tokens = np.full(s, self.docs.pad_id, dtype=np.int64)
        targets = np.full(s, IGNORE, dtype=np.int64)
        positions = np.zeros(s, dtype=np.int64)
        pieces = np.zeros(s, dtype=np.int32)
        j = int(np.searchsorted(ends, start, side="right"))
        piece = 0
        while j < len(order) and ends[j] - self.padded[order[j]] < stop:
            doc_start = int(ends[j] - self.padded[order[j]])
            lo, hi = max(start, doc_start) - doc_start, min(stop, int(ends[j])) - doc_start
            doc = self.doc_indices[order[j]]
            ids = self.docs.tokens[self.docs.offsets[doc]:self.docs.offsets[doc + 1]]
            real_hi = min(hi, len(ids))
            at = lo + doc_start - start  # where the piece begins in the row
            if real_hi > lo:
                tokens[at:at + real_hi - lo] = ids[lo:real_hi]
                # a token predicts the next one of the same piece: not past the piece's end
                targets[at:at + real_hi - lo - 1] = ids[lo + 1:real_hi]
            positions[at:at + hi - lo] = np.arange(hi - lo)
            pieces[at:at + hi - lo] = piece
            piece += 1
            j += 1
        return tokens, targets, positions, pieces

    def get_packed(self, step: int, micro: int) -> PackedBatch:
        """Global microbatch `micro` of optimizer step `step` (0-based) as one packed row."""
        first = step * self.global_batch_size + micro * self.batch
        rows = [self.row(first + b) for b in range(self.batch)]
        pieces, offset = [], 0
        for row in rows:
            pieces.append(row[3] + offset)
            offset = int(pieces[-1][-1]) + 1
        cat = lambda i: torch.from_numpy(np.concatenate([row[i] for row in rows]))  # noqa: E731
        return PackedBatch(tokens=cat(0)[None], targets=cat(1)[None], positions=cat(2),
                           doc_ids=torch.from_numpy(np.concatenate(pieces))[None])

    def get(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets) as `Batches.get` gives them (boundaries dropped: profiling only)."""
        batch = self.get_packed(step, micro)
        return batch.tokens, batch.targets

    def attention_fraction(self, num_rows: int = 256) -> float:
        """Mean over packed rows of sum(piece_len^2) / seq_len^2: the share of a full
        causal seq_len x seq_len attention that document masking leaves (first rows of
        epoch 0; 1.0 = one document per row)."""
        total = 0.0
        count = min(num_rows, self.rows_per_epoch)
        for index in range(count):
            pieces = self.row(index)[3]
            lengths = np.bincount(pieces).astype(np.float64)
            total += float((lengths ** 2).sum()) / self.seq_len ** 2
        return total / count


def split_documents(num_documents: int, valid_fraction: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document indices: a seeded `valid_fraction` held out (>= 1 doc
    when the fraction is positive, never all of them)."""
    order = np.random.default_rng([seed, 0x5A11D]).permutation(num_documents)
    num_valid = 0 if valid_fraction <= 0 else max(1, int(round(valid_fraction * num_documents)))
    if num_valid >= num_documents:
        raise DataError(f"data.valid_fraction: leaves no training documents ({num_documents} "
                        f"documents, {num_valid} held out)")
    return np.sort(order[num_valid:]), np.sort(order[:num_valid])


def build_document_batches(job, *, progress: bool = True, micro_batch_size: int | None = None
                           ) -> tuple[DocumentBatches, DocumentBatches | None]:
    """(training batches, validation batches or None) of a `data.kind: documents` job, in
    microbatches of `micro_batch_size` rows (a run passes its plan's; None: the spec's, 1
    under auto; rows never depend on it)."""
    from disttrain.data.documents import document_tokenizer_dir, tokenize_documents
    from disttrain.spec import _resolve

    data, tr = job.spec.data, job.spec.train
    docs = tokenize_documents(
        job.data_path, text_field=data.text_field, ids_field=data.ids_field,
        tokenizer_dir=document_tokenizer_dir(job),
        cache_dir=_resolve(data.cache_dir, job.base_dir) if data.cache_dir else None,
        vocab_size=job.shape.vocab_size, progress=progress)
    train_ids, valid_ids = split_documents(docs.num_documents, data.valid_fraction, tr.seed)
    if micro_batch_size is None:
        micro_batch_size = 1 if tr.micro_batch_size == "auto" else tr.micro_batch_size
    common = dict(seq_len=tr.seq_len, micro_batch_size=micro_batch_size,
                  global_batch_size=tr.global_batch_size, seed=tr.seed,
                  pad_to_multiple_of=data.pad_to_multiple_of)
    train = DocumentBatches(docs, doc_indices=train_ids, **common)
    valid = None
    if len(valid_ids):
        try:
            valid = DocumentBatches(docs, doc_indices=valid_ids, **common)
        except DataError:
            raise DataError(f"data.valid_fraction: the {len(valid_ids)} held-out documents "
                            f"hold fewer tokens than one train.seq_len ({tr.seq_len})") from None
    return train, valid
