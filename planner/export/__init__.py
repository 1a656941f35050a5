"""Plan export: the closest configuration an existing stack can express, and what it cannot.

`disttrain plan job.yaml --emit deepspeed|megatron` writes, beside plan.json, a DeepSpeed
config (JSON) or a Megatron-core argument description (YAML + command-line flags). A stack
has a coarser vocabulary than the plan (whole-layer checkpointing instead of token-wise swap,
all-or-nothing parameter offload, one offload setting for every layer), so each exporter
lists *alternatives*: plans in the planner's own vocabulary that the stack can express, with
input adjustments for behaviour the vocabulary lacks (e.g. a checkpointed layer that also
recomputes its attention core). Each alternative is re-costed by the planner's cost model,
through the same machinery `planner.report.evaluate_baselines` uses; the fastest one that
fits is the *nearest expressible plan*, and its predicted step time and memory are reported
next to the full plan's.

The planner never imports deepspeed or megatron: the exporters only write files. Tests build
the stacks' own config objects from those files when the packages are installed.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from planner.costmodel import CostParams, LayerCost
from planner.mip import StageProblem, evaluate_stage
from planner.outer import outer_flags
from planner.plan import Plan
from planner.report import plan_stages
from planner.search import compose_step

GiB = 2**30
STACKS = ("deepspeed", "megatron")
"""Stacks a plan can be exported to; each has a module `planner.export.<name>`."""

LayerAdjust = Callable[[int, LayerCost], LayerCost]
"""(global layer index, layer cost) -> the cost the stack's behaviour implies."""
ProblemAdjust = Callable[[StageProblem], StageProblem]
"""A stage problem -> the problem the stack's behaviour implies."""


@dataclass(frozen=True, kw_only=True)
class PlanCost:
    """The cost model's verdict on one plan (per rank, the busiest pipeline stage)."""

    fits: bool
    """No capacity or policy constraint is violated."""
    violations: tuple[str, ...]
    """What is violated, with numbers."""
    device_bytes: float
    """Device bytes of the busiest stage (states, buffers, resident activations)."""
    host_bytes: float
    """Host bytes per rank (offloaded states, swapped activations)."""
    nvme_bytes: float
    """NVMe bytes per rank."""
    step_time_s: float
    """Predicted optimizer-step time."""
    activation_bytes: float = 0.0
    """Resident saved activations of the busiest stage (its in-flight microbatches)."""
    working_bytes: float = 0.0
    """The busiest stage's largest transient backward working set."""

    def to_dict(self) -> dict[str, Any]:
        return dict(fits=self.fits, violations=list(self.violations),
                    device_gib=round(self.device_bytes / GiB, 3),
                    host_gib=round(self.host_bytes / GiB, 3),
                    nvme_gib=round(self.nvme_bytes / GiB, 3),
                    step_time_s=round(self.step_time_s, 6))


@dataclass(frozen=True, kw_only=True)
class Alternative:
    """A plan the stack can express, with the stack settings it stands for."""

    name: str
    """Short description, e.g. 'checkpoint 18 layers, params+optimizer offloaded to cpu'."""
    plan: Plan
    """The plan in the planner's vocabulary."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Stack-specific choices the emitter turns into config keys."""
    layer_adjust: LayerAdjust | None = None
    """Changes layer costs for behaviour the plan vocabulary lacks."""
    problem_adjust: ProblemAdjust | None = None
    """Changes stage problems for behaviour the plan vocabulary lacks."""


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """What an exporter wrote and what it could not express."""

    stack: str
    """'deepspeed' or 'megatron'."""
    path: Path
    """The file written beside plan.json."""
    unexpressed: tuple[str, ...]
    """Plan decisions the stack cannot express (one sentence each)."""
    full: PlanCost
    """The full plan re-costed by the cost model."""
    nearest: PlanCost
    """The nearest expressible plan, costed the same way."""
    chosen: str
    """Name of the nearest expressible alternative."""
    alternatives: tuple[tuple[str, PlanCost], ...]
    """Every alternative considered, with its cost."""


def evaluate_plan(plan: Plan, *, layer_adjust: LayerAdjust | None = None,
                  problem_adjust: ProblemAdjust | None = None,
                  params: CostParams | None = None) -> PlanCost:
    """Re-cost `plan` (its layout, chunk placement and per-layer policy) with the cost model.

    Same stage set-up as `evaluate_baselines`; the layer times come from the plan's profile
    when it carries fitted times, so the plan's own policy reproduces its prediction.
    """
    if not plan.feasible:
        raise ValueError("plan.feasible: an infeasible plan has no layout to cost or export")
    params = params or CostParams()
    request, cand, setups = plan_stages(plan, params)
    if len(plan.activations) != request.model.num_layers:
        raise ValueError(f"activations: need {request.model.num_layers} entries, "
                         f"got {len(plan.activations)}")
    cpu_chunks = set(plan.model_states.cpu_chunks)
    buffers = min(2, max(1, plan.model_states.num_prefetch_buffers))
    adjusted, evaluations = [], []
    for setup in setups:
        first, last = setup.layer_range
        problem = setup.problem
        if layer_adjust is not None:
            problem = dataclasses.replace(problem, layers=tuple(
                layer_adjust(first + i, lc) for i, lc in enumerate(problem.layers)))
        if problem_adjust is not None:
            problem = problem_adjust(problem)
        persistent = problem.num_chunks - sum(1 for c in range(first, last) if c in cpu_chunks)
        evaluations.append(evaluate_stage(problem, plan.activations[first:last], persistent, buffers,
                                          outer_on_cpu=outer_flags(problem.outer_chunks,
                                                                   plan.model_states.cpu_outer)))
        adjusted.append(dataclasses.replace(setup, problem=problem))
    step = compose_step(cand, tuple(adjusted), evaluations)
    busiest = max(zip(adjusted, evaluations), key=lambda pair: pair[1].device_bytes)
    violations = tuple(sorted({v for ev in evaluations for v in ev.violations}))
    return PlanCost(fits=not violations, violations=violations,
                    device_bytes=max(ev.device_bytes for ev in evaluations),
                    host_bytes=max(ev.host_bytes for ev in evaluations),
                    nvme_bytes=max(ev.nvme_bytes for ev in evaluations),
                    step_time_s=step.total,
                    activation_bytes=busiest[0].problem.inflight * sum(busiest[1].resident_bytes_per_layer),
                    working_bytes=busiest[1].working_bytes)


def whole_layer_recompute(layers: set[int]) -> LayerAdjust:
    """Layer costs of stack-style checkpointing: the layers in `layers` recompute their whole
    forward (attention core included) and keep nothing but their input."""
    def adjust(index: int, lc: LayerCost) -> LayerCost:
        if index not in layers:
            return lc
        return dataclasses.replace(lc, recompute_s=lc.forward_s, attention_output_bytes=0.0)
    return adjust


def choose_nearest(alternatives: list[Alternative], params: CostParams | None = None
                   ) -> tuple[Alternative, PlanCost, tuple[tuple[str, PlanCost], ...]]:
    """The fastest alternative that fits (the leanest on device memory when none fits)."""
    if not alternatives:
        raise ValueError("alternatives: need at least one expressible plan")
    costed = [(alt, evaluate_plan(alt.plan, layer_adjust=alt.layer_adjust,
                                  problem_adjust=alt.problem_adjust, params=params))
              for alt in alternatives]
    best, cost = min(costed, key=lambda ac: (not ac[1].fits,
                                             ac[1].step_time_s if ac[1].fits else ac[1].device_bytes))
    return best, cost, tuple((alt.name, c) for alt, c in costed)


def layer_ranges(indices: list[int]) -> str:
    """'0-3, 7, 9-10' for a sorted list of layer indices."""
    parts: list[str] = []
    for index in indices:
        if parts and index == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{index}"
        else:
            parts.append(str(index))
    return ", ".join(parts)


def costs_record(result_full: PlanCost, chosen: str, nearest: PlanCost,
                 alternatives: tuple[tuple[str, PlanCost], ...]) -> dict[str, Any]:
    """The machine-readable cost comparison both emitters embed in their files."""
    return {"cost_model": "disttrain planner (per rank, busiest pipeline stage)",
            "full_plan": result_full.to_dict(),
            "nearest_expressible": dict(nearest.to_dict(), name=chosen),
            "alternatives": [dict(c.to_dict(), name=n) for n, c in alternatives]}


def summary_lines(result: ExportResult) -> list[str]:
    """Human summary: what cannot be expressed, and full vs nearest predicted cost."""
    label = {"deepspeed": "DeepSpeed", "megatron": "Megatron-core"}[result.stack]
    lines = [f"{label} cannot express {len(result.unexpressed)} plan decision(s):"]
    lines += [f"  - {item}" for item in result.unexpressed] or ["  (none)"]
    lines.append("predicted by the planner's cost model (per rank, busiest stage):")
    for name, cost in (("full plan", result.full), (f"nearest expressible: {result.chosen}", result.nearest)):
        fits = "fits" if cost.fits else "does NOT fit: " + "; ".join(cost.violations)
        lines.append(f"  {name}: step {cost.step_time_s:.4g} s, device {cost.device_bytes / GiB:.2f} GiB, "
                     f"host {cost.host_bytes / GiB:.2f} GiB, nvme {cost.nvme_bytes / GiB:.2f} GiB, {fits}")
    if result.full.step_time_s > 0:
        lines.append(f"  nearest / full step time: {result.nearest.step_time_s / result.full.step_time_s:.3f}x")
    return lines


def export_plan(plan: Plan, stack: str, out_dir: str | Path, *,
                params: CostParams | None = None) -> ExportResult:
    """Write the `stack` configuration for `plan` into `out_dir` (beside plan.json)."""
    if stack not in STACKS:
        raise ValueError(f"stack: must be one of {STACKS}, got {stack!r}")
    module = importlib.import_module(f"planner.export.{stack}")
    return module.export(plan, Path(out_dir), params=params)
