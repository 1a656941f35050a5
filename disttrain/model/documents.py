"""Document boundaries of packed sequences, as the attention cores see them.

A packed row holds several documents back to back; `doc_ids_BS` labels each token of the
*whole* (global-order, unsharded) row with its document, documents being contiguous runs.
The model never takes them as an argument: the caller opens `documents_scope(doc_ids)`
around the forward and every attention core reads `current_documents()` when it runs its
forward (the local core, Ulysses after its all-to-all, ring for each K/V block), then keeps
the ids in its `saved` tensors for the backward. So memory policies (swap, token-wise
recompute) and pipeline stages carry the boundaries without knowing about them.

Blocks: a core attends a *query piece* (a contiguous global range of tokens) to a *key
piece*; in every core the two are either the same range or disjoint (ring zig-zag chunks,
or the whole sequence). `piece_blocks` cuts such a pair into the kernel calls document
masking needs:

    same piece:            one causal square per document inside it
    keys before queries:   at most one full (unmasked) block: the document that contains the
                           first query token, if it started inside the key piece or before it
    keys after queries:    nothing (causal)
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch

_DOCUMENTS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "disttrain_documents", default=None)


@contextlib.contextmanager
def documents_scope(doc_ids_BS: torch.Tensor | None) -> Iterator[None]:
    """Attention cores called inside see these document ids (None: plain causal)."""
    if doc_ids_BS is not None and doc_ids_BS.dim() != 2:
        raise ValueError(f"doc_ids: must be (batch, sequence), got shape {tuple(doc_ids_BS.shape)}")
    token = _DOCUMENTS.set(doc_ids_BS)
    try:
        yield
    finally:
        _DOCUMENTS.reset(token)


def current_documents() -> torch.Tensor | None:
    """The document ids (B, S) of the forward being run, or None."""
    return _DOCUMENTS.get()


def document_bounds(doc_ids_S: torch.Tensor) -> list[int]:
    """Start of every document run of one row, then the row length: [0, s1, s2, ..., S]."""
    change = (doc_ids_S[1:] != doc_ids_S[:-1]).nonzero().flatten() + 1
    return [0, *change.tolist(), int(doc_ids_S.shape[0])]


@dataclass(frozen=True)
class DocumentBlock:
    """One kernel call: query rows `q` against key rows `k` (slices local to the pieces)."""

    q: slice
    k: slice
    causal: bool


def piece_blocks(bounds: list[int], q_start: int, q_end: int, k_start: int, k_end: int
                 ) -> list[DocumentBlock]:
    """The kernel calls of query piece [q_start, q_end) against key piece [k_start, k_end)
    under causal document masking (see the module docstring); slices are piece-local."""
    if (q_start, q_end) == (k_start, k_end):
        first = bisect.bisect_right(bounds, q_start) - 1
        blocks = []
        for run in range(first, len(bounds) - 1):
            lo, hi = max(bounds[run], q_start), min(bounds[run + 1], q_end)
            if lo >= hi:
                break
            part = slice(lo - q_start, hi - q_start)
            blocks.append(DocumentBlock(part, part, True))
        return blocks
    if not (k_end <= q_start or q_end <= k_start):
        raise ValueError(f"pieces: query [{q_start}, {q_end}) and key [{k_start}, {k_end}) "
                         f"must be equal or disjoint")
    if q_end <= k_start:
        return []  # every key is later than every query
    run = bisect.bisect_right(bounds, q_start) - 1
    if bounds[run] >= k_end:
        return []  # the first query's document starts after the key piece
    q_hi = min(bounds[run + 1], q_end)
    k_lo = max(bounds[run], k_start)
    return [DocumentBlock(slice(0, q_hi - q_start), slice(k_lo - k_start, k_end - k_start), False)]


def reference_document_attention(q_BNSD: torch.Tensor, k_BKSD: torch.Tensor,
                                 v_BKSD: torch.Tensor, doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Plain masked softmax attention (dense S x S mask), for tests only."""
    s = q_BNSD.shape[2]
    same = doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=q_BNSD.device).tril()
    mask = (same & causal)[:, None]
    return torch.nn.functional.scaled_dot_product_attention(
        q_BNSD, k_BKSD, v_BKSD, attn_mask=mask, enable_gqa=k_BKSD.shape[1] != q_BNSD.shape[1])
