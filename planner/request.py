"""What the user asks the planner for: the job, with each decision either fixed or left open.

`None` in a field means "auto": the planner decides. The job spec (disttrain.spec) is
translated into one of these; the planner never reads YAML.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.hardware import HardwareSpec
from planner.plan import TP_COLUMN_BACKWARDS
from planner.shapes import DTYPE_BYTES, ModelShape

OFFLOAD_CHOICES = ("auto", "none", "cpu", "nvme")
RECOMPUTE_CHOICES = ("auto", "none", "full", "token", "selective")
SOLVERS = ("auto", "highs", "cbc")


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    model: ModelShape
    """Model to train."""
    hardware: HardwareSpec
    """Cluster to train on (need not be this machine)."""
    dtype: str = "fp32"
    """Training dtype of parameters and activations: 'fp32' or 'bf16'."""
    seq_len: int
    """Tokens per sequence."""
    micro_batch_size: int | None = 1
    """Sequences per microbatch per data-parallel rank (None: auto, the planner tries the
    sizes `planner.grid.micro_batch_sizes` offers per layout and keeps the fastest)."""
    global_batch_size: int = 1
    """Sequences per optimizer step, whole job."""
    dp: int | None = None
    """Data-parallel degree (None: auto)."""
    tp: int | None = None
    """Tensor-parallel degree (None: auto, searched up to the devices of one node)."""
    sp: int | None = None
    """Sequence-parallel degree (None: auto)."""
    sp_kind: str | None = None
    """'ulysses' or 'ring' (None: auto)."""
    pp: int | None = None
    """Pipeline degree (None: auto)."""
    num_microbatches: int | None = None
    """Microbatches per step (None: auto)."""
    zero_stage: int | None = None
    """ZeRO stage 0-3 (None: auto)."""
    tp_overlap_chunks: int | None = None
    """Token blocks the tensor-parallel collectives are pipelined with the GEMMs over (1:
    blocking; None: auto, `planner.tp_collectives.TP_OVERLAP_CHOICES`)."""
    tp_column_backward: str | None = None
    """How the column-parallel backward runs its GEMMs: 'lean' or 'whole' (None: auto, the
    faster on the target; `planner.plan.ParallelPlan.tp_column_backward`)."""
    activation_offload: str = "auto"
    """'auto', 'none' (never swap), 'cpu' or 'nvme' (only that tier)."""
    recompute: str = "auto"
    """'auto', 'none' (never recompute), 'full' (recompute all token-local), 'token',
    'selective' (every layer op-level selective checkpointing, `planner.selective`; 'auto'
    offers it per layer when `planner.candidates.SELECTIVE_IN_AUTO`)."""
    grad_reduce_dtype: str = "fp32"
    """Dtype the gradient reduction runs in: 'fp32' (default) or 'bf16'."""
    overlap_param_gather: bool | None = None
    """ZeRO 0-2: start the post-update parameter all-gather asynchronously and overlap it
    with the next step's forward (None: auto, `planner.collectives.param_gather_overlap`)."""
    schedule: str | None = None
    """Pipeline schedule '1f1b' or 'interleaved-1f1b' (None: auto)."""
    grad_clip: float = 0.0
    """Gradient clipping threshold (0: none). Clipping needs the global gradient norm before
    any update, so the runtime's CPU optimizer then waits for the end of the backward."""
    solver: str = "auto"
    """'auto' (HiGHS, CBC fallback), 'highs' or 'cbc'."""
    time_limit_s: float = 10.0
    """Wall-clock safety cap of each MIP solve: the solves stop on work limits (nodes), so
    the plan does not depend on the machine's load unless this cap is hit (then the plan's
    notes say so)."""
    attention_fraction: float | None = None
    """Packed documents: mean over packed sequences of sum(doc_len^2) / seq_len^2, the share
    of a full causal seq_len x seq_len attention that document masking leaves (measured on
    the tokenized data). None: no data statistics, assume one document per sequence (1.0)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: must be one of {tuple(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.seq_len <= 0:
            raise ValueError(f"seq_len: must be positive, got {self.seq_len}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be >= 1 or None (auto), got "
                             f"{self.micro_batch_size}")
        if self.activation_offload not in OFFLOAD_CHOICES:
            raise ValueError(f"activation_offload: must be one of {OFFLOAD_CHOICES}")
        if self.recompute not in RECOMPUTE_CHOICES:
            raise ValueError(f"recompute: must be one of {RECOMPUTE_CHOICES}")
        if self.grad_reduce_dtype not in DTYPE_BYTES:
            raise ValueError(f"grad_reduce_dtype: must be one of {tuple(DTYPE_BYTES)}, "
                             f"got {self.grad_reduce_dtype!r}")
        if self.overlap_param_gather not in (None, True, False):
            raise ValueError(f"overlap_param_gather: must be true, false or auto, got "
                             f"{self.overlap_param_gather!r}")
        if self.schedule not in (None, "1f1b", "interleaved-1f1b"):
            raise ValueError(f"schedule: must be '1f1b' or 'interleaved-1f1b', got {self.schedule!r}")
        if self.tp_overlap_chunks is not None and self.tp_overlap_chunks < 1:
            raise ValueError(f"tp_overlap_chunks: must be >= 1, got {self.tp_overlap_chunks}")
        if self.tp_column_backward not in (None, *TP_COLUMN_BACKWARDS):
            raise ValueError(f"tp_column_backward: must be one of {TP_COLUMN_BACKWARDS} or auto, "
                             f"got {self.tp_column_backward!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver: must be one of {SOLVERS}, got {self.solver!r}")
        if self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s: must be positive, got {self.time_limit_s}")
        if self.attention_fraction is not None and not 0 < self.attention_fraction <= 1:
            raise ValueError(f"attention_fraction: must be in (0, 1], got "
                             f"{self.attention_fraction}")
