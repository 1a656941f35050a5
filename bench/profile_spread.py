"""How much a CPU profile's predictions move from one profile to the next, on this machine.

Takes N profiles back to back (the fidelity grid's job: the model of `bench/peers.py`, two
ranks side by side, `bench/fidelity.fresh_profile`) in one pass (`rounds=1`: each piece
timed once, one after the other) and N in interleaved rounds (the default beside twins,
`planner.profiler.TWIN_ROUNDS`), alternately, and plans every fidelity grid row with each.
Printed per row: each profile's predicted step time as a ratio to the mean of its kind;
then per kind the spread that matters for corrections learned from other rows (a profile
too fast or too slow as a whole is what a trial's factor corrects; one piece off against
another is not): the relative sd, over the profiles, of each row's prediction divided by
the profile's mean over rows.

`--drift N`: instead, two processes side by side (as the profile's twins) each time one
decoder layer's forward + backward at 512 tokens for N blocks of 25 runs and print each
block's median: how far this machine's speed moves within a minute with nothing else
running.

`--faults N`: instead, N fresh processes one after the other each take the profile's
page-fault price 5 times (`measure_page_fault_s_per_byte`) and print their median: how much
the price depends on the process that measures it.

    .venv/bin/python bench/profile_spread.py [--profiles 3] [--drift N] [--faults N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity import LAYOUTS, POLICIES, _plan, config_spec  # noqa: E402
from peers import job_spec  # noqa: E402

from disttrain.spec import job_from_dict  # noqa: E402


def take_profile(rounds: int | None, max_seq: int = 1024):
    """A fresh profile of the fidelity job (None: the profiler's default rounds)."""
    from disttrain.profiling import profile_job_layer

    lens = tuple(s for s in (256, 512, 1024) if s <= max_seq)
    return profile_job_layer(job_from_dict(job_spec(max_seq, 1024, 1)), lens, cache_dir=None,
                             rounds=rounds)


def grid_predictions(profile) -> dict[str, float]:
    out = {}
    for seq in (512, 1024):
        for lname, parallel in LAYOUTS.items():
            for pname, (budget, memory) in POLICIES.items():
                plan = _plan({**config_spec(seq, budget, parallel, memory, 4), "name": "spread"},
                             profile)[1]
                if plan.feasible:
                    out[f"{seq} {lname} {pname}"] = plan.prediction.step_time_s
    return out


def relative_spread(preds: list[dict[str, float]]) -> float:
    """Mean over rows of the relative sd of (row / the profile's mean over rows)."""
    rows = sorted(set.intersection(*(set(p) for p in preds)))
    normed = [{r: p[r] / statistics.mean(p[x] for x in rows) for r in rows} for p in preds]
    return statistics.mean(statistics.pstdev(n[r] for n in normed)
                           / statistics.mean(n[r] for n in normed) for r in rows)


def drift_blocks(blocks: int, seq: int = 512, runs: int = 25) -> list[float]:
    """Median seconds of each of `blocks` blocks of `runs` forward + backward passes of one
    decoder layer of the fidelity model (one torch thread)."""
    import torch

    from disttrain.model.llama import build_model

    torch.set_num_threads(1)
    job = job_from_dict(job_spec(seq, 1024, 1))
    model = build_model(job.shape, seed=0)
    layer = model.layers[0]
    x = torch.randn(1, seq, job.shape.hidden_size, requires_grad=True)
    cos, sin = model.rope(torch.arange(seq), torch.float32)
    out = []
    for _ in range(blocks):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            layer(x, cos, sin).sum().backward()
            times.append(time.perf_counter() - start)
        out.append(statistics.median(times))
    return out


def drift(blocks: int) -> None:
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(drift_blocks, [blocks, blocks])
    for i, medians in enumerate(results):
        print(f"process {i}: block medians ms " + " ".join(f"{m * 1e3:.1f}" for m in medians)
              + f" (max/min {max(medians) / min(medians):.2f})")


def fault_prices(_: int) -> list[float]:
    from planner.profile_memory import measure_page_fault_s_per_byte

    return [measure_page_fault_s_per_byte(median=True) for _ in range(5)]


def faults(processes: int) -> None:
    import multiprocessing as mp

    medians = []
    for i in range(processes):
        with mp.get_context("spawn").Pool(1) as pool:
            prices = pool.map(fault_prices, [0])[0]
        medians.append(statistics.median(prices))
        print(f"process {i}: page-fault price {medians[-1]:.2e} s/B (its 5: "
              + " ".join(f"{p:.2e}" for p in prices) + ")")
    print(f"over processes: {min(medians):.2e} to {max(medians):.2e} s/B")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=int, default=3)
    ap.add_argument("--drift", type=int, default=0, help="blocks of the drift check instead")
    ap.add_argument("--faults", type=int, default=0, help="processes of the fault-price check")
    args = ap.parse_args()
    if args.faults > 0:
        faults(args.faults)
        return 0
    if args.drift > 0:
        drift(args.drift)
        return 0
    kinds = {"one pass": 1, "rounds": None}
    preds: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.profiles):
        for kind, rounds in kinds.items():
            start = time.perf_counter()
            profile = take_profile(rounds)
            seconds[kind].append(time.perf_counter() - start)
            preds[kind].append(grid_predictions(profile))
    for kind in kinds:
        print(f"\n{kind} (profile took {statistics.mean(seconds[kind]):.1f} s on average):")
        rows = sorted(set.intersection(*(set(p) for p in preds[kind])))
        for row in rows:
            values = [p[row] for p in preds[kind]]
            mean = statistics.mean(values)
            print(f"  {row:32s} " + " ".join(f"{v / mean:.2f}" for v in values))
    for kind in kinds:
        print(f"{kind}: row-to-row relative spread over {args.profiles} profiles "
              f"{relative_spread(preds[kind]):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
