"""Host<->device copies of the stores on CUDA: on the device's copy stream, ordered against
compute with events, from and to pinned host memory.

The copy engine's CUDA binding (csrc/copy_engine.cu through csrc/copy_engine_cuda.cpp) does
the transfers when it was built (`CopyEngine.cuda_kernels`); otherwise `Tensor.copy_(...,
non_blocking=True)` does the same DMA. Either way the calling thread never blocks: a handle's
`wait()` synchronises on the copy's event, `done()` queries it.

Stream discipline (the CUDA caching allocator's rules):
  * device -> host: the copy stream first waits for an event recorded on the compute stream
    (the source is final), and the source is marked as used by the copy stream
    (`record_stream`) so its memory is not reused before the copy ran;
  * host -> device: the destination is allocated on the compute stream, filled on the copy
    stream after an event of the compute stream, and the compute stream waits for the copy's
    event before any use (`wait_ready`); it is later freed on the compute stream, after that
    wait, so no `record_stream` is needed.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # offload does not import disttrain at runtime (disttrain imports offload)
    from disttrain.device import Device


class EventHandle:
    """A queued CUDA copy: `wait()` blocks the host until it ran; `done()` does not block."""

    def __init__(self, event: torch.cuda.Event, nbytes: int, keep: tuple = ()):
        self.event, self._nbytes = event, nbytes
        self._keep = keep  # tensors that must live until the copy ran (pinned sources)

    def wait(self) -> None:
        self.event.synchronize()
        self._keep = ()

    def done(self) -> bool:
        return self.event.query()

    @property
    def nbytes(self) -> int:
        return self._nbytes


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def copy_to_host(device: Device, engine, src: torch.Tensor, dst_host: torch.Tensor) -> EventHandle:
    """Queue `dst_host` (pinned, same shape and dtype) <- `src` (CUDA) on the copy stream."""
    src = src.detach().contiguous()  # a no-op when dense; else on the compute stream
    stream = device.copy_stream()
    device.wait_event(device.record_event(), stream)
    with device.stream(stream):
        if engine.cuda_kernels and dst_host.is_pinned():
            engine.gather(_flat(src), 0, [0], [src.numel()], _flat(dst_host))
        else:
            dst_host.copy_(src, non_blocking=True)
    src.record_stream(stream)
    return EventHandle(device.record_event(stream), src.nbytes)


def copy_to_device(device: Device, engine, src_host: torch.Tensor, after: EventHandle | None = None
                   ) -> tuple[torch.Tensor, EventHandle]:
    """A new CUDA tensor filled from `src_host` (pinned) on the copy stream, after `after` (an
    earlier copy of the same bytes, e.g. their write) if given. Use it only after
    `wait_ready(device, handle)`."""
    stream = device.copy_stream()
    dst = torch.empty(src_host.shape, dtype=src_host.dtype, device=device.torch_device)
    device.wait_event(device.record_event(), stream)  # dst's memory is free on compute
    if after is not None:
        device.wait_event(after.event, stream)
    with device.stream(stream):
        if engine.cuda_kernels and src_host.is_pinned():
            engine.scatter(_flat(src_host), 0, [0], [dst.numel()], _flat(dst))
        else:
            dst.copy_(src_host, non_blocking=True)
    return dst, EventHandle(device.record_event(stream), dst.nbytes, keep=(src_host,))


def wait_ready(device: Device, handle: EventHandle) -> None:
    """Make the compute stream wait for `handle`'s copy (no host block)."""
    device.wait_event(handle.event)


class ThenHandle:
    """A request that runs on a helper thread after another finished (a file write after the
    device-to-host copy of its data)."""

    def __init__(self, future: cf.Future, nbytes: int):
        self._future, self._nbytes = future, nbytes

    def wait(self) -> None:
        self._future.result()

    def done(self) -> bool:
        return self._future.done()

    @property
    def nbytes(self) -> int:
        return self._nbytes
