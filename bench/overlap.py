"""Overlap: step time with activations swapped to NVMe vs keeping everything, same job.

The disk is measured first, in the NVMe directory itself (`planner.hardware.probe`: an
fsync'd write and a cache-dropped read), and those bandwidths go into the job's
`cluster.nvme`, so the planner plans for this disk. The job (the `small` preset with
`NUM_LAYERS` layers, fp32, `SEQ_LEN` tokens) is planned for `MEMORY_GIB` per rank with
swapping to NVMe only and no recompute (`memory.recompute: none`), so any slowdown is
copy time the runtime failed to hide, not recompute. Keep-all is the same plan with every
layer keep_all (plain layers; a third run keeps the plan's MLP tiling, to separate the
copies' cost from the tiling's). Each runs `STEPS` steps in a fresh process; step time =
median after the first (warm-up) step.

The plan's required bandwidth is the NVMe bytes a step writes (and reads back) divided by
the keep-all step time: the rate the disk must sustain for the copies to hide under
compute. Target: swap step time within 15% of keep-all where the measured disk bandwidth
(write and read) is at least that.

    .venv/bin/python bench/overlap.py [--seq-len 4096] [--steps 6] [--write-docs]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import long_sequence as ls  # noqa: E402
from disttrain.spec import job_from_dict  # noqa: E402
from planner.hardware import GB, probe  # noqa: E402

SEQ_LEN = 4096
NUM_LAYERS = 4
STEPS = 6
MEMORY_GIB = 1.0
"""Per-rank budget planned for: keep-all does not fit, so layers swap."""
NVME_GIB = 4.0
PROBE_BYTES = 256 * 2**20
TARGET = 0.15
MiB = 2**20


def measure(*, seq_len: int = SEQ_LEN, num_layers: int = NUM_LAYERS, steps: int = STEPS,
            memory_gib: float = MEMORY_GIB, nvme_gib: float = NVME_GIB, preset: str = "small",
            probe_bytes: int = PROBE_BYTES, workdir: Path | None = None) -> dict:
    """Measure the disk, plan, run keep-all and swap-to-NVMe in fresh processes, compare."""
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="disttrain-overlap-")) if own else workdir
    try:
        nvme_dir = workdir / "nvme"
        # the disk only: the gloo collectives the probe also times (2 processes) are not used
        disk = probe(nvme_path=str(nvme_dir), nvme_test_bytes=probe_bytes, collectives=False)
        read_bw, write_bw = disk.nvme_read_bw, disk.nvme_write_bw

        def spec_of(name: str) -> dict:
            spec = ls.job_spec(seq_len=seq_len, num_layers=num_layers, steps=steps,
                               memory_gib=memory_gib, nvme_gib=nvme_gib, preset=preset,
                               nvme_dir=nvme_dir, output_dir=workdir / name / "out",
                               name=f"overlap-{name}", nvme_gbps=(read_bw / GB, write_bw / GB))
            spec["memory"]["recompute"] = "none"
            return spec

        plan = ls.plan_for(job_from_dict(spec_of("swap")), workdir / "profile")
        runs = {"keep-all": ls.run_fresh(spec_of("keep"), ls.keep_all_plan(plan), workdir / "keep"),
                "keep-all+mlp-tiling": ls.run_fresh(spec_of("keep-tiled"), ls.keep_all_plan(
                    plan, mlp_tiling=True), workdir / "keep-tiled"),
                "swap-to-nvme": ls.run_fresh(spec_of("swap"), plan, workdir / "swap")}
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = {}
    for name, run in runs.items():
        steady = run["step_times"][1:] or run["step_times"]
        rows[name] = {"step_times": run["step_times"], "median_s": statistics.median(steady),
                      "swapped_nvme": max(run["swapped_nvme"]),
                      "copy_wait_s": statistics.median(run["copy_wait_s"][1:] or run["copy_wait_s"]),
                      "peak_rss": run["peak_rss"], "losses": run["losses"]}
    keep, swap = rows["keep-all"], rows["swap-to-nvme"]
    required = swap["swapped_nvme"] / keep["median_s"]  # written once and read once per step
    disk_ok = write_bw >= required and read_bw >= required
    ratio = swap["median_s"] / keep["median_s"]
    ratio_tiled = swap["median_s"] / rows["keep-all+mlp-tiling"]["median_s"]
    return {"config": {"preset": preset, "num_layers": num_layers, "seq_len": seq_len,
                       "steps": steps, "memory_gib": memory_gib, "policy": ls.policy_text(plan)},
            "rows": rows, "disk_write_bw": write_bw, "disk_read_bw": read_bw,
            "required_bw": required, "disk_ok": disk_ok, "ratio": ratio,
            "ratio_same_tiling": ratio_tiled,
            "predicted_exposed_s": plan.prediction.time_breakdown.get("exposed_transfer", 0.0),
            "target_met": disk_ok and ratio <= 1 + TARGET,
            "losses_agree": all(abs(a - b) <= 1e-5 * abs(b)
                                for a, b in zip(swap["losses"], keep["losses"]))}


def table(result: dict) -> str:
    lines = [f"{'policy':<20} {'median step s':>13} {'steps s (each)':>34} {'NVMe MiB/step':>13} "
             f"{'copy wait s':>11} {'peak RSS MiB':>12}"]
    for name, r in result["rows"].items():
        steps = " ".join(f"{t:.2f}" for t in r["step_times"])
        lines.append(f"{name:<20} {r['median_s']:>13.2f} {steps:>34} "
                     f"{r['swapped_nvme'] / MiB:>13,.0f} {r['copy_wait_s']:>11.2f} "
                     f"{r['peak_rss'] / MiB:>12,.0f}")
    lines.append(f"disk measured in the NVMe directory: write {result['disk_write_bw'] / GB:.2f} GB/s, "
                 f"read {result['disk_read_bw'] / GB:.2f} GB/s; plan needs "
                 f"{result['required_bw'] / GB:.3f} GB/s each way (NVMe bytes per step / keep-all "
                 f"step time) -> disk fast enough: {'yes' if result['disk_ok'] else 'NO'}")
    lines.append(f"swap / keep-all step time: {result['ratio']:.3f} (target <= {1 + TARGET:.2f} "
                 f"where the disk is fast enough) -> "
                 f"{'MET' if result['target_met'] else 'MISSED' if result['disk_ok'] else 'n/a (disk too slow)'}; "
                 f"planner predicted exposed transfer {result['predicted_exposed_s']:.3f} s")
    lines.append(f"swap / keep-all with the plan's MLP tiling (copies alone): "
                 f"{result['ratio_same_tiling']:.3f}")
    if result["disk_ok"] and not result["target_met"]:
        rows = result["rows"]
        plain, tiled = rows["keep-all"]["median_s"], rows["keep-all+mlp-tiling"]["median_s"]
        swap = rows["swap-to-nvme"]
        lines.append(f"where the {swap['median_s'] - plain:.2f} s go: the plan's MLP tiling "
                     f"{tiled - plain:+.2f} s (keep-all+mlp-tiling vs keep-all); with it, the "
                     f"copies {swap['median_s'] - tiled:+.2f} s, of which waiting on copies "
                     f"{swap['copy_wait_s']:.2f} s; the rest is compute running slower beside "
                     f"the copy threads (2 shared cores) or noise")
    lines.append(f"losses agree (1e-5 relative): {'yes' if result['losses_agree'] else 'NO'}")
    return "\n".join(lines)


def header(result: dict) -> str:
    cfg = result["config"]
    return (f"{cfg['preset']} preset, {cfg['num_layers']} layers, seq_len {cfg['seq_len']}, fp32, "
            f"{cfg['steps']} steps (median after the first); planned for {cfg['memory_gib']} GiB "
            f"per rank, NVMe only, no recompute: {cfg['policy']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--num-layers", type=int, default=NUM_LAYERS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--memory-gib", type=float, default=MEMORY_GIB)
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write the table into {ls.DOCS.relative_to(ls.ROOT)}")
    args = parser.parse_args()
    result = measure(seq_len=args.seq_len, num_layers=args.num_layers, steps=args.steps,
                     memory_gib=args.memory_gib)
    text = header(result) + "\n" + table(result)
    print(text)
    if args.write_docs:
        command = "python bench/overlap.py" + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k != "write_docs" and v != globals()[k.upper()])
        ls.write_docs_section("overlap", text, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
