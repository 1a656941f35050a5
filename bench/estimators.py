"""Estimators and I/O side by side with DeepSpeed.

1. Model-state memory per device: what disttrain's runtime holds (`planner.analytic.model_state_bytes`,
   measured equal in tests/test_precision_bytes.py) against
   DeepSpeed's estimators (ZeRO-3: the no-offload row `estimate_zero3_model_states_mem_needs_all_cold`
   prints, i.e. `estimate_zero3_model_states_mem_needs(..., cpu_offload=False)`; ZeRO-2:
   `estimate_zero2_model_states_mem_needs(..., cpu_offload=False)`) for the shipped presets
   and cluster sizes (bf16 training, Adam), and against bytes measured on CPU for the small
   model of `bench/peers.py` (fp32, 2 gloo ranks, disttrain's runtime).
2. File I/O: disttrain's copy engine (`offload.engine`) against DeepSpeed's async I/O op
   (`AsyncIOBuilder`, needs Debian's libaio-dev: installed with apt-get if missing, skipped
   with a message when that is impossible), write and read GB/s, same sizes, same directory.

    .venv/bin/python bench/estimators.py [--io-mib 256] [--dir /tmp] [--no-io]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docs_sections import md_table, write_section  # noqa: E402
from peers import SHAPE  # noqa: E402

from disttrain.parallel.spawn import spawn_ranks  # noqa: E402
from planner.analytic import model_state_bytes  # noqa: E402
from planner.shapes import MODEL_PRESETS, ModelShape  # noqa: E402

GiB = 2**30
CLUSTERS = ((1, 8), (8, 8))
"""(nodes, devices per node) of the estimator table."""


def estimator_rows() -> list[dict]:
    """Per device, GiB: disttrain ZeRO-2/3 vs DeepSpeed's ZeRO-2/3 estimators (no offload)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for name, shape in MODEL_PRESETS.items():
        params = shape.num_params()
        largest = max(shape.layer_params(), shape.vocab_size * shape.hidden_size)
        for nodes, per_node in CLUSTERS:
            world = nodes * per_node
            ours3 = sum(model_state_bytes(params, "bf16", 3, world).values())
            ours2 = sum(model_state_bytes(params, "bf16", 2, world).values())
            _, ds3, _ = estimate_zero3_model_states_mem_needs(
                params, largest, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=False)
            _, ds2 = estimate_zero2_model_states_mem_needs(
                params, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=False)
            rows.append({"model": name, "params": params, "devices": f"{nodes}x{per_node}",
                         "ours3": ours3, "ds3": ds3, "ours2": ours2, "ds2": ds2})
    return rows


def states_worker(rank: int, world: int, stages: list[int]) -> dict[int, int]:
    """Model-state bytes (all places) this rank holds under ZeRO stage s, dp=2, after a step."""
    import torch.distributed as dist

    from disttrain.engine import build_runtime
    from disttrain.spec import job_from_dict
    from fidelity import config_spec
    from peers import COMMON
    from peers_baselines import _batches

    out = {}
    for stage in stages:
        spec = config_spec(256, 1024, {"dp": 2, "sp": 1, "pp": 1, "zero_stage": stage}, {}, 1)
        job = job_from_dict(spec)
        from disttrain.planning import fixed_plan

        runtime = build_runtime(job, fixed_plan(job, world), rank=rank)
        runtime.forward_backward(0, _batches(COMMON, 256))
        runtime.states.step(1e-3)
        out[stage] = sum(sum(v.values()) for v in runtime.states.bytes_by_place().values())
        runtime.close()
        dist.barrier()
    return out


def measured_rows(stages: tuple[int, ...] = (0, 1, 2, 3)) -> list[dict]:
    """disttrain prediction vs runtime-held bytes vs DeepSpeed's estimator, fp32 small model."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = ModelShape(**SHAPE)
    params = shape.num_params()
    measured = spawn_ranks(states_worker, 2, list(stages))[0]
    ds = {3: estimate_zero3_model_states_mem_needs(params, shape.vocab_size * shape.hidden_size,
                                                   num_gpus_per_node=2, cpu_offload=False)[1],
          2: estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=2, cpu_offload=False)[1]}
    return [{"stage": s, "ours": sum(model_state_bytes(params, "fp32", s, 2).values()),
             "measured": measured[s], "ds": ds.get(s)} for s in stages]


def ensure_libaio() -> str | None:
    """None when libaio-dev is present (installed here if possible), else why it is not."""
    if Path("/usr/include/libaio.h").exists():
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "libaio-dev missing and cannot be installed here (no apt-get or not root)"
    done = subprocess.run(["apt-get", "install", "-y", "libaio-dev"], capture_output=True, text=True)
    if done.returncode != 0 or not Path("/usr/include/libaio.h").exists():
        return f"apt-get install libaio-dev failed: {done.stderr.strip().splitlines()[-1:]}"
    return None


def io_rows(directory: Path, nbytes: int, repeats: int = 3, *, deepspeed_aio: bool = True
            ) -> tuple[list[tuple[str, float]], list[str]]:
    """(rows of (what, GB/s), notes): copy engine and DeepSpeed aio, write (fsync) and cold read."""
    import torch

    from copy_engine import aligned_empty, best_of, durable_write, open_engine_file

    notes: list[str] = []
    src = aligned_empty(nbytes)
    src.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    dst = aligned_empty(nbytes)
    rows: list[tuple[str, float]] = []
    try:
        from offload.engine import CopyEngineConfig, create_engine
    except ImportError as exc:
        notes.append(f"copy engine skipped: offload.engine not importable ({exc})")
    else:
        engine = create_engine(CopyEngineConfig(backend="auto"))
        path = directory / "bench-engine.bin"
        fd, direct = open_engine_file(path)
        write = durable_write(engine, fd, direct, src, path)

        def read() -> None:
            engine.read_file(fd, direct, 0, dst, str(path)).wait()

        rows.append((f"write, disttrain copy engine ({engine.backend})", nbytes / best_of(repeats, write)))
        rows.append((f"read, disttrain copy engine ({engine.backend})", nbytes / _cold(path, read, repeats)))
        assert torch.equal(dst, src), "copy engine read back different bytes"
        for f in (fd, direct):
            if f >= 0:
                os.close(f)
        path.unlink()
        engine.shutdown()
    reason = ensure_libaio() if deepspeed_aio else "not requested"
    if reason is not None:
        notes.append(f"DeepSpeed aio skipped: {reason}")
        return rows, notes
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    t0 = time.perf_counter()
    aio = AsyncIOBuilder().load(verbose=False)
    notes.append(f"DeepSpeed aio op loaded in {time.perf_counter() - t0:.0f} s (JIT build on first use)")
    handle = aio.aio_handle(1 << 20, 32, False, True, 2)
    path = directory / "bench-dsaio.bin"
    dst.zero_()

    def ds_write() -> None:
        handle.sync_pwrite(src, str(path))
        fd2 = os.open(path, os.O_RDONLY)
        os.fsync(fd2)
        os.close(fd2)

    rows.append(("write, DeepSpeed aio (2 threads, QD 32)", nbytes / best_of(repeats, ds_write)))
    rows.append(("read, DeepSpeed aio (2 threads, QD 32)",
                 nbytes / _cold(path, lambda: handle.sync_pread(dst, str(path)), repeats)))
    assert torch.equal(dst, src), "DeepSpeed aio read back different bytes"
    path.unlink()
    return rows, notes


def _cold(path: Path, fn, repeats: int) -> float:
    from copy_engine import drop_cache

    times = []
    for _ in range(repeats):
        drop_cache(path)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def report(est: list[dict], meas: list[dict], io: list[tuple[str, float]], notes: list[str],
           nbytes: int, directory: Path) -> str:
    g = lambda b: f"{b / GiB:,.2f}"  # noqa: E731
    t1 = md_table(["model", "params", "devices", "disttrain Z3 GiB", "DeepSpeed Z3 GiB", "Z3 ratio",
                   "disttrain Z2 GiB", "DeepSpeed Z2 GiB", "Z2 ratio"],
                  [[r["model"], f"{r['params'] / 1e9:.2f}B", r["devices"], g(r["ours3"]), g(r["ds3"]),
                    f"{r['ours3'] / r['ds3']:.2f}", g(r["ours2"]), g(r["ds2"]),
                    f"{r['ours2'] / r['ds2']:.2f}"] for r in est])
    m = lambda b: "n/a" if b is None else f"{b / 2**20:,.2f}"  # noqa: E731
    t2 = md_table(["ZeRO stage", "disttrain predicted MiB", "disttrain runtime MiB", "error",
                   "DeepSpeed estimator MiB"],
                  [[r["stage"], m(r["ours"]), m(r["measured"]),
                    f"{(r['ours'] - r['measured']) / r['measured']:+.1%}", m(r["ds"])] for r in meas])
    t3 = md_table(["operation", "GB/s"], [[w, f"{v / 1e9:.2f}"] for w, v in io]) if io else "_no I/O rows_"
    note_text = "\n".join(f"- {n}" for n in notes) or "- none"
    return (f"## Estimators and I/O\n\n`bench/estimators.py`. Model states per device, bf16 "
            f"training with Adam, no offload. DeepSpeed's estimators assume mixed precision "
            f"(18 bytes/param sharded at ZeRO-3 plus 4 bytes x the largest layer; ZeRO-2 keeps 2 "
            f"bytes/param of parameters unsharded); disttrain's runtime holds bf16 parameters, fp32 "
            f"gradients (fp32 accumulation) and fp32 Adam m, v and master (18 bytes/param) over the "
            f"dp x sp group; its ZeRO-3 gather buffers (two units) are not in this table.\n\n"
            f"{t1}\n\nMeasured on CPU (model of the peers section, "
            f"{ModelShape(**SHAPE).num_params() / 1e6:.2f}M params, fp32, dp=2, after one step; "
            f"DeepSpeed's estimators assume mixed precision, so they overstate fp32 by design):\n\n"
            f"{t2}\n\nFile I/O, {nbytes / 2**20:.0f} MiB in {directory} (best of 3; writes "
            f"include fsync, reads after dropping the page cache):\n\n{t3}\n\nNotes:\n\n{note_text}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--io-mib", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=None, help="directory for the I/O files")
    parser.add_argument("--no-io", action="store_true")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args(argv)
    est, meas = estimator_rows(), measured_rows()
    io, notes = [], ["I/O skipped (--no-io)"] if args.no_io else []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if not args.no_io:
            io, notes = io_rows(Path(tmp), args.io_mib * 2**20)
        text = report(est, meas, io, notes, args.io_mib * 2**20, args.dir or Path(tempfile.gettempdir()))
    print(text)
    if not args.no_docs:
        print(f"wrote {write_section('estimators', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
