"""Tensor parallelism over the `tp` axis, applied by a function to an unmodified Llama.

Shape legend: T tokens (any leading batch/sequence dims), H hidden, h = H/tp, V vocab,
v = V/tp, F ffn hidden, N query heads, K kv heads, D head dim.

Megatron's recipe (column-parallel q/k/v/gate/up, row-parallel o/down, vocabulary-parallel
embedding, head and loss) with the activations *between* blocks sharded over the tp ranks, as
Megatron's sequence parallelism does, so every activation a rank holds is 1/tp of the whole:

    x_Th --norm(sharded)--> hn_Th --all-gather--> hn_TH --colwise--> q/k/v, gate/up (heads/tp, F/tp)
    o/down (rowwise) --> partial y_TH --reduce-scatter--> y_Th --+ residual x_Th

The one difference from Megatron: the residual stream is sharded over the *hidden* dimension
(each tp rank holds h of the H features of every token), not over tokens. Every operation then
stays token-local, which the token-wise swap/recompute runtime (offload/layer_fn.py) needs: it
runs a layer's token-local parts on slices of this rank's tokens, and gathering token shards of
a slice would interleave the ranks' tokens (docs/design.md, "Tensor parallelism", has the probe).
The bytes are those of Megatron-SP: one all-gather of T x H per block in the forward, a
reduce-scatter after it; in the backward the column-parallel input is all-gathered again (only
the h-wide shard is saved, as Megatron saves its token shard), its gradient reduce-scattered,
and the row-parallel output gradient all-gathered. RMSNorm over sharded features adds one
all-reduce of one fp32 per token (forward and backward).

Every parameter is a true shard (norm weights included) except Qwen3's per-head q/k norm
weights (`ModelShape.qk_norm`): one head_dim weight that every head, so every tp rank, uses.
Those are replicated over tp (`TP_REPLICATED`); each rank's backward gives the gradient from
its own heads, and ZeRO sums them over the tp group once per step (grad_reduce.py,
`TpReplicatedGrads`), as Megatron-core all-reduces its sequence-parallel and qk-layernorm
weights' gradients over tp once per step. ZeRO shards each rank's local parameters over dp x sp unchanged. The
parameters keep their names; `TP_SHARD_DIM` says along which dim each is split (checkpoints
store full shapes; a replicated one once, the same on every tp rank).
Collectives run on the tp process group (NCCL on GPUs, gloo on CPU): nothing here is device
specific. With `parallel.tp_overlap_chunks` = K > 1 every all-gather -> GEMM and GEMM ->
reduce-scatter pair runs over K token blocks with asynchronous collectives, so that block i's
collective overlaps block i-1's / i+1's GEMM and only the first (or last) block's is exposed
(collective matmul, as Megatron's TP comm overlap and torchtitan's async TP; docs/design.md). `comm_bytes` counts the bytes this rank sends to other ranks, by collective kind.

This file holds the layout, the norm and linear modules and `apply_tensor_parallel`; the tp
group and its collectives are in tp_comm.py, the linears' autograd Functions in tp_linear.py,
the vocabulary-parallel embedding and loss in tp_vocab.py (names importable from here too).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from planner.working_set import NORM_CHUNK_TOKENS

from disttrain.model.rmsnorm import rms_norm
from disttrain.parallel.tp_comm import COMM_KINDS, TensorParallel, _AllReduceSum  # noqa: F401
from disttrain.parallel.tp_linear import _ColumnParallel, _RowParallel
from disttrain.parallel.tp_vocab import (VocabParallelEmbedding, _pad_rows,  # noqa: F401
                                        _real_rows, padded_vocab_size, vocab_parallel_lm_loss)
from disttrain.spec import tensor_parallel_error

TP_SHARD_DIM = {"embed.weight": 0, "pos_embed.weight": 1, "head.weight": 0, "norm.weight": 0,
                "attn_norm.weight": 0, "mlp_norm.weight": 0,
                "q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0,
                "gate_proj.weight": 0, "up_proj.weight": 0,
                "o_proj.weight": 1, "down_proj.weight": 1,
                "q_norm.weight": None, "k_norm.weight": None}
"""Parameter-name suffix -> dim along which tensor parallelism splits it (None: replicated)."""
TP_REPLICATED = tuple(suffix for suffix, dim in TP_SHARD_DIM.items() if dim is None)
"""Suffixes of the parameters every tp rank holds whole (Qwen3's q/k norm weights)."""


def tp_shard_dim(name: str) -> int | None:
    """Dim along which parameter `name` (of the unmodified model) is split over tp; None when
    every tp rank holds it whole (`TP_REPLICATED`)."""
    for suffix, dim in TP_SHARD_DIM.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    raise KeyError(f"{name}: no tensor-parallel layout for this parameter")


class ShardedRMSNorm(nn.Module):
    """RMSNorm over features sharded across tp: the sum of squares is all-reduced per token."""

    def __init__(self, tp: TensorParallel, weight: torch.Tensor, eps: float, hidden_size: int):
        super().__init__()
        self.tp, self.eps, self.hidden_size = tp, eps, hidden_size
        self.weight = nn.Parameter(weight)
        self.chunk_tokens = NORM_CHUNK_TOKENS

    def forward(self, x_Th: torch.Tensor) -> torch.Tensor:
        return rms_norm(x_Th, self.weight, self.eps, self.hidden_size, self.tp, self.chunk_tokens)


class _Siblings:
    """Column-parallel linears that read the same input (q, k, v): the first one called runs
    all of them with one all-gather and holds the others' outputs until they are called."""

    def __init__(self) -> None:
        self.members: list["ColumnParallelLinear"] = []
        self.pending: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None


class ColumnParallelLinear(nn.Module):
    """Output features split over tp; takes the (..., h) shard, returns (..., out/tp)."""

    def __init__(self, tp: TensorParallel, weight: torch.Tensor, siblings: _Siblings):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(weight)
        self._siblings = siblings
        siblings.members.append(self)

    def forward(self, x_Th: torch.Tensor) -> torch.Tensor:
        sib = self._siblings
        index = sib.members.index(self)
        if sib.pending is not None and sib.pending[0] is x_Th and index in sib.pending[1]:
            out = sib.pending[1].pop(index)
            if not sib.pending[1]:
                sib.pending = None
            return out
        later = sib.members[index:]
        outs = _ColumnParallel.apply(self.tp, x_Th, *(m.weight for m in later))
        rest = {index + i: o for i, o in enumerate(outs) if i}
        sib.pending = (x_Th, rest) if rest else None
        return outs[0]


class RowParallelLinear(nn.Module):
    """Input features split over tp; returns the reduce-scattered (..., h) shard."""

    def __init__(self, tp: TensorParallel, weight: torch.Tensor):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RowParallel.apply(self.tp, x, self.weight)


def _shard(weight: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    return weight.detach().chunk(tp.size, dim=dim)[tp.rank].clone()


def apply_tensor_parallel(model: nn.Module, group: dist.ProcessGroup | None,
                          overlap_chunks: int = 1,
                          column_backward: str = "lean") -> TensorParallel | None:
    """Split every parameter of `model` (a freshly built, identical Llama on every rank) over
    the tp `group`: this rank keeps its shard, the modules become their parallel forms under
    the same names. Run before sequence parallelism and the activation policy (they see the
    local heads). Returns the TensorParallel (also `model.tensor_parallel`, which the loss
    uses), or None with no group / a group of one rank. `overlap_chunks`: token blocks the
    linears overlap their collectives with their GEMMs over (`_ColumnParallel`);
    `column_backward`: the column-parallel backward's GEMM layout, 'lean' or 'whole'."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    tp = TensorParallel(group, overlap_chunks, column_backward)
    shape = model.shape
    error = tensor_parallel_error(shape, tp.size)
    if error:
        raise ValueError(f"parallel.tp: {error}")
    h = shape.hidden_size

    def norm(old: nn.Module) -> ShardedRMSNorm:
        return ShardedRMSNorm(tp, _shard(old.weight, 0, tp), old.eps, h)

    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        layer.attn_norm, layer.mlp_norm = norm(layer.attn_norm), norm(layer.mlp_norm)
        qkv = _Siblings()
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, ColumnParallelLinear(tp, _shard(getattr(attn, name).weight, 0, tp),
                                                     qkv))
        attn.o_proj = RowParallelLinear(tp, _shard(attn.o_proj.weight, 1, tp))
        attn.num_heads //= tp.size
        attn.num_kv_heads //= tp.size
        gate_up = _Siblings()
        if hasattr(mlp, "gate_proj"):  # SwiGLU; GPT's GeLU MLP has up and down only
            mlp.gate_proj = ColumnParallelLinear(tp, _shard(mlp.gate_proj.weight, 0, tp), gate_up)
        mlp.up_proj = ColumnParallelLinear(tp, _shard(mlp.up_proj.weight, 0, tp), gate_up)
        mlp.down_proj = RowParallelLinear(tp, _shard(mlp.down_proj.weight, 1, tp))
    tp.vocab_size = shape.vocab_size
    vocab = padded_vocab_size(shape.vocab_size, tp.size)
    model.embed = VocabParallelEmbedding(tp, _shard(_pad_rows(model.embed.weight, vocab), 0, tp))
    if model.pos_embed is not None:  # learned positions: this rank's h features of each row
        model.pos_embed = nn.Embedding.from_pretrained(_shard(model.pos_embed.weight, 1, tp),
                                                       freeze=False)
    model.norm = norm(model.norm)
    if model.head is not None:
        model.head = ColumnParallelLinear(tp, _shard(_pad_rows(model.head.weight, vocab), 0, tp),
                                          _Siblings())
    model.tensor_parallel = tp
    return tp


def tp_checkpoint_state(state: dict, tp: TensorParallel) -> dict:
    """A ZeRO `state_dict()` of this rank's tp shards with each parameter's (and moment's)
    FlatShard placed in the full-shaped tensor: the same views, so loads land in place."""
    from disttrain.checkpoint import FlatShard  # checkpoints are not this module's concern

    out = {}
    for key, value in state.items():
        if not isinstance(value, FlatShard):
            out[key] = value
            continue
        name = key.split(".", 1)[1].removesuffix(".exp_avg_sq").removesuffix(".exp_avg")
        dim = tp_shard_dim(name)
        if dim is None:   # replicated: the same key and values on every tp rank, saved once
            out[key] = value
            continue
        origin = [0] * len(value.shape)
        origin[dim] = tp.rank * value.shape[dim]
        full = list(value.shape)
        full[dim] *= tp.size
        shape, local = value.shape, value.local
        if _is_vocab_sharded(name):   # leave the padded rows out: the key has the true vocabulary
            full[0] = tp.vocab_size
            shape = (_real_rows(tp, value.shape[0]), *value.shape[1:])
            keep = max(0, min(local.numel(), math.prod(shape) - value.start))
            if keep == 0:
                continue
            local = local[:keep]
        out[key] = FlatShard(tuple(shape), value.start, local, tuple(origin), tuple(full))
    return out


def tp_replicated_names(model: nn.Module) -> tuple[str, ...]:
    """Names of `model`'s parameters every tp rank holds whole (`TP_REPLICATED`)."""
    return tuple(name for name, _ in model.named_parameters()
                 if any(name == s or name.endswith("." + s) for s in TP_REPLICATED))


def _is_vocab_sharded(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in ("embed.weight", "head.weight"))


def gather_full_parameters(params: dict[str, torch.Tensor], tp: TensorParallel
                           ) -> dict[str, torch.Tensor]:
    """{name: this rank's shard} -> {name: the whole parameter} (a collective over tp; a
    replicated parameter is this rank's copy)."""
    out = {}
    for name, shard in params.items():
        if tp_shard_dim(name) is None:
            out[name] = shard.detach().clone()
            continue
        parts = [torch.empty_like(shard) for _ in range(tp.size)]
        dist.all_gather(parts, shard.contiguous(), group=tp.group)
        out[name] = torch.cat(parts, dim=tp_shard_dim(name))
        if _is_vocab_sharded(name) and tp.vocab_size is not None:
            out[name] = out[name][:tp.vocab_size]          # without the padding rows
    return out
