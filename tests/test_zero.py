"""Chunked ZeRO model states vs plain single-process AdamW training (fp32, same seed)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from disttrain.model import build_model
from disttrain.optim import build_optimizer
from disttrain.parallel.chunks import pack_chunks
from disttrain.parallel.spawn import spawn_ranks
from disttrain.parallel.zero import ZeroConfig, ZeroModelStates
from planner.shapes import MODEL_PRESETS
from lm_batches import random_batch

SHAPE = MODEL_PRESETS["tiny"].replace(num_layers=3, vocab_size=128)
LR, WD, CLIP, STEPS = 1e-2, 0.1, 0.5, 3


def _batch(step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return random_batch(SHAPE.vocab_size, seed=1000 * step + index, seq_len=32, batch=1)


def _loss(model, tokens, targets):
    return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


def reference(tie: bool, num_micro: int):
    shape = SHAPE.replace(tie_embeddings=tie)
    model = build_model(shape, seed=0)
    opt = build_optimizer(model, lr=LR, weight_decay=WD)
    losses, norms = [], []
    for step in range(STEPS):
        total = 0.0
        for m in range(num_micro):
            loss = _loss(model, *_batch(step, m)) / num_micro
            loss.backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def _zero_worker(rank, world, stage, tie, chunk_numel, cpu_chunks, micro_per_rank,
                 overlap_gather=False):
    """(losses, norms, full state, bytes by place, chunks, early reductions, pending): the last
    counts [steps after which a parameter gather was still pending (`overlap_gather` only),
    later steps whose first forward left none pending (every chunk waited for), gathers
    pending after `state_dict()`]."""
    shape = SHAPE.replace(tie_embeddings=tie)
    model = build_model(shape, seed=0)
    group = dist.group.WORLD if world > 1 else None
    states = ZeroModelStates(model, ZeroConfig(stage=stage, chunk_numel=chunk_numel,
                                               cpu_chunks=cpu_chunks, weight_decay=WD,
                                               overlap_param_gather=overlap_gather),
                             group=group)
    losses, norms, pending = [], [], [0, 0]
    for step in range(STEPS):
        states.begin_step(LR, num_microbatches=micro_per_rank, grad_clip=CLIP)
        total = torch.zeros(1)
        for m in range(micro_per_rank):
            loss = _loss(model, *_batch(step, m * world + rank)) / micro_per_rank
            if m == 0 and step > 0 and all(c.work is None for c in states.chunks):
                pending[1] += 1
            loss.backward()
            total += loss.detach()
        states.finish_backward()
        if group is not None:
            dist.all_reduce(total, group=group)
        losses.append(total.item() / world)
        norms.append(states.clip_grad_norm(CLIP))
        states.step(LR)
        pending[0] += any(c.work is not None for c in states.chunks)
    states.state_dict()  # what a checkpoint saves from: waits for the pending gathers
    pending.append(sum(c.work is not None for c in states.chunks))
    return (losses, norms, states.full_state_dict(), states.bytes_by_place(), len(states.chunks),
            states._reductions.early_launches, pending)


def _stages_worker(rank, world, stages, micro_per_rank):
    return [_zero_worker(rank, world, stage, False, 0, (), micro_per_rank, overlap)
            for stage, overlap in stages]


def _check(result, ref):
    """Losses and gradient norms within 1e-5 relative. Parameters after AdamW steps get an
    absolute 2e-5: the global norm is summed in another order than torch's per-tensor norms,
    and Adam magnifies that last-ulp difference on elements whose gradient is near eps."""
    losses, norms, params = result[:3]
    ref_losses, ref_norms, ref_params = ref
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert params.keys() == ref_params.keys()
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-5, atol=2e-5, msg=name)


def test_packing_respects_order_and_size():
    model = build_model(SHAPE, seed=0)
    chunks = pack_chunks(model, chunk_numel=20_000, group_size=4)
    order = [s.name for c in chunks for s in c.slots]
    assert order == [n for n, _ in model.named_parameters()]
    for c in chunks:
        assert c.numel % 4 == 0
        assert c.numel - 3 <= max(20_000, *(s.numel for s in c.slots)) + 3 or len(c.slots) == 1
    per_unit = pack_chunks(model, chunk_numel=0, group_size=1)
    assert len(per_unit) == SHAPE.num_layers + 2  # embedding, layers, norm + head


@pytest.mark.parametrize("stage", [0, 3])
def test_single_process_stages_match_adamw(stage):
    _check(_zero_worker(0, 1, stage, False, 30_000, (), 2), reference(False, 2))


@pytest.mark.slow
def test_zero3_dp2_half_chunks_on_cpu_matches_single_process():
    model = build_model(SHAPE, seed=0)
    num_chunks = len(pack_chunks(model, chunk_numel=30_000, group_size=2))
    cpu = tuple(range(num_chunks // 2, num_chunks))
    results = spawn_ranks(_zero_worker, 2, 3, True, 30_000, cpu, 1)
    ref = reference(True, 2)
    for result in results:
        _check(result, ref)
    total_state = 4 * 4 * SHAPE.replace(tie_embeddings=True).num_params()  # p, g, m, v fp32
    for result in results:
        by_place = result[3]
        assert by_place["cpu"]["optimizer"] > 0 and by_place["device"]["optimizer"] > 0
        per_rank = sum(sum(categories.values()) for categories in by_place.values())
        assert 0.5 * total_state <= per_rank < 0.51 * total_state  # 1/dp, plus padding


@pytest.mark.slow
def test_zero0_to_zero2_dp2_accumulating_match_single_process():
    """Two microbatches per rank: stages 0-1 reduce each chunk during the last one's
    backward (every chunk's reduction starts there), stage 2 every microbatch. Stages 1-2
    again with the parameter all-gather overlapped with the next step's forward: still
    pending after each step, all waited for in the first forward."""
    ref = reference(False, 4)
    runs = ((0, False), (1, False), (2, False), (1, True), (2, True))
    for results in spawn_ranks(_stages_worker, 2, runs, 2):
        for (stage, overlap), result in zip(runs, results):
            _check(result, ref)
            assert result[5] == (result[4] if stage <= 1 else 0)
            assert result[6] == ([STEPS, STEPS - 1, 0] if overlap else [0, STEPS - 1, 0])
