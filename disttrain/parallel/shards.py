"""ZeRO's configuration, one rank's tensors of one model-state chunk, and the CUDA side stream
the collectives run on (disttrain.parallel.zero owns the logic; this file only allocates and
orders).

Per chunk: `full` (the compute-dtype flat buffer the model's parameters are views of),
`master` (fp32 shard), `shard` (stage 3: the compute-dtype shard gathers read), `grad` /
`full_grad` (fp32), `exp_avg` / `exp_avg_sq` (fp32), `decay` (element ranges for weight
decay). CPU chunks keep master, moments and gradient shard in host memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from disttrain.device import Device
from disttrain.parallel.chunks import ChunkLayout, decay_ranges

FP32 = torch.float32


@dataclass(frozen=True, kw_only=True)
class ZeroConfig:
    stage: int = 3
    """ZeRO stage 0-3."""
    chunk_numel: int = 0
    """Elements per chunk (0: one chunk per execution unit)."""
    cpu_chunks: tuple[int, ...] = ()
    """Indices (into this rank's `pack_chunks`) of the chunks whose master shard, gradient
    shard and optimizer state live in host memory; the engine maps the plan's ids here."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (same as the single-process trainer)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay on >= 2-D parameters."""
    overlap_cpu_optimizer: bool = True
    """Update CPU chunks on a worker thread during the backward once their gradients are final
    (needs `begin_step`; never with gradient clipping). Off: every chunk updates in `step`."""
    compute_dtype: torch.dtype = FP32
    """Dtype of the parameters the model computes with and gathers in (fp32 or bf16)."""
    reduce_dtype: torch.dtype = FP32
    """Dtype gradients are reduced in over the group (accumulated in fp32 either way)."""
    prefetch: int = 1
    """Stage 3: execution units gathered ahead of the one running (0 or 1)."""
    overlap_param_gather: bool = False
    """Stages 0-2: start each chunk's post-update parameter all-gather asynchronously in
    `step` and wait for it before the chunk's first use in the next forward (Megatron's
    `overlap_param_gather`); off: `step` gathers every chunk before it returns."""

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0-3, got {self.stage}")
        for name in ("compute_dtype", "reduce_dtype"):
            if getattr(self, name) not in (FP32, torch.bfloat16):
                raise ValueError(f"{name}: must be torch.float32 or torch.bfloat16, "
                                 f"got {getattr(self, name)}")
        if self.prefetch not in (0, 1):
            raise ValueError(f"prefetch: must be 0 or 1, got {self.prefetch}")
        if not isinstance(self.overlap_param_gather, bool):
            raise ValueError(f"overlap_param_gather: must be true or false, "
                             f"got {self.overlap_param_gather!r}")


class SideStream:
    """Where collectives run. On CUDA: one side stream that first waits for the compute
    stream (the inputs are ready), and that the compute stream waits for (`join`, or an
    event per gather) before it reads the results — FSDP2's all-gather / reduce-scatter
    streams, through the device interface (disttrain/device.py). Elsewhere (CPU, gloo) a
    no-op: collectives run on the calling thread."""

    def __init__(self, device: torch.device):
        self.device = Device.from_torch(device)
        self.stream = torch.cuda.Stream(device) if self.device.is_cuda else None

    @contextlib.contextmanager
    def after_compute(self):
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with self.device.stream(self.stream):
            yield

    def event(self):
        """An event marking the work queued on the side stream so far (None off CUDA)."""
        return None if self.stream is None else self.device.record_event(self.stream)

    def wait(self, event) -> None:
        """Make the compute (current) stream wait for `event` (no-op for None)."""
        self.device.wait_event(event)

    def keep(self, tensor: torch.Tensor) -> None:
        """`tensor` (allocated on the compute stream) is used by the side stream: its memory
        must not be reused before the side stream's work is done."""
        if self.stream is not None:
            tensor.record_stream(self.stream)

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


class ChunkShards:
    def __init__(self, layout: ChunkLayout, shard_size: int, rank: int, on_cpu: bool,
                 stage: int, compute_dtype: torch.dtype):
        self.layout = layout
        self.on_cpu = on_cpu
        n = layout.numel // shard_size
        device = layout.slots[0].param.device
        home = torch.device("cpu") if on_cpu else device  # where master, moments, shard live
        self.full = torch.zeros(layout.numel, dtype=compute_dtype, device=device)
        init = self.full if compute_dtype == FP32 else torch.zeros(layout.numel, device=device)
        for slot in layout.slots:
            part = slice(slot.offset, slot.offset + slot.numel)
            init[part].copy_(slot.param.detach().flatten())  # the fp32 initial values
            if init is not self.full:
                self.full[part].copy_(init[part])
            slot.param.data = self.full[part].view_as(slot.param)
        mine = slice(rank * n, (rank + 1) * n)
        # fp32 stages 0-2 keep the full parameters: the master shard is this rank's slice of
        # them. Otherwise it is a copy: stage 3 frees the full buffer between uses, and in
        # bf16 the full buffer holds the rounded compute copy.
        shares = stage < 3 and compute_dtype == FP32 and home == device
        self.master = self.full[mine] if shares else init[mine].to(home, copy=True)
        # Stage 3 gathers from a persistent compute-dtype shard on the device (the master
        # itself in fp32 off CPU chunks), refreshed after each update.
        self.shard = None
        if stage == 3:
            self.shard = (self.master if compute_dtype == FP32 and home == device
                          else self.master.to(device, compute_dtype, copy=True))
        # Stages 0-1 accumulate full gradients during the backward and reduce once per step;
        # this rank's gradient shard is then its slice. Stages 2-3 keep only the shard.
        # Gradients accumulate in fp32 whatever the compute dtype.
        self.full_grad = torch.zeros(layout.numel, device=device) if stage <= 1 else None
        self.grad = self.full_grad[mine] if stage <= 1 else torch.zeros(n, device=home)
        self.exp_avg = torch.zeros(n, device=home)
        self.exp_avg_sq = torch.zeros(n, device=home)
        self.decay = decay_ranges(layout, mine.start, mine.stop)
        self.pending = len(layout.slots)
        self.backwards_owed = 0  # forwards (microbatches) that used it, gradients not reduced
        self.gathered = True
        self.work = None
        self.event = None  # CUDA: the side-stream gather this chunk's users wait for

    @property
    def full_bytes(self) -> int:
        return self.layout.numel * self.full.element_size()
