"""Memory-aware profiler: run one decoder layer, record saved bytes by kind and its timing.

Importable without the runtime: it takes any layer object with the three-part API
(`qkv(x, cos, sin)`, `attention_core(q, k, v)`, `post_attention(x, out)`) and a rope
callable, so tests hand it a real `disttrain.model.DecoderLayer` while this module never
imports `disttrain`.

Saved tensors are seen through `torch.autograd.graph.saved_tensors_hooks` and counted once
per *storage* (views share storage). They are split into
  - `input`: the layer input's storage,
  - `attention_output`: storages first saved inside `attention_core` that are not its
    inputs (the output and the log-sum-exp),
  - `token_local`: everything else the layer saves,
and parameters and the rope tables are left out (they are not per-token activations). The
bytes allocated beyond the saved ones bound the forward's transient peak from above.
Byte counts are fitted linear in tokens, times linear + quadratic, so a profile taken at a
few short lengths extrapolates to long sequences.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CATEGORIES = ("input", "attention_output", "token_local")


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


def profile_key(shape_dict: dict[str, Any], dtype: str, device: str) -> str:
    """Stable cache key for a (shape, dtype, device) triple."""
    text = json.dumps({"shape": shape_dict, "dtype": dtype, "device": device}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def measure_saved(layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                  ) -> tuple[dict[str, int], int, torch.Tensor]:
    """Run the layer forward under saved-tensor hooks; unique saved bytes per category."""
    excluded = {_storage_id(p) for p in layer.parameters()} | {_storage_id(cos), _storage_id(sin)}
    phase_saved: dict[str, list[torch.Tensor]] = {"qkv": [], "core": [], "post": []}
    current = ["qkv"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        phase_saved[current[0]].append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q, k, v = layer.qkv(x, cos, sin)
        current[0] = "core"
        out = layer.attention_core(q, k, v)
        current[0] = "post"
        y = layer.post_attention(x, out)
    core_inputs = {_storage_id(t) for t in (q, k, v)}
    attention_ids = {_storage_id(t) for t in phase_saved["core"]} - core_inputs
    sizes: dict[int, tuple[str, int]] = {}
    count = 0
    for tensors in phase_saved.values():
        for t in tensors:
            count += 1
            sid = _storage_id(t)
            if sid in excluded or sid in sizes:
                continue
            if sid == _storage_id(x):
                kind = "input"
            elif sid in attention_ids:
                kind = "attention_output"
            else:
                kind = "token_local"
            sizes[sid] = (kind, _storage_bytes(t))
    totals = {name: 0 for name in CATEGORIES}
    for kind, nbytes in sizes.values():
        totals[kind] += nbytes
    return totals, count, y


class _AllocatedBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums the bytes of every new storage an op returns (allocations; frees not tracked)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                sid = _storage_id(t)
                if sid not in self.live:
                    self.live[sid] = _storage_bytes(t)
        return out

    @property
    def total(self) -> int:
        return sum(self.live.values())


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_layer(layer: Any, rope_fn: Callable[[torch.Tensor, torch.dtype], tuple],
              hidden_size: int, seq_len: int, dtype: str, batch: int = 1,
              seed: int = 0, repeats: int = 2) -> LayerMeasurement:
    """One measured forward + backward of `layer` at `seq_len` tokens per sequence.

    A warm-up pass runs first; each time is the fastest of `repeats` runs.
    """
    torch_dtype = TORCH_DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, hidden_size, generator=gen).to(torch_dtype).requires_grad_()
    cos, sin = rope_fn(torch.arange(seq_len), torch_dtype)
    saved, count, y = measure_saved(layer, x, cos, sin)
    y.backward(torch.ones_like(y))                   # warm-up (and frees the hooked graph)
    with _AllocatedBytes() as tracker:
        layer(x, cos, sin)
    allocated = tracker.total
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
    best = {name: min(values) for name, values in times.items()}
    return LayerMeasurement(
        seq_len=seq_len, batch=batch, saved_bytes=saved, num_saved_tensors=count,
        forward_s=best["fwd"], backward_s=best["bwd"],
        token_local_forward_s=best["qkv"] + best["post"], attention_forward_s=best["core"],
        transient_upper_bound_bytes=max(0, allocated - sum(saved.values())))


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
                dtype: str) -> LayerProfile:
    """Least-squares fits: bytes = slope * tokens; time = c0 + c1*tokens + c2*tokens*seq
    with non-negative coefficients (timing noise must not extrapolate to negative time)."""
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
    return LayerProfile(key=key, device=device, dtype=dtype, bytes_per_token=slopes,
                        time_coeffs=coeffs, measurements=list(measurements))


def profile_layer(layer: Any, rope_fn: Callable[[torch.Tensor, torch.dtype], tuple],
                  hidden_size: int, seq_lens: list[int] | tuple[int, ...], dtype: str,
                  batch: int = 1, *, shape_dict: dict[str, Any] | None = None,
                  cache_dir: str | Path | None = None, device: str = "cpu") -> LayerProfile:
    """Profile `layer` at each of `seq_lens`; read/write a JSON cache when `cache_dir` is set."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype: must be one of {tuple(TORCH_DTYPES)}, got {dtype!r}")
    if not seq_lens:
        raise ValueError("seq_lens: need at least one sequence length")
    key_source = dict(shape_dict or {"hidden_size": hidden_size}, seq_lens=list(seq_lens),
                      batch=batch)
    key = profile_key(key_source, dtype, device)
    cache_path = Path(cache_dir) / f"profile-{key}.json" if cache_dir else None
    if cache_path is not None and cache_path.exists():
        return LayerProfile.from_dict(json.loads(cache_path.read_text()))
    layer.to(TORCH_DTYPES[dtype])
    runs = [run_layer(layer, rope_fn, hidden_size, s, dtype, batch) for s in seq_lens]
    profile = fit_profile(runs, key=key, device=device, dtype=dtype)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(profile.to_dict(), indent=1))
    return profile
