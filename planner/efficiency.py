"""Device efficiency curves: how fast a GPU runs the kernels of one decoder layer.

Mechanisms, not one constant per plan (docs/design.md, "Compute" gives the sources):
- GEMMs: the achieved fraction of peak of a large GEMM (`gemm_max`, measured at 8192^3 by
  public cuBLAS/CUTLASS benchmarks) times a tile-quantisation factor per dimension
  d / (d + c), normalised at 8192, so small-M shards (few tokens per rank) and narrow
  tensor-parallel shards run slower; never faster than the HBM roofline allows (the
  operands and result read/written once).
- Attention (flash kernels): the kernel's achieved fraction of peak at long sequences
  (`attn_fwd_max`, `attn_bwd_max` from the FlashAttention-2/3 papers) times S / (S + 512)
  for the key length each query block sees and d / (d + 32) normalised at head dim 128;
  the backward does 2.5x the forward's matmul FLOPs (it recomputes the scores).
- Element-wise work (norms with their fp32 upcast, RoPE, SiLU x up, residual adds, the
  loss's softmax) is memory-bound: its bytes over the HBM bandwidth.
- A part run below the power its datasheet peak is quoted at sustains a lower tensor-core
  clock (`clock_factor`, scaling GEMM and attention, not HBM-bound work).
- Gradient bookkeeping (fp32 accumulation or packing for the reduce-scatter) is HBM-bound
  copy work per parameter and microbatch (`grad_bookkeeping_bytes_per_param`).
- A collective's NCCL kernel holds `NCCL_CTAS` thread blocks, one SM each, for as long as it
  runs, so compute beside it runs on the other SMs (`collective_slowdown`).

A device is matched to a family by its name (case-insensitive substring); `cpu` and
unknown devices keep the flat `CostParams` efficiencies (the CPU numbers are measured by
`disttrain profile`, whose fitted times replace all of this when they exist).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.shapes import DTYPE_BYTES, ModelShape

REFERENCE_DIM = 8192
"""GEMM size at which `gemm_max` is quoted."""
ATTN_SEQ_HALF = 512
"""Key length at which a flash kernel reaches half its long-sequence efficiency."""
MEMORY_EFFICIENCY = 0.8
"""Achieved share of nominal HBM bandwidth by streaming element-wise kernels."""
NCCL_CTAS = 24
"""Thread blocks (SMs) one running NCCL collective occupies: 24 for an FSDP-style all-gather
beside a GEMM on an H100 in Nsight Systems traces (docs/design.md, "Contention")."""


@dataclass(frozen=True, kw_only=True)
class DeviceFamily:
    """Kernel efficiencies of one GPU family (fractions of the dense bf16 peak)."""

    name: str
    gemm_max: float
    """Large-GEMM (8192^3) achieved fraction of peak."""
    tile: float
    """Tile-quantisation constant c of d / (d + c) per GEMM dimension."""
    attn_fwd_max: float
    """Flash attention forward, long sequence, head dim 128."""
    attn_bwd_max: float
    """Flash attention backward (counting its 2.5x forward FLOPs)."""
    hbm_bw: float
    """Nominal device memory bandwidth, bytes/s."""
    rated_power_w: float = 0.0
    """Board power at which the datasheet's peak FLOP/s are quoted (0: not power-capped)."""
    power_limit_w: float = 0.0
    """The part's default power limit when below `rated_power_w` (0: runs at rated power)."""
    sms: int = 132
    """Streaming multiprocessors (datasheet)."""

    @property
    def collective_slowdown(self) -> float:
        """Share of the compute rate lost while a collective runs beside it: the SMs its NCCL
        kernel holds (`NCCL_CTAS`) out of the device's."""
        return NCCL_CTAS / self.sms

    @property
    def clock_factor(self) -> float:
        """Sustained tensor-core clock under a power limit as a share of the clock the peak
        is quoted at: dynamic power ~ f V^2 with V ~ f, so f ~ P^(1/3) (docs/design.md)."""
        if not self.rated_power_w or not self.power_limit_w:
            return 1.0
        return min(1.0, (self.power_limit_w / self.rated_power_w) ** (1 / 3))


# Order matters: the first family whose key is in the device name wins.
FAMILIES: tuple[tuple[str, DeviceFamily], ...] = (
    ("hbm2e", DeviceFamily(name="H100-HBM2e", gemm_max=0.70, tile=128, attn_fwd_max=0.35,
                           attn_bwd_max=0.30, hbm_bw=2.4e12, rated_power_w=700,
                           power_limit_w=500)),
    ("h100", DeviceFamily(name="H100", gemm_max=0.70, tile=128, attn_fwd_max=0.35,
                          attn_bwd_max=0.30, hbm_bw=3.35e12)),
    ("h200", DeviceFamily(name="H200", gemm_max=0.70, tile=128, attn_fwd_max=0.35,
                          attn_bwd_max=0.30, hbm_bw=4.8e12)),
    ("b200", DeviceFamily(name="B200", gemm_max=0.72, tile=512, attn_fwd_max=0.35,
                          attn_bwd_max=0.30, hbm_bw=8.0e12, sms=148)),
    ("a100-40", DeviceFamily(name="A100-40G", gemm_max=0.75, tile=128, attn_fwd_max=0.65,
                             attn_bwd_max=0.55, hbm_bw=1.555e12, sms=108)),
    ("a100", DeviceFamily(name="A100", gemm_max=0.75, tile=128, attn_fwd_max=0.65,
                          attn_bwd_max=0.55, hbm_bw=2.0e12, sms=108)),
    ("a800", DeviceFamily(name="A800", gemm_max=0.75, tile=128, attn_fwd_max=0.65,
                          attn_bwd_max=0.55, hbm_bw=2.0e12, sms=108)),
    ("4090", DeviceFamily(name="RTX 4090", gemm_max=0.75, tile=128, attn_fwd_max=0.60,
                          attn_bwd_max=0.50, hbm_bw=1.0e12, sms=128)),
)


def device_family(device_name: str) -> DeviceFamily | None:
    """The family of a device name, or None (CPU, unknown device: flat efficiencies)."""
    name = device_name.lower()
    for key, family in FAMILIES:
        if key in name:
            return family
    return None


def _tile(d: float, c: float) -> float:
    return d / (d + c)


def gemm_efficiency(family: DeviceFamily, m: float, n: float, k: float) -> float:
    """Achieved fraction of peak of an (m x k) @ (k x n) GEMM, before the roofline."""
    ref = _tile(REFERENCE_DIM, family.tile) ** 3
    return family.clock_factor * family.gemm_max * _tile(m, family.tile) * _tile(n, family.tile) * _tile(k, family.tile) / ref


def gemm_seconds(family: DeviceFamily, peak: float, m: float, n: float, k: float,
                 elem_bytes: int) -> float:
    """Forward seconds of one GEMM: compute at its shape's efficiency or the HBM roofline."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    compute = 2.0 * m * n * k / (peak * gemm_efficiency(family, m, n, k))
    memory = elem_bytes * (m * k + k * n + m * n) / (family.hbm_bw * MEMORY_EFFICIENCY)
    return max(compute, memory)


ATTENTION_KERNEL_TFLOPS = {"flash-attn-2": 189.0, "flash-attn-1": 83.0}
"""Forward + backward TFLOP/s of an attention kernel generation on an A100 80GB SXM4 (bf16/fp16,
causal, head dim 128, sequence 16K, the FLOP count of flash-attention's
benchmarks/benchmark_flash_attention.py: 3.5 x 4 s^2 d per head, halved when causal): the
FlashAttention-2 paper (arXiv 2307.08691, Fig. 4(d); flash-attention's
assets/flash2_a100_fwd_bwd_benchmark.png), bars "FlashAttention-2" and "FlashAttention" (v1,
CUDA). The Ampere curves of `FAMILIES` are FlashAttention-2-class, the kernel class of
disttrain's own runtime (torch SDPA's flash backend); a job whose software stack runs another
generation says so in `HardwareSpec.attention_kernel` (the spec's `cluster.attention_kernel`)."""
REFERENCE_KERNEL = "flash-attn-2"
"""The kernel generation the `FAMILIES` curves describe on Ampere."""
KERNEL_FAMILIES = ("A100-40G", "A100", "A800")
"""Families the kernel table was measured on (SM80): the ratios are not carried to others."""


def check_attention_kernel(kernel: str | None, device_name: str) -> None:
    """Raise ValueError ('attention_kernel: ...') unless `kernel` is None or a generation of
    `ATTENTION_KERNEL_TFLOPS` measured on `device_name`'s family (`KERNEL_FAMILIES`)."""
    if kernel is None:
        return
    if kernel not in ATTENTION_KERNEL_TFLOPS:
        raise ValueError(f"attention_kernel: unknown kernel {kernel!r}; known: "
                         f"{', '.join(sorted(ATTENTION_KERNEL_TFLOPS))}")
    family = device_family(device_name)
    if family is None or family.name not in KERNEL_FAMILIES:
        raise ValueError(f"attention_kernel: no published {kernel} table for device "
                         f"{device_name!r} (measured on {', '.join(KERNEL_FAMILIES)} only); "
                         f"leave it unset for the device's own curve")


def attention_efficiency(family: DeviceFamily, key_len: float, head_dim: int, backward: bool,
                         kernel: str | None = None) -> float:
    """Achieved fraction of peak of the flash-attention forward (or backward) at `key_len`.
    `kernel` (None: the family's own curve) rescales an Ampere family's curve by that kernel
    generation's measured forward + backward throughput over the reference generation's
    (`ATTENTION_KERNEL_TFLOPS`): the cost model passes `HardwareSpec.attention_kernel`."""
    base = family.attn_bwd_max if backward else family.attn_fwd_max
    if kernel is not None:
        check_attention_kernel(kernel, family.name)
        base *= ATTENTION_KERNEL_TFLOPS[kernel] / ATTENTION_KERNEL_TFLOPS[REFERENCE_KERNEL]
    dim = _tile(head_dim, 32) / _tile(128, 32)
    return family.clock_factor * base * min(1.0, dim) * key_len / (key_len + ATTN_SEQ_HALF)


def layer_gemms(shape: ModelShape, tokens: int, tp: int) -> list[tuple[float, float, float]]:
    """(m, n, k) of a decoder layer's projections on one rank: q, k, v, o, [gate,] up, down
    (GeLU has no gate), with tensor parallelism splitting the heads / the MLP width (ceil for
    uneven shards)."""
    h, f, kv, q = shape.hidden_size, shape.ffn_hidden_size, shape.kv_dim, shape.q_dim
    split = lambda x: -(-x // tp)  # noqa: E731
    return [(tokens, split(q), h), (tokens, split(kv), h), (tokens, split(kv), h),
            (tokens, h, split(q))] + [(tokens, split(f), h)] * (shape.mlp_matrices - 1) + [
            (tokens, h, split(f))]


def elementwise_bytes_per_token(shape: ModelShape, dtype: str, tp: int) -> tuple[float, float]:
    """(forward, backward) HBM bytes per token of a layer's element-wise kernels as the eager
    runtime (disttrain/model/llama.py) runs them, one kernel per op, each reading its inputs
    and writing its output: two RMSNorms (upcast b+4, square 8, mean 4, scale 8, downcast
    4+b, weight 2b bytes per element; no casts in fp32), RoPE on q and k (four products and
    two sums over halves, then the concatenation: 9b per element; none with learned positions),
    SiLU x up (GeLU: read 1, write 1), two residual adds, Qwen3's q/k norms (the norm's
    kernels over q and k); the backward reads and writes about
    twice what the forward does. Token-parallel parts (norms, residuals) shard by tp under
    sequence parallelism, head-parallel ones by the head split."""
    b = DTYPE_BYTES[dtype]
    h, f, kv, q = shape.hidden_size, shape.ffn_hidden_size, shape.kv_dim, shape.q_dim
    casts = 2 * (b + 4) if b != 4 else 0
    norms = 2 * (casts + 8 + 4 + 8 + 2 * b) * h
    if shape.qk_norm:   # Qwen3's per-head q/k norms: the same kernels over q + kv features
        norms += (casts + 8 + 4 + 8 + 2 * b) * (q + kv)
    rope = 9 * b * (q + kv) if shape.rope else 0
    mlp = (5 if shape.mlp == "swiglu" else 2) * b * f
    residual = 2 * 3 * b * h
    forward = (norms + rope + mlp + residual) / tp
    return forward, 2.0 * forward


def loss_bytes_per_token(shape: ModelShape, tp: int) -> float:
    """HBM bytes per token of the loss's fp32 logits: written, softmax read + written, its
    gradient written and read by the head's backward."""
    return 5 * 4 * shape.vocab_size / tp


def grad_bookkeeping_bytes_per_param(zero_stage: int, dtype: str, reduce_dtype: str) -> float:
    """HBM bytes per parameter and microbatch the runtime (disttrain/parallel/zero.py,
    `_reduce_chunk`) moves to hand a layer's gradients on, beside the layer's own kernels:
    stages 0-1 add the compute-dtype gradient into the fp32 full gradient (read 4 + b, write
    4); stages 2-3 pack it into a zeroed reduce-dtype buffer for the reduce-scatter (write r
    zeros, read b, write r). The sharded remainder (1/group of it) is left out."""
    b, r = DTYPE_BYTES[dtype], DTYPE_BYTES[reduce_dtype]
    return float(8 + b if zero_stage <= 1 else 2 * r + b)
