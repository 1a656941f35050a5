"""Does an async gloo collective overlap with compute on this machine? (the planner's
`overlaps_compute` for CPU nodes; ZeRO stage 0-1 gradient reduction launched during the
backward, disttrain/parallel/grad_reduce.py).

Two gloo ranks, each with one intra-op thread: `compute` = matmuls alone, `comm` = an
all-reduce (or reduce-scatter) of `--mib` MiB fp32 alone, `both` = the collective launched
with async_op=True, the same matmuls, then wait. Medians over `--repeats`. Overlap =
(compute + comm - both) / min(compute, comm): 1 = the shorter one fully hidden, 0 = none.

Then the runtime itself: ZeRO stage 0 and 1 over the two ranks (the `small` preset, 2
microbatches of `--seq-len` tokens), step time with the reductions started during the last
microbatch's backward (`begin_step` announces the step) and with all of them started after
the backward (not announced). Medians over `--repeats` steps after one warm-up.

Last, ZeRO stage 1 and 2 with the post-update parameter all-gather overlapped with the next
step's forward (`ZeroConfig.overlap_param_gather`, `parallel.overlap_param_gather`) and
blocking in the step: two copies of the model on the same batches, timed in alternating
blocks of `--repeats` consecutive steps (best block of three).

    .venv/bin/python bench/gloo_overlap.py [--mib 64] [--repeats 5] [--param-gather-only]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from disttrain.parallel.spawn import spawn_ranks  # noqa: E402


def _worker(rank: int, world: int, mib: int, repeats: int, kind: str) -> dict[str, float]:
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    buf = torch.randn(mib * 2 ** 18)
    out = torch.empty(buf.numel() // world)

    def collective(async_op: bool):
        if kind == "all_reduce":
            return dist.all_reduce(buf, async_op=async_op)
        return dist.reduce_scatter_single(out, buf, async_op=async_op)

    def compute() -> None:
        for _ in range(matmuls):
            a.matmul(a)

    # size the compute to about the collective's time
    dist.barrier()
    start = time.perf_counter()
    collective(False)
    comm_guess = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(5):
        a.matmul(a)
    matmuls = max(1, round(comm_guess / ((time.perf_counter() - start) / 5)))
    matmuls = torch.tensor(matmuls)
    dist.all_reduce(matmuls, op=dist.ReduceOp.MAX)
    matmuls = int(matmuls)
    times: dict[str, list[float]] = {"compute": [], "comm": [], "both": []}
    for _ in range(repeats):
        for name in times:
            dist.barrier()
            start = time.perf_counter()
            if name == "compute":
                compute()
            elif name == "comm":
                collective(False)
            else:
                work = collective(True)
                compute()
                work.wait()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _zero_worker(rank: int, world: int, stage: int, seq_len: int, repeats: int) -> dict:
    import torch.nn.functional as F

    from disttrain.model import build_model
    from disttrain.parallel.zero import ZeroConfig, ZeroModelStates
    from planner.shapes import MODEL_PRESETS

    torch.set_num_threads(1)
    shape = MODEL_PRESETS["small"].replace(num_layers=4)
    model = build_model(shape, seed=0)
    states = ZeroModelStates(model, ZeroConfig(stage=stage), group=dist.group.WORLD)
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, shape.vocab_size, (2, 1, seq_len + 1), generator=gen)
    out: dict[str, list[float]] = {"announced": [], "after_backward": []}
    for step in range(2 * (repeats + 1)):
        mode = ("announced", "after_backward")[step % 2]
        dist.barrier()
        start = time.perf_counter()
        if mode == "announced":
            states.begin_step(1e-4, num_microbatches=2)
        for micro in range(2):
            logits = model(tokens[micro, :, :-1])
            F.cross_entropy(logits.flatten(0, 1), tokens[micro, :, 1:].flatten()).backward()
        states.finish_backward()
        states.step(1e-4)
        if step >= 2:
            out[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(values) for mode, values in out.items()}


def _param_gather_worker(rank: int, world: int, stage: int, seq_len: int, repeats: int) -> dict:
    """Seconds per step of each mode, from blocks of `repeats` consecutive steps (the
    overlapped mode's last gathers waited for inside its block: no mode leaves work to the
    other's timing), blocks alternating, best of three rounds after a warm-up round."""
    import torch.nn.functional as F

    from disttrain.model import build_model
    from disttrain.parallel.zero import ZeroConfig, ZeroModelStates
    from planner.shapes import MODEL_PRESETS

    torch.set_num_threads(1)
    shape = MODEL_PRESETS["small"].replace(num_layers=4)
    runs = {}
    for mode in ("overlapped", "blocking"):
        model = build_model(shape, seed=0)
        runs[mode] = (model, ZeroModelStates(model, ZeroConfig(
            stage=stage, overlap_param_gather=mode == "overlapped"), group=dist.group.WORLD))
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, shape.vocab_size, (2, 1, seq_len + 1), generator=gen)
    out: dict[str, list[float]] = {mode: [] for mode in runs}
    losses: dict[str, list[float]] = {mode: [] for mode in runs}
    for round_ in range(4):
        for mode, (model, states) in runs.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(repeats):
                states.begin_step(1e-4, num_microbatches=2)
                for micro in range(2):
                    logits = model(tokens[micro, :, :-1])
                    loss = F.cross_entropy(logits.flatten(0, 1), tokens[micro, :, 1:].flatten())
                    loss.backward()
                    losses[mode].append(float(loss.detach()))
                states.finish_backward()
                states.step(1e-4)
            states.wait_params()
            dist.barrier()
            if round_:
                out[mode].append((time.perf_counter() - start) / repeats)
    result = {mode: min(values) for mode, values in out.items()}
    result["same_losses"] = losses["overlapped"] == losses["blocking"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--param-gather-only", action="store_true",
                        help="only the stage 1-2 parameter all-gather comparison")
    args = parser.parse_args()
    for kind in ("all_reduce", "reduce_scatter") * (not args.param_gather_only):
        result = spawn_ranks(_worker, 2, args.mib, args.repeats, kind)[0]
        c, r, b = result["compute"], result["comm"], result["both"]
        overlap = (c + r - b) / min(c, r)
        print(f"{kind} {args.mib} MiB: compute {c:.3f} s, comm {r:.3f} s, async both "
              f"{b:.3f} s (serial {c + r:.3f}): overlap {overlap:.0%} of the shorter")
    for stage in (0, 1) * (not args.param_gather_only):
        result = spawn_ranks(_zero_worker, 2, stage, args.seq_len, args.repeats)[0]
        print(f"ZeRO-{stage} dp2 step: reductions during the last backward "
              f"{result['announced']:.3f} s, after the backward {result['after_backward']:.3f} s")
    for stage in (1, 2):
        result = spawn_ranks(_param_gather_worker, 2, stage, args.seq_len, args.repeats)[0]
        print(f"ZeRO-{stage} dp2 step: parameter all-gather overlapped with the next forward "
              f"{result['overlapped']:.3f} s, blocking {result['blocking']:.3f} s "
              f"(ratio {result['overlapped'] / result['blocking']:.3f}; same losses: "
              f"{result['same_losses']})")


if __name__ == "__main__":
    main()
