"""Shared by the document-masking tests: a packed row and the run-each-document-alone reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from disttrain.tiling import IGNORE

DOC_LENGTHS = (5, 10, 1, 3, 9, 4)
"""32 tokens: documents cross the zig-zag chunk borders of sp=2 (8, 16, 24), one has 1 token."""


def packed_row(vocab_size: int, seed: int = 0, lengths=DOC_LENGTHS):
    """(tokens (1,T), targets (1,T), positions (T,), doc_ids (1,T)) of documents back to back."""
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab_size, (n,), generator=gen) for n in lengths]
    targets = [torch.cat([d[1:], torch.tensor([IGNORE])]) for d in docs]
    positions = [torch.arange(n) for n in lengths]
    ids = [torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)]
    return (torch.cat(docs)[None], torch.cat(targets)[None], torch.cat(positions),
            torch.cat(ids)[None])


def reference_loss(model, tokens, targets, doc_ids) -> torch.Tensor:
    """Each document run alone (its own sequence, positions from 0): mean over valid tokens."""
    total, count = 0.0, 0
    for doc in doc_ids[0].unique():
        sel = doc_ids[0] == doc
        tok, tgt = tokens[:, sel], targets[:, sel]
        logits = model(tok, torch.arange(tok.shape[1]))
        total = total + F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(),
                                        reduction="sum", ignore_index=IGNORE)
        count += int((tgt != IGNORE).sum())
    return total / count
