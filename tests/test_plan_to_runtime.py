"""Plans from the planner drive the runtime end to end, and its predictions are checked."""

from __future__ import annotations

from conftest import TINY_JOB, merge
from disttrain.metrics import read_metrics
from disttrain.spec import job_from_dict
from disttrain.trainer import Trainer
from planner.search import plan_job


def _tight_job(tmp_path, memory_gib: float):
    return job_from_dict(merge(TINY_JOB, {
        "train": {"seq_len": 1024, "micro_batch_size": 1, "global_batch_size": 1, "steps": 2},
        "cluster": {"device": {"name": "cpu", "memory_gib": memory_gib,
                               "peak_tflops": {"fp32": 0.05}},
                    "host_memory_gib": 4,
                    "nvme": {"path": str(tmp_path / "nvme"), "capacity_gib": 1,
                             "read_gbps": 0.6, "write_gbps": 0.8}},
        "output_dir": str(tmp_path / f"run{memory_gib}")}))


def test_tight_budget_plan_swaps_and_runtime_measures_what_was_predicted(tmp_path):
    roomy = plan_job(_tight_job(tmp_path, 0.5).plan_request())
    assert all(a.keep_all for a in roomy.activations)  # everything fits: nothing to do
    job = _tight_job(tmp_path, 0.026)  # one pool (no CPU chunks): just above ZeRO-0's leanest 24.4 MiB
    plan = plan_job(job.plan_request())
    assert plan.feasible and not any(a.keep_all for a in plan.activations)
    assert plan.tiling.loss_chunk_tokens > 0  # the (tokens x vocab) logits do not fit either
    losses = Trainer(job, plan).run().losses
    reference = Trainer(_tight_job(tmp_path, 0.5), roomy).run().losses
    assert losses == reference or max(abs(a - b) / b for a, b in zip(losses, reference)) < 1e-5
    layers = read_metrics(job.output_dir / "metrics.jsonl")[-1]["activations"]["layers"]
    predicted = plan.prediction.activation_bytes_per_layer
    assert len(layers) == len(predicted) == job.shape.num_layers
    for layer in layers:
        expected = predicted[layer["layer"]]
        assert abs(layer["bytes_kept"] - expected) <= 0.02 * expected, (layer, expected)
