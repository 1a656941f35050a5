"""The cost model's inputs: efficiency allowances, a candidate layout, one layer's costs.

Split from `planner.costmodel` (which re-exports them) so that the collective model in
`planner.collectives` can use them without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.hardware import GiB


@dataclass(frozen=True, kw_only=True)
class CostParams:
    """Efficiency factors and allowances the cost model applies to peak numbers."""

    matmul_efficiency: float = 0.6
    """Achieved fraction of peak FLOP/s in projections and MLP."""
    attention_efficiency: float = 0.5
    """Achieved fraction of peak FLOP/s in the attention core."""
    attention_backward_factor: float = 2.5
    """Attention backward time / forward time (flash recomputes the scores)."""
    comm_efficiency: float = 0.8
    """Achieved fraction of the nominal collective bandwidth."""
    cpu_adam_params_per_s: float = 2e9
    """Parameters per second a node's CPU Adam updates (shared by its ranks)."""
    device_memory_bw: float = 1.5e12
    """Device memory bandwidth for the (memory-bound) on-device optimizer step, bytes/s."""
    fragmentation: float = 0.05
    """Share of device memory held back for allocator fragmentation."""
    reserved_bytes: int = 1 * GiB
    """Per-rank device bytes the framework holds (context, workspace); 0 on CPU ranks."""
    gpu_collective_latency_s: float = 1e-5
    """Fixed cost of one NCCL call inside a node (launch + handshake; nccl-tests' small-message
    times are ~10 us on NVLink)."""
    inter_node_latency_s: float = 1e-5
    """Extra fixed cost of a call that leaves the node (network round trips)."""
    host_reserve_share: float = 0.1
    """Share of host memory the plan never budgets (OS, page cache, the framework's own)."""
    gpus_per_pcie_switch: int = 2
    """GPUs sharing one PCIe uplink to the host (DGX/HGX boards: 2 per switch), so concurrent
    host copies of a node's ranks get host_link_bw / this each."""
    single_pool_on_cpu: bool = True
    """Model a node without accelerators as one memory pool (device = host): the cpu tier and
    CPU chunks save nothing there, so only keep / recompute / NVMe are offered and NVMe reads
    count their page cache. False plans such a node as two pools (tests where CPU ranks stand
    in for a GPU node's device and host memory)."""
    pinned_share: float = 0.5
    """Largest share of host memory the runtime pins for device copies on GPU nodes."""

    def __post_init__(self) -> None:
        for name in ("matmul_efficiency", "attention_efficiency", "comm_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.fragmentation < 1:
            raise ValueError(f"fragmentation: must be in [0, 1), got {self.fragmentation}")


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One parallel layout the search considers."""

    dp: int
    """Data-parallel degree."""
    sp: int
    """Sequence-parallel degree."""
    sp_kind: str
    """'ulysses' or 'ring'."""
    pp: int
    """Pipeline degree."""
    num_microbatches: int
    """Microbatches per step per pipeline."""
    zero_stage: int
    """ZeRO stage 0-3 over the dp x sp group."""
    tp: int = 1
    """Tensor-parallel degree (Megatron-style with sequence parallelism)."""
    virtual: int = 1
    """Model chunks per pipeline rank: 1 = 1F1B, 2 = interleaved 1F1B."""
    micro_batch_size: int = 1
    """Sequences per microbatch per data-parallel rank (the request's, or one of the sizes
    `planner.grid.micro_batch_sizes` offers when it is auto)."""

    @property
    def shard_group(self) -> int:
        return self.dp * self.sp

    @property
    def schedule(self) -> str:
        if self.pp == 1:
            return "none"
        return "interleaved-1f1b" if self.virtual > 1 else "1f1b"

    def to_dict(self) -> dict:
        out = dict(dp=self.dp, tp=self.tp, sp=self.sp, sp_kind=self.sp_kind, pp=self.pp,
                   num_microbatches=self.num_microbatches, zero_stage=self.zero_stage,
                   micro_batch_size=self.micro_batch_size)
        if self.virtual > 1:
            out["schedule"] = self.schedule
        return out


@dataclass(frozen=True, kw_only=True)
class LayerCost:
    """One decoder layer, one microbatch, one rank: bytes and seconds."""

    tokens: int
    """Local tokens of the microbatch on this rank."""
    input_bytes: float
    """Layer input a memory policy keeps (or swaps)."""
    attention_output_bytes: float
    """Attention output + log-sum-exp."""
    token_local_bytes: float
    """Token-local saved bytes (swapped or recomputed)."""
    mlp_bytes: float
    """Part of token_local inside the MLP (bounded by MLP tiling when materialised)."""
    plain_bytes: float
    """Saved bytes of the unmodified layer (keep_all)."""
    forward_s: float
    """Forward time."""
    backward_s: float
    """Backward time (without recompute)."""
    recompute_s: float
    """Time to recompute all token-local parts (qkv + post_attention forward)."""
    qkv_bytes: float = 0.0
    """The part of token_local_bytes the attention core's backward needs for the whole
    sequence at once (q, k, v after RoPE): a sequence-tiled rebuild cannot tile it."""
    tp_overlap_chunks: int = 1
    """Token blocks the tensor-parallel collectives are pipelined with the GEMMs over, as
    these times assume (`parallel.tp_overlap_chunks`)."""
    tp_column_backward: str = "lean"
    """How the column-parallel backward runs its GEMMs, as these times assume
    (`parallel.tp_column_backward`: 'lean' or 'whole')."""
    selective_bytes: float = 0.0
    """Saved bytes of an op-level selective layer (`planner.selective`; 0: not priced, the
    policy is not offered)."""
    selective_recompute_s: float = 0.0
    """Its backward's recompute: the element-wise forward kernels and every second matmul."""


def local_tokens(seq_len: int, micro_batch_size: int, sp: int) -> int:
    return micro_batch_size * seq_len // sp
