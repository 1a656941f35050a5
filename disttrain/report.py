"""`disttrain report RUN_DIR`: what the plan predicted beside what the run measured.

Reads `plan.json` and the per-rank `metrics*.jsonl` of a run directory; prints a table and
writes `RUN_DIR/report.md`. Every row pairs a prediction with the measurement of the same
quantity: model-state bytes per category (tracked by the runtime's model-state manager),
saved activation bytes per layer (tracked by the activation runtime), step time and tokens/s.
The process's peak RSS is shown for reference: on a CPU it also holds the interpreter, so it
is not compared with a device-memory prediction.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from disttrain.metrics import read_metrics
from disttrain.spec import SpecError
from planner.plan import Plan


@dataclass
class Row:
    quantity: str
    predicted: float | None
    measured: float | None
    unit: str

    @property
    def error(self) -> float | None:
        if not self.predicted or self.measured is None:
            return None
        return (self.measured - self.predicted) / self.predicted


def _rank_files(run_dir: Path) -> dict[int, Path]:
    files = {0: run_dir / "metrics.jsonl"}
    for path in run_dir.glob("metrics.rank*.jsonl"):
        files[int(path.stem.split("rank")[1])] = path
    return {r: p for r, p in files.items() if p.exists()}


def compare(run_dir: Path) -> tuple[Plan, list[Row]]:
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file():
        raise SpecError(f"report: {run_dir} has no plan.json (is it a run directory?)")
    plan = Plan.load(plan_path)
    per_rank = {r: read_metrics(p) for r, p in _rank_files(run_dir).items()}
    if not per_rank or not per_rank.get(0):
        raise SpecError(f"report: {run_dir} has no metrics yet")
    pred = plan.prediction
    rank0 = per_rank[0]
    steady = [r["step_time_s"] for r in rank0[1:]] or [r["step_time_s"] for r in rank0]
    rows = [
        Row("step time", pred.step_time_s or None, statistics.median(steady), "s"),
        Row("tokens/s", pred.tokens_per_s or None,
            statistics.median(r["tokens_per_s"] for r in rank0), "tok/s"),
    ]
    states = [recs[-1].get("model_state_bytes") for recs in per_rank.values() if recs]
    states = [s for s in states if s]
    for category in ("parameters", "gradients", "optimizer"):
        if states:
            measured = max(sum(s[place][category] for place in s) for s in states)
            rows.append(Row(f"model states: {category} (max rank)",
                            pred.bytes_by_category.get(category), measured, "B"))
    activations = (rank0[-1].get("activations") or {}).get("layers")
    if activations and pred.activation_bytes_per_layer:
        for layer in activations:
            index = layer["layer"]
            if index < len(pred.activation_bytes_per_layer):
                rows.append(Row(f"layer {index} saved bytes kept ({layer['policy']})",
                                pred.activation_bytes_per_layer[index], layer["bytes_kept"], "B"))
    rows.append(Row("peak RSS, process (max rank; reference)", None,
                    max(recs[-1]["peak_bytes"] for recs in per_rank.values() if recs), "B"))
    last = [recs[-1] for recs in per_rank.values() if recs]
    if all("device_max_allocated_bytes" in r for r in last):  # CUDA runs (disttrain.device)
        rows.append(Row("peak device memory allocated (max rank)",
                        pred.per_rank_peak_bytes or None,
                        max(r["device_max_allocated_bytes"] for r in last), "B"))
        rows.append(Row("peak device memory reserved (max rank; allocator cache)", None,
                        max(r["device_max_reserved_bytes"] for r in last), "B"))
    return plan, rows


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "B":
        return f"{value / 2**20:,.2f} MiB"
    if unit == "s":
        return f"{value * 1e3:,.1f} ms"
    return f"{value:,.0f} {unit}"


def render_markdown(run_dir: Path, plan: Plan, rows: list[Row]) -> str:
    par = plan.parallel
    lines = [f"# Run report: {run_dir.name}", "",
             f"Plan: dp {par.dp} × tp {par.tp} × sp {par.sp} ({par.sp_kind}) × pp {par.pp}, "
             f"ZeRO-{par.zero_stage}, "
             f"{sum(not a.keep_all and not a.selective for a in plan.activations)} of "
             f"{len(plan.activations)} layers under a token-wise policy, "
             f"{sum(a.selective for a in plan.activations)} under selective checkpointing.", "",
             "| quantity | predicted | measured | error |", "|---|---|---|---|"]
    for row in rows:
        err = "—" if row.error is None else f"{row.error:+.1%}"
        lines.append(f"| {row.quantity} | {_fmt(row.predicted, row.unit)} | "
                     f"{_fmt(row.measured, row.unit)} | {err} |")
    return "\n".join(lines) + "\n"


def write_run_report(run_dir: str | Path) -> tuple[str, Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SpecError(f"report: {run_dir} is not a directory")
    plan, rows = compare(run_dir)
    text = render_markdown(run_dir, plan, rows)
    out = run_dir / "report.md"
    out.write_text(text)
    return text, out
