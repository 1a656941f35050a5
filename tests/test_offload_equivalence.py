"""Activation runtime: every policy trains exactly like plain PyTorch, and the attention core
runs once per layer per step (never recomputed)."""

from __future__ import annotations

import collections
import functools
import itertools
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from disttrain.model import build_model
from offload.engine import CopyEngineConfig, create_engine
from offload.policy import ActivationRuntimeConfig, apply_activation_policy, num_swap_tokens
from offload.stores import CpuStore, CpuStoreConfig, NvmeStore, NvmeStoreConfig
from planner.analytic import layer_saved_bytes_per_token
from planner.plan import LayerActivationPlan as Layer
from planner.shapes import MODEL_PRESETS

TINY = MODEL_PRESETS["tiny"]
DEEP = TINY.replace(num_layers=4)  # more layers than copies in flight: exercises the throttle
BATCH, SEQ, STEPS, LR = 2, 64, 3, 0.1
REL_TOL = 1e-5
BUDGET = 64 << 20
_run_ids = itertools.count()

POLICIES = {
    "keep_all": [Layer(keep_all=True)] * 2,
    "recompute_all": [Layer(swap_fraction=0.0)] * 2,
    "swap_0.3_cpu": [Layer(swap_fraction=0.3)] * 2,
    "swap_1.0_cpu": [Layer(swap_fraction=1.0)] * 2,
    "swap_0.3_nvme": [Layer(swap_fraction=0.3, tier="nvme")] * 2,
    "swap_1.0_nvme_all": [Layer(swap_fraction=1.0, tier="nvme", swap_input=True,
                                swap_attention_output=True)] * 2,
    "recompute_swap_input_cpu": [Layer(swap_fraction=0.0, swap_input=True,
                                       swap_attention_output=True)] * 2,
    "mixed": [Layer(swap_fraction=1.0, swap_attention_output=True),
              Layer(swap_fraction=0.3, tier="nvme", swap_input=True)],
    "mixed_deep": [Layer(keep_all=True), Layer(swap_fraction=0.0, tier="nvme", swap_input=True),
                   Layer(swap_fraction=0.3, swap_attention_output=True),
                   Layer(swap_fraction=1.0, tier="nvme")],
}


class CountOps(TorchDispatchMode):
    """Counts every aten call below autograd, forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


FLASH_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def batches(shape):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, shape.vocab_size, (BATCH, SEQ + 1), generator=gen) for _ in range(STEPS)]


def train(model, shape, count_ops: bool = False, runtime=None):
    """STEPS SGD steps (linear in the gradients, so differences do not amplify as with Adam's
    normalised updates); returns per step (loss, grads by name, op counts, runtime metrics)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    history = []
    for tokens in batches(shape):
        opt.zero_grad()
        counter = CountOps() if count_ops else None
        with counter or _null():
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        metrics = runtime.step_metrics() if runtime is not None else None
        history.append((loss.item(), grads, counter.counts if counter else None, metrics))
        opt.step()
    return history


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def reference(num_layers: int):
    shape = TINY.replace(num_layers=num_layers)
    return train(build_model(shape, seed=0), shape)


@pytest.fixture(scope="module")
def cpp_engine():
    engine = create_engine(CopyEngineConfig(backend="cpp"))
    yield engine
    engine.shutdown()


def make_stores(engine, tmp_path, budget=BUDGET):
    nvme = NvmeStoreConfig(path=str(tmp_path / "nvme"), budget_bytes=budget,
                           run_id=f"eq{next(_run_ids)}")
    return {"cpu": CpuStore(CpuStoreConfig(budget_bytes=budget), engine), "nvme": NvmeStore(nvme, engine)}


def assert_matches(history, ref):
    for step, ((loss, grads, _, _), (ref_loss, ref_grads, _, _)) in enumerate(zip(history, ref)):
        assert loss == pytest.approx(ref_loss, rel=REL_TOL), f"step {step} loss"
        for name, ref_grad in ref_grads.items():
            err = (grads[name] - ref_grad).abs().max().item()
            assert err <= REL_TOL * ref_grad.abs().max().item(), f"step {step} grad {name}: {err}"


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policy_matches_plain_pytorch_and_never_reruns_attention(policy, cpp_engine, tmp_path):
    plans = POLICIES[policy]
    shape = TINY.replace(num_layers=len(plans))
    model = build_model(shape, seed=0)
    with apply_activation_policy(model, plans, stores=make_stores(cpp_engine, tmp_path)) as runtime:
        history = train(model, shape, count_ops=True, runtime=runtime)
        stores = runtime.stores
    assert_matches(history, reference(len(plans)))
    for _, _, counts, metrics in history:
        assert counts[FLASH_FWD] == len(plans), "attention forward must run once per layer"
        assert counts[FLASH_BWD] == len(plans)  # proves the counter also sees the backward
        for plan, layer in zip(plans, metrics["layers"]):
            assert layer["num_calls"] == 1
            swapped = num_swap_tokens(BATCH * SEQ, plan.swap_fraction)
            assert layer["tokens_recomputed"] == (0 if plan.keep_all else BATCH * SEQ - swapped)
    assert all(store.bytes_in_use == 0 for store in stores.values())
    assert not any((tmp_path / "nvme").iterdir()), "nvme files must be removed at close"


GPT = TINY.replace(mlp="gelu", positions="learned", ffn_hidden_size=4 * TINY.hidden_size)


@pytest.mark.parametrize("policy,tile", [("recompute_all", 48), ("mixed", 0)])
def test_gpt_block_policy_matches_plain_pytorch(policy, tile, cpp_engine, tmp_path):
    """GPT's block (GeLU MLP, learned positions: the layers ignore the RoPE tables) under
    token-wise recompute (rebuilt in tiles of `tile` tokens) and swap trains exactly like the
    plain GPT model."""
    history = train_under_policy(GPT, policy, tile, cpp_engine, tmp_path)
    assert_matches(history, train(build_model(GPT, seed=0), GPT))


def train_under_policy(shape, policy, tile, cpp_engine, tmp_path):
    """`train`'s history of `shape`'s model under POLICIES[policy], rebuilt in `tile`-token
    tiles."""
    model = build_model(shape, seed=0)
    with apply_activation_policy(model, POLICIES[policy], stores=make_stores(cpp_engine, tmp_path),
                                 config=ActivationRuntimeConfig(rebuild_tile_tokens=tile)
                                 ) as runtime:
        return train(model, shape, runtime=runtime)


QWEN3 = TINY.replace(head_dim=48, qk_norm=True)
"""Qwen3's block: q 4 x 48 = 192 wide against hidden 128, per-head q/k RMSNorm."""


@pytest.mark.parametrize("policy,tile", [("recompute_all", 48), ("mixed", 0)])
def test_qwen3_block_policy_matches_plain_pytorch_and_swaps_the_planned_bytes(
        policy, tile, cpp_engine, tmp_path):
    """Token-wise recompute (in tiles) and swap of a layer with q/k norms and a q wider than
    hidden train exactly like the plain model; a fully swapped layer moves the planner's
    token-local bytes (the q/k norms' saves included)."""
    history = train_under_policy(QWEN3, policy, tile, cpp_engine, tmp_path)
    assert_matches(history, train(build_model(QWEN3, seed=0), QWEN3))
    if policy == "mixed":   # layer 0: every token swapped to the CPU store, attention output too
        per_token = layer_saved_bytes_per_token(QWEN3, "fp32")
        first = history[0][3]["layers"][0]
        assert first["bytes_swapped_cpu"] == (per_token.token_local
                                              + per_token.attention_output) * BATCH * SEQ


def test_python_backend_matches(tmp_path):
    engine = create_engine(CopyEngineConfig(backend="python"))
    assert engine.backend == "python"
    plans = POLICIES["mixed"]
    model = build_model(TINY, seed=0)
    with apply_activation_policy(model, plans, stores=make_stores(engine, tmp_path)) as runtime:
        history = train(model, TINY, runtime=runtime)
    assert_matches(history, reference(2))
    engine.shutdown()


def test_bytes_kept_and_swapped_match_the_planners_analytic_model(cpp_engine, tmp_path):
    """Measured bytes per layer equal `planner.analytic` exactly (fp32): kept = layer input
    (unless swapped) + attention output and lse (unless swapped); swapped = the token-local
    bytes of the swapped tokens (+ what swap_input / swap_attention_output move); a keep-all
    layer keeps the plain total."""
    plans = [Layer(keep_all=True), Layer(swap_fraction=1.0), Layer(swap_fraction=0.0),
             Layer(swap_fraction=0.3, tier="nvme", swap_input=True, swap_attention_output=True)]
    model = build_model(DEEP, seed=0)
    with apply_activation_policy(model, plans, stores=make_stores(cpp_engine, tmp_path)) as runtime:
        (_, _, _, metrics), *_ = train(model, DEEP, runtime=runtime)
    per_token = layer_saved_bytes_per_token(DEEP, "fp32")
    tokens = BATCH * SEQ
    swapped_tokens = num_swap_tokens(tokens, 0.3)
    keep, full, recompute, partial = metrics["layers"]
    assert keep["bytes_kept"] == per_token.plain_total * tokens
    boundary = (per_token.layer_input + per_token.attention_output) * tokens
    assert full["bytes_kept"] == recompute["bytes_kept"] == boundary
    assert full["bytes_swapped_cpu"] == per_token.token_local * tokens
    assert recompute["bytes_swapped_cpu"] == 0 and partial["bytes_kept"] == 0
    assert partial["bytes_swapped_nvme"] == per_token.token_local * swapped_tokens + boundary
    assert metrics["peak_resident_bytes"] >= sum(layer["bytes_kept"] for layer in metrics["layers"])
    assert all(layer["peak_resident_bytes"] >= layer["bytes_kept"] for layer in metrics["layers"])


def test_swapped_input_is_freed_after_forward(cpp_engine, tmp_path):
    model = build_model(TINY, seed=0)
    plans = [Layer(swap_fraction=0.3, swap_input=True)] * 2
    seen = []
    layer1 = model.layers[1]
    with apply_activation_policy(model, plans, stores=make_stores(cpp_engine, tmp_path)):
        forward = layer1.forward

        def spy(x, cos, sin):
            seen.append(weakref.ref(x))
            return forward(x, cos, sin)

        layer1.forward = spy
        tokens = batches(TINY)[0]
        loss = model(tokens[:, :-1]).sum()
        assert seen[0]() is None, "layer 1's input must not stay alive once swapped"
        loss.backward()
    assert model.layers[1].attn.q_proj.weight.grad is not None


def test_policy_is_removed_and_model_is_untouched(cpp_engine, tmp_path):
    model = build_model(TINY, seed=0)
    names = [n for n, _ in model.named_parameters()]
    runtime = apply_activation_policy(model, POLICIES["swap_0.3_cpu"],
                                      stores=make_stores(cpp_engine, tmp_path))
    assert [n for n, _ in model.named_parameters()] == names
    with pytest.raises(ValueError, match="applied twice"):
        apply_activation_policy(model, POLICIES["swap_0.3_cpu"], stores=runtime.stores)
    runtime.close()
    assert all("forward" not in layer.__dict__ for layer in model.layers)


def test_config_errors_name_the_field(cpp_engine):
    model = build_model(TINY, seed=0)
    with pytest.raises(ValueError, match="activations: need one entry"):
        apply_activation_policy(model, [Layer()], stores={})
    with pytest.raises(ValueError, match=r"activations\[1\].tier"):
        apply_activation_policy(model, [Layer(), Layer(swap_fraction=0.5, tier="nvme")], stores={})


BF16_SPLIT_TOL = 4 * 2.0 ** -8
"""bf16 keeps 8 mantissa bits: a weight gradient summed over two token slices is rounded to
bf16 twice instead of once, and on CPUs with AMX oneDNN's bf16 GEMMs accumulate in an order
that depends on the operand shape (a token-wise recompute or a tile runs other shapes than the
forward did), so wrapped policies agree to a few bf16 ulps, not to fp32 rounding."""


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matmul's first operand (forward, recompute and backward)."""

    def __init__(self):
        super().__init__()
        self.dtypes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.dtypes[args[-2].dtype] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy", ["recompute_all", "swap_1.0_cpu", "mixed"])
def test_bf16_autocast_recomputes_in_the_forward_precision(policy, cpp_engine, tmp_path):
    """Under bf16 autocast a wrapped model runs every layer matmul, recompute included, in bf16
    (an fp32 recompute would show up as fp32 matmuls), and its loss and gradients match plain
    autocast to a few bf16 ulps (see BF16_SPLIT_TOL for why not to fp32 rounding)."""
    tokens = batches(TINY)[0]

    def loss_and_grads(model):
        with MatmulDtypes() as seen:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
        return loss.item(), {name: p.grad for name, p in model.named_parameters()}, seen.dtypes

    ref_loss, ref_grads, ref_dtypes = loss_and_grads(build_model(TINY, seed=0))
    model = build_model(TINY, seed=0)
    with apply_activation_policy(model, POLICIES[policy], stores=make_stores(cpp_engine, tmp_path)):
        loss, grads, dtypes = loss_and_grads(model)
    assert set(ref_dtypes) == {torch.bfloat16}
    assert set(dtypes) == {torch.bfloat16}, dtypes
    if policy != "swap_1.0_cpu":
        assert dtypes[torch.bfloat16] > ref_dtypes[torch.bfloat16]  # the recompute ran, in bf16
    assert loss == pytest.approx(ref_loss, rel=REL_TOL)
    for name, ref_grad in ref_grads.items():
        err = (grads[name] - ref_grad).abs().max().item()
        assert err <= BF16_SPLIT_TOL * ref_grad.abs().max().item(), f"grad {name}: {err}"


def test_pipeline_stage_layers_and_deep_copies(cpp_engine, tmp_path):
    """A stage's layer container is named by global layer index; a deep copy of a wrapped
    model runs its own parameters."""
    import copy

    from disttrain.parallel.pipeline import build_stage_module

    model = build_model(DEEP, seed=0)
    stage = build_stage_module(model, 1, [(0, 2), (2, 4)])
    plans = POLICIES["mixed_deep"]
    with apply_activation_policy(stage, plans, stores=make_stores(cpp_engine, tmp_path)) as runtime:
        assert sorted(runtime.layers) == [2, 3]
        assert "forward" not in model.layers[0].__dict__ and "forward" in model.layers[2].__dict__
        twin = copy.deepcopy(model)
        assert twin.layers[2].forward.__self__ is twin.layers[2]
        tokens = batches(DEEP)[0][:, :-1]
        model(tokens).sum().backward()
        twin(tokens).sum().backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert q.grad is not None and torch.allclose(p.grad, q.grad, rtol=REL_TOL, atol=0), name
        layer_ids = [layer["layer"] for layer in runtime.step_metrics()["layers"]]
    assert layer_ids == [2, 3]


def test_second_backward_is_a_clear_error(cpp_engine, tmp_path):
    model = build_model(TINY, seed=0)
    with apply_activation_policy(model, POLICIES["swap_0.3_cpu"], stores=make_stores(cpp_engine, tmp_path)):
        loss = model(batches(TINY)[0][:, :-1]).sum()
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="retain_graph=True is not supported"):
            loss.backward()
