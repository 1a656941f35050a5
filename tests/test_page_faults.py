"""Page faults of memory-bound CPU plans (planner/page_faults.py, planner/profile_memory.py):
which blocks are mapped fresh, the profile's allocation record, and where the step pays."""

from __future__ import annotations

import inspect

import pytest
import torch

from planner.page_faults import (HEADROOM, MMAP_THRESHOLD_BYTES, bytes_in_mapped_blocks,
                                 memory_bound, microbatch_mapped_bytes, state_mapped_bytes)
from planner.profile_memory import (fit_allocations, measure_page_fault_s_per_byte,
                                    pinned_to_current_cpu, record_allocations)
from planner.profile_memory import _current_cpu

MiB = 1 << 20


def test_only_blocks_at_or_above_the_threshold_are_mapped():
    fit = [[0.0, 512.0], [4096.0, 0.0], [MiB, 0.0]]   # per token 512 B; a constant 4 KiB; 1 MiB
    # 1024 tokens: 512 KiB + 4 KiB stay in the heap, the 1 MiB block (exactly the threshold) maps
    assert bytes_in_mapped_blocks(fit, 1024) == MiB
    assert bytes_in_mapped_blocks(fit, 2048) == 2 * MiB           # 1 MiB per-token block too
    assert bytes_in_mapped_blocks(fit, 2048, threshold=2 * MiB) == 0


def test_microbatch_counts_layers_and_each_loss_tile():
    layer, head = [[0.0, 1024.0]], [[0.0, 2048.0]]     # 1 KiB and 2 KiB per token
    whole = microbatch_mapped_bytes(layer, head, tokens=4096, layers=3, with_head=True)
    assert whole == 3 * 4 * MiB + 8 * MiB
    # 512-token loss tiles: 1 MiB each, 8 of them; 256-token tiles stay below the threshold
    assert microbatch_mapped_bytes(layer, head, tokens=4096, layers=3, with_head=True,
                                   loss_chunk_tokens=512) == 3 * 4 * MiB + 8 * MiB
    assert microbatch_mapped_bytes(layer, head, tokens=4096, layers=3, with_head=True,
                                   loss_chunk_tokens=256) == 3 * 4 * MiB
    assert microbatch_mapped_bytes(layer, head, tokens=4096, layers=3, with_head=False) == 12 * MiB


def test_rule_and_constants_match_the_runtime():
    from offload.host_memory import DEFAULT_THRESHOLD_BYTES
    from offload.host_memory import memory_bound as runtime_rule

    assert MMAP_THRESHOLD_BYTES == DEFAULT_THRESHOLD_BYTES
    assert inspect.signature(runtime_rule).parameters["headroom"].default == HEADROOM
    args = dict(any_layer_not_kept=False, any_chunk_off_device=False, capacity_bytes=100.0)
    assert not memory_bound(peak_bytes=90.0, **args)
    assert memory_bound(peak_bytes=91.0, **args)
    assert memory_bound(peak_bytes=10.0, **{**args, "any_layer_not_kept": True})


def test_allocation_fit_predicts_a_longer_layer():
    """The recorder sees a real layer's forward and backward allocations; fitted at two
    lengths, they predict a third length's record exactly, block by block."""
    from disttrain.model import build_model
    from planner.shapes import ModelShape

    shape = ModelShape(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                       ffn_hidden_size=160, vocab_size=64)
    model = build_model(shape)
    layer = model.layers[0]

    def sizes(seq: int) -> list[int]:
        x = torch.randn(1, seq, shape.hidden_size, requires_grad=True)
        cos, sin = model.rope(torch.arange(seq), torch.float32)
        return record_allocations(lambda: layer(x, cos, sin).backward(
            torch.ones(1, seq, shape.hidden_size)))

    short, mid, long = sizes(32), sizes(64), sizes(256)
    assert len(short) == len(long) > 20            # forward and backward both recorded
    fit = fit_allocations([32, 64], [short, mid])
    assert [round(a + b * 256) for a, b in fit] == long
    threshold = 256 * shape.hidden_size * 4       # the layer input's size at 256 tokens
    assert bytes_in_mapped_blocks(fit, 256, threshold) == sum(s for s in long if s >= threshold)
    # one length: sizes scale with the tokens
    assert fit_allocations([32], [short]) == [[0.0, s / 32] for s in short]


def test_fresh_pages_cost_something():
    threads = torch.get_num_threads()
    assert measure_page_fault_s_per_byte(4 * MiB, repeats=3) > 0
    assert torch.get_num_threads() == threads          # one thread while timing, then restored


def test_the_fault_timing_holds_the_thread_on_one_cpu_and_restores_its_affinity():
    import os

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    before = os.sched_getaffinity(0)
    with pinned_to_current_cpu():
        inside = os.sched_getaffinity(0)
    assert os.sched_getaffinity(0) == before
    assert inside <= before
    if len(before) > 1 and _current_cpu() is not None:   # it can pin: it did
        assert len(inside) == 1


def _one_pool_request():
    from planner.hardware import CLUSTER_PRESETS
    from planner.request import PlanRequest
    from planner.shapes import MODEL_PRESETS

    hw = CLUSTER_PRESETS["cpu-local"].replace(devices_per_node=2, device_memory_bytes=1 << 30)
    return PlanRequest(model=MODEL_PRESETS["tiny"], hardware=hw, seq_len=512,
                       micro_batch_size=1, global_batch_size=4)


@pytest.mark.parametrize("one_pool", [True, False])
def test_memory_bound_policies_pay_page_faults(one_pool):
    """A stage that keeps every layer pays nothing; one layer recomputed makes the plan
    memory-bound, and every microbatch pays rate x the blocks it maps (one pool only)."""
    from planner.candidates import ProfiledTiming, build_stages, bytes_per_token
    from planner.costmodel import Candidate, CostParams
    from planner.mip import evaluate_stage
    from planner.plan import LayerActivationPlan
    from planner.search import compose_step

    req = _one_pool_request()
    cand = Candidate(dp=2, sp=1, sp_kind="ulysses", pp=1, num_microbatches=2, zero_stage=0)
    fits = {"layer": [[0.0, 4096.0]], "head": [[0.0, 8192.0]]}   # 2 MiB + 4 MiB at 512 tokens
    timing = ProfiledTiming(head_forward_s=0.01, head_backward_s=0.02, optimizer_s_per_param=0.0,
                            page_fault_s_per_byte=1e-9, allocation_fits=fits)
    params = CostParams(single_pool_on_cpu=one_pool)
    (setup,), (loss_chunk, _, _) = build_stages(req, cand, params, bytes_per_token(req, cand, None),
                                                timing=timing, tiling=(0, 0, 0))
    layers = len(setup.problem.layers)
    keep = (LayerActivationPlan(keep_all=True),) * layers
    lean = (LayerActivationPlan(swap_fraction=0.0),) + keep[1:]
    kept = compose_step(cand, (setup,), [evaluate_stage(setup.problem, keep, 0)])
    bound = compose_step(cand, (setup,), [evaluate_stage(setup.problem, lean, 0)])
    assert kept.page_faults == 0
    mb_states, step_states = state_mapped_bytes(
        req.model, layers=layers, first=True, last=True, tp=1, zero_stage=0, group=2,
        compute_bytes=4, reduce_bytes=4)
    assert step_states > 0        # the clip's fp64 copies of the embedding / head
    expected = (1e-9 * (2 * (layers * 2 * MiB + 4 * MiB + mb_states) + step_states)
                if one_pool else 0.0)
    assert bound.page_faults == pytest.approx(expected)
    assert bound.total - bound.page_faults == pytest.approx(
        bound.compute + bound.recompute + bound.exposed_transfer + bound.exposed_communication
        + bound.bubble + bound.optimizer)


@pytest.mark.parametrize("stage,dtype", [(1, torch.bfloat16), (2, torch.float32),
                                         (3, torch.bfloat16)])
def test_model_state_blocks_match_the_runtime(stage, dtype, monkeypatch):
    """The planner's count of the model states' fresh blocks equals what the runtime's ZeRO
    code allocates (storages new from ops, and stage 3's gather buffers, a storage resize),
    in one process: per microbatch beyond the model's own forward + backward, per step in
    finish_backward + clip + update. At 7 tokens and a 128 KiB threshold the activations
    (logits: 112 KiB) stay below it and the state blocks fall on both sides of it (a layer
    chunk's AdamW temporaries: 168 KiB; its bf16 gather: 84 KiB)."""
    from disttrain.model import build_model
    from disttrain.parallel.zero import ZeroConfig, ZeroModelStates
    from planner.page_faults import stage_state_chunks, step_mapped_bytes, zero_microbatch_mapped_bytes
    from planner.shapes import ModelShape

    shape = ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       ffn_hidden_size=160, vocab_size=4096)
    threshold = 128 << 10
    resized: list[int] = []
    original = torch.UntypedStorage.resize_

    def resize(storage, size):
        if size > storage.nbytes():
            resized.append(size)
        return original(storage, size)

    monkeypatch.setattr(torch.UntypedStorage, "resize_", resize)
    ids = torch.randint(0, shape.vocab_size, (1, 7))

    def microbatch(model):
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()

    def big(sizes):
        return sorted(s for s in sizes if s >= threshold)

    plain = build_model(shape).to(dtype)
    own = big(record_allocations(lambda: microbatch(plain)))   # the model's: its two weight grads
    assert own == [shape.vocab_size * shape.hidden_size * dtype.itemsize] * 2
    model = build_model(shape)
    chunk_numel = shape.layer_params() if stage == 3 else 0      # as runtime_setup packs them
    states = ZeroModelStates(model, ZeroConfig(stage=stage, chunk_numel=chunk_numel,
                                               compute_dtype=dtype, reduce_dtype=dtype))
    for _ in range(2):                                          # the second step is measured
        states.begin_step(1e-3, num_microbatches=1, grad_clip=1.0)
        resized.clear()
        mb = big(record_allocations(lambda: microbatch(model)) + resized)
        resized.clear()
        step = big(record_allocations(states.finish_backward)
                   + record_allocations(lambda: states.clip_grad_norm(1.0))
                   + record_allocations(lambda: states.step(1e-3)) + resized)
    chunks = stage_state_chunks(shape, layers=2, first=True, last=True, zero_stage=stage)
    kw = dict(zero_stage=stage, group=1, compute_bytes=dtype.itemsize,
              reduce_bytes=dtype.itemsize, threshold=threshold)
    head_grad = own[-1]                                         # the profiled head's
    assert sum(mb) - head_grad == zero_microbatch_mapped_bytes(chunks, **kw) > 0
    assert sum(step) == step_mapped_bytes(chunks, **kw) > 0
