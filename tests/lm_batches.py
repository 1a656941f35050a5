"""Shared by the sequence-parallel tests: a seeded batch of token ids and the plain LM loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_batch(vocab_size: int, seed: int, seq_len: int = 64, batch: int = 2
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, next-token targets), each (batch, seq_len), from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def lm_loss(model, tokens, targets, positions=None) -> torch.Tensor:
    """Mean next-token cross entropy of `model(tokens, positions)`."""
    return F.cross_entropy(model(tokens, positions).flatten(0, 1), targets.flatten())
