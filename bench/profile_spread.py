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

    .venv/bin/python bench/profile_spread.py [--profiles 3]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=int, default=3)
    args = ap.parse_args()
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
