"""CPU optimizer overlap: step time with CPU chunks' AdamW during the backward vs after it.

One 2-rank dp2 ZeRO-3 job (the `small` preset with `NUM_LAYERS` layers and a `VOCAB`-token
vocabulary, so the decoder layers hold most parameters; fp32, `SEQ_LEN` tokens, one sequence
per rank per step, grad_clip 0), every decoder-layer chunk on CPU. Each rank builds the job
twice, overlap on and off (`ZeroConfig.overlap_cpu_optimizer`), and alternates steps between
the two (which one goes first alternates too), so both see the same machine load. Step time
= median over the steps after the first of each. The optimizer seconds are what the runtime
records per step (`ZeroModelStates.optimizer_stats`): CPU-chunk update work that ran
overlapped, and what the step then spent exposed on it; beside them the cost model's
`cpu_optimizer_s` for this rank's CPU-chunk parameters. Both runs must train the same model:
their losses are compared exactly.

    .venv/bin/python bench/cpu_optimizer_overlap.py [--num-layers 6] [--seq-len 64] [--steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402

from disttrain.data import build_batches  # noqa: E402
from disttrain.engine import build_runtime  # noqa: E402
from disttrain.parallel.spawn import spawn_ranks  # noqa: E402
from disttrain.planning import fixed_plan  # noqa: E402
from disttrain.spec import job_from_dict  # noqa: E402
from planner.costmodel import CostParams, cpu_optimizer_s  # noqa: E402
from planner.plan import ModelStatePlan, Plan  # noqa: E402

NUM_LAYERS = 6
SEQ_LEN = 64
VOCAB = 4096
STEPS = 12
LR = 1e-3
MODES = ("off", "on")


def job_spec(*, num_layers: int, seq_len: int) -> dict:
    return {"name": "cpu-optimizer-overlap",
            "model": {"preset": "small", "num_layers": num_layers, "vocab_size": VOCAB},
            "train": {"seq_len": seq_len, "micro_batch_size": 1, "global_batch_size": 2,
                      "steps": STEPS, "lr": LR, "min_lr": LR, "seed": 0, "grad_clip": 0.0},
            "data": {"kind": "synthetic"},
            "parallel": {"dp": 2, "sp": 1, "pp": 1, "zero_stage": 3},
            "memory": {"activation_offload": "none", "recompute": "none"},
            "cluster": {"preset": "cpu-local", "devices_per_node": 2},
            "launch": {"launcher": "torchrun"}, "output_dir": "/tmp/disttrain-cpu-opt-overlap"}


def all_layers_on_cpu(spec: dict) -> Plan:
    job = job_from_dict(spec)
    base = fixed_plan(job, 2)
    return Plan.from_dict({**base.to_dict(), "model_states": ModelStatePlan(
        cpu_chunks=tuple(range(job.shape.num_layers))).__dict__})


def _worker(rank: int, world: int, spec: dict, plan_dict: dict, steps: int) -> dict:
    job = job_from_dict(spec)
    plan = Plan.from_dict(plan_dict)
    runtimes = {mode: build_runtime(job, plan, rank=rank, overlap_cpu_optimizer=mode == "on")
                for mode in MODES}
    batches = build_batches("synthetic", None, vocab_size=job.shape.vocab_size,
                            seq_len=job.spec.train.seq_len, micro_batch_size=1, seed=0)
    out = {mode: {"step_s": [], "losses": [], "stats": []} for mode in MODES}
    for step in range(steps):
        for mode in (MODES if step % 2 == 0 else MODES[::-1]):
            dist.barrier()
            t0 = time.perf_counter()
            loss, _ = runtimes[mode].train_step(step, batches, LR)
            out[mode]["step_s"].append(time.perf_counter() - t0)
            out[mode]["losses"].append(loss)
            out[mode]["stats"].append(runtimes[mode].optimizer_stats())
    states = runtimes["on"].states
    out["cpu_params"] = sum(c.master.numel() for c in states.chunks if c.on_cpu)
    for runtime in runtimes.values():
        runtime.close()
    return out


def measure(*, num_layers: int = NUM_LAYERS, seq_len: int = SEQ_LEN, steps: int = STEPS) -> dict:
    spec = job_spec(num_layers=num_layers, seq_len=seq_len)
    ranks = spawn_ranks(_worker, 2, spec, all_layers_on_cpu(spec).to_dict(), steps)
    rows = {}
    for mode in MODES:
        steady = [r[mode] for r in ranks]

        def median(values_of) -> float:  # over ranks' steps after the first (warm-up)
            return statistics.median(v for r in steady for v in values_of(r)[1:] or values_of(r))

        rows[mode] = {"step_s": median(lambda r: r["step_s"]),
                      **{key: median(lambda r, k=key: [s[k] for s in r["stats"]])
                         for key in ("cpu_s", "cpu_overlapped_s", "cpu_exposed_s", "device_s",
                                     "exposed_s")},
                      "overlap": all(s["overlap"] for r in steady for s in r["stats"])}
    job = job_from_dict(spec)
    return {"rows": rows, "num_layers": num_layers, "seq_len": seq_len, "steps": steps,
            "same_losses": ranks[0]["on"]["losses"] == ranks[0]["off"]["losses"],
            "cpu_params": ranks[0]["cpu_params"],
            "predicted_cpu_s": cpu_optimizer_s(ranks[0]["cpu_params"], job.hardware,
                                               CostParams())}


def report(result: dict) -> str:
    rows = result["rows"]
    lines = [f"small preset, {result['num_layers']} layers, vocab {VOCAB}, seq {result['seq_len']}, "
             f"dp2 ZeRO-3, every layer chunk on CPU ({result['cpu_params'] / 1e6:.1f} M CPU "
             f"params per rank), grad_clip 0; {result['steps']} alternating steps each, "
             f"medians over both ranks after the first step",
             "",
             "| overlap | step s | CPU opt s | overlapped s | exposed CPU s | device opt s "
             "| exposed opt s |",
             "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        r = rows[mode]
        lines.append(f"| {mode} | {r['step_s']:.3f} | {r['cpu_s']:.3f} | "
                     f"{r['cpu_overlapped_s']:.3f} | {r['cpu_exposed_s']:.3f} | "
                     f"{r['device_s']:.3f} | {r['exposed_s']:.3f} |")
    lines += ["",
              f"step time on/off: {rows['on']['step_s'] / rows['off']['step_s']:.3f} "
              f"(saved {rows['off']['step_s'] - rows['on']['step_s']:+.3f} s of "
              f"{rows['off']['cpu_exposed_s']:.3f} s exposed CPU optimizer when off)",
              f"cost model cpu_optimizer_s for this rank's CPU params: "
              f"{result['predicted_cpu_s']:.3f} s (measured, overlap off: "
              f"{rows['off']['cpu_s']:.3f} s)",
              f"overlap ran every step: {rows['on']['overlap']}; identical losses on/off: "
              f"{result['same_losses']}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=NUM_LAYERS)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    result = measure(num_layers=args.num_layers, seq_len=args.seq_len, steps=args.steps)
    print(report(result))
    return 0 if result["same_losses"] else 1


if __name__ == "__main__":
    sys.exit(main())
