"""FSDP2 (`fully_shard` per decoder layer, bf16 `MixedPrecisionPolicy`) against disttrain's
chunked ZeRO-3 (one-layer chunks, bf16 compute, fp32 reduce), on 2 gloo ranks.

Same model, seed, data and recipe (bf16 compute parameters, fp32 sharded masters and AdamW,
gradients reduced in fp32); also with half of the layers' states on the CPU (FSDP2:
`CPUOffloadPolicy(pin_memory=False)` on those layers; disttrain: the plan's `cpu_chunks`).
Prints the median step time, the last loss and the largest loss difference between the two.
The evidence behind "Model states and mixed precision" in docs/design.md.

    PYTHONPATH=$PWD .venv/bin/python bench/fsdp2_vs_zero.py [--steps 6] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disttrain.data import build_batches  # noqa: E402
from disttrain.engine import build_runtime  # noqa: E402
from disttrain.model import build_model  # noqa: E402
from disttrain.optim import build_optimizer  # noqa: E402
from disttrain.parallel.spawn import spawn_ranks  # noqa: E402
from disttrain.spec import job_from_dict  # noqa: E402
from planner.plan import LayerActivationPlan, ModelStatePlan, ParallelPlan, Plan  # noqa: E402

LR = 1e-3


def _job(seq: int, layers: int):
    return job_from_dict({
        "name": "fsdp2", "model": {"preset": "tiny", "num_layers": layers, "dtype": "bf16"},
        "train": {"seq_len": seq, "micro_batch_size": 1, "global_batch_size": 2, "steps": 1,
                  "grad_clip": 0.0, "weight_decay": 0.1, "lr": LR, "min_lr": LR},
        "data": {"kind": "synthetic"}, "cluster": {"preset": "cpu-local"},
        "launch": {"launcher": "torchrun"}})


def _batches(job, seq: int):
    return build_batches("synthetic", None, vocab_size=job.shape.vocab_size, seq_len=seq,
                         micro_batch_size=1, seed=0)


def run_fsdp2(rank: int, job, seq: int, steps: int, offload: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (2,))
    model = build_model(job.shape, seed=job.spec.train.seed)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    half = len(model.layers) // 2
    for index, layer in enumerate(model.layers):
        policy = CPUOffloadPolicy(pin_memory=False) if offload and index < half else None
        kwargs = {"offload_policy": policy} if policy is not None else {}
        fully_shard(layer, mesh=mesh, mp_policy=mp, **kwargs)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    opt = build_optimizer(model, lr=LR, weight_decay=job.spec.train.weight_decay)
    batches, losses, times = _batches(job, seq), [], []
    for step in range(steps):
        start = time.perf_counter()
        tokens, targets = batches.get(step, rank)
        logits = model(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        reduced = loss.detach().clone()
        torch.distributed.all_reduce(reduced)
        losses.append(reduced.item() / 2)
        times.append(time.perf_counter() - start)
    return losses, times


def run_zero(rank: int, job, seq: int, steps: int, offload: bool):
    layers = job.shape.num_layers
    plan = Plan(model=job.shape.to_dict(), dtype="bf16", seq_len=seq, micro_batch_size=1,
                global_batch_size=2, parallel=ParallelPlan(dp=2, zero_stage=3),
                model_states=ModelStatePlan(chunk_size_bytes=2 * job.shape.layer_params(),
                                            cpu_chunks=tuple(range(layers // 2)) if offload
                                            else ()),
                activations=(LayerActivationPlan(keep_all=True),) * layers)
    runtime = build_runtime(job, plan, rank=rank)
    batches, losses, times = _batches(job, seq), [], []
    for step in range(steps):
        start = time.perf_counter()
        loss, _ = runtime.train_step(step, batches, LR)
        losses.append(loss)
        times.append(time.perf_counter() - start)
    runtime.close()
    return losses, times


def worker(rank: int, world: int, seq: int, layers: int, steps: int) -> dict:
    job = _job(seq, layers)
    out = {}
    for offload in (False, True):
        for name, fn in (("fsdp2", run_fsdp2), ("disttrain", run_zero)):
            torch.distributed.barrier()
            out[(name, offload)] = fn(rank, job, seq, steps, offload)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    result = spawn_ranks(worker, 2, args.seq, args.layers, args.steps)[0]
    print(f"tiny preset, {args.layers} layers, seq {args.seq}, 2 gloo ranks x 1 thread, bf16 "
          f"compute / fp32 reduce, ZeRO-3 one-layer units, {args.steps} steps "
          f"(median of steps 2..)")
    print(f"{'states':<22} {'fsdp2 s/step':>13} {'disttrain s/step':>17} {'last loss':>10} "
          f"{'max |dloss|':>12}")
    for offload in (False, True):
        (f_loss, f_t), (z_loss, z_t) = result[("fsdp2", offload)], result[("disttrain", offload)]
        diff = max(abs(a - b) for a, b in zip(f_loss, z_loss))
        label = "half the layers on CPU" if offload else "all on device"
        print(f"{label:<22} {statistics.median(f_t[1:]):>13.4f} "
              f"{statistics.median(z_t[1:]):>17.4f} {z_loss[-1]:>10.4f} {diff:>12.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
