"""Pipeline parallelism vs single-process training (fp32, same seed), and stage splitting."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from disttrain.model import build_model
from disttrain.optim import build_optimizer
from disttrain.parallel.dims import ParallelDims, build_groups
from disttrain.parallel.pipeline import (PipelineConfig, PipelineRunner, build_stage_module,
                                         split_stages)
from disttrain.parallel.spawn import spawn_ranks
from planner.plan import ParallelPlan
from planner.shapes import MODEL_PRESETS

SHAPE = MODEL_PRESETS["tiny"].replace(num_layers=4, vocab_size=128)
BATCH, SEQ, NUM_MICRO, STEPS, LR, WD = 4, 32, 4, 2, 1e-2, 0.1


def _batch(step: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * seed + step)
    tokens = torch.randint(0, SHAPE.vocab_size, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


@functools.cache
def _reference(tie: bool, seed: int = 0):
    """Single process: per step the loss is the mean of the microbatch losses."""
    model = build_model(SHAPE.replace(tie_embeddings=tie), seed=0)
    opt = build_optimizer(model, lr=LR, weight_decay=WD)
    losses, grads = [], []
    for step in range(STEPS):
        tokens, targets = _batch(step, seed)
        total = 0.0
        for tok, tgt in zip(tokens.chunk(NUM_MICRO), targets.chunk(NUM_MICRO)):
            logits = model(tok)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten()) / NUM_MICRO
            loss.backward()
            total += loss.item()
        losses.append(total)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


class _RecomputeWrapper(torch.nn.Module):
    """Stands in for a memory policy's layer wrapper: same call, recomputed in backward."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.layer, x, cos, sin, use_reentrant=False)


def _unwrapped_name(name: str) -> str:
    return name.replace(".layer.", ".")


def _pipeline_worker(rank: int, world: int, dp: int, runs: list[tuple[bool, str, bool]]):
    """Each (tie, schedule, wrap) run trains STEPS steps from the same init on this rank's
    data; `wrap` puts every decoder layer inside a recomputing wrapper first."""
    dims = ParallelDims(pp=world // dp, dp=dp, world_size=world)
    groups = build_groups(dims, rank)
    out = {}
    for tie, schedule, wrap in runs:
        model = build_model(SHAPE.replace(tie_embeddings=tie), seed=0)
        if wrap:
            for index, layer in enumerate(model.layers):
                model.layers[index] = _RecomputeWrapper(layer)
        runner = PipelineRunner(model, groups, PipelineConfig(num_microbatches=NUM_MICRO,
                                                              schedule=schedule))
        opt = build_optimizer(runner.module, lr=LR, weight_decay=WD)
        losses, grads, sent = [], [], []
        for step in range(STEPS):
            tokens, targets = _batch(step, seed=groups.dp_rank)  # each dp slice: its own data
            losses.append(runner.step(tokens, targets))
            grads.append({_unwrapped_name(n): p.grad.clone()
                          for n, p in runner.module.named_parameters()})
            sent.append(dict(runner.bytes_sent))
            opt.step()
            opt.zero_grad()
        params = {_unwrapped_name(n): p.detach().clone()
                  for n, p in runner.module.named_parameters()}
        # Two steps without zeroing must accumulate exactly twice one step's gradient.
        runner.step(*_batch(0, seed=groups.dp_rank))
        once = [p.grad.clone() for p in runner.module.parameters()]
        runner.step(*_batch(0, seed=groups.dp_rank))
        accumulation_err = max(_rel_err(p.grad, 2 * g)
                               for p, g in zip(runner.module.parameters(), once))
        out[tie, schedule, wrap] = dict(pp_rank=groups.pp_rank, dp_rank=groups.dp_rank,
                                        losses=losses, grads=grads, params=params, sent=sent,
                                        accumulation_err=accumulation_err)
    return out


RUNS = [(False, "1f1b", False), (True, "interleaved-1f1b", False), (False, "1f1b", True)]


@pytest.fixture(scope="module")
def pp2_dp2_runs():
    """One spawn of 4 ranks, grid (pp=2, dp=2): pipelines {0, 2} and {1, 3} run different
    data at the same time, each over its own pp group; every run of RUNS, per rank."""
    results = spawn_ranks(_pipeline_worker, 4, 2, RUNS)
    return {run: [rank_out[run] for rank_out in results] for run in RUNS}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _check_against_reference(results: list[dict], tie: bool, tol: float = 1e-5) -> None:
    """Every rank's loss equals the reference of its dp slice's data; every parameter of
    every stage (same name as in the full model) has the reference gradient at each step
    and the reference value after STEPS AdamW steps; gradients accumulate across steps."""
    references = {r["dp_rank"]: _reference(tie, seed=r["dp_rank"]) for r in results}
    for r in results:
        ref_losses, ref_grads, ref_params = references[r["dp_rank"]]
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-5)
        for step in range(STEPS):
            for name, grad in r["grads"][step].items():
                assert _rel_err(grad, ref_grads[step][name]) < tol, (step, name)
        for name, value in r["params"].items():
            assert _rel_err(value, ref_params[name]) < tol, name
        assert r["accumulation_err"] < 1e-6, "gradients must accumulate across steps"
    for dp_rank, ref in references.items():
        names = set().union(*(r["params"] for r in results if r["dp_rank"] == dp_rank))
        assert names == set(ref[2]), "the stages of a pipeline must hold every parameter"


@pytest.mark.slow
def test_pp2_1f1b_4_microbatches_matches_single_process(pp2_dp2_runs):
    results = pp2_dp2_runs[False, "1f1b", False]
    assert [(r["pp_rank"], r["dp_rank"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert results[0]["losses"] != pytest.approx(results[1]["losses"], rel=1e-3)  # data differ
    _check_against_reference(results, tie=False)


@pytest.mark.slow
def test_pp2_interleaved_1f1b_tied_embeddings_match_single_process(pp2_dp2_runs):
    """4 virtual stages of one layer each; the head tied to the embedding, its gradient
    summed across the first and the last stage."""
    _check_against_reference(pp2_dp2_runs[True, "interleaved-1f1b", False], tie=True)


@pytest.mark.slow
def test_pp2_with_wrapped_layers_matches_single_process(pp2_dp2_runs):
    """Layers replaced by wrappers (as a memory policy does) and recomputed in backward."""
    _check_against_reference(pp2_dp2_runs[False, "1f1b", True], tie=False)


@pytest.mark.slow
def test_p2p_bytes_per_step_are_the_hidden_states_of_all_microbatches(pp2_dp2_runs):
    act_bytes = BATCH * SEQ * SHAPE.hidden_size * 4  # fp32 (B, S, H) per stage boundary
    for r in pp2_dp2_runs[False, "1f1b", False]:
        want = ({"activations": act_bytes, "gradients": 0} if r["pp_rank"] == 0 else
                {"activations": 0, "gradients": act_bytes})
        assert r["sent"] == [{**want, "tied_grad_allreduce": 0}] * STEPS
    vocab_bytes = SHAPE.vocab_size * SHAPE.hidden_size * 4
    for r in pp2_dp2_runs[True, "interleaved-1f1b", False]:
        # 3 boundaries between 4 virtual stages: rank 0 sends across 2 of them forward
        # (stages 0->1, 2->3) and 1 backward (2->1); rank 1 the mirror image.
        first = r["pp_rank"] == 0
        want = {"activations": (2 if first else 1) * act_bytes,
                "gradients": (1 if first else 2) * act_bytes, "tied_grad_allreduce": vocab_bytes}
        assert r["sent"] == [want] * STEPS


def _chunked_loss_worker(rank: int, world: int, loss_chunk_tokens: int) -> dict:
    groups = build_groups(ParallelDims(pp=world, world_size=world), rank)
    runner = PipelineRunner(build_model(SHAPE, seed=0), groups,
                            PipelineConfig(num_microbatches=NUM_MICRO),
                            loss_chunk_tokens=loss_chunk_tokens)
    widths = []
    for module in runner.stage_modules:
        module.register_forward_hook(lambda m, a, out: widths.append(out.shape[-1]))
    opt = build_optimizer(runner.module, lr=LR, weight_decay=WD)
    losses, grads = [], []
    for step in range(STEPS):
        losses.append(runner.step(*_batch(step)))
        grads.append({n: p.grad.clone() for n, p in runner.module.named_parameters()})
        opt.step()
        opt.zero_grad()
    params = {n: p.detach().clone() for n, p in runner.module.named_parameters()}
    return dict(pp_rank=groups.pp_rank, dp_rank=0, losses=losses, grads=grads, params=params,
                accumulation_err=0.0, widths=set(widths))


@pytest.mark.slow
def test_pp2_last_stage_tiles_the_loss_and_matches_single_process():
    """With the plan's loss_chunk_tokens the last stage returns hidden states (never the
    (tokens x vocab) logits) and the loss tiles the head: same losses and gradients (the
    tiled cross entropy rounds in another order: the first step's gradients agree to 1e-5,
    and AdamW at lr 1e-2 magnifies that to ~2e-5 after a step, hence 1e-4 after it)."""
    results = spawn_ranks(_chunked_loss_worker, 2, 8)
    assert [r["widths"] for r in results] == [{SHAPE.hidden_size}] * 2
    _, ref_grads, _ = _reference(False)
    for r in results:
        for name, grad in r["grads"][0].items():
            assert _rel_err(grad, ref_grads[0][name]) < 1e-5, name
    _check_against_reference(results, tie=False, tol=1e-4)


def test_split_stages_even_with_extra_layers_first():
    assert split_stages(4, 2) == ((0, 2), (2, 4))
    assert split_stages(7, 3) == ((0, 3), (3, 5), (5, 7))
    assert split_stages(3, 3) == ((0, 1), (1, 2), (2, 3))


def _brute_force_bottleneck(costs: list[float], pp: int) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), pp - 1):
        bounds = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def test_split_stages_by_cost_minimises_the_bottleneck():
    rng = random.Random(0)
    for _ in range(200):
        num_layers = rng.randint(1, 9)
        pp = rng.randint(1, num_layers)
        costs = [rng.choice([0.0, rng.uniform(0, 10)]) for _ in range(num_layers)]
        stages = split_stages(num_layers, pp, costs)
        assert len(stages) == pp and stages[0][0] == 0 and stages[-1][1] == num_layers
        assert all(a < b for a, b in stages)
        assert all(prev[1] == nxt[0] for prev, nxt in zip(stages, stages[1:]))
        got = max(sum(costs[a:b]) for a, b in stages)
        assert got == pytest.approx(_brute_force_bottleneck(costs, pp)), (costs, pp, stages)
    assert split_stages(4, 2, [10, 1, 1, 1]) == ((0, 1), (1, 4))


@pytest.mark.parametrize("args, field", [((1, 2), "pp"), ((4, 0), "pp"),
                                          ((3, 2, [1, 1]), "layer_costs"),
                                          ((2, 2, [1, -1]), "layer_costs"),
                                          ((2, 2, [1, float("nan")]), "layer_costs")])
def test_split_stages_rejects_bad_input_naming_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        split_stages(*args)


@pytest.mark.parametrize("block", ["llama", "gpt"])
def test_stage_modules_keep_model_names_and_compose_to_the_model(block):
    """Run the stages one after another in one process: same logits as the model, at
    absolute positions that do not start at 0 (as on a sequence-parallel rank); GPT's learned
    position table lives on the first stage."""
    shape = SHAPE if block == "llama" else SHAPE.replace(mlp="gelu", positions="learned")
    model = build_model(shape, seed=0)
    stages = ((0, 1), (1, 3), (3, 4))
    modules = [build_stage_module(model, i, stages) for i in range(3)]
    names = [n for m in modules for n, _ in m.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert list(modules[1].layers) == [model.layers[1], model.layers[2]]  # in layer order
    tokens, _ = _batch(0)
    positions = torch.arange(SEQ) + 5
    x = tokens
    for module in modules:
        module.positions_S = positions
        x = module(x)
    torch.testing.assert_close(x, model(tokens, positions), rtol=0, atol=0)
    with pytest.raises(ValueError, match="parallel.stages"):
        build_stage_module(model, 0, ((0, 1), (2, 4)))
    with pytest.raises(ValueError, match="parallel.stages"):
        build_stage_module(model, 0, ((0, 1), (1, 3)))


def test_config_from_plan_and_bad_fields():
    plan = ParallelPlan(pp=2, num_microbatches=4, schedule="1f1b", stages=((0, 3), (3, 4)))
    assert PipelineConfig.from_plan(plan) == PipelineConfig(
        num_microbatches=4, schedule="1f1b", stages=((0, 3), (3, 4)))
    with pytest.raises(ValueError, match="parallel.schedule"):
        PipelineConfig.from_plan(ParallelPlan())  # schedule 'none' is not a pipeline
    with pytest.raises(ValueError, match="parallel.schedule"):
        PipelineConfig(num_microbatches=2, schedule="gpipe")
    with pytest.raises(ValueError, match="parallel.num_microbatches"):
        PipelineConfig(num_microbatches=0)
    groups = build_groups(ParallelDims(), 0)
    with pytest.raises(ValueError, match="parallel.pp"):
        PipelineRunner(build_model(SHAPE, seed=0), groups, PipelineConfig(num_microbatches=2))
