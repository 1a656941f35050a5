"""Heads wider or narrower than hidden / num_heads (`ModelShape.head_dim`: Qwen3, Mistral-NeMo)
and Qwen3's per-head q/k RMSNorm (`ModelShape.qk_norm`), against transformers (fp32, nothing
downloaded): loss and every gradient equal; the weights go back out under the same names and
shapes and a config transformers builds the same model from; bad values are one-line errors
naming the field. Training, export and reload through the trainer: tests/test_hf_models.py
(its 'qwen3' and 'mistral' families)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import run_cli
from disttrain.model import build_model
from disttrain.model.hf import config_from_shape, hf_state_dict, load_hf_weights
from disttrain.model.hf_config import hf_names, shape_from_config
from disttrain.spec import SpecError, job_from_dict
from planner.shapes import MODEL_PRESETS, ModelShape
from test_hf_models import SEQ, TOKENS, _edit_config, make_hf_dir, spec


def _loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_loss_and_gradients_equal_transformers(tmp_path, family):
    hf_dir = make_hf_dir(tmp_path / "hf", family)
    shape = job_from_dict(spec(hf_dir, tmp_path / "run")).shape
    assert shape.head_dim == 24 and shape.q_dim == 96 != shape.hidden_size
    assert shape.qk_norm is (family == "qwen3")
    ours = build_model(shape)
    load_hf_weights(ours, hf_dir)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).train()
    loss = _loss(ours(TOKENS), TOKENS)
    ref = _loss(theirs(TOKENS).logits, TOKENS)
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    mine = dict(ours.named_parameters())
    ref_params = dict(theirs.named_parameters())
    for ours_name, hf_name in hf_names(shape).items():
        torch.testing.assert_close(mine[ours_name].grad, ref_params[hf_name].grad,
                                   rtol=1e-5, atol=1e-7, msg=lambda m: f"{ours_name}: {m}")
    if family == "qwen3":   # the q/k norms are live: their gradients are not zero
        assert mine["layers.0.attn.q_norm.weight"].grad.abs().max() > 1e-4
        assert mine["layers.1.attn.k_norm.weight"].grad.abs().max() > 1e-4


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_weights_and_config_go_back_out_unchanged(tmp_path, family):
    """hf_state_dict gives back exactly the tensors loaded, under the same names; the config
    written without a source config.json (a run from explicit shape fields) describes the same
    shape and builds, in transformers, a model of the same parameter names and shapes."""
    hf_dir = make_hf_dir(tmp_path / "hf", family)
    shape = job_from_dict(spec(hf_dir, tmp_path / "run")).shape
    ours = build_model(shape)
    load_hf_weights(ours, hf_dir)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir)
    out = hf_state_dict(dict(ours.named_parameters()), shape)
    ref = theirs.state_dict()
    assert set(out) == set(ref)
    for name, tensor in out.items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=0, msg=name)

    config = config_from_shape(shape)
    assert config["model_type"] == ("qwen3" if family == "qwen3" else "llama")
    assert shape_from_config(config, seq_len=SEQ) == shape
    rebuilt = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    assert {n: tuple(t.shape) for n, t in rebuilt.state_dict().items()} == \
        {n: tuple(t.shape) for n, t in ref.items()}


def test_shape_fields_default_and_round_trip():
    plain = ModelShape(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                       ffn_hidden_size=96, vocab_size=32)
    assert plain.head_dim == 16 and plain.q_dim == 64
    assert "head_dim" not in plain.to_dict() and "qk_norm" not in plain.to_dict()
    assert plain.replace(hidden_size=128).head_dim == 32            # derived again
    assert plain.replace(head_dim=16) == plain                      # the same shape
    wide = plain.replace(head_dim=24, qk_norm=True)
    assert wide.replace(hidden_size=128).head_dim == 24             # given: kept
    assert ModelShape(**wide.to_dict()) == wide and wide.to_dict()["head_dim"] == 24
    # q and o are h x N*D, k and v h x K*D, two norms of D
    assert wide.layer_params() - plain.layer_params() == (
        2 * 64 * (96 - 64) + 2 * 64 * (48 - 32) + 2 * 24)
    # hidden 100 is not a multiple of 3 heads: fine once head_dim says how wide a head is
    assert ModelShape(hidden_size=100, num_layers=1, num_heads=3, num_kv_heads=1,
                      ffn_hidden_size=8, vocab_size=8, head_dim=32).q_dim == 96


def test_presets_have_their_published_sizes():
    """Total parameters of the published checkpoints (their model cards): Qwen3-8B 8.2B,
    Qwen3-32B 32.8B, Mistral-NeMo 12B (12.2B)."""
    sizes = {"qwen3-8b": 8.19e9, "qwen3-32b": 32.76e9, "mistral-nemo-12b": 12.25e9}
    for name, size in sizes.items():
        assert MODEL_PRESETS[name].num_params() == pytest.approx(size, rel=2e-3), name
    assert MODEL_PRESETS["qwen3-32b"].q_dim == 8192 and MODEL_PRESETS["qwen3-8b"].qk_norm
    assert MODEL_PRESETS["mistral-nemo-12b"].q_dim == 4096


BAD = {  # name: (family, config edit, spec changes, message)
    "odd-head-dim": ("qwen3", dict(head_dim=23), {},
                     r"^model.hf: config.json describes no valid model: head_dim: must be even "
                     r"for RoPE, got 23$"),
    "head-dim-not-int": ("mistral", dict(head_dim=24.5), {},
                         r"^model.hf: config.json head_dim = 24.5 is not supported"),
    "qwen3-bias": ("qwen3", dict(attention_bias=True), {},
                   r"^model.hf: config.json attention_bias = True is not supported"),
    "heads-for-tp": ("mistral", {}, {"parallel": {"tp": 8}, "cluster": {"devices_per_node": 8}},
                     r"^parallel.tp: model.num_heads \(4\) must be divisible by tp, got 8$"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_head_values_name_the_field(tmp_path, case):
    family, edit, changes, message = BAD[case]
    hf_dir = make_hf_dir(tmp_path / "hf", family)
    _edit_config(hf_dir, **edit)
    with pytest.raises(SpecError, match=message):
        job_from_dict(spec(hf_dir, tmp_path / "run", **changes))


def test_explicit_shape_fields_and_cli_exit_2(tmp_path, write_spec):
    fields = dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=96, vocab_size=64)
    raw = {"name": "x", "model": {**fields, "head_dim": 24, "qk_norm": True},
           "train": {"seq_len": 32, "steps": 1}, "output_dir": str(tmp_path / "run")}
    shape = job_from_dict(raw).shape
    assert shape.head_dim == 24 and shape.qk_norm
    raw["model"]["head_dim"] = 7
    done = run_cli("check", write_spec(raw=raw))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: model.head_dim: must be even for RoPE, got 7"


def test_plan_counts_the_heads_and_norms_it_runs(tmp_path):
    """The planner plans the imported shape, its
    parameter count is transformers', and its attention FLOPs and Ulysses volume use the
    q width num_heads x head_dim (Qwen3-32B: 8192, not hidden 5120)."""
    from planner.analytic import layer_flops_per_token
    from planner.collectives import ulysses_alltoall_bytes
    from planner.search import plan_job

    hf_dir = make_hf_dir(tmp_path / "hf", "qwen3")
    job = job_from_dict(spec(hf_dir, tmp_path / "run"))
    plan = plan_job(job.plan_request())
    assert plan.feasible and plan.model == job.shape.to_dict()
    hf_params = AutoModelForCausalLM.from_pretrained(hf_dir).num_parameters()
    assert job.shape.num_params() == hf_params == sum(
        p.numel() for p in build_model(job.shape).parameters())
    big = MODEL_PRESETS["qwen3-32b"]
    assert layer_flops_per_token(big, 4096).attention == 2.0 * 4096 * 64 * 128
    assert ulysses_alltoall_bytes(big, "bf16", 1000, 2) == (2 * 8192 + 2 * 1024) * 1000 * 2 / 2
