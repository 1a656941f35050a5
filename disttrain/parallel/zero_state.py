"""ZeroModelStates' whole-state reads and writes, as a mixin: the resident model-state bytes
by place, the full (gathered) parameters, and the sharded `state_dict` a checkpoint saves
from and loads into in place. `disttrain.parallel.zero` holds the chunks and the step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from disttrain.parallel.shards import FP32


class ZeroStateMixin:
    """Part of `ZeroModelStates` (which provides `chunks`, `config`, `group`, `rank`,
    `step_count`, `_keeps_full`, `wait_params` and `_regather`)."""

    def bytes_by_place(self) -> dict[str, dict[str, int]]:
        """Resident model-state bytes of this rank: {'device'|'cpu': {category: bytes}}.
        `parameters`: the compute parameters (stage 3: its compute shard + the chunks
        gathered now); `optimizer`: the moments and, when it is a separate copy in a bf16
        run, the fp32 master; `gradients`: the fp32 gradient buffers."""
        out = {place: {"parameters": 0, "gradients": 0, "optimizer": 0}
               for place in ("device", "cpu")}
        mixed = self.config.compute_dtype != FP32

        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        for chunk in self.chunks:
            place = "cpu" if chunk.on_cpu else "device"
            out[place]["optimizer"] += nbytes(chunk.exp_avg) + nbytes(chunk.exp_avg_sq)
            grads = chunk.full_grad if chunk.full_grad is not None else chunk.grad
            out["device" if chunk.full_grad is not None else place]["gradients"] += nbytes(grads)
            if chunk.shard is not None:  # stage 3: compute shard + gathered full buffer
                out["device"]["parameters"] += chunk.full_bytes if chunk.gathered else 0
                if chunk.shard is not chunk.master:
                    out["device"]["parameters"] += nbytes(chunk.shard)
            else:
                out["device"]["parameters"] += chunk.full_bytes
            shares_full = (chunk.master.untyped_storage().data_ptr()
                           == chunk.full.untyped_storage().data_ptr())
            if not shares_full or not self._keeps_full:
                out[place]["optimizer" if mixed else "parameters"] += nbytes(chunk.master)
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gather every parameter's master value (collective: all ranks of the group call it)."""
        self.wait_params()
        out = {}
        for chunk in self.chunks:
            full = torch.empty(chunk.layout.numel, device=chunk.master.device)
            if chunk.master.numel() == full.numel():
                full.copy_(chunk.master)
            else:
                dist.all_gather_single(full, chunk.master, group=self.group)
            for slot in chunk.layout.slots:
                out[slot.name] = full[slot.offset:slot.offset + slot.numel].view(
                    slot.param.shape).clone()
        return out

    def state_dict(self) -> dict:
        """This rank's part of each parameter and its AdamW moments by name, and the step count:
        views (`FlatShard`s) a checkpoint saves from and loads into in place."""
        from disttrain.checkpoint import packed_shards  # here: checkpoints are not ZeRO's concern

        self.wait_params()  # fp32 stages 1-2: the master is a slice of the gathered buffer
        out: dict = {"optim.step": torch.tensor(self.step_count)}
        for chunk in self.chunks:
            size = chunk.master.numel()
            first = 0 if size == chunk.layout.numel else self.rank * size
            slots = [(s.name, tuple(s.param.shape), s.offset) for s in chunk.layout.slots]
            out.update(packed_shards(slots, first, {
                "model.{}": chunk.master, "optim.{}.exp_avg": chunk.exp_avg,
                "optim.{}.exp_avg_sq": chunk.exp_avg_sq}))
        return out

    def load_state_dict(self, state: dict) -> None:
        """Take a `state_dict()` a checkpoint was loaded into; refresh gathered parameters."""
        self.wait_params()
        self.step_count = int(state["optim.step"])
        for key, live in self.state_dict().items():
            saved = getattr(state[key], "local", state[key])
            if key != "optim.step" and saved.data_ptr() != live.local.data_ptr():
                live.local.copy_(saved)
        for chunk in self.chunks:
            if chunk.shard is not None and chunk.shard is not chunk.master:
                chunk.shard.copy_(chunk.master)
        self._regather()
