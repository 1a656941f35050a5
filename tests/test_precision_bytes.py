"""Measured bytes = the planner's bytes, per category, for ZeRO 0-3 x {fp32, bf16} x {keep,
swap, recompute} on CPU.

Measured without the runtime's counters:
  * saved activations per decoder layer: a keep layer's through saved-tensor hooks (what
    autograd saves during the layer's forward, once per storage, parameters and RoPE tables
    left out); a swap / recompute layer's as every tensor reachable from its autograd node
    (the custom Function's context: what it holds for its backward, the swapped copies in
    the store left out);
  * model states: every tensor reachable from the runtime's states object (and their
    `.grad`s), once per storage, sorted by what it is: the model's parameters, the masters
    and moments a checkpoint saves (`state_dict`), the rest: fp32 = gradients, the compute
    dtype = parameters (a bf16 shard);
  * ZeRO-3 gather buffers: the storage bytes of the model's parameters (views into the
    gathered buffers) sampled at every module's forward and backward, the peak;
  * ZeRO collective bytes (bf16 gathers, fp32 reduction): the runtime's per-collective
    counters against the planner's `zero_step_bytes` (as bench/comm_volume.py does).
Predicted: `planner.analytic` (`model_state_bytes`, `zero3_gather_bytes`) and the planner's
per-layer resident bytes (`planner.mip._layer_traffic` over `planner.costmodel.LayerCost`).
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from conftest import TINY_JOB, merge
from disttrain.data import build_batches
from disttrain.engine import build_runtime
from disttrain.parallel.spawn import spawn_ranks
from disttrain.spec import job_from_dict
from planner.analytic import layer_saved_bytes_per_token, model_state_bytes, zero3_gather_bytes
from planner.collectives import zero_step_bytes
from planner.costmodel import LayerCost
from planner.mip import _layer_traffic
from planner.plan import LayerActivationPlan, ModelStatePlan, ParallelPlan, Plan

SEQ, TOL = 64, 0.01
POLICIES = {"keep": LayerActivationPlan(keep_all=True),
            "swap": LayerActivationPlan(swap_fraction=1.0, tier="cpu"),
            "recompute": LayerActivationPlan(swap_fraction=0.0)}


GPT = {"mlp": "gelu", "positions": "learned", "ffn_hidden_size": 512, "max_seq_len": 4096}
"""The tiny preset as a GPT block: GeLU MLP of 4 x hidden, learned positions (a table of 4096
rows, so that it and the first layer are the ZeRO-3 gather peak)."""


def _job(dtype: str, world: int, model: dict | None = None):
    return job_from_dict(merge(TINY_JOB, {
        "model": {"dtype": dtype, **(model or {})}, "data": {"kind": "synthetic"},
        "train": {"seq_len": SEQ, "micro_batch_size": 1, "global_batch_size": world,
                  "steps": 2, "grad_clip": 1.0}}))


def _plan(job, dtype: str, stage: int, world: int, policy: str) -> Plan:
    return Plan(model=job.shape.to_dict(), dtype=dtype, seq_len=SEQ, micro_batch_size=1,
                global_batch_size=world, parallel=ParallelPlan(dp=world, zero_stage=stage),
                model_states=ModelStatePlan(chunk_size_bytes=job.shape.layer_params()
                                            * (2 if dtype == "bf16" else 4)),
                activations=(POLICIES[policy],) * job.shape.num_layers)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def reachable_tensors(root: object) -> list[torch.Tensor]:
    """Tensors (and their gradients) reachable from `root` through attributes, containers and
    dict keys; modules, functions, classes and the activation stores are not entered."""
    out, seen, stack = [], set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            out.append(obj)
            if obj.grad is not None:
                stack.append(obj.grad)
            continue
        if isinstance(obj, (nn.Module, type, types.FunctionType, types.MethodType,
                            types.BuiltinFunctionType, types.ModuleType, str, bytes)):
            continue
        if type(obj).__module__.startswith(("offload.stores", "offload.engine", "threading",
                                            "concurrent")):
            continue  # swapped copies live in the store: host bytes, not the device's
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
        for slot in getattr(type(obj), "__slots__", ()):
            stack.append(getattr(obj, slot, None))
    return out


def _unique_bytes(tensors, skip: set[int] = frozenset()) -> int:
    sizes = {_ptr(t): t.untyped_storage().nbytes() for t in tensors if _ptr(t) not in skip}
    return sum(sizes.values())


class _LayerActivations:
    """Bytes each decoder layer holds for its backward, measured during the forward."""

    def __init__(self, model: nn.Module):
        self.model, self.current, self.saved = model, None, {}
        self.by_layer: dict[int, int] = {}
        self.handles = []
        for name, layer in model.layers.named_children():
            self.handles.append(layer.register_forward_pre_hook(
                lambda m, args, i=int(name): self._enter(i, args)))
            self.handles.append(layer.register_forward_hook(
                lambda m, args, out, i=int(name): self._leave(i, out)))

    def _enter(self, index: int, args) -> None:
        self.current, self.saved[index] = index, []
        self.skip = {_ptr(t) for t in args[1:3]}  # the RoPE tables, shared by every layer

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.current is not None:
            self.saved[self.current].append(t)
        return t

    def _leave(self, index: int, out: torch.Tensor) -> None:
        params = {_ptr(p) for p in self.model.parameters()}
        node = out.grad_fn
        held = list(self.saved[index])
        if node is not None and hasattr(node, "call"):  # a policy layer's custom Function
            held += reachable_tensors(vars(node))
        self.by_layer[index] = _unique_bytes(held, params | self.skip)
        self.current, self.saved[index] = None, []

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


def _gather_peak(model: nn.Module) -> tuple[list, list[int]]:
    """Sample the parameters' storage bytes at every module's forward and backward."""
    peak = [0]

    def sample(*_):
        peak[0] = max(peak[0], _unique_bytes(model.parameters()))

    handles = []
    for module in model.modules():
        handles += [module.register_forward_pre_hook(sample), module.register_forward_hook(sample),
                    module.register_full_backward_pre_hook(sample)]
    return handles, peak


def _state_bytes(runtime, compute_dtype: torch.dtype) -> dict[str, int]:
    model, states = runtime.model, runtime.states
    params = {_ptr(p): p.untyped_storage().nbytes() for p in model.parameters()}
    saved = states.state_dict()
    local = {k: getattr(v, "local", v) for k, v in saved.items() if k != "optim.step"}
    masters = {_ptr(v): v.untyped_storage().nbytes() for k, v in local.items()
               if k.startswith("model.")}
    moments = {_ptr(v): v.untyped_storage().nbytes() for k, v in local.items()
               if k.startswith("optim.")}
    rest: dict[int, tuple[torch.dtype, int]] = {}
    for t in reachable_tensors(vars(states)):
        ptr = _ptr(t)
        if t.dim() and ptr not in params and ptr not in masters and ptr not in moments:
            rest[ptr] = (t.dtype, t.untyped_storage().nbytes())
    separate_masters = sum(n for ptr, n in masters.items() if ptr not in params)
    mixed = compute_dtype != torch.float32
    out = {"parameters": sum(params.values()) + (0 if mixed else separate_masters),
           "gradients": 0, "optimizer": sum(moments.values()) + (separate_masters if mixed else 0)}
    for dtype, nbytes in rest.values():
        out["gradients" if dtype == torch.float32 else "parameters"] += nbytes
    return out


def measure(rank: int, world: int, dtype: str, stage: int, model: dict | None = None) -> dict:
    """Per policy: {activations by layer, states by category, gather peak}, measured in the
    second step (AdamW's moments exist), states at the end of its backward."""
    out = {}
    for policy in POLICIES:
        job = _job(dtype, world, model)
        runtime = build_runtime(job, _plan(job, dtype, stage, world, policy), rank=rank)
        batches = build_batches("synthetic", None, vocab_size=job.shape.vocab_size,
                                seq_len=SEQ, micro_batch_size=1, seed=0)
        runtime.train_step(0, batches, 1e-3)
        runtime.communication_bytes()  # reset the counters
        acts = _LayerActivations(runtime.model)
        handles, peak = _gather_peak(runtime.model)
        with acts.hooks():
            runtime.forward_backward(1, batches)
        states = _state_bytes(runtime, runtime.model.embed.weight.dtype)
        for handle in handles + acts.handles:
            handle.remove()
        runtime.states.step(1e-3)
        zero = sum(v for k, v in runtime.communication_bytes().items() if k.startswith("zero_"))
        out[policy] = {"activations": acts.by_layer, "states": states, "gather": peak[0],
                       "zero_comm": zero}
        runtime.close()
    return out


def _predicted_layer_bytes(job, dtype: str, policy: str) -> float:
    per_token = layer_saved_bytes_per_token(job.shape, dtype)
    tokens = SEQ
    lc = LayerCost(tokens=tokens, input_bytes=per_token.layer_input * tokens,
                   attention_output_bytes=per_token.attention_output * tokens,
                   token_local_bytes=per_token.token_local * tokens,
                   mlp_bytes=per_token.mlp * tokens, plain_bytes=per_token.plain_total * tokens,
                   forward_s=0.0, backward_s=0.0, recompute_s=0.0)
    return _layer_traffic(lc, POLICIES[policy])[1]


def _check(measured: dict, dtype: str, stage: int, world: int, model: dict | None = None
           ) -> None:
    job = _job(dtype, world, model)
    expected_states = model_state_bytes(job.shape.num_params(), dtype, stage, world)
    for policy, result in measured.items():
        where = f"{dtype} zero-{stage} {policy}"
        for category, expected in expected_states.items():
            assert result["states"][category] == pytest.approx(expected, rel=TOL), (
                where, category, result["states"])
        layer = _predicted_layer_bytes(job, dtype, policy)
        assert sorted(result["activations"]) == list(range(job.shape.num_layers))
        for index, nbytes in result["activations"].items():
            assert nbytes == pytest.approx(layer, rel=TOL), (where, index, nbytes, layer)
        if stage == 3:
            assert result["gather"] == pytest.approx(zero3_gather_bytes(job.shape, dtype),
                                                     rel=TOL), where
        if world > 1:  # the runtime's collective counters against the planner's volumes
            per_mb, per_step = zero_step_bytes(
                job.shape.num_params(), dtype, stage, world, 1,
                backward_resident_params=job.shape.embedding_params(),
                grad_reduce_dtype=job.spec.train.grad_reduce_dtype)
            assert result["zero_comm"] == pytest.approx(per_mb + per_step, rel=TOL), where


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_single_process_bytes_equal_the_planner(dtype):
    _check(measure(0, 1, dtype, 0), dtype, 0, 1)


def test_gpt_block_bytes_equal_the_planner():
    """GeLU MLP and a learned position table: the planner's parameters, saved activations and
    ZeRO-3 gather peak (the position table is its own unit after the embedding) as measured."""
    job = _job("bf16", 1, GPT)
    assert job.shape.mlp_matrices == 2 and job.shape.input_embedding_params() > 259 * 128
    _check(measure(0, 1, "bf16", 3, GPT), "bf16", 3, 1, GPT)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero_bytes_on_two_ranks_equal_the_planner(dtype, stage):
    for measured in spawn_ranks(measure, 2, dtype, stage):
        _check(measured, dtype, stage, 2)
