"""The tensor-parallel group: `TensorParallel` (the tp process group, this rank's place in
it, the hidden-dim collectives and their byte counter) and the autograd Functions of the
collectives the tp modules share. `disttrain.parallel.tensor` has the layout and the modules.

Shape legend: T tokens (any leading dims), H hidden, h = H/tp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from disttrain.parallel.comm_counter import CommCounter
from planner.plan import TP_COLUMN_BACKWARDS as COLUMN_BACKWARDS

COMM_KINDS = ("all_gather", "reduce_scatter", "all_reduce")
"""Keys of `TensorParallel.comm_bytes`."""


class TensorParallel(CommCounter):
    """The tp group, this rank's place in it, hidden-dim collectives and their byte counter."""

    def __init__(self, group: dist.ProcessGroup, overlap_chunks: int = 1,
                 column_backward: str = "lean") -> None:
        if overlap_chunks < 1:
            raise ValueError(f"parallel.tp_overlap_chunks: must be >= 1, got {overlap_chunks}")
        if column_backward not in COLUMN_BACKWARDS:
            raise ValueError(f"parallel.tp_column_backward: must be one of {COLUMN_BACKWARDS}, "
                             f"got {column_backward!r}")
        self.group = group
        self.overlap_chunks = overlap_chunks
        """Token blocks the column- and row-parallel linears pipeline their collectives over
        (1: one blocking collective each)."""
        self.column_backward = column_backward
        """How the column-parallel backward runs its GEMMs (`tp_linear._ColumnParallel`):
        'lean' (tp GEMMs of H / tp features each) or 'whole' (one GEMM each, transposed)."""
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

    def start_gather(self, x_Th: torch.Tensor, out: torch.Tensor | None = None,
                     rank_major: bool = False) -> "_InFlight":
        """Issue the all-gather of `gather_hidden` without waiting (`async_op`: on CUDA it runs
        on NCCL's stream, on gloo on its worker thread); `.wait()` returns the (..., H), written
        into `out` (a (..., H) tensor, e.g. a row block of a larger one) when given. The
        collective receives the shards rank by rank into a staging buffer that `.wait()`
        rearranges and releases; `rank_major`: `.wait()` returns that buffer as it is,
        (tp, ..., h) with rank r's shard at r, no copy."""
        x_Th = x_Th.contiguous()
        staged = torch.empty((self.size, *x_Th.shape), dtype=x_Th.dtype, device=x_Th.device)
        work = dist.all_gather_single(staged.view(-1), x_Th.view(-1), group=self.group,
                                      async_op=True)
        self._count_collective("all_gather", x_Th)

        def result() -> torch.Tensor:
            if rank_major:
                return staged
            by_feature = staged.movedim(0, -2)          # (..., tp, h)
            if out is None:
                return by_feature.reshape(*x_Th.shape[:-1], -1)
            out.view(by_feature.shape).copy_(by_feature)
            return out
        return _InFlight(work, result, x_Th)

    def start_reduce_scatter(self, y_TH: torch.Tensor, out: torch.Tensor | None = None,
                             rank_major: bool = False) -> "_InFlight":
        """Issue the reduce-scatter of `reduce_scatter_hidden` without waiting, into `out`
        (a contiguous (..., h) tensor, e.g. a row block of a larger one) when given.
        `rank_major`: `y_TH` is already the collective's layout, a contiguous (tp, ..., h) with
        the features bound for rank r at r (no rank-major copy of it is made)."""
        parts = (y_TH if rank_major
                 else y_TH.unflatten(-1, (self.size, -1)).movedim(-2, 0).contiguous())
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
        """The result, once (the buffers the collective used are released here)."""
        self.work.wait()
        self.source = None
        result, self.result = self.result, None
        return result()


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
