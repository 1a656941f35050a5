"""Per-part correction factors from measured trial step times (`disttrain plan --trial K`).

A trial measures one number per plan that maps cleanly onto the cost model: the step time.
The runtime also times forward+backward, clipping and the optimizer update, but those cuts
are not the model's parts (the ZeRO gradient reduction runs inside the backward, the
parameter re-gather and the norm's all-reduce inside the update), so the fit uses the total.
Each plan predicts its step as a sum of parts (`StepTime`: compute, recompute, exposed
transfer, exposed communication, bubble, optimizer, page faults); the fit finds one factor per
part such that factor-weighted sums match the measured totals:

    measured_i ~ sum_p f[family_i, p] * predicted_i[p]

with a factor per part shared by every layout (global, `g[p]`) and one per layout family and
part (`f[F, p]`: the family's mechanisms - e.g. Ulysses' all-to-all against ZeRO's
reduce-scatter - err differently). Few trials cannot pin that many factors, so the least
squares is regularised: each global factor toward 1 (`PRIOR_SD`: how far a part's factor is
expected from 1 before any trial), each family factor toward its global one (`FAMILY_SD`),
each trial weighted by its relative noise (`NOISE_SD`, or the run-to-run spread measured).
A part no trial exercised (e.g. recompute, when every trial kept all activations) stays at
1; a part small in every trial moves little. (Tried: recompute tied to compute's factor, the
forward again from the same profile fits. With the fidelity bench's memory-bound trials
exercising recompute it changed the worst row of 5 runs by +2.9, +3.6, -2.4, -1.9, -3.9
points, worse in the three quiet ones: 1024-token tp2 recompute, whose 0.14 s recompute part
took tp's compute factor x1.4-1.6, learned from a keep-all trial whose ranks wait at their
all-reduces ~half the step, and went +16% -> +20%. Not kept.) All factors are non-negative (Lawson-Hanson NNLS on the stacked system).

Pure numpy: the planner runs without the runtime.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

PARTS = ("compute", "recompute", "exposed_transfer", "exposed_communication", "bubble",
         "optimizer", "page_faults")
"""The parts of a predicted step (`planner.costmodel.StepTime`), each corrected by its factor."""
PRIOR_SD = 0.5
"""Prior spread of a part's factor around 1 (the uncorrected model was off by -34% to +20% on
this CPU and by up to 2.5x on published GPU runs: 0.5 leaves the measurements in charge)."""
FAMILY_SD = 0.5
"""Prior spread of a family's factor around the part's global one: as wide as the global
prior, since a family's collectives can err very differently from another's (measured on
this CPU: Ulysses' all-to-all ~2x its prediction, ZeRO's collectives ~1x). The global factors
a never-measured family starts from are then the measured families' shrunk toward 1 (by 1/4
with three families agreeing)."""
NOISE_SD = 0.03
"""Relative noise of one trial's median step time (a few steps on a quiet machine): the
floor; an observation carrying a larger measured `noise_sd` (the run-to-run spread of the
trials' repeated runs, `trial_rounds.trial_noise`) is weighted by that instead, so that on
a busy machine the priors hold the factors rather than one noisy run."""


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0 (Lawson and Hanson's active-set method; `a` of
    full column rank, as the regularised systems here are)."""
    n = a.shape[1]
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    if (x >= 0).all():
        return x
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    tol = 1e-12 * max(1.0, float(np.abs(a).max()) * float(np.abs(b).max()))
    for _ in range(3 * n + 10):
        w = a.T @ (b - a @ x)
        if passive.all() or w[~passive].max() <= tol:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            down = passive & (z <= 0)
            alpha = float(np.min(x[down] / (x[down] - z[down])))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def fit_part_factors(observations: Iterable[dict], family_of: Callable[[str], str], *,
                     prior_sd: float = PRIOR_SD, family_sd: float = FAMILY_SD,
                     noise_sd: float = NOISE_SD) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(global factor per part, {family: factor per part}) from `observations`, each
    {"layout": layout key, "parts": {part: predicted s, uncorrected}, "measured_s": s} and
    optionally "noise_sd" (its relative noise, if measured above `noise_sd`).
    Only parts some observation predicts get a factor (others: 1, by the caller); a family
    gets factors for the parts its own observations predict."""
    obs = [o for o in observations
           if o["measured_s"] > 0 and math.isfinite(o["measured_s"]) and sum(o["parts"].values()) > 0]
    seen = [p for p in PARTS if any(o["parts"].get(p, 0) > 0 for o in obs)]
    pairs = sorted({(family_of(o["layout"]), p) for o in obs for p in seen if o["parts"].get(p, 0) > 0})
    if not obs:
        return {}, {}
    column = {("*", p): i for i, p in enumerate(seen)}
    column.update({pair: len(seen) + i for i, pair in enumerate(pairs)})
    rows, rhs = [], []
    for o in obs:  # sum_p f[F, p] x_p = y, relative to y / noise
        row = np.zeros(len(column))
        family = family_of(o["layout"])
        sd = max(noise_sd, float(o.get("noise_sd") or 0.0))
        for p in seen:
            if o["parts"].get(p, 0) > 0:
                row[column[(family, p)]] = o["parts"][p] / (o["measured_s"] * sd)
        rows.append(row)
        rhs.append(1.0 / sd)
    for p in seen:  # g[p] ~ 1
        row = np.zeros(len(column))
        row[column[("*", p)]] = 1.0 / prior_sd
        rows.append(row)
        rhs.append(1.0 / prior_sd)
    for family, p in pairs:  # f[F, p] ~ g[p]
        row = np.zeros(len(column))
        row[column[(family, p)]], row[column[("*", p)]] = 1.0 / family_sd, -1.0 / family_sd
        rows.append(row)
        rhs.append(0.0)
    x = nnls(np.array(rows), np.array(rhs))
    parts = {p: float(x[column[("*", p)]]) for p in seen}
    families: dict[str, dict[str, float]] = {}
    for family, p in pairs:
        families.setdefault(family, {})[p] = float(x[column[(family, p)]])
    return parts, families
