"""The plan's model-state chunks as the runtime places them: ids, placement, device bytes.

The plan numbers the decoder layers' chunks (chunk i = decoder layer i when a chunk is one
layer); the embedding and the final norm + head are the outer chunks, named in the plan's
`cpu_outer` when they are CPU chunks. The runtime's packing also holds those, so its own chunk
indices differ from the plan's ids: the engine maps one to the other, and a ZeRO-3 run then
measures the device and host model-state bytes the plan predicts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from disttrain.engine import _first_chunk_ids, build_runtime
from disttrain.model import build_model
from disttrain.parallel.chunks import pack_chunks, plan_chunk_ids
from disttrain.parallel.pipeline import build_stage_module
from disttrain.parallel.spawn import spawn_ranks
from disttrain.parallel.zero import ZeroConfig, ZeroModelStates
from disttrain.spec import SpecError, job_from_dict
from planner.costtypes import CostParams
from planner.plan import ModelStatePlan, Plan
from planner.search import plan_job
from planner.shapes import MODEL_PRESETS

SHAPE = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=176,
             vocab_size=512, max_seq_len=1024)


def _spec(host_mib: float, device_mib: float = 4) -> dict:
    """A dp2 ZeRO-3 job whose device holds only some of its model-state chunks (on a CPU node
    the planner keeps every chunk it can on the device: the CPU optimizer has no idle core to
    hide under) and whose host memory holds the rest."""
    return {"name": "zero3-chunks", "model": {"dtype": "fp32", **SHAPE},
            "train": {"seq_len": 64, "micro_batch_size": 1, "global_batch_size": 2, "steps": 2,
                      "lr": 1e-3, "min_lr": 1e-3, "seed": 0, "grad_clip": 1.0,
                      "weight_decay": 0.0},
            "data": {"kind": "synthetic"},
            "parallel": {"dp": 2, "sp": 1, "pp": 1, "zero_stage": 3},
            "memory": {"activation_offload": "none", "recompute": "none"},
            "cluster": {"preset": "cpu-local", "devices_per_node": 2,
                        "device": {"name": "cpu", "memory_gib": device_mib / 1024,
                                   "peak_tflops": {"fp32": 0.05, "bf16": 0.025}},
                        "host_memory_gib": host_mib / 1024},
            "launch": {"launcher": "torchrun"}, "output_dir": "/tmp/disttrain-zero3-chunks"}


def test_layer_chunks_are_numbered_apart_from_embedding_and_head():
    model = build_model(MODEL_PRESETS["tiny"].replace(num_layers=4), seed=0)
    layer = sum(p.numel() for p in model.layers[0].parameters())
    chunks = pack_chunks(model, chunk_numel=layer, group_size=2)
    assert [sorted(c.layers) for c in chunks] == [[], [0], [1], [2], [3], []]  # norm + head: one
    assert plan_chunk_ids(chunks, {0: 0}) == {1: 0, 2: 1, 3: 2, 4: 3}
    # a big chunk size still keeps the embedding and the head out of the layer chunks
    big = pack_chunks(model, chunk_numel=10 * layer, group_size=1)
    assert [sorted(c.layers) for c in big] == [[], [0, 1, 2, 3], []]
    # a pipeline stage keeps the global ids of its layers
    stage = build_stage_module(model, 1, ((0, 2), (2, 4)))
    stage_chunks = pack_chunks(stage, chunk_numel=layer, group_size=1)
    assert plan_chunk_ids(stage_chunks, {0: 0, 2: 2}) == {0: 2, 1: 3}


def test_engine_rejects_chunk_ids_the_layers_do_not_have():
    job = job_from_dict(_spec(2))
    plan = plan_job(job.plan_request(), None, with_layout=False)
    model = build_model(job.shape, seed=0)
    assert _first_chunk_ids(model, plan) == {0: 0}
    for states in (ModelStatePlan(chunk_size_bytes=plan.model_states.chunk_size_bytes,
                                  cpu_chunks=(4,)),
                   ModelStatePlan(chunk_size_bytes=plan.model_states.chunk_size_bytes,
                                  num_chunks=6)):
        bad = Plan.from_dict({**plan.to_dict(), "model_states": states.__dict__})
        with pytest.raises(SpecError, match="model_states"):
            _first_chunk_ids(model, bad)


def test_zero3_releases_every_chunk_after_the_backward():
    """The head's chunk is reduced (and released) before the final norm's backward starts;
    that backward must not gather it again, or it stays gathered into the next step."""
    model = build_model(MODEL_PRESETS["tiny"].replace(vocab_size=2048), seed=0)
    layer = sum(p.numel() for p in model.layers[0].parameters())
    states = ZeroModelStates(model, ZeroConfig(stage=3, chunk_numel=layer))
    assert [len(c.layout.slots) for c in states.chunks][-2:] == [1, 1]  # norm | head
    tokens = torch.arange(33).view(1, 33)
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    states.finish_backward()
    assert [c.layout.index for c in states.chunks if c.gathered] == []
    assert sum(states.bytes_by_place()["device"].values()) == 16 * sum(
        c.layout.numel for c in states.chunks)


def _measure_worker(rank: int, world: int, spec: dict, plan: Plan) -> dict:
    from disttrain.data import build_batches

    job = job_from_dict(spec)
    runtime = build_runtime(job, plan, rank=rank)
    batches = build_batches("synthetic", None, vocab_size=SHAPE["vocab_size"],
                            seq_len=plan.seq_len, micro_batch_size=1, seed=0)
    for step in range(job.spec.train.steps):
        runtime.forward_backward(step, batches)
        runtime.states.clip_grad_norm(1.0)
        runtime.states.step(1e-3)
    places = runtime.states.bytes_by_place()
    runtime.close()
    return {"device": sum(places["device"].values()), "cpu": sum(places["cpu"].values())}


def test_zero3_device_model_states_match_the_plan():
    spec = _spec(2, device_mib=3.2)  # some layer chunks and an outer chunk on the CPU
    job = job_from_dict(spec)
    # two pools (as on a GPU node): the CPU ranks' host memory takes the chunks
    plan = plan_job(job.plan_request(), None, params=CostParams(single_pool_on_cpu=False),
                    with_layout=False)
    ms = plan.model_states
    assert plan.feasible and plan.parallel.zero_stage == 3 and ms.num_chunks == 4
    assert 0 < len(ms.cpu_chunks) < ms.num_chunks and ms.num_persistent_chunks > 0
    assert ms.cpu_outer, ms
    cats = plan.prediction.bytes_by_category
    predicted = sum(cats[k] for k in ("parameters", "gradients", "optimizer"))
    per_rank_states = 16 * job.shape.num_params() / 2  # p, g, m, v fp32 over dp 2
    chunk_states = 16 * job.shape.layer_params() / 2
    vocab_h = SHAPE["vocab_size"] * SHAPE["hidden_size"]
    outer_params = {"embedding": vocab_h, "head": job.shape.embedding_params() - vocab_h}
    on_cpu = len(ms.cpu_chunks) * chunk_states + sum(16 * outer_params[n] / 2 for n in ms.cpu_outer)
    assert plan.prediction.host_bytes == pytest.approx(on_cpu, rel=0.01)
    for measured in spawn_ranks(_measure_worker, 2, spec, plan):
        assert measured["device"] == pytest.approx(predicted, rel=0.01)
        assert measured["cpu"] == pytest.approx(on_cpu, rel=0.01)
        assert measured["device"] + measured["cpu"] == pytest.approx(per_rank_states, rel=0.01)
