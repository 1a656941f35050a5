"""Why disttrain's tensor parallelism is hand-written: two probes of torch's DTensor TP here.

On 2 gloo ranks, one decoder layer's norm and q projection are parallelised the torchtitan way
(`parallelize_module`: `SequenceParallel` norm, `ColwiseParallel` q_proj with token-sharded
input). Printed:

1. which sequence positions the q projection's all-gather assembles when the layer's
   token-local part runs on a slice of this rank's tokens, as the token-wise swap/recompute
   runtime (offload/layer_fn.py) runs it: rank r holds positions [4r, 4r+4), the slice is the
   first 2 of them. Contiguous positions would be [0, 1, 2, 3]; anything else means the
   attention core would see tokens out of order.
2. whether disttrain's chunked ZeRO (disttrain/parallel/zero.py) accepts the DTensor
   parameters `parallelize_module` leaves behind.

    .venv/bin/python bench/tp_dtensor_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disttrain.parallel.spawn import spawn_ranks  # noqa: E402


def probe(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, SequenceParallel,
                                                   parallelize_module)

    from disttrain.model import build_model
    from disttrain.parallel.zero import ZeroConfig, ZeroModelStates
    from planner.shapes import ModelShape

    shape = ModelShape(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                       ffn_hidden_size=64, vocab_size=64)
    mesh = init_device_mesh("cpu", (world,))
    model = build_model(shape, seed=0)
    layer = model.layers[0]
    parallelize_module(layer, mesh, {"attn_norm": SequenceParallel(),
                                     "attn.q_proj": ColwiseParallel(input_layouts=Shard(1))})
    positions = torch.arange(4, dtype=torch.float32) + 4 * rank  # this rank's tokens
    x_BSH = positions.view(1, 4, 1).expand(1, 4, shape.hidden_size).contiguous()
    layer.attn.q_proj(layer.attn_norm(x_BSH[:, :2]))  # runs: the gather below is what it used
    gathered = DTensor.from_local(x_BSH[:, :2], mesh, [Shard(1)]).full_tensor()
    out = {"slice gathers positions": [int(v) for v in gathered[0, :, 0].tolist()]}
    try:
        ZeroModelStates(model, ZeroConfig(stage=3), group=dist.group.WORLD)
        out["zero.py with DTensor parameters"] = "ok"
    except Exception as exc:  # reported: it is the finding
        out["zero.py with DTensor parameters"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return out


def main() -> None:
    result = spawn_ranks(probe, 2)[0]
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
