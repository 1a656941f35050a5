"""`cluster.attention_kernel` (`HardwareSpec.attention_kernel`): the attention kernel generation
the job's stack runs scales the attention core's price by its table ratio and nothing else;
unset, plans are what they were; a profile's measured layers win; bad values exit 2."""

from __future__ import annotations

import pytest

from conftest import run_cli
from disttrain.spec import SpecError, load_job
from planner.analytic import layer_flops_per_token
from planner.costmodel import Candidate, CostParams, head_seconds, layer_cost
from planner.efficiency import (ATTENTION_KERNEL_TFLOPS, attention_efficiency, device_family)
from planner.hardware import CLUSTER_PRESETS, HardwareSpec
from planner.report import report_markdown
from planner.request import PlanRequest
from planner.search import plan_job
from planner.shapes import MODEL_PRESETS

A100 = CLUSTER_PRESETS["8xa100-40g"]
RATIO = ATTENTION_KERNEL_TFLOPS["flash-attn-2"] / ATTENTION_KERNEL_TFLOPS["flash-attn-1"]


@pytest.mark.parametrize("sp,sp_kind", [(1, "ulysses"), (4, "ulysses"), (4, "ring")])
def test_kernel_scales_only_the_attention_core_by_the_table_ratio(sp, sp_kind):
    shape, seq = MODEL_PRESETS["llama2-7b"], 32768
    cand = Candidate(dp=1, tp=1, sp=sp, sp_kind=sp_kind, pp=1, num_microbatches=1, zero_stage=3)
    kw = dict(seq_len=seq, micro_batch_size=1, params=CostParams())
    own = layer_cost(shape, "bf16", A100, cand, **kw)
    old = layer_cost(shape, "bf16", A100.replace(attention_kernel="flash-attn-1"), cand, **kw)
    same = layer_cost(shape, "bf16", A100.replace(attention_kernel="flash-attn-2"), cand, **kw)
    assert same == own
    # the attention backward by hand from the device curve (the forward is forward_s - recompute_s)
    family, peak = device_family(A100.device_name), A100.flops("bf16")
    flops = layer_flops_per_token(shape, seq).attention * own.tokens
    key_len = seq if sp_kind == "ulysses" else seq / sp
    attn_b = 2.5 * flops / (peak * attention_efficiency(family, key_len, shape.head_dim, True))
    assert old.forward_s - old.recompute_s == pytest.approx(RATIO * (own.forward_s - own.recompute_s))
    assert old.backward_s - own.backward_s == pytest.approx((RATIO - 1) * attn_b)
    # GEMMs, element-wise work, the selective recompute and every byte: unchanged
    assert old.recompute_s == own.recompute_s
    assert old.selective_recompute_s == own.selective_recompute_s
    for name in ("input_bytes", "attention_output_bytes", "token_local_bytes", "qkv_bytes",
                 "plain_bytes", "mlp_bytes"):
        assert getattr(old, name) == getattr(own, name)
    assert head_seconds(shape, "bf16", A100.replace(attention_kernel="flash-attn-1"), 8192, 1,
                        CostParams()) == head_seconds(shape, "bf16", A100, 8192, 1, CostParams())


def _request(kernel: str | None) -> PlanRequest:
    return PlanRequest(model=MODEL_PRESETS["small"], dtype="bf16", seq_len=16384, global_batch_size=2,
                       hardware=A100.replace(devices_per_node=2, attention_kernel=kernel))


def test_unset_kernel_plans_as_before_and_an_older_one_is_priced_and_reported():
    unset, fa2, fa1 = (plan_job(_request(k), with_layout=False)
                       for k in (None, "flash-attn-2", "flash-attn-1"))
    # unset: the plan carries no trace of the field (same JSON as before it existed)
    assert "attention_kernel" not in unset.prediction.hardware
    assert "attention_kernel" not in unset.to_json()
    assert not any(n.startswith("attention kernel") for n in unset.notes)
    # the reference generation is the device curve: the same plan, noted
    assert fa2.prediction.step_time_s == unset.prediction.step_time_s
    assert fa2.parallel == unset.parallel and fa2.activations == unset.activations
    # an older one: the attention core slower, said in the notes and the report, round-tripped
    assert fa1.prediction.step_time_s > unset.prediction.step_time_s
    assert fa1.prediction.time_breakdown["optimizer"] == unset.prediction.time_breakdown["optimizer"]
    assert HardwareSpec.from_dict(fa1.prediction.hardware).attention_kernel == "flash-attn-1"
    assert any(n.startswith("attention kernel flash-attn-1") for n in fa1.notes)
    assert "attention kernel flash-attn-1 (cluster.attention_kernel)" in report_markdown(fa1)
    assert "attention kernel" not in report_markdown(unset)


def test_profile_measured_on_the_device_replaces_the_kernel():
    from planner.profiler import LayerProfile

    per_token = 1e-6     # seconds per token of each timing: any measured layer will do
    profile = LayerProfile(key="k", device=A100.device_name, dtype="bf16", bytes_per_token={},
                           time_coeffs={n: [0.0, per_token, 1e-11] for n in
                                        ("forward_s", "backward_s", "token_local_forward_s")})
    unset, fa1 = (plan_job(_request(k), profile, with_layout=False) for k in (None, "flash-attn-1"))
    assert fa1.prediction.step_time_s == unset.prediction.step_time_s
    assert any(n.startswith("attention kernel flash-attn-1") and "not used" in n for n in fa1.notes)


def test_cli_refuses_an_unknown_kernel_or_one_without_a_table(write_spec, tmp_path):
    """`disttrain plan` exits 2 with a one-line error naming the field."""
    unknown = run_cli("plan", write_spec({"cluster": {"attention_kernel": "flash-attn-0"}}),
                      "--out", tmp_path / "a")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: cluster.attention_kernel: unknown kernel 'flash-attn-0'")
    assert len(unknown.stderr.strip().splitlines()) == 1
    # the same SpecError (exit 2 above) for a device family without a published table
    with pytest.raises(SpecError, match=r"^cluster\.attention_kernel: no published flash-attn-1 "
                       r"table for device 'H100-80G'"):
        load_job(write_spec({"cluster": {"preset": "8xh100-80g", "devices_per_node": 1,
                                         "attention_kernel": "flash-attn-1"}}))
    ok = load_job(write_spec({"cluster": {"preset": "8xa100-40g", "devices_per_node": 1,
                                          "attention_kernel": "flash-attn-1"}}))
    assert ok.hardware.attention_kernel == "flash-attn-1"
    assert load_job(write_spec()).hardware.attention_kernel is None


def test_launch_warns_that_the_kernel_is_pricing_only(write_spec, caplog):
    from disttrain.planning import resolve_plan

    job = load_job(write_spec({"cluster": {"preset": "8xa100-40g", "devices_per_node": 1,
                                           "attention_kernel": "flash-attn-1"}}))
    with caplog.at_level("WARNING", logger="disttrain.planning"):
        resolve_plan(job, 1, use_planner=False)
    assert "cluster.attention_kernel: flash-attn-1" in caplog.text and "SDPA" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="disttrain.planning"):
        resolve_plan(load_job(write_spec()), 1, use_planner=False)
    assert "attention_kernel" not in caplog.text
