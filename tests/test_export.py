"""Plan export to DeepSpeed and Megatron-core: the emitted files, the cost comparison, and
verification by the stacks themselves (skipped with a reason when a package is absent).

DeepSpeed on CPU: `DS_ACCELERATOR=cpu`; a torch AdamW is passed to `deepspeed.initialize`
(the emitted config sets `zero_force_ds_cpu_optimizer: false` for CPU ranks), so no
DeepSpeedCPUAdam op is built; the shared-memory all-reduce op DeepSpeed JIT-builds on first
init on CPU (~66 s here) is marked incompatible so collectives fall back to gloo.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import ROOT, run_cli
from planner.costtypes import CostParams
from planner.export import ExportResult, evaluate_plan, export_plan, summary_lines
from planner.hardware import CLUSTER_PRESETS
from planner.plan import Plan
from planner.request import PlanRequest
from planner.search import plan_job
from planner.shapes import MODEL_PRESETS, ModelShape

TINY = MODEL_PRESETS["tiny"]
LR = 1e-2
TWO_POOLS = CostParams(single_pool_on_cpu=False)
"""The CPU ranks stand in for a GPU node here: device memory and host memory are two pools,
so the plans place chunks and activations on the cpu tier (what the exporters translate)."""


def _request(device_mib: float = 10, **fixed) -> PlanRequest:
    hw = CLUSTER_PRESETS["cpu-local"].replace(devices_per_node=2, device_memory_bytes=int(device_mib * 2**20))
    return PlanRequest(model=TINY, hardware=hw, seq_len=128, micro_batch_size=2, global_batch_size=8, **fixed)


@pytest.fixture(scope="module")
def offload_plan() -> Plan:
    """Tiny model, 2 CPU ranks of 9 MiB: ZeRO-3, both layer chunks on the CPU and neither
    layer keeping all its activations (swapped to the CPU or recomputed)."""
    plan = plan_job(_request(9.0, dp=2, zero_stage=3), params=TWO_POOLS, with_layout=False)
    assert plan.feasible and plan.parallel.zero_stage == 3 and plan.model_states.cpu_chunks == (0, 1)
    return plan


def _sp_plan(kind: str) -> Plan:
    plan = plan_job(_request(64, dp=1, sp=2, sp_kind=kind), with_layout=False)
    assert plan.feasible and plan.parallel.sp == 2 and plan.parallel.sp_kind == kind
    return plan


def test_full_plan_recosted_matches_its_prediction(offload_plan):
    cost = evaluate_plan(offload_plan, params=TWO_POOLS)
    assert cost.fits
    assert cost.step_time_s == pytest.approx(offload_plan.prediction.step_time_s, rel=1e-9)
    assert cost.host_bytes == pytest.approx(offload_plan.prediction.host_bytes, rel=1e-6, abs=2)


def test_deepspeed_config_from_zero3_offload_plan(offload_plan, tmp_path):
    result = export_plan(offload_plan, "deepspeed", tmp_path, params=TWO_POOLS)
    config = json.loads(result.path.read_text())
    assert result.path == tmp_path / "deepspeed.json"
    assert config["train_batch_size"] == 8 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == offload_plan.parallel.num_microbatches == 2
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert config["zero_force_ds_cpu_optimizer"] is False
    ckpt = config["activation_checkpointing"]
    assert ckpt["cpu_checkpointing"] is False and ckpt["number_checkpoints"] == 2   # CPU ranks
    notes = config["_disttrain"]
    assert notes["checkpoint_layers"] == [0, 1]
    assert any("attention core" in item for item in notes["cannot_express"])
    assert notes["predicted"]["full_plan"]["fits"] and notes["predicted"]["nearest_expressible"]["fits"]
    assert result.nearest.step_time_s >= result.full.step_time_s * 0.999   # the plan is the optimum
    assert "sequence_parallel_size" not in config


def test_ring_plan_maps_to_ulysses_for_deepspeed_and_p2p_for_megatron(tmp_path):
    ring = _sp_plan("ring")
    ds = export_plan(ring, "deepspeed", tmp_path)
    config = json.loads(ds.path.read_text())
    assert config["sequence_parallel_size"] == 2 and config["data_parallel_size"] == 1
    assert any(item.startswith("ring attention (sp=2)") for item in ds.unexpressed)
    assert ds.chosen.startswith("ring -> Ulysses")
    mg = export_plan(ring, "megatron", tmp_path)
    doc = yaml.safe_load(mg.path.read_text())
    assert doc["model_parallel"]["context_parallel_size"] == 2
    assert doc["transformer"]["cp_comm_type"] == "p2p"
    ulysses = yaml.safe_load(export_plan(_sp_plan("ulysses"), "megatron", tmp_path).path.read_text())
    assert ulysses["transformer"]["cp_comm_type"] == "a2a"


def test_megatron_yaml_has_header_fields_and_flags(offload_plan, tmp_path):
    result = export_plan(offload_plan, "megatron", tmp_path)
    text = result.path.read_text()
    header = text.split("\nmodel_parallel:")[0].splitlines()
    assert all(line.startswith("#") for line in header)
    assert any("Cannot be expressed" in line for line in header)
    assert any("nearest expressible: step" in line for line in header)
    doc = yaml.safe_load(text)
    assert set(doc) == {"model_parallel", "transformer", "ddp", "optimizer", "training", "command_line", "_disttrain"}
    assert doc["ddp"] == {"use_distributed_optimizer": True, "use_megatron_fsdp": True,
                          "data_parallel_sharding_strategy": "optim_grads_params"}
    assert any("optimizer states only" in item for item in result.unexpressed)
    assert doc["transformer"]["num_query_groups"] == TINY.num_kv_heads
    assert "--context-parallel-size 1" in doc["command_line"]
    assert doc["_disttrain"]["predicted"]["nearest_expressible"]["name"] == result.chosen


def test_pipeline_plan_caps_deepspeed_zero_and_sets_megatron_stages(tmp_path):
    plan = plan_job(_request(64, pp=2, zero_stage=0), with_layout=False)
    assert plan.feasible and plan.parallel.pp == 2
    zero2 = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, zero_stage=2))
    ds = export_plan(zero2, "deepspeed", tmp_path)
    config = json.loads(ds.path.read_text())
    assert config["pipeline"] == {"stages": 2, "partition": "uniform"}
    assert config["zero_optimization"]["stage"] == 1
    assert any("pipeline engine allows ZeRO-0/1" in item for item in ds.unexpressed)
    mg = yaml.safe_load(export_plan(plan, "megatron", tmp_path).path.read_text())
    assert mg["model_parallel"]["pipeline_model_parallel_size"] == 2


def test_infeasible_plan_and_unknown_stack_are_refused(offload_plan, tmp_path):
    with pytest.raises(ValueError, match="plan.feasible"):
        export_plan(Plan(feasible=False), "deepspeed", tmp_path)
    with pytest.raises(ValueError, match="stack"):
        export_plan(offload_plan, "colossalai", tmp_path)


def test_summary_lines_name_every_decision(offload_plan, tmp_path):
    result = export_plan(offload_plan, "deepspeed", tmp_path)
    assert isinstance(result, ExportResult)
    text = "\n".join(summary_lines(result))
    assert all(item in text for item in result.unexpressed)
    assert "full plan: step" in text and "nearest expressible:" in text


def test_planner_exports_without_deepspeed_or_megatron(tmp_path):
    code = ("import sys; sys.modules['deepspeed'] = None; sys.modules['megatron'] = None\n"
            "from planner.plan import Plan; from planner.export import export_plan\n"
            f"plan = Plan.load({str(tmp_path / 'plan.json')!r})\n"
            f"export_plan(plan, 'deepspeed', {str(tmp_path)!r}); export_plan(plan, 'megatron', {str(tmp_path)!r})\n")
    plan_job(_request(dp=2, zero_stage=3), with_layout=False).save(tmp_path / "plan.json")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "deepspeed.json").is_file() and (tmp_path / "megatron.yaml").is_file()


def test_cli_plan_emit_writes_beside_plan_json(write_spec, tmp_path):
    spec = write_spec({"cluster": {"devices_per_node": 2}, "launch": {"launcher": "torchrun"}})
    out = tmp_path / "planout"
    result = run_cli("plan", spec, "--out", out, "--emit", "megatron")
    assert result.returncode == 0, result.stderr
    assert (out / "plan.json").is_file() and (out / "megatron.yaml").is_file()
    assert "Megatron-core cannot express" in result.stdout and "nearest expressible" in result.stdout


# --- verification by the stacks themselves -------------------------------------------------

def _import_deepspeed() -> Any:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return pytest.importorskip("deepspeed", reason="deepspeed not installed (extra 'peers'): "
                                                   "pip install -c constraints.txt --no-build-isolation deepspeed==0.19.8")


def _import_megatron() -> Any:
    return pytest.importorskip("megatron.core", reason="megatron-core not installed (extra 'peers'): "
                                                       "pip install -c constraints.txt megatron-core==0.16.1")


def test_deepspeed_parses_every_emitted_variant(offload_plan, tmp_path):
    _import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig
    from planner.export.deepspeed import alternatives, build_config

    # The same plan as if its ranks were GPUs: cpu_checkpointing and pinned memory come into play.
    gpu = dict(offload_plan.prediction.hardware, nvme_path=str(tmp_path), device_name="A800-80G")
    plan = dataclasses.replace(offload_plan, prediction=dataclasses.replace(offload_plan.prediction, hardware=gpu))
    variants = alternatives(plan)
    assert {(alt.settings["offload"], alt.settings["cpu_checkpointing"]) for alt in variants} == {
        (tier, cpu) for tier in ("none", "cpu", "nvme") for cpu in (False, True)}
    for alt in variants:
        config = dict(build_config(plan, alt), _disttrain={"note": "ignored by DeepSpeed"})
        config.pop("train_batch_size")   # checked against this process's world size 1; the 2-rank test keeps it
        parsed = DeepSpeedConfig(config)
        assert parsed.zero_optimization_stage == 3
        assert parsed.activation_checkpointing_config.cpu_checkpointing == alt.settings["cpu_checkpointing"]
        offload = parsed.zero_config.offload_param
        assert (offload is None) == (alt.settings["offload"] == "none")
        if offload is not None:
            assert offload.device == alt.settings["offload"] and offload.pin_memory is True
            assert offload.nvme_path is None or str(offload.nvme_path) == str(tmp_path)


class _Checkpointed(torch.nn.Module):
    """One decoder layer run under deepspeed.checkpointing.checkpoint (as the config's
    `_disttrain.checkpoint_layers` asks the user to do)."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        import deepspeed
        return deepspeed.checkpointing.checkpoint(self.layer, x, cos, sin)


def _deepspeed_worker(rank: int, world: int, config: dict) -> dict:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    import deepspeed.ops
    from deepspeed.utils import safe_get_full_fp32_param
    from disttrain.model.llama import build_model

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False   # gloo, no 66 s JIT build
    model = build_model(TINY, seed=0)
    for index in config["_disttrain"]["checkpoint_layers"]:
        model.layers[index] = _Checkpointed(model.layers[index])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    deepspeed.checkpointing.configure(None, deepspeed_config=config)
    gen = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(engine.gradient_accumulation_steps()):
        tokens = torch.randint(0, TINY.vocab_size, (engine.train_micro_batch_size_per_gpu(), 33), generator=gen)
        logits = engine(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    after = {name: safe_get_full_fp32_param(p) for name, p in engine.module.named_parameters()}
    return dict(losses=losses, steps=engine.global_steps, stage=engine.zero_optimization_stage(),
                offload=engine.zero_offload_param() is not None,
                changed=sum(not torch.equal(after[n], before[n]) for n in before), num_params=len(before),
                checksum=sum(float(t.double().sum()) for t in after.values()))


@pytest.mark.slow
def test_deepspeed_zero3_two_ranks_trains_a_step_with_emitted_config(offload_plan, tmp_path):
    _import_deepspeed()
    from disttrain.parallel.spawn import spawn_ranks

    config = json.loads(export_plan(offload_plan, "deepspeed", tmp_path).path.read_text())
    results = spawn_ranks(_deepspeed_worker, 2, config)
    for result in results:
        assert result["stage"] == 3 and result["offload"] and result["steps"] == 1
        assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
        assert result["changed"] == result["num_params"]
    assert results[0]["checksum"] == results[1]["checksum"]     # identical parameters on both ranks


def _megatron_configs(path: Path) -> tuple[dict, Any, Any, Any]:
    _import_megatron()
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    doc = yaml.safe_load(path.read_text())
    parallel = {k: getattr(torch, v) if k.endswith("_dtype") else v for k, v in doc["model_parallel"].items()}
    transformer = TransformerConfig(**parallel, **doc["transformer"], activation_func=F.silu)
    ddp = DistributedDataParallelConfig(**doc["ddp"])
    optimizer = OptimizerConfig(**doc["optimizer"], lr=LR)
    return doc, transformer, ddp, optimizer


@pytest.mark.parametrize("case", ["zero3-offload", "ring", "ulysses", "pipeline"])
def test_megatron_accepts_emitted_values(case, offload_plan, tmp_path):
    _import_megatron()
    plan = {"zero3-offload": lambda: offload_plan, "ring": lambda: _sp_plan("ring"),
            "ulysses": lambda: _sp_plan("ulysses"),
            "pipeline": lambda: plan_job(_request(64, pp=2, zero_stage=1), with_layout=False)}[case]()
    doc, transformer, ddp, optimizer = _megatron_configs(export_plan(plan, "megatron", tmp_path).path)
    assert transformer.context_parallel_size == plan.parallel.sp
    assert transformer.pipeline_model_parallel_size == plan.parallel.pp
    assert transformer.recompute_granularity == doc["transformer"].get("recompute_granularity")
    assert ddp.use_distributed_optimizer == (plan.parallel.zero_stage >= 1)
    assert optimizer.optimizer_cpu_offload == doc["optimizer"].get("optimizer_cpu_offload", False)


def test_megatron_rejects_cpu_offloading_with_recompute(offload_plan, tmp_path):
    _import_megatron()
    from megatron.core.transformer.transformer_config import TransformerConfig

    doc = yaml.safe_load(export_plan(offload_plan, "megatron", tmp_path).path.read_text())
    transformer = dict(doc["transformer"], recompute_granularity="full", recompute_method="block",
                       recompute_num_layers=1)
    with pytest.raises(ValueError, match="CPU offloading does not work when activation recomputation"):
        TransformerConfig(**dict(doc["model_parallel"], params_dtype=torch.float32, cpu_offloading=True,
                                 cpu_offloading_num_layers=1),
                          **transformer, activation_func=F.silu)


def test_megatron_accepts_every_alternative(offload_plan):
    _import_megatron()
    from megatron.core.transformer.transformer_config import TransformerConfig
    from planner.export.megatron import alternatives, build_sections

    variants = alternatives(offload_plan)
    kinds = {alt.settings.get("recompute_granularity") for alt in variants}
    assert kinds == {None, "selective", "full"}
    assert any(alt.settings.get("cpu_offloading") for alt in variants)
    assert any(alt.settings.get("fine_grained_activation_offloading") for alt in variants)
    for alt in variants:
        sections = build_sections(offload_plan, alt)
        parallel = {k: getattr(torch, v) if k.endswith("_dtype") else v
                    for k, v in sections["model_parallel"].items()}
        config = TransformerConfig(**parallel, **sections["transformer"], activation_func=F.silu)
        assert config.cpu_offloading == alt.settings.get("cpu_offloading", False)


def _tp2(plan: Plan) -> Plan:
    """The same plan with its two ranks as one tp2 group (dp 1)."""
    return dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, dp=1, tp=2))


def test_tensor_parallel_plan_exports_tp_and_sequence_parallel_to_megatron(offload_plan, tmp_path):
    doc = yaml.safe_load(export_plan(_tp2(offload_plan), "megatron", tmp_path).path.read_text())
    assert doc["model_parallel"]["tensor_model_parallel_size"] == 2
    assert doc["model_parallel"]["sequence_parallel"] is True
    assert "--tensor-model-parallel-size 2" in doc["command_line"]
    assert "--sequence-parallel" in doc["command_line"]
    plain = yaml.safe_load(export_plan(offload_plan, "megatron", tmp_path / "tp1").path.read_text())
    assert plain["model_parallel"]["sequence_parallel"] is False
    assert "--sequence-parallel" not in plain["command_line"]


def test_megatron_accepts_tensor_parallel_values(offload_plan, tmp_path):
    _, transformer, _, _ = _megatron_configs(export_plan(_tp2(offload_plan), "megatron", tmp_path).path)
    assert transformer.tensor_model_parallel_size == 2 and transformer.sequence_parallel


def test_tensor_parallel_plan_uses_autotp_for_deepspeed(offload_plan, tmp_path):
    result = export_plan(_tp2(offload_plan), "deepspeed", tmp_path)
    config = json.loads(result.path.read_text())
    assert config["tensor_parallel"] == {"autotp_size": 2}
    assert any(item.startswith("activations between blocks sharded over tp=2") for item in result.unexpressed)
    _import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    config.pop("train_batch_size")
    assert DeepSpeedConfig(config).tensor_parallel_config.autotp_size == 2


def test_megatron_export_of_a_gpt_block(offload_plan, tmp_path):
    shape = ModelShape(**offload_plan.model).replace(mlp="gelu", positions="learned")
    plan = dataclasses.replace(offload_plan, model=shape.to_dict())
    doc = yaml.safe_load(export_plan(plan, "megatron", tmp_path).path.read_text())
    assert doc["transformer"]["gated_linear_unit"] is False  # Megatron's default GeLU MLP
    assert "--swiglu" not in doc["command_line"]
    assert "--position-embedding-type learned_absolute" in doc["command_line"]
    assert f"--max-position-embeddings {shape.max_seq_len}" in doc["command_line"]
