"""Tensor parallelism vs plain single-process PyTorch: same loss and same gradients (fp32).

The model-level tests run `apply_tensor_parallel` on 2 gloo ranks and compare each rank's
parameter shards and their gradients, gathered to full shape, with the unmodified model's.
"""

from __future__ import annotations

import pytest
import torch

from disttrain.engine import lm_loss
from disttrain.model import build_model
from disttrain.parallel.dims import ParallelDims, build_groups
from disttrain.parallel.spawn import spawn_ranks
from disttrain.parallel.tensor import (apply_tensor_parallel, gather_full_parameters,
                                       tp_replicated_names, tp_shard_dim)
from disttrain.parallel.zero import ZeroConfig, ZeroModelStates
from disttrain.spec import tensor_parallel_error
from disttrain.tiling import apply_mlp_tiling
from lm_batches import random_batch
from planner.tp_collectives import tp_replicated_grad_bytes, tp_step_bytes
from planner.grid import tp_problem
from planner.shapes import MODEL_PRESETS, ModelShape

SHAPE = ModelShape(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   ffn_hidden_size=48, vocab_size=64, max_seq_len=64)
TIED = ModelShape(**{**SHAPE.__dict__, "tie_embeddings": True, "vocab_size": 61})
GPT = SHAPE.replace(mlp="gelu", positions="learned", ffn_hidden_size=128, vocab_size=63)
"""Odd vocabulary (as GPT-2's 50,257): tp2 pads embedding and head to 64 rows."""
WIDE_HEADS = SHAPE.replace(head_dim=12)
"""head_dim given (as Qwen3-32B's, Mistral-NeMo's): q and the attention output are
4 x 12 = 48 wide against hidden 32, so q/o shard 24 columns per rank, not 16."""
QWEN3 = WIDE_HEADS.replace(qk_norm=True)
"""Qwen3's block: per-head q/k RMSNorm weights of head_dim (12), replicated over tp."""


def _loss_and_grads(model, tokens, targets, loss_chunk_tokens=0):
    loss = lm_loss(model, tokens, targets, loss_chunk_tokens=loss_chunk_tokens)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


OVERLAP_CHUNKS = (1, 2)
"""tp_overlap_chunks each spawn runs: blocking collectives, and two token blocks whose
collectives are issued asynchronously and overlapped with the other block's GEMMs."""
RUNS = [(chunks, column) for column in ("lean", "whole") for chunks in OVERLAP_CHUNKS]
"""(tp_overlap_chunks, tp_column_backward) each spawn runs."""


def _tp_worker(rank, world, shape, loss_chunk_tokens, mlp_chunk_tokens):
    groups = build_groups(ParallelDims(tp=world, world_size=world), rank)
    results = []
    for chunks, column in RUNS:
        model = build_model(shape, seed=3)
        tp = apply_tensor_parallel(model, groups.tp, overlap_chunks=chunks,
                                   column_backward=column)
        if mlp_chunk_tokens:
            apply_mlp_tiling(model, mlp_chunk_tokens)
        tokens, targets = random_batch(shape.vocab_size, seed=5, seq_len=16, batch=2)
        loss, grads = _loss_and_grads(model, tokens, targets, loss_chunk_tokens)
        params = {n: p.detach() for n, p in model.named_parameters()}
        results.append(((chunks, column), loss, gather_full_parameters(params, tp),
                        gather_full_parameters(grads, tp), tp.reset_comm_bytes()))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("shape,loss_chunk,mlp_chunk", [(SHAPE, 0, 0), (TIED, 8, 8), (GPT, 0, 8),
                                                      (WIDE_HEADS, 0, 0)],
                         ids=["plain", "tied-chunked-loss-tiled-mlp", "gpt-tiled-mlp", "head-dim"])
def test_tp2_matches_single_process_loss_and_gradients(shape, loss_chunk, mlp_chunk):
    ref = build_model(shape, seed=3)
    tokens, targets = random_batch(shape.vocab_size, seed=5, seq_len=16, batch=2)
    ref_loss, ref_grads = _loss_and_grads(ref, tokens, targets)
    results = [r for rank in spawn_ranks(_tp_worker, 2, shape, loss_chunk, mlp_chunk) for r in rank]
    assert sorted({r[0] for r in results}) == sorted(RUNS)
    for (chunks, column), loss, params, grads, comm in results:
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(params[name], p.detach(), rtol=0, atol=0, msg=name)
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6,
                                       msg=f"{name} (tp_overlap_chunks {chunks}, {column})")
        assert sum(comm.values()) == tp_step_bytes(shape, "fp32", 2 * 16, 2,
                                                   recomputed_mlp=bool(mlp_chunk))


def _qwen3_zero_worker(rank, world):
    """tp2 x dp2, per ZeRO stage: this dp rank's two microbatches (sequences 2d, 2d + 1)
    backward into the states; the step's gradients gathered over dp and tp, the norm, the
    mean loss of this rank's sequences, the tp bytes sent."""
    groups = build_groups(ParallelDims(tp=2, dp=2, world_size=world), rank)
    tokens, targets = random_batch(QWEN3.vocab_size, seed=5, seq_len=16, batch=4)
    results = []
    for stage, cpu_chunks in ((1, ()), (3, (1,))):
        model = build_model(QWEN3, seed=3)
        tp = apply_tensor_parallel(model, groups.tp)
        shared = tp_replicated_names(model)
        assert len(shared) == 2 * QWEN3.num_layers
        states = ZeroModelStates(model, ZeroConfig(stage=stage, cpu_chunks=cpu_chunks),
                                 group=groups.dp_sp, extra_norm_group=groups.pp_tp,
                                 tp_replicated=(tp, [p for n, p in model.named_parameters()
                                                     if n in shared]))
        states.begin_step(1e-3, num_microbatches=2)   # stage 3: final shards reduced early
        loss = 0.0
        for i in (2 * groups.dp_rank, 2 * groups.dp_rank + 1):
            part = lm_loss(model, tokens[i:i + 1], targets[i:i + 1]) / 2
            part.backward()
            loss += part.item()
        states.finish_backward()
        norm = states.clip_grad_norm(0.0)
        grads = {}
        for chunk in states.chunks:
            flat = torch.empty(chunk.grad.numel() * 2)
            torch.distributed.all_gather_single(flat, chunk.grad.contiguous(), group=groups.dp_sp)
            grads.update({s.name: flat[s.offset:s.offset + s.numel].view(s.param.shape)
                          for s in chunk.layout.slots})
        results.append((stage, loss, gather_full_parameters(grads, tp), norm,
                        tp.reset_comm_bytes()))
        states.step(1e-3)
    return results


@pytest.mark.slow
def test_tp2_dp2_qwen3_sums_the_replicated_qk_norm_gradients_once_per_step():
    # Qwen3's q/k norm weights are whole on each tp rank, each rank's backward gives their
    # gradient from its own heads: ZeRO sums them over tp once per step on the dp-reduced
    # gradient shard (stage 1: reduced at the step's end; stage 3: during the last
    # microbatch's backward, a CPU chunk among them); loss, every gradient and the norm are
    # plain PyTorch's, the tp bytes the planner's (two microbatches of the tp collectives on
    # each rank + the per-step all-reduce, whose shares of the dp shards add up to its mean)
    ref = build_model(QWEN3, seed=3)
    tokens, targets = random_batch(QWEN3.vocab_size, seed=5, seq_len=16, batch=4)
    ref_loss, ref_grads = _loss_and_grads(ref, tokens, targets)
    ref_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in ref_grads.values())).item()
    per_rank = 2 * tp_step_bytes(QWEN3, "fp32", 16, 2)
    ranks = spawn_ranks(_qwen3_zero_worker, 4)
    for index, stage in enumerate((1, 3)):
        runs = [rank[index] for rank in ranks]
        assert sum(r[1] for r in runs) / 4 == pytest.approx(ref_loss, rel=1e-6)  # mean over dp
        for _, _, grads, norm, _ in runs:
            for name, g in ref_grads.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6,
                                           msg=f"{name} (ZeRO-{stage})")
            assert norm == pytest.approx(ref_norm, rel=1e-6)
        assert all(sum(r[4].values()) >= per_rank for r in runs)
        assert sum(sum(r[4].values()) - per_rank for r in runs) == 4 * tp_replicated_grad_bytes(
            QWEN3, 2, QWEN3.num_layers, zero_stage=stage, shard_group=2)


def test_planner_layer_per_tp_rank_is_the_layer_a_runtime_tp_rank_holds():
    # the planner's per-rank layer (its ZeRO-3 chunk, its states) is what apply_tensor_parallel
    # leaves on a rank: every weight split over tp but Qwen3's q/k norm weights, held whole
    for shape in (SHAPE, GPT, WIDE_HEADS, QWEN3):
        layer = build_model(shape, seed=0).layers[0]
        for tp in (1, 2):
            held = sum(p.numel() // (1 if tp_shard_dim(name) is None else tp)
                       for name, p in layer.named_parameters())
            assert shape.layer_params_per_tp_rank(tp) == held, (shape, tp)


def test_qwen3_32b_plans_with_tp_in_a_node_its_chunk_the_layer_a_rank_holds():
    # Megatron's / torchtitan's layout for Qwen3-32B on one node: tp 8; each rank's ZeRO-3
    # chunk is its 1/8 of the layer plus the whole q/k norm weights (2 x 128)
    from planner.hardware import CLUSTER_PRESETS
    from planner.request import PlanRequest
    from planner.search import plan_job
    big = MODEL_PRESETS["qwen3-32b"]
    plan = plan_job(PlanRequest(model=big, hardware=CLUSTER_PRESETS["8xh100-80g"], dtype="bf16",
                                seq_len=8192, global_batch_size=64, tp=8))
    assert plan.feasible and plan.parallel.tp == 8 and plan.parallel.zero_stage == 3
    assert plan.model_states.chunk_size_bytes == 2 * ((big.layer_params() - 256) // 8 + 256)


def test_planner_offers_exactly_the_tp_degrees_the_runtime_accepts():
    # the planner must not pick a layout the runtime then refuses (nor refuse one it runs)
    shapes = [SHAPE, GPT, *MODEL_PRESETS.values()]
    shapes += [SHAPE.replace(**{name: value}) for name, value in (
        ("vocab_size", 63), ("vocab_size", 50257), ("vocab_size", 66), ("ffn_hidden_size", 44),
        ("num_kv_heads", 1), ("hidden_size", 40))]
    shapes.append(SHAPE.replace(hidden_size=48, num_heads=3, num_kv_heads=1))
    shapes += [WIDE_HEADS, WIDE_HEADS.replace(num_heads=6, num_kv_heads=3), SHAPE.replace(qk_norm=True)]
    for shape in shapes:
        for tp in range(1, 9):
            planner_ok = tp_problem(shape, tp, devices_per_node=8) == ""
            assert planner_ok == (tensor_parallel_error(shape, tp) is None), (shape, tp)


class _OneRankTP:
    """A tp group of one rank without a process group (gather / reduce-scatter return their
    input), recording the collectives the linears issue: enough to run `_ColumnParallel`'s
    paths in one process against plain autograd."""

    size, rank = 1, 0

    def __init__(self, overlap_chunks: int, column_backward: str = "lean") -> None:
        self.overlap_chunks, self.calls = overlap_chunks, []
        self.column_backward = column_backward

    def start_gather(self, x, out=None, rank_major=False):
        self.calls.append("all_gather")
        if rank_major:                      # (tp, ..., h): this one rank's shard
            return _Done(x.contiguous().unsqueeze(0))
        if out is None:
            return _Done(x.contiguous())
        out.copy_(x.reshape(out.shape))
        return _Done(out)

    def start_reduce_scatter(self, y, out=None, rank_major=False):
        self.calls.append("reduce_scatter")
        if out is None:
            return _Done(y.clone())
        out.copy_(y.reshape(out.shape))
        return _Done(out)


class _Done:
    def __init__(self, t):
        self.t = t

    def wait(self):
        return self.t


@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("mode", ["lean", "whole"])
def test_column_parallel_backward_overlaps_in_bulk_with_one_call_per_collective(chunks, mode):
    # K > 1: the backward gathers the saved shard once (beside the input-gradient GEMMs) and
    # reduce-scatters once (beside the weight-gradient GEMMs); same gradients as autograd
    from disttrain.parallel.tp_linear import _ColumnParallel
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, generator=gen, requires_grad=True)
    weights = [torch.randn(n, 8, generator=gen, requires_grad=True) for n in (5, 3)]
    tp = _OneRankTP(chunks, mode)
    outs = _ColumnParallel.apply(tp, x, *weights)
    assert tp.calls == ["all_gather"] * chunks
    seeds = [torch.randn(o.shape, generator=gen) for o in outs]
    sum((o * s).sum() for o, s in zip(outs, seeds)).backward()
    assert tp.calls[chunks:] == ["all_gather", "reduce_scatter"]   # not one pair per block
    got = [x.grad.clone(), *(w.grad.clone() for w in weights)]
    for t in (x, *weights):
        t.grad = None
    ref = sum((torch.nn.functional.linear(x, w) * s).sum() for w, s in zip(weights, seeds))
    ref.backward()
    for g, t in zip(got, (x, *weights)):
        torch.testing.assert_close(g, t.grad, rtol=1e-6, atol=1e-6)


class _RankOfTwo:
    """Rank `rank` of a tp group of two in one process: the gather returns both ranks' shards
    of a known full input (rank-major), the reduce-scatter keeps this rank's block of its own
    partial and records every block (the test sums the two ranks' partials)."""

    size = 2

    def __init__(self, rank: int, full: torch.Tensor, chunks: int, column_backward: str) -> None:
        self.rank, self.full, self.overlap_chunks, self.partials = rank, full, chunks, None
        self.row, self.column_backward = 0, column_backward

    def _whole(self) -> bool:
        return self.column_backward == "whole"

    def start_gather(self, x, out=None, rank_major=False):
        if rank_major:                      # the backward's: the whole shard at once
            shards = [s.reshape(-1, s.shape[-1]) for s in self.full.chunk(2, dim=-1)]
            # 'whole' gathers (h, T) shards transposed: the staging is X^T
            staged = torch.stack([s.t() if self._whole() else s for s in shards])
            torch.testing.assert_close(x, staged[self.rank].view(x.shape), rtol=0, atol=0)
            return _Done(staged)
        flat = self.full.reshape(-1, self.full.shape[-1])   # the forward's: token blocks in turn
        rows = flat[self.row:self.row + x.shape[0]]
        self.row += x.shape[0]
        torch.testing.assert_close(x, rows.chunk(2, dim=-1)[self.rank], rtol=0, atol=0)
        return _Done(rows.clone())

    def start_reduce_scatter(self, y, out=None, rank_major=False):
        parts = y if rank_major else torch.stack(y.chunk(2, dim=-1))
        # recorded as (tp, T, h): 'whole' reduce-scatters D^T's (h, T) blocks
        self.partials = (parts.transpose(1, 2) if self._whole() else parts).clone()
        out.copy_(parts[self.rank].reshape(out.shape))
        return _Done(out)


@pytest.mark.parametrize("dtype,chunks", [(torch.float32, 1), (torch.float32, 2),
                                          (torch.bfloat16, 2)])
@pytest.mark.parametrize("mode", ["lean", "whole"])
def test_column_parallel_backward_of_two_ranks_matches_autograd(dtype, chunks, mode):
    # lean: the input gradient written per rank's column block (summed over q, k, v in place)
    # and the weight gradients per column block of the rank-major gathered input; whole: both
    # as one GEMM each on the transposed layouts. Both ranks run in turn: the partials summed
    # and the weight gradients stacked are autograd's
    _two_ranks_against_autograd(dtype, chunks, mode, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lean", "whole"])
def test_column_parallel_backward_of_two_ranks_on_cuda(mode):
    # the same torch ops on cuBLAS (transposed operands and outputs: no copies, flags only)
    _two_ranks_against_autograd(torch.float32, 2, mode, "cuda")


def _two_ranks_against_autograd(dtype, chunks, mode, device):
    from disttrain.parallel.tp_linear import _ColumnParallel
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 8, generator=gen).to(device, dtype)
    weights = [torch.randn(n, 8, generator=gen).to(device, dtype) for n in (6, 4, 4)]
    seeds = [torch.randn(2, 6, n, generator=gen).to(device, dtype) for n in (6, 4, 4)]
    partial_sum, grad_w = 0, [[], [], []]
    for rank in range(2):
        tp = _RankOfTwo(rank, x, chunks, mode)
        shard = x.chunk(2, dim=-1)[rank].contiguous().requires_grad_(True)
        mine = [w.chunk(2, dim=0)[rank].clone().requires_grad_(True) for w in weights]
        outs = _ColumnParallel.apply(tp, shard, *mine)
        mine_seeds = [s.chunk(2, dim=-1)[rank] for s in seeds]
        sum((o.float() * s.float()).sum() for o, s in zip(outs, mine_seeds)).backward()
        partial_sum = partial_sum + tp.partials.float()
        for i, w in enumerate(mine):
            grad_w[i].append(w.grad)
    xr = x.clone().requires_grad_(True)
    wr = [w.clone().requires_grad_(True) for w in weights]
    sum((torch.nn.functional.linear(xr, w).float() * s.float()).sum()
        for w, s in zip(wr, seeds)).backward()
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(torch.cat(list(partial_sum), dim=-1).view(x.shape),
                               xr.grad.float(), **tol)
    for got, w in zip(grad_w, wr):
        torch.testing.assert_close(torch.cat(got), w.grad, **tol)


def test_row_parallel_backward_gathers_per_block_and_matches_autograd():
    # K = 4: four reduce-scatters forward, four gathers backward (input gradient per block,
    # weight gradient as one GEMM over the gathered blocks); same gradients as autograd
    from disttrain.parallel.tp_linear import _RowParallel
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 5, generator=gen, requires_grad=True)
    w = torch.randn(8, 5, generator=gen, requires_grad=True)
    tp = _OneRankTP(4)
    y = _RowParallel.apply(tp, x, w)
    seed = torch.randn(y.shape, generator=gen)
    (y * seed).sum().backward()
    assert tp.calls == ["reduce_scatter"] * 4 + ["all_gather"] * 4
    got = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    (torch.nn.functional.linear(x, w) * seed).sum().backward()
    torch.testing.assert_close(got[0], x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], w.grad, rtol=1e-6, atol=1e-6)


def test_q_k_v_biases_keep_qwen2_off_tensor_parallelism_in_planner_and_runtime_alike():
    """The runtime does not split q/k/v biases yet: the planner never offers tp > 1 for
    Qwen2.5, and the runtime's check names the field."""
    from planner.hardware import CLUSTER_PRESETS
    from planner.request import PlanRequest
    from planner.search import plan_job

    qwen = MODEL_PRESETS["qwen2.5-7b"]
    assert "model.qkv_bias" in tensor_parallel_error(qwen, 2)
    assert "q/k/v biases" in tp_problem(qwen, 2, devices_per_node=8)
    assert tensor_parallel_error(qwen, 1) is None and tp_problem(qwen, 1, 8) == ""
    hw = CLUSTER_PRESETS["h100-80g-x8"] if "h100-80g-x8" in CLUSTER_PRESETS else next(
        h for h in CLUSTER_PRESETS.values() if h.devices_per_node == 8)
    plan = plan_job(PlanRequest(model=qwen, hardware=hw, seq_len=4096, micro_batch_size=1,
                                global_batch_size=16, tp=2), with_layout=False)
    assert not plan.feasible
    assert any("q/k/v biases" in r["reason"] for r in plan.rejected)
