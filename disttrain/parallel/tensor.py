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

Every parameter is a true shard (norm weights included), so no gradient is reduced over tp and
ZeRO shards each rank's local parameters over dp x sp unchanged. The parameters keep their
names; `TP_SHARD_DIM` says along which dim each is split (checkpoints store full shapes).
Collectives run on the tp process group (NCCL on GPUs, gloo on CPU): nothing here is device
specific. With `parallel.tp_overlap_chunks` = K > 1 every all-gather -> GEMM and GEMM ->
reduce-scatter pair runs over K token blocks with asynchronous collectives, so that block i's
collective overlaps block i-1's / i+1's GEMM and only the first (or last) block's is exposed
(collective matmul, as Megatron's TP comm overlap and torchtitan's async TP; docs/design.md). `comm_bytes` counts the bytes this rank sends to other ranks, by collective kind.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from disttrain.parallel.comm_counter import CommCounter
from disttrain.parallel.tp_linear import _ColumnParallel, _RowParallel
from disttrain.spec import tensor_parallel_error

TP_SHARD_DIM = {"embed.weight": 0, "pos_embed.weight": 1, "head.weight": 0, "norm.weight": 0,
                "attn_norm.weight": 0, "mlp_norm.weight": 0,
                "q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0,
                "gate_proj.weight": 0, "up_proj.weight": 0,
                "o_proj.weight": 1, "down_proj.weight": 1}
"""Parameter-name suffix -> dim along which tensor parallelism splits it."""

COMM_KINDS = ("all_gather", "reduce_scatter", "all_reduce")
"""Keys of `TensorParallel.comm_bytes`."""


def tp_shard_dim(name: str) -> int:
    """Dim along which parameter `name` (of the unmodified model) is split over tp."""
    for suffix, dim in TP_SHARD_DIM.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    raise KeyError(f"{name}: no tensor-parallel layout for this parameter")


class TensorParallel(CommCounter):
    """The tp group, this rank's place in it, hidden-dim collectives and their byte counter."""

    def __init__(self, group: dist.ProcessGroup, overlap_chunks: int = 1) -> None:
        if overlap_chunks < 1:
            raise ValueError(f"parallel.tp_overlap_chunks: must be >= 1, got {overlap_chunks}")
        self.group = group
        self.overlap_chunks = overlap_chunks
        """Token blocks the column- and row-parallel linears pipeline their collectives over
        (1: one blocking collective each)."""
        self.size = dist.get_world_size(group)
        """Tensor-parallel degree."""
        self.rank = dist.get_rank(group)
        """This rank's index in the tp group: it holds shard `rank` of every parameter."""
        self.vocab_size: int | None = None
        """The model's true vocabulary (set by `apply_tensor_parallel`): the embedding and
        head rows are padded to a multiple of tp, and rows from here on are padding."""
        CommCounter.__init__(self, COMM_KINDS)

    def _count_collective(self, kind: str, t: torch.Tensor) -> None:
        """Ring volume: an all-gather / reduce-scatter of shard `t` sends (tp-1) shards; an
        all-reduce of `t` sends 2 (tp-1)/tp of it."""
        nbytes = t.numel() * t.element_size() * (self.size - 1)
        self._count(kind, 2 * nbytes // self.size if kind == "all_reduce" else nbytes)

    def start_gather(self, x_Th: torch.Tensor) -> "_InFlight":
        """Issue the all-gather of `gather_hidden` without waiting (`async_op`: on CUDA it runs
        on NCCL's stream, on gloo on its worker thread); `.wait()` returns the (..., H)."""
        x_Th = x_Th.contiguous()
        out = torch.empty((self.size, *x_Th.shape), dtype=x_Th.dtype, device=x_Th.device)
        work = dist.all_gather_single(out.view(-1), x_Th.view(-1), group=self.group,
                                      async_op=True)
        self._count_collective("all_gather", x_Th)
        return _InFlight(work, lambda: out.movedim(0, -2).reshape(*x_Th.shape[:-1], -1), x_Th)

    def start_reduce_scatter(self, y_TH: torch.Tensor, out: torch.Tensor | None = None
                             ) -> "_InFlight":
        """Issue the reduce-scatter of `reduce_scatter_hidden` without waiting, into `out`
        (a contiguous (..., h) tensor, e.g. a row block of a larger one) when given."""
        parts = y_TH.unflatten(-1, (self.size, -1)).movedim(-2, 0).contiguous()
        if out is None:
            out = torch.empty(parts.shape[1:], dtype=y_TH.dtype, device=y_TH.device)
        work = dist.reduce_scatter_single(out.view(-1), parts.view(-1), group=self.group,
                                          async_op=True)
        self._count_collective("reduce_scatter", out)
        return _InFlight(work, lambda: out, parts)

    def gather_hidden(self, x_Th: torch.Tensor) -> torch.Tensor:
        """(..., h) shards of the tp ranks -> (..., H), shard r at features [r*h, (r+1)*h)."""
        return self.start_gather(x_Th).wait()

    def reduce_scatter_hidden(self, y_TH: torch.Tensor) -> torch.Tensor:
        """Sum of the ranks' (..., H) partials, this rank keeping its (..., h) features."""
        return self.start_reduce_scatter(y_TH).wait()

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        t = t.contiguous().clone()
        dist.all_reduce(t, op=op, group=self.group)
        self._count_collective("all_reduce", t)
        return t


class _InFlight:
    """A collective issued with `async_op=True`: its work handle, how to read its result,
    and the buffer it reads (held until it completes)."""

    def __init__(self, work, result, source: torch.Tensor) -> None:
        self.work, self.result, self.source = work, result, source

    def wait(self) -> torch.Tensor:
        self.work.wait()
        self.source = None
        return self.result()


class _AllReduceSum(torch.autograd.Function):
    """Sum over the tp ranks; every rank uses the sum, so the gradient is summed too."""

    @staticmethod
    def forward(ctx, tp: TensorParallel, t: torch.Tensor) -> torch.Tensor:
        ctx.tp = tp
        return tp.all_reduce(t)

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.tp.all_reduce(grad)


class _ReduceScatterHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tp: TensorParallel, y_TH: torch.Tensor) -> torch.Tensor:
        ctx.tp = tp
        return tp.reduce_scatter_hidden(y_TH)

    @staticmethod
    def backward(ctx, grad_Th):
        return None, ctx.tp.gather_hidden(grad_Th)


class ShardedRMSNorm(nn.Module):
    """RMSNorm over features sharded across tp: the sum of squares is all-reduced per token."""

    def __init__(self, tp: TensorParallel, weight: torch.Tensor, eps: float, hidden_size: int):
        super().__init__()
        self.tp, self.eps, self.hidden_size = tp, eps, hidden_size
        self.weight = nn.Parameter(weight)

    def forward(self, x_Th: torch.Tensor) -> torch.Tensor:
        xf = x_Th.float()
        sumsq = _AllReduceSum.apply(self.tp, xf.pow(2).sum(-1, keepdim=True))
        normed = xf * torch.rsqrt(sumsq / self.hidden_size + self.eps)
        return normed.to(x_Th.dtype) * self.weight


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


class VocabParallelEmbedding(nn.Module):
    """Rows [rank*v, (rank+1)*v) of the embedding; the partial lookups are summed and
    scattered over the hidden dim (one reduce-scatter)."""

    def __init__(self, tp: TensorParallel, weight: torch.Tensor):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(weight)
        self.vocab_start = tp.rank * weight.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        inside = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return _ReduceScatterHidden.apply(self.tp, rows * inside.unsqueeze(-1).to(rows.dtype))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(all_gather(h_Th) @ W_vH^T, target) with the logits
    split over the vocabulary (Megatron's loss parallel): per token chunk, the max and the
    sum of exponentials and the target logit are all-reduced; only `chunk` x v logits exist
    at a time. Logits of padded vocabulary rows (`_real_rows`) are -inf: they take no
    probability and get no gradient. Saves the hidden shard, W and the per-token log-sum-exp."""

    @staticmethod
    def forward(ctx, tp: TensorParallel, h_Th, weight_vH, targets_T, chunk: int):
        h_TH = tp.gather_hidden(h_Th)
        vocab, real = weight_vH.shape[0], _real_rows(tp, weight_vH.shape[0])
        local_T = targets_T - tp.rank * vocab
        inside_T = (local_T >= 0) & (local_T < vocab)
        lse_T = torch.empty(h_TH.shape[0], dtype=torch.float32, device=h_TH.device)
        total = torch.zeros((), dtype=torch.float32, device=h_TH.device)
        for s in range(0, h_TH.shape[0], chunk):
            logits = F.linear(h_TH[s:s + chunk], weight_vH).float()
            logits[:, real:] = -torch.inf
            peak = tp.all_reduce(logits.max(-1).values, dist.ReduceOp.MAX)
            rows = torch.arange(logits.shape[0], device=logits.device)
            picked = logits[rows, local_T[s:s + chunk].clamp(0, vocab - 1)]
            sums = tp.all_reduce(torch.stack([(logits - peak[:, None]).exp().sum(-1),
                                              torch.where(inside_T[s:s + chunk], picked, 0.0)]))
            lse_T[s:s + chunk] = peak + sums[0].log()
            total += (lse_T[s:s + chunk] - sums[1]).sum()
        ctx.tp, ctx.chunk = tp, chunk
        ctx.save_for_backward(h_Th, weight_vH, local_T, inside_T, lse_T)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h_Th, weight_vH, local_T, inside_T, lse_T = ctx.saved_tensors
        h_TH = ctx.tp.gather_hidden(h_Th)
        real = _real_rows(ctx.tp, weight_vH.shape[0])
        grad_h = torch.empty(h_TH.shape, dtype=torch.float32, device=h_TH.device)
        grad_w = torch.zeros(weight_vH.shape, dtype=torch.float32, device=weight_vH.device)
        for s in range(0, h_TH.shape[0], ctx.chunk):
            h = h_TH[s:s + ctx.chunk]
            logits = F.linear(h, weight_vH).float()
            logits[:, real:] = -torch.inf
            dlogits = (logits - lse_T[s:s + ctx.chunk, None]).exp()
            rows = torch.nonzero(inside_T[s:s + ctx.chunk]).flatten()
            dlogits[rows, local_T[s:s + ctx.chunk][rows]] -= 1
            dlogits *= grad_total
            grad_h[s:s + ctx.chunk] = dlogits @ weight_vH.float()
            grad_w += dlogits.t() @ h.float()
        grad_h_Th = ctx.tp.reduce_scatter_hidden(grad_h).to(h_Th.dtype)
        return None, grad_h_Th, grad_w.to(weight_vH.dtype), None, None


def vocab_parallel_lm_loss(tp: TensorParallel, hidden_BSh: torch.Tensor, weight_vH: torch.Tensor,
                           targets_BS: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean next-token cross entropy of the sharded final hidden states against the
    vocabulary-parallel head (the same value on every tp rank); `chunk_tokens` tiles it over
    tokens as `tiling.chunked_lm_loss` does (0: all tokens at once)."""
    hidden_Th = hidden_BSh.flatten(0, -2)
    targets_T = targets_BS.flatten()
    chunk = chunk_tokens if chunk_tokens > 0 else max(1, hidden_Th.shape[0])
    total = _VocabParallelCrossEntropy.apply(tp, hidden_Th, weight_vH, targets_T, chunk)
    return total / targets_T.numel()


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp, as the embedding and head are held
    under tensor parallelism (Megatron pads to a multiple of 128 x tp for GEMM efficiency,
    `make_vocab_size_divisible_by`; a multiple of tp is what splitting needs)."""
    return -(-vocab_size // tp) * tp


def _real_rows(tp: TensorParallel, rows: int) -> int:
    """How many of this rank's `rows` vocabulary rows are real (not padding)."""
    if tp.vocab_size is None:
        return rows
    return max(0, min(rows, tp.vocab_size - tp.rank * rows))


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with zero rows appended up to `rows` (padding of the vocabulary)."""
    extra = rows - weight.shape[0]
    return weight if extra == 0 else torch.cat([weight.detach(), weight.new_zeros(extra, *weight.shape[1:])])


def _shard(weight: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    return weight.detach().chunk(tp.size, dim=dim)[tp.rank].clone()


def apply_tensor_parallel(model: nn.Module, group: dist.ProcessGroup | None,
                          overlap_chunks: int = 1) -> TensorParallel | None:
    """Split every parameter of `model` (a freshly built, identical Llama on every rank) over
    the tp `group`: this rank keeps its shard, the modules become their parallel forms under
    the same names. Run before sequence parallelism and the activation policy (they see the
    local heads). Returns the TensorParallel (also `model.tensor_parallel`, which the loss
    uses), or None with no group / a group of one rank. `overlap_chunks`: token blocks the
    linears overlap their collectives with their GEMMs over (`_ColumnParallel`)."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    tp = TensorParallel(group, overlap_chunks)
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


def _is_vocab_sharded(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in ("embed.weight", "head.weight"))


def gather_full_parameters(params: dict[str, torch.Tensor], tp: TensorParallel
                           ) -> dict[str, torch.Tensor]:
    """{name: this rank's shard} -> {name: the whole parameter} (a collective over tp)."""
    out = {}
    for name, shard in params.items():
        parts = [torch.empty_like(shard) for _ in range(tp.size)]
        dist.all_gather(parts, shard.contiguous(), group=tp.group)
        out[name] = torch.cat(parts, dim=tp_shard_dim(name))
        if _is_vocab_sharded(name) and tp.vocab_size is not None:
            out[name] = out[name][:tp.vocab_size]          # without the padding rows
    return out
