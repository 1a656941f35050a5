"""Document masking is exact in every attention core: a packed row's loss and gradients equal
running each document alone (fp32), for the local core, Ulysses and ring (sp2), under the
swap / token-wise recompute policy, and through a 2-stage pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from disttrain.engine import lm_loss
from disttrain.model import build_model
from disttrain.model.attention import LOCAL_CORE
from disttrain.model.documents import (documents_scope, piece_blocks, document_bounds,
                                       reference_document_attention)
from disttrain.parallel.sequence import (apply_sequence_parallel, build_sequence_core,
                                         sequence_positions)
from disttrain.parallel.spawn import spawn_ranks
from doc_batches import packed_row, reference_loss
from planner.plan import LayerActivationPlan as Layer
from planner.shapes import MODEL_PRESETS

SHAPE = MODEL_PRESETS["tiny"]
TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-7)


def _core_inputs(num_heads=4, num_kv_heads=2, seq=32, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, num_heads, seq, d), (1, num_kv_heads, seq, d), (1, num_kv_heads, seq, d),
              (1, num_heads, seq, d)]
    return [torch.randn(s, generator=gen) for s in shapes]


def _reference_core(q, k, v, dout, doc_ids):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = reference_document_attention(q, k, v, doc_ids)
    out.backward(dout)
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def _packed_model_reference(model_seed=3):
    model = build_model(SHAPE, seed=model_seed)
    tokens, targets, _, doc_ids = packed_row(SHAPE.vocab_size)
    loss = reference_loss(model, tokens, targets, doc_ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_model_matches(loss, grads, ref_loss, ref_grads, what=""):
    torch.testing.assert_close(loss, ref_loss, **TOL, msg=lambda m: f"{what} loss: {m}")
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **GRAD_TOL,
                                   msg=lambda m: f"{what} grad {name}: {m}")


def _packed_loss(model, tokens, targets, positions, doc_ids, **kw):
    count = int((targets != -100).sum())
    with documents_scope(doc_ids):
        return lm_loss(model, tokens, targets, positions, reduction="sum", **kw) / count


# -- blocks ----------------------------------------------------------------------------------

def test_piece_blocks_tile_the_document_mask_exactly():
    """Every (query piece, key piece) split of a 2*sp-chunk sequence covers the causal
    same-document mask exactly once."""
    _, _, _, doc_ids = packed_row(SHAPE.vocab_size)
    ids = doc_ids[0]
    bounds = document_bounds(ids)
    seq = len(ids)
    want = (ids[:, None] == ids[None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
    for num_pieces in (1, 2, 4, 8):
        size = seq // num_pieces
        covered = torch.zeros(seq, seq, dtype=torch.int64)
        for qi in range(num_pieces):
            for ki in range(num_pieces):
                q0, k0 = qi * size, ki * size
                for blk in piece_blocks(bounds, q0, q0 + size, k0, k0 + size):
                    rows = torch.arange(blk.q.start, blk.q.stop) + q0
                    cols = torch.arange(blk.k.start, blk.k.stop) + k0
                    block = torch.ones(len(rows), len(cols), dtype=torch.int64)
                    covered[rows[:, None], cols[None, :]] += block.tril() if blk.causal else block
        assert torch.equal(covered, want.long()), f"{num_pieces} pieces"


# -- local core and single-process paths -------------------------------------------------------

def test_local_core_matches_masked_reference():
    q, k, v, dout = _core_inputs()
    _, _, _, doc_ids = packed_row(SHAPE.vocab_size)
    ref = _reference_core(q, k, v, dout, doc_ids)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    with documents_scope(doc_ids):
        out = LOCAL_CORE(q, k, v)
    out.backward(dout)
    for name, got in dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad).items():
        torch.testing.assert_close(got, ref[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss_chunk_tokens", [0, 7])
def test_packed_model_equals_each_document_alone(loss_chunk_tokens):
    ref_loss, ref_grads = _packed_model_reference()
    model = build_model(SHAPE, seed=3)
    loss = _packed_loss(model, *packed_row(SHAPE.vocab_size),
                        loss_chunk_tokens=loss_chunk_tokens)
    loss.backward()
    _assert_model_matches(loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                          ref_loss, ref_grads)


def test_without_documents_the_documents_differ():
    """The check above can fail: the unmasked packed row gives another loss."""
    ref_loss, _ = _packed_model_reference()
    model = build_model(SHAPE, seed=3)
    tokens, targets, positions, _ = packed_row(SHAPE.vocab_size)
    count = int((targets != -100).sum())
    loss = lm_loss(model, tokens, targets, positions, reduction="sum") / count
    assert abs(loss.item() - ref_loss.item()) > 1e-4


@pytest.mark.parametrize("policy", ["recompute", "swap_half_cpu", "swap_all_and_outputs",
                                    "swap_all_nvme"])
def test_swap_and_token_recompute_keep_documents(policy, tmp_path):
    """The document ids travel in the core's saved tensors: kept, or swapped with the
    attention output (an int tensor in the CPU or NVMe store)."""
    from offload.engine import CopyEngineConfig, create_engine
    from offload.policy import apply_activation_policy
    from offload.stores import CpuStore, CpuStoreConfig, NvmeStore, NvmeStoreConfig

    layers = {"recompute": Layer(swap_fraction=0.0),
              "swap_half_cpu": Layer(swap_fraction=0.5),
              "swap_all_and_outputs": Layer(swap_fraction=1.0, swap_input=True,
                                            swap_attention_output=True),
              "swap_all_nvme": Layer(swap_fraction=1.0, tier="nvme", swap_input=True,
                                     swap_attention_output=True)}[policy]
    ref_loss, ref_grads = _packed_model_reference()
    engine = create_engine(CopyEngineConfig(backend="python"))
    try:
        model = build_model(SHAPE, seed=3)
        nvme = NvmeStoreConfig(path=str(tmp_path / "nvme"), budget_bytes=64 << 20,
                               run_id="docs")
        runtime = apply_activation_policy(
            model, [layers] * SHAPE.num_layers,
            stores={"cpu": CpuStore(CpuStoreConfig(budget_bytes=64 << 20), engine),
                    "nvme": NvmeStore(nvme, engine)})
        loss = _packed_loss(model, *packed_row(SHAPE.vocab_size))
        loss.backward()
        runtime.close()
    finally:
        engine.shutdown()
    _assert_model_matches(loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                          ref_loss, ref_grads, policy)


# -- sequence parallel and pipeline (spawned gloo ranks) ----------------------------------------

def _sp_worker(rank: int, world: int) -> dict:
    tokens, targets, positions, doc_ids = packed_row(SHAPE.vocab_size)
    q_f, k_f, v_f, dout_f = _core_inputs()
    results = {}
    for kind in ("ulysses", "ring"):
        index = sequence_positions(tokens.shape[1], rank, world, kind)
        core = build_sequence_core(dist.group.WORLD, kind, num_heads=4, num_kv_heads=2)
        q, k, v = (t[:, :, index].clone().requires_grad_() for t in (q_f, k_f, v_f))
        with documents_scope(doc_ids):
            out = core(q, k, v)
        out.backward(dout_f[:, :, index])
        model = build_model(SHAPE, seed=3)
        apply_sequence_parallel(model, dist.group.WORLD, kind)
        count = int((targets != -100).sum())
        with documents_scope(doc_ids):
            loss = lm_loss(model, tokens[:, index], targets[:, index], positions[index],
                           reduction="sum") / count
        loss.backward()
        loss = loss.detach()
        dist.all_reduce(loss)  # the loss is already normalised by the global count: sum
        for p in model.parameters():
            dist.all_reduce(p.grad)
        results[kind] = dict(index=index, out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad,
                             loss=loss, grads={n: p.grad for n, p in model.named_parameters()})
    return results


@pytest.mark.slow
def test_sequence_parallel_cores_and_model_mask_documents_sp2():
    per_rank = spawn_ranks(_sp_worker, 2)
    q, k, v, dout = _core_inputs()
    _, _, _, doc_ids = packed_row(SHAPE.vocab_size)
    ref = _reference_core(q, k, v, dout, doc_ids)
    ref_loss, ref_grads = _packed_model_reference()
    for rank, res in enumerate(per_rank):
        for kind, got in res.items():
            for name in ("out", "dq", "dk", "dv"):
                torch.testing.assert_close(got[name], ref[name][:, :, got["index"]], **TOL,
                                           msg=lambda m: f"{kind} rank {rank} {name}: {m}")
            _assert_model_matches(got["loss"], got["grads"], ref_loss, ref_grads,
                                  f"{kind} rank {rank}")


def _pp_worker(rank: int, world: int) -> dict:
    from disttrain.parallel.dims import ParallelDims, build_groups
    from disttrain.parallel.pipeline import PipelineConfig, PipelineRunner

    groups = build_groups(ParallelDims(dp=1, sp=1, pp=2, world_size=2), rank)
    model = build_model(SHAPE.replace(num_layers=2), seed=3)
    runner = PipelineRunner(model, groups, PipelineConfig(num_microbatches=2))
    rows = [packed_row(SHAPE.vocab_size, seed=s) for s in (0, 1)]
    count = sum(int((r[1] != -100).sum()) for r in rows)
    loss = runner.step(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]),
                       documents=[(r[2], r[3]) for r in rows], loss_scale=1.0 / count)
    return dict(loss=loss, grads={n: p.grad for n, p in runner.module.named_parameters()})


@pytest.mark.slow
def test_pipeline_pp2_masks_documents():
    per_rank = spawn_ranks(_pp_worker, 2)
    model = build_model(SHAPE.replace(num_layers=2), seed=3)
    rows = [packed_row(SHAPE.vocab_size, seed=s) for s in (0, 1)]
    count = sum(int((r[1] != -100).sum()) for r in rows)
    # each row's documents alone, the two rows' summed token losses over the joint count
    loss = sum(reference_loss(model, r[0], r[1], r[3]) * int((r[1] != -100).sum())
               for r in rows) / count
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for rank, res in enumerate(per_rank):
        assert res["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert res["grads"], f"rank {rank} holds no parameters"
        for name, g in res["grads"].items():
            torch.testing.assert_close(g, grads[name], **GRAD_TOL,
                                       msg=lambda m: f"pp rank {rank} grad {name}: {m}")
