"""Memory-aware profiler: run one decoder layer, record saved bytes by kind and its timing.

Importable without the runtime: it takes any layer object with the three-part API
(`qkv(x, cos, sin)`, `attention_core(q, k, v)`, `post_attention(x, out)`) and a rope
callable, so tests hand it a real `disttrain.model.DecoderLayer` while this module never
imports `disttrain`.

Saved tensors are seen through `torch.autograd.graph.saved_tensors_hooks` and counted once
per *storage* (views share storage; `planner.saved_bytes`). They are split into
  - `input`: the layer input's storage,
  - `attention_output`: storages first saved inside `attention_core` that are not its
    inputs (the output and the log-sum-exp),
  - `token_local`: everything else the layer saves,
and parameters and the rope tables are left out (they are not per-token activations). The
bytes allocated beyond the saved ones bound the forward's transient peak from above.
The layer runs in the training dtype as the runtime runs it: in bf16 its weights and input
are bf16 (no autocast), RMSNorm statistics and the log-sum-exp fp32 inside the model.
Byte counts are fitted linear in tokens, times linear + quadratic, so a profile taken at a
few short lengths extrapolates to long sequences.

Times are taken the way the ranks will run: with their torch thread count (`threads`) and,
on a CPU node whose cores the ranks share, with `concurrent - 1` forked twins running the
same measurements in step (`Lockstep`): one rank alone on a 2-core machine runs a layer up
to 2x faster than each of two ranks side by side. An optional `head` callable (final norm +
output head + loss) is timed at the same token counts, and the runtime's gradient clip +
AdamW update is timed per parameter, so the planner need not guess the parts of a step
outside the decoder layers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from planner.lockstep import Lockstep, Solo
from planner.profile_memory import (fit_allocations, measure_page_fault_s_per_byte,
                                    record_allocations)
from planner.profile_loss import measure_loss_tile_s
from planner.profile_optimizer import measure_optimizer_s_per_param
from planner.profile_rounds import TWIN_ROUNDS, pool_rounds  # noqa: F401  (re-exported)
from planner.saved_bytes import (  # noqa: F401  (measure_saved, CATEGORIES: re-exported)
    CATEGORIES, _AllocatedBytes, measure_saved)

log = logging.getLogger(__name__)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class LayerMeasurement:
    """One run of one layer at one sequence length."""

    seq_len: int
    """Tokens per sequence of the run."""
    batch: int
    """Sequences in the run."""
    saved_bytes: dict[str, int]
    """Unique saved bytes per category (input, attention_output, token_local)."""
    num_saved_tensors: int
    """Saved tensors seen by the hook (before de-duplication by storage)."""
    forward_s: float
    """Forward wall time of the whole layer."""
    backward_s: float
    """Backward wall time of the whole layer."""
    token_local_forward_s: float
    """Forward wall time of qkv + post_attention (what recompute re-runs)."""
    attention_forward_s: float
    """Forward wall time of the attention core."""
    transient_upper_bound_bytes: int
    """Bytes the forward's ops allocate beyond what autograd saves: an upper bound on the
    transient peak (frees are not tracked)."""
    head_forward_s: float = 0.0
    """Forward wall time of the head (final norm, output projection, loss) on the same
    tokens; 0: not measured."""
    head_backward_s: float = 0.0
    """Backward wall time of the head; 0: not measured."""
    allocations: dict[str, list[int]] = field(default_factory=dict)
    """Bytes of every storage allocated, in order: 'layer' (forward + backward), 'head'
    (forward + backward, when timed); `planner.page_faults` prices the large ones."""


@dataclass(frozen=True, kw_only=True)
class LayerProfile:
    """Fitted per-layer costs: bytes linear in tokens, times linear + quadratic."""

    key: str
    """Cache key: shape, dtype, device."""
    device: str
    """Device the profile was taken on."""
    dtype: str
    """'fp32' or 'bf16'."""
    bytes_per_token: dict[str, float]
    """Saved bytes per token per category (fitted slope)."""
    time_coeffs: dict[str, list[float]]
    """Per timing name, [c0, c1, c2] of c0 + c1*tokens + c2*tokens*seq_len."""
    measurements: list[LayerMeasurement] = field(default_factory=list)
    """Raw runs the fit came from."""
    threads: int = 0
    """torch threads of the measuring process (0: not recorded)."""
    concurrent: int = 1
    """Processes that ran the same layer at the same time on this machine's cores (the
    ranks that will share them); 1: measured alone."""
    optimizer_s_per_param: float = 0.0
    """Seconds per parameter of the runtime's gradient clip + AdamW update over fp32 shards
    (+ the bf16 compute copy in bf16), under the same threads and concurrency, over the
    job's chunk sizes (`planner.profile_optimizer`); 0: not measured."""
    measured_at: float = 0.0
    """Unix time the measurements were taken (0: not recorded)."""
    load_average: float = -1.0
    """The machine's 1-minute load average just before measuring (-1: not recorded): a
    profile taken on a busy machine is not one taken on a quiet one."""
    page_fault_s_per_byte: float = 0.0
    """Seconds per byte a freshly mapped block costs over a recycled one (page faults and
    kernel zeroing), under the same threads and concurrency; 0: not measured."""
    allocation_fits: dict[str, list[list[float]]] = field(default_factory=dict)
    """Per allocation of `LayerMeasurement.allocations` ('layer', 'head'): [a, b] of its
    size a + b * tokens (`planner.profile_memory.fit_allocations`)."""
    loss_tile_s: float = 0.0
    """Fixed seconds one more tile of the runtime's tiled loss costs (forward + backward,
    `planner.profile_loss`); 0: not measured."""
    collective_fits: dict[str, list[float]] = field(default_factory=dict)
    """Per collective kind, [latency s, bandwidth bytes/s] of a blocking gloo call between
    `concurrent` ranks reached from compute on these cores, measured with the profile
    (`planner.collective_probe.busy_collectives`); empty: not measured (the hardware's
    figures stand)."""

    def saved_bytes(self, tokens: int) -> dict[str, float]:
        return {name: slope * tokens for name, slope in self.bytes_per_token.items()}

    def time_s(self, name: str, tokens: int, seq_len: int) -> float:
        c0, c1, c2 = self.time_coeffs[name]
        return max(0.0, c0 + c1 * tokens + c2 * tokens * seq_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerProfile":
        data = dict(data)
        data["measurements"] = [LayerMeasurement(**m) for m in data.get("measurements", ())]
        return cls(**data)


def profile_key(shape_dict: dict[str, Any], dtype: str, device: str, **conditions: Any) -> str:
    """Stable cache key for a (shape, dtype, device) triple and the measuring conditions
    (threads, concurrency, ...): a profile taken alone is not one taken beside other ranks."""
    text = json.dumps({"shape": shape_dict, "dtype": dtype, "device": device, **conditions},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_layer(layer: Any, rope_fn: Callable[[torch.Tensor, torch.dtype], tuple],
              hidden_size: int, seq_len: int, dtype: str, batch: int = 1,
              seed: int = 0, repeats: int = 2, *,
              head: Callable[[torch.Tensor], torch.Tensor] | None = None,
              median: bool = False) -> LayerMeasurement:
    """One measured forward + backward of `layer` at `seq_len` tokens per sequence.

    A warm-up pass runs first; each time is the fastest of `repeats` runs, or their median
    (`median`: beside twins the fastest run is the one the others left the cores to, while
    a step's ranks compete throughout). `head` maps the layer output (B, S, H) to a scalar
    loss; it is timed forward and backward too.
    """
    torch_dtype = TORCH_DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, hidden_size, generator=gen).to(torch_dtype).requires_grad_()
    cos, sin = rope_fn(torch.arange(seq_len), torch_dtype)
    saved, count, y = measure_saved(layer, x, cos, sin)
    grad_y = torch.ones_like(y)
    y.backward(grad_y)                               # warm-up (and frees the hooked graph)
    with _AllocatedBytes() as tracker:
        layer(x, cos, sin)
    allocated = tracker.total
    allocations = {"layer": record_allocations(lambda: layer(x, cos, sin).backward(grad_y))}
    times: dict[str, list[float]] = {k: [] for k in ("qkv", "core", "post", "fwd", "bwd")}
    for _ in range(max(1, repeats)):
        with torch.no_grad():
            t_qkv, (q, k, v) = _timed(lambda: layer.qkv(x, cos, sin))
            t_core, out = _timed(lambda: layer.attention_core(q, k, v))
            t_post, _ = _timed(lambda: layer.post_attention(x, out))
        forward_s, y = _timed(lambda: layer(x, cos, sin))
        grad = torch.ones_like(y)
        backward_s, _ = _timed(lambda: y.backward(grad))
        for name, value in zip(times, (t_qkv, t_core, t_post, forward_s, backward_s)):
            times[name].append(value)
    layer.zero_grad(set_to_none=True)
    if head is not None:
        times.update(head_fwd=[], head_bwd=[])
        h = x.detach().clone().requires_grad_()
        head(h).backward()                           # warm-up
        allocations["head"] = record_allocations(lambda: head(h).backward())
        for _ in range(max(1, repeats)):
            forward_s, loss = _timed(lambda: head(h))
            backward_s, _ = _timed(loss.backward)
            times["head_fwd"].append(forward_s)
            times["head_bwd"].append(backward_s)
    pick = statistics.median if median else min
    best = {name: pick(values) for name, values in times.items()}
    return LayerMeasurement(
        seq_len=seq_len, batch=batch, saved_bytes=saved, num_saved_tensors=count,
        forward_s=best["fwd"], backward_s=best["bwd"],
        token_local_forward_s=best["qkv"] + best["post"], attention_forward_s=best["core"],
        transient_upper_bound_bytes=max(0, allocated - sum(saved.values())),
        head_forward_s=best.get("head_fwd", 0.0), head_backward_s=best.get("head_bwd", 0.0),
        allocations=allocations)


def _nonnegative_fit(design: np.ndarray, values: np.ndarray) -> list[float]:
    """Least squares with every coefficient >= 0 (exact: tries each subset of columns)."""
    best, best_residual = [0.0] * design.shape[1], float(values @ values)
    columns = range(design.shape[1])
    for mask in range(1, 1 << design.shape[1]):
        chosen = [c for c in columns if mask >> c & 1]
        solution, *_ = np.linalg.lstsq(design[:, chosen], values, rcond=None)
        if (solution < 0).any():
            continue
        residual = values - design[:, chosen] @ solution
        if residual @ residual < best_residual:
            best_residual = float(residual @ residual)
            best = [0.0] * design.shape[1]
            for c, coef in zip(chosen, solution):
                best[c] = float(coef)
    return best


def fit_profile(measurements: list[LayerMeasurement], *, key: str, device: str,
                dtype: str, **extra: Any) -> LayerProfile:
    """Least-squares fits: bytes = slope * tokens; time = c0 + c1*tokens + c2*tokens*seq
    with non-negative coefficients (timing noise must not extrapolate to negative time);
    head times c0 + c1*tokens. `extra`: further LayerProfile fields (threads, ...)."""
    if not measurements:
        raise ValueError("measurements: need at least one run to fit")
    tokens = np.array([m.seq_len * m.batch for m in measurements], dtype=float)
    quad = np.array([m.seq_len * m.batch * m.seq_len for m in measurements], dtype=float)
    slopes = {}
    for name in CATEGORIES:
        values = np.array([m.saved_bytes[name] for m in measurements], dtype=float)
        slopes[name] = float(values @ tokens / (tokens @ tokens))
    design = np.stack([np.ones_like(tokens), tokens, quad], axis=1)
    coeffs = {}
    for name in ("forward_s", "backward_s", "token_local_forward_s", "attention_forward_s"):
        values = np.array([getattr(m, name) for m in measurements], dtype=float)
        coeffs[name] = _nonnegative_fit(design, values)
    for name in ("head_forward_s", "head_backward_s"):  # token-local: linear, no seq term
        rows = [i for i, m in enumerate(measurements) if getattr(m, name) > 0]
        if rows:
            values = np.array([getattr(measurements[i], name) for i in rows], dtype=float)
            coeffs[name] = _nonnegative_fit(design[rows, :2], values) + [0.0]
    fits = {}
    for name in sorted({n for m in measurements for n in m.allocations}):
        runs = [m for m in measurements if name in m.allocations]
        fits[name] = fit_allocations([m.seq_len * m.batch for m in runs],
                                     [m.allocations[name] for m in runs])
    return LayerProfile(key=key, device=device, dtype=dtype, bytes_per_token=slopes,
                        time_coeffs=coeffs, measurements=list(measurements),
                        allocation_fits=fits, **extra)


def _collective_fits(ranks: int, threads: int) -> dict[str, list[float]]:
    """{kind: [latency s, bandwidth]} of `busy_collectives` between `ranks` processes; {}
    (logged) when they cannot run."""
    from planner.collective_probe import busy_collectives
    try:
        fit = busy_collectives(ranks, threads=threads)
    except (RuntimeError, OSError, ValueError) as exc:
        log.warning("profile: collectives not timed (%s); the hardware's figures stand", exc)
        return {}
    return {kind: [float(lat), float(bw)] for kind, (lat, bw) in fit["by_kind"].items()}


def profile_layer(layer: Any, rope_fn: Callable[[torch.Tensor, torch.dtype], tuple],
                  hidden_size: int, seq_lens: list[int] | tuple[int, ...], dtype: str,
                  batch: int = 1, *, shape_dict: dict[str, Any] | None = None,
                  cache_dir: str | Path | None = None, device: str = "cpu",
                  threads: int | None = None, concurrent: int = 1,
                  head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  optimizer_numel: int | Sequence[int] = 0, repeats: int | None = None,
                  rounds: int | None = None, twin_timeout_s: float = 300.0,
                  max_cache_age_s: float | None = None,
                  collectives: bool = False) -> LayerProfile:
    """Profile `layer` at each of `seq_lens`; read/write a JSON cache when `cache_dir` is set.

    `threads`: torch threads while measuring (None: this process's current count), as each
    rank will run. `concurrent`: ranks that will share this machine's cores; `concurrent - 1`
    forked twins run the same measurements in step with this process (`Lockstep`); each
    time is the fastest of `repeats` alone (default 2), their median side by side (default 3
    per round: the ranks of a step compete all along). Side by side, every piece (each
    length's layer and head, the update, the page-fault and loss-tile prices) is timed in
    `rounds` interleaved rounds (default `TWIN_ROUNDS`) and each keeps the median of its
    rounds (`pool_rounds`). `head`: (B, S, H) -> scalar loss, timed too.
    `optimizer_numel`: time the clip + AdamW update on chunks of that many parameters (one
    size, or the job's chunk sizes in update order; 0: not timed).
    All of these are part of the cache key. A twin that dies, or a step that waits for the
    others longer than `twin_timeout_s`, makes it measure alone (recorded, not cached).
    `max_cache_age_s`: a cached profile older than this is measured again (the machine's
    load may have changed since; None: any age). `collectives` (CPU, `concurrent` > 1): also
    time blocking gloo collectives between `concurrent` ranks as a step meets them, after
    compute (`collective_fits`; a failure is logged and leaves them unmeasured).
    """
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype: must be one of {tuple(TORCH_DTYPES)}, got {dtype!r}")
    if not seq_lens:
        raise ValueError("seq_lens: need at least one sequence length")
    if concurrent < 1:
        raise ValueError(f"concurrent: must be >= 1, got {concurrent}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads: must be >= 1, got {threads}")
    before = torch.get_num_threads()
    threads = threads or before
    opt_sizes = ([int(optimizer_numel)] if isinstance(optimizer_numel, int)
                 else [int(n) for n in optimizer_numel])
    opt_sizes = [n for n in opt_sizes if n > 0]
    key_source = dict(shape_dict or {"hidden_size": hidden_size}, seq_lens=list(seq_lens),
                      batch=batch)
    repeats = repeats or (2 if concurrent == 1 else 3)
    rounds = rounds or (1 if concurrent == 1 else TWIN_ROUNDS)
    key = profile_key(key_source, dtype, device, threads=threads, concurrent=concurrent,
                      head=head is not None, optimizer_numel=opt_sizes, page_faults=True,
                      loss_tiles=bool(getattr(head, "tiles_loss", False)),
                      **({"collectives": True} if collectives else {}),
                      **({"rounds": rounds} if rounds > 1 else {}))
    cache_path = Path(cache_dir) / f"profile-{key}.json" if cache_dir else None
    if cache_path is not None and cache_path.exists():
        cached = LayerProfile.from_dict(json.loads(cache_path.read_text()))
        if max_cache_age_s is None or time.time() - cached.measured_at <= max_cache_age_s:
            return cached
    layer.to(TORCH_DTYPES[dtype])
    median = concurrent > 1
    piece_repeats = repeats if rounds > 1 else 5     # in one pass: the update, fault, tile x5

    def one_round(barrier: Any) -> tuple[list[LayerMeasurement], float, float, float]:
        runs = []
        for s in seq_lens:
            barrier.wait()
            runs.append(run_layer(layer, rope_fn, hidden_size, s, dtype, batch,
                                  repeats=repeats, head=head, median=median))
        barrier.wait()
        opt = (measure_optimizer_s_per_param(opt_sizes, dtype=dtype, repeats=piece_repeats,
                                             median=median) if opt_sizes else 0.0)
        barrier.wait()
        fault = (measure_page_fault_s_per_byte(repeats=piece_repeats, median=median)
                 if device == "cpu" else 0.0)
        barrier.wait()
        tile = (measure_loss_tile_s(head, hidden_size, TORCH_DTYPES[dtype], repeats=piece_repeats,
                                    median=median) if head is not None else 0.0)
        barrier.wait()
        return runs, opt, fault, tile

    def steps(barrier: Any) -> tuple[list[LayerMeasurement], float, float, float]:
        """The measurements; every process (this one and its twins) runs them in step."""
        torch.set_num_threads(threads)
        return pool_rounds([one_round(barrier) for _ in range(max(1, rounds))])

    cache = cache_path
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0
    measured_at = time.time()
    torch.set_num_threads(threads)
    try:
        try:
            with Lockstep(concurrent - 1, steps, timeout_s=twin_timeout_s) as twins:
                runs, opt, fault, tile = steps(Solo() if twins.barrier is None else twins.barrier)
                measured_concurrent = 1 + twins.active
        except threading.BrokenBarrierError:        # a twin died or hung: measure alone
            log.warning("profile: a twin process died or hung; measured alone instead of "
                        "%d side by side (not cached)", concurrent)
            runs, opt, fault, tile = steps(Solo())
            measured_concurrent, cache = 1, None
    finally:
        torch.set_num_threads(before)
    comm = (_collective_fits(concurrent, threads)
            if collectives and device == "cpu" and concurrent > 1 else {})
    profile = fit_profile(runs, key=key, device=device, dtype=dtype, threads=threads,
                          concurrent=measured_concurrent, optimizer_s_per_param=opt,
                          measured_at=measured_at, load_average=load_average,
                          page_fault_s_per_byte=fault, loss_tile_s=tile, collective_fits=comm)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(profile.to_dict(), indent=1))
    return profile
