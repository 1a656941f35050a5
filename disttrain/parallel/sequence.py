"""Sequence parallelism applied to an unmodified model: shards, cores, loss and gradients.

Shape legend: B batch, S full sequence, s = S/sp local tokens.

Usage on every rank of a sequence-parallel group (the same model and batch everywhere):

    core = apply_sequence_parallel(model, groups.sp, kind)       # once, before other policies
    tokens, targets, positions = shard_sequence(tokens_BS, targets_BS, sp_rank, sp, kind)
    loss = cross_entropy(model(tokens, positions), targets)      # mean over the local tokens
    loss.backward()
    loss = sp_loss_and_grad_reduce(model, loss, groups.sp)       # or let ZeRO do it, see below

Loss and gradients: every shard has the same number of tokens, so the loss of the whole
sequence is the *average* of the ranks' local mean losses. Each rank's backward already
routes the attention gradients of its tokens to the ranks that own the keys, so after every
rank has run backward on its own local loss the gradient of the whole-sequence loss is the
*average* of the ranks' parameter gradients over the sp group - the same reduction as data
parallelism. Hence with ZeRO, which averages over the dp x sp group, no extra step is
needed: each rank just calls backward on its local mean loss (scaled by 1/num_microbatches as
usual). Without ZeRO, `sp_loss_and_grad_reduce` averages the gradients over the sp group.
If a loss ignores some tokens (padding), shards stop being equal: weight by token counts.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from disttrain.parallel.ring import RingCore, zigzag_chunks
from disttrain.parallel.sp_core import SequenceParallelCore
from disttrain.parallel.ulysses import UlyssesCore

SequenceKind = Literal["ulysses", "ring"]
KINDS: tuple[str, ...] = ("ulysses", "ring")
"""Accepted values of `kind` (the plan's `parallel.sp_kind`)."""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"parallel.sp_kind: must be one of {list(KINDS)}, got {kind!r}")


def sequence_positions(seq_len: int, sp_rank: int, sp: int, kind: SequenceKind) -> torch.Tensor:
    """Absolute positions (s,) of the tokens rank `sp_rank` holds: a contiguous slice for
    Ulysses, chunks r and 2*sp-1-r of 2*sp for ring (zig-zag load balance)."""
    _check_kind(kind)
    if sp < 1:
        raise ValueError(f"parallel.sp: must be >= 1, got {sp}")
    if not 0 <= sp_rank < sp:
        raise ValueError(f"sp_rank: must be in [0, {sp}), got {sp_rank}")
    num_chunks = sp if kind == "ulysses" else 2 * sp
    if seq_len % num_chunks:
        raise ValueError(f"train.seq_len: {kind} sequence parallelism with sp={sp} needs a "
                         f"multiple of {num_chunks}, got {seq_len}")
    chunk = seq_len // num_chunks
    if kind == "ulysses":
        return torch.arange(sp_rank * chunk, (sp_rank + 1) * chunk)
    early, late = zigzag_chunks(sp_rank, sp)
    return torch.cat([torch.arange(early * chunk, (early + 1) * chunk),
                      torch.arange(late * chunk, (late + 1) * chunk)])


def shard_sequence(tokens_BS: torch.Tensor, targets_BS: torch.Tensor, sp_rank: int, sp: int,
                   kind: SequenceKind) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (tokens_Bs, targets_Bs, positions_s) of a batch of whole sequences.

    Pass the positions to the model (`model(tokens, positions)`) so RoPE rotates each token
    by its absolute position; targets stay paired with their tokens."""
    if tokens_BS.shape != targets_BS.shape:
        raise ValueError(f"targets: shape {tuple(targets_BS.shape)} must equal the tokens' "
                         f"{tuple(tokens_BS.shape)}")
    positions_s = sequence_positions(tokens_BS.shape[1], sp_rank, sp, kind).to(tokens_BS.device)
    return tokens_BS[:, positions_s], targets_BS[:, positions_s], positions_s


def build_sequence_core(group: dist.ProcessGroup | None, kind: SequenceKind, *,
                        num_heads: int, num_kv_heads: int) -> SequenceParallelCore:
    """The attention core of one sequence-parallel kind over `group`."""
    _check_kind(kind)
    if kind == "ulysses":
        return UlyssesCore(group, num_heads=num_heads, num_kv_heads=num_kv_heads)
    return RingCore(group)


def apply_sequence_parallel(model: nn.Module, group: dist.ProcessGroup | None,
                            kind: SequenceKind) -> SequenceParallelCore | None:
    """Give every decoder layer of `model` one shared sequence-parallel core; return it (its
    `comm_bytes` then counts the whole model's traffic). With no group or a group of one
    rank the model is left as it is and None is returned."""
    _check_kind(kind)
    if group is None or dist.get_world_size(group) == 1:
        return None
    attn = model.layers[0].attn  # this rank's heads (fewer under tensor parallelism)
    core = build_sequence_core(group, kind, num_heads=attn.num_heads,
                               num_kv_heads=attn.num_kv_heads)
    for layer in model.layers:
        layer.core = core
    return core


def sp_loss_and_grad_reduce(model: nn.Module, loss: torch.Tensor,
                            group: dist.ProcessGroup | None) -> torch.Tensor:
    """After backward on every rank's local mean loss: average parameter gradients over the
    sp group (in place) and return the whole-sequence loss (detached, same on every rank).

    Not for use together with ZeRO/data-parallel reduction over dp x sp, which already
    averages over the sp ranks (doing both would divide twice)."""
    loss = loss.detach().clone()
    if group is None or dist.get_world_size(group) == 1:
        return loss
    sp = dist.get_world_size(group)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([loss.reshape(1).to(grads[0].dtype)] + [g.reshape(-1) for g in grads]
                     if grads else [loss.reshape(1)])
    dist.all_reduce(flat, group=group)  # SUM: gloo has no AVG
    flat /= sp
    offset = 1
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[0].to(loss.dtype)
