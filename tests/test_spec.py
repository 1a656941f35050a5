"""Job spec validation: good specs resolve, every user error is one line naming the YAML path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY_JOB, merge, run_cli
from disttrain.spec import SpecError, job_from_dict, load_job
from planner.hardware import GB, GiB
from planner.shapes import MODEL_PRESETS


def test_preset_with_overrides_resolves():
    job = job_from_dict(merge(TINY_JOB, {"model": {"num_layers": 3, "dtype": "bf16"}}))
    assert job.shape.num_layers == 3
    assert job.shape.hidden_size == MODEL_PRESETS["tiny"].hidden_size
    assert job.dtype == "bf16"


def test_explicit_model_and_cluster():
    spec = merge(TINY_JOB, {
        "model": {"preset": None, "hidden_size": 64, "num_layers": 1, "num_heads": 4,
                  "num_kv_heads": 1, "ffn_hidden_size": 96, "vocab_size": 300},
        "cluster": {"preset": None, "nodes": 2, "devices_per_node": 4,
                    "device": {"name": "X", "memory_gib": 40, "peak_tflops": {"bf16": 100}},
                    "host_memory_gib": 256, "host_link_gbps": 20, "intra_node_gbps": 100,
                    "inter_node_gbps": 10,
                    "nvme": {"path": "/tmp/x", "capacity_gib": 100, "read_gbps": 3,
                             "write_gbps": 2}},
        "launch": {"launcher": "torchrun"},
    })
    job = job_from_dict(spec)
    hw = job.hardware
    assert (hw.nodes, hw.devices_per_node, hw.world_size) == (2, 4, 8)
    assert hw.device_memory_bytes == 40 * GiB and hw.flops("bf16") == 100e12
    assert hw.host_link_bw == 20 * GB and hw.nvme_capacity_bytes == 100 * GiB
    assert job.shape.kv_dim == 16


def test_gpt_block_fields():
    job = job_from_dict(merge(TINY_JOB, {"model": {"mlp": "gelu", "positions": "learned",
                                                   "ffn_hidden_size": 512}}))
    assert (job.shape.mlp, job.shape.positions) == ("gelu", "learned")
    h = job.shape.hidden_size
    assert job.shape.layer_params() == MODEL_PRESETS["tiny"].layer_params() - 3 * h * 352 + 2 * h * 512
    assert job.shape.embedding_params() == MODEL_PRESETS["tiny"].embedding_params() + 1024 * h


def test_plan_request_maps_auto_to_none():
    job = job_from_dict(merge(TINY_JOB, {"parallel": {"dp": 1, "sp": "auto"},
                                         "memory": {"recompute": "token"}}))
    req = job.plan_request()
    assert req.dp == 1 and req.sp is None and req.pp is None and req.recompute == "token"
    assert req.seq_len == 64 and req.global_batch_size == 4 and req.micro_batch_size == 2
    auto = job_from_dict(merge(TINY_JOB, {"train": {"micro_batch_size": "auto"}}))
    assert auto.plan_request().micro_batch_size is None


BAD = [
    ({"train": {"seq_len": 1001}, "parallel": {"sp": 8}, "cluster": {"devices_per_node": 8},
      "launch": {"launcher": "torchrun"}},
     "train.seq_len: must be a positive multiple of parallel.sp (8), got 1001"),
    ({"model": {"colour": "red"}}, "model.colour: unknown key"),
    ({"model": {"mlp": "relu"}}, "model.mlp: must be one of swiglu, gelu, got 'relu'"),
    ({"model": {"positions": "alibi"}},
     "model.positions: must be one of rope, learned, got 'alibi'"),
    ({"bogus": 1}, "bogus: unknown section; known: name, model, train"),
    ({"trainer": {"steps": 1}}, "trainer: unknown section; did you mean 'train'?"),
    ({"model": {"hidden_sise": 8}}, "model.hidden_sise: unknown key; did you mean 'hidden_size'?"),
    ({"train": {"seq_len": 0}}, "train.seq_len:"),
    ({"model": {"preset": "gpt-5"}}, "model.preset: unknown preset 'gpt-5'"),
    ({"model": {"dtype": "fp16"}}, "model.dtype:"),
    ({"model": {"num_kv_heads": 3}}, "model.num_heads: must be divisible by num_kv_heads (3)"),
    ({"parallel": {"zero_stage": 7}}, "parallel.zero_stage:"),
    ({"parallel": {"tp_overlap_chunks": 0}},
     "parallel.tp_overlap_chunks: must be >= 1 or auto, got 0"),
    ({"parallel": {"overlap_param_gather": "yes"}},
     "parallel.overlap_param_gather: Input should be a valid boolean, got 'yes'"),
    ({"train": {"global_batch_size": 5}},
     "train.global_batch_size: must be a multiple of micro_batch_size x dp (2 x 1), got 5"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size: must be >= 1 or auto, got 0"),
    ({"parallel": {"zero_stage": False}}, "parallel.zero_stage: not a boolean"),  # was ZeRO-0
    ({"parallel": {"sp": True}}, "parallel.sp: not a boolean"),                 # was sp 1
    ({"train": {"seq_len": True}}, "train.seq_len: not a boolean (YAML reads"),
    ({"memory": {"recompute": False}}, "memory.recompute: not a boolean"),      # `recompute: off`
    ({"model": {"tie_embeddings": True}, "parallel": {"overlap_param_gather": False}}, None),
    ({"train": {"micro_batch_size": "big"}}, "train.micro_batch_size: Input should be"),
    ({"train": {"micro_batch_size": "auto", "global_batch_size": 5}}, None),  # 5 x 1 per rank
    ({"train": {"micro_batch_size": "auto", "global_batch_size": 5}, "parallel": {"dp": 2},
      "cluster": {"devices_per_node": 2}, "launch": {"launcher": "torchrun"}},
     "train.global_batch_size: must be a multiple of parallel.dp (2), got 5"),
    ({"train": {"seq_len": 4096}}, "train.seq_len: exceeds model.max_seq_len (1024)"),
    ({"train": {"min_lr": 1.0}}, "train.min_lr: must be <= train.lr"),
    ({"train": {"adam_betas": [0.9, 1.0]}}, "train.adam_betas: each must be in [0, 1)"),
    ({"train": {"adam_eps": 0}}, "train.adam_eps:"),
    ({"cluster": {"preset": "moon-base"}}, "cluster.preset: unknown preset 'moon-base'"),
    ({"cluster": {"devices_per_node": 2}}, "launch.launcher: 'local' runs one process"),
    ({"cluster": {"devices_per_node": 4}, "parallel": {"dp": 2, "sp": 1, "pp": 1},
      "launch": {"launcher": "torchrun"}}, "parallel: dp*sp*pp = 2 must equal"),
    ({"cluster": {"devices_per_node": 2}, "parallel": {"sp": 2, "sp_kind": "ulysses"},
      "model": {"num_heads": 2, "num_kv_heads": 1}, "launch": {"launcher": "torchrun"}},
     None),  # valid: 2 heads divisible by sp 2
    ({"cluster": {"devices_per_node": 4}, "parallel": {"sp": 4, "sp_kind": "ulysses"},
      "model": {"num_heads": 2, "num_kv_heads": 1}, "launch": {"launcher": "torchrun"}},
     "parallel.sp: Ulysses needs num_heads (2) divisible by sp"),
    ({"cluster": {"devices_per_node": 2}, "parallel": {"tp": 2}, "model": {"vocab_size": 260},
      "launch": {"launcher": "torchrun"}}, None),  # valid: every dimension splits over tp 2
    ({"cluster": {"devices_per_node": 3}, "parallel": {"tp": 3}, "launch": {"launcher": "torchrun"}},
     "parallel.tp: model.num_heads (4) must be divisible by tp, got 3"),
    ({"cluster": {"devices_per_node": 2}, "parallel": {"tp": 2}, "launch": {"launcher": "torchrun"}},
     None),  # valid: the vocabulary (259) is padded to a multiple of tp
    ({"cluster": {"devices_per_node": 2}, "parallel": {"tp": 2}, "model": {"ffn_hidden_size": 351},
      "launch": {"launcher": "torchrun"}},
     "parallel.tp: model.ffn_hidden_size (351) must be divisible by tp, got 2"),
    ({"cluster": {"devices_per_node": 4}, "parallel": {"dp": 1, "sp": 1, "pp": 1, "tp": 2},
      "model": {"vocab_size": 260}, "launch": {"launcher": "torchrun"}},
     "parallel: dp*sp*pp*tp = 2 must equal"),
    ({"cluster": {"devices_per_node": 8}, "parallel": {"sp": 4, "tp": 2, "sp_kind": "ulysses"},
      "model": {"vocab_size": 260}, "launch": {"launcher": "torchrun"}},
     "parallel.sp: Ulysses needs the heads left after tensor parallelism (num_heads / tp = 2)"),
    ({"cluster": {"devices_per_node": 2}, "parallel": {"tp": 2}, "memory": {"recompute": "selective"},
      "launch": {"launcher": "torchrun"}},
     "memory.recompute: 'selective' (op-level checkpointing) does not run under tensor parallelism"),
    ({"memory": {"activation_offload": "nvme"}, "cluster": {"preset": "1xrtx4090-24g"}},
     "memory.activation_offload: 'nvme' needs cluster.nvme"),
    ({"data": {"kind": "tokens"}}, "data.path: required for data.kind 'tokens'"),
    ({"data": {"kind": "text", "path": "/nonexistent/corpus"}}, "data.path: /nonexistent"),
    ({"cluster": {"nvme": {"path": "/tmp", "capacity_gib": 1, "read_gbps": -1,
                           "write_gbps": 1}}}, "cluster.nvme.read_gbps:"),
]


@pytest.mark.parametrize("changes,expected", BAD)
def test_bad_specs_name_the_path(changes, expected):
    spec = merge(TINY_JOB, changes)
    if expected is None:
        job_from_dict(spec)
        return
    with pytest.raises(SpecError) as info:
        job_from_dict(spec)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_non_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="spec: must be a mapping"):
        job_from_dict([1, 2])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(SpecError, match=r"not valid YAML \(line"):
        load_job(bad)
    with pytest.raises(SpecError, match="no such spec file"):
        load_job(tmp_path / "missing.yaml")


def test_cli_check_exit_codes(write_spec):
    ok = run_cli("check", write_spec())
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    bad = run_cli("check", write_spec({"train": {"seq_len": -5}}))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.seq_len:"), bad.stderr
    assert "Traceback" not in bad.stderr
    bad = run_cli("check", write_spec({"train": {"micro_batch_size": -1}}))
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: train.micro_batch_size: must be >= 1 or auto, got -1"), bad.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_loads(path: Path, request):
    if "make_tiny_hf_model.py" in path.read_text():  # its model is made by a script, not shipped
        raw = yaml.safe_load(path.read_text())
        raw["model"]["hf"] = str(request.getfixturevalue("tiny_hf_model"))
        job = job_from_dict(raw, base_dir=path.parent)
    else:
        job = load_job(path)
    assert job.spec.name == path.stem
    assert job.shape.num_params() > 0


def test_overlap_param_gather_resolves_per_cluster_and_must_match_the_plan():
    """auto: off on a CPU node (gloo gains nothing, bench/gloo_overlap.py), on for GPUs; a
    fixed value reaches the plan, a plan that differs from it is refused; plans written
    before the field load as blocking."""
    import dataclasses

    from disttrain.planning import check_plan, fixed_plan
    from planner.plan import Plan

    cpu = job_from_dict(TINY_JOB)
    assert fixed_plan(cpu, 1).parallel.overlap_param_gather is False
    gpu = job_from_dict(merge(TINY_JOB, {"cluster": {"preset": "1xrtx4090-24g"}}))
    assert fixed_plan(gpu, 1).parallel.overlap_param_gather is True
    forced = job_from_dict(merge(TINY_JOB, {"parallel": {"overlap_param_gather": True}}))
    plan = fixed_plan(forced, 1)
    assert plan.parallel.overlap_param_gather is True
    off = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel,
                                                                 overlap_param_gather=False))
    with pytest.raises(SpecError, match="parallel.overlap_param_gather = True"):
        check_plan(forced, off, 1)
    raw = plan.to_dict()
    del raw["parallel"]["overlap_param_gather"]
    assert Plan.from_dict(raw).parallel.overlap_param_gather is False
