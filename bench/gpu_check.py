"""GPU acceptance check (`make gpu-check`): on a machine with at least one CUDA device, run

1. every test marked `gpu` (attention kernels vs SDPA; keep / swap CPU / swap NVMe / recompute
   vs plain in fp32 and bf16; stores and copies; model states on one and on all local GPUs;
   the probe; the device interface), one line per test;
2. a plan made for this GPU with `cluster.preset: probe` (1 rank on cuda:0), trained for a few
   steps: predicted vs measured peak allocated device bytes and step time, one line each,
   passing when the measured peak is within PEAK_TOLERANCE of the prediction and the step time
   within STEP_TIME_FACTOR;

then a final verdict (exit 0 when every check passed, 1 otherwise). Without a GPU it prints
exactly "no GPU: nothing checked" and exits 0, claiming nothing.

    .venv/bin/python bench/gpu_check.py [--steps N] [--seq-len S] [--skip-tests]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_TOLERANCE = 0.25
"""|measured / predicted - 1| allowed for the peak allocated device bytes."""
STEP_TIME_FACTOR = 2.0
"""Measured step time within [predicted / f, predicted * f]."""


def gpu_tests(out_dir: Path) -> list[tuple[str, bool, str]]:
    """(test id, passed, reason) for every `gpu` test, from pytest's JUnit report."""
    report = out_dir / "gpu-tests.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                    f"--junitxml={report}", str(ROOT / "tests")], cwd=ROOT, check=False,
                   stdout=subprocess.DEVNULL)
    if not report.is_file():
        return [("pytest -m gpu", False, "pytest wrote no report")]
    rows = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            rows.append((name, False, (failure.get("message") or "failed").splitlines()[0][:120]))
        elif skipped is not None:
            rows.append((name, True, "skipped: " + (skipped.get("message") or "")[:100]))
        else:
            rows.append((name, True, ""))
    return rows or [("pytest -m gpu", False, "no gpu test was collected")]


def probe_plan_run(out_dir: Path, steps: int, seq_len: int) -> list[tuple[str, bool, str]]:
    """Plan for this GPU (`cluster.preset: probe`), train `steps` steps on cuda:0, compare."""
    import yaml

    from disttrain.device import job_device
    from disttrain.metrics import read_metrics
    from disttrain.planning import resolve_plan
    from disttrain.spec import load_job
    from disttrain.trainer import Trainer

    spec = {"name": "gpu-check",
            "model": {"hidden_size": 1024, "num_layers": 4, "num_heads": 8, "num_kv_heads": 8,
                      "ffn_hidden_size": 2816, "vocab_size": 32000, "max_seq_len": seq_len,
                      "dtype": "bf16"},
            "train": {"seq_len": seq_len, "micro_batch_size": 1, "global_batch_size": 1,
                      "steps": steps, "checkpoint_every": 0, "log_every": steps},
            "data": {"kind": "synthetic"},
            "cluster": {"preset": "probe", "devices_per_node": 1,
                        "nvme": {"path": str(out_dir / "nvme"), "capacity_gib": 1}},
            "output_dir": str(out_dir / "run")}
    path = out_dir / "gpu-check.yaml"
    path.write_text(yaml.safe_dump(spec))
    job = load_job(path)
    device = job_device(job.hardware, local_rank=0)
    device.set_current()
    plan = resolve_plan(job, 1)
    Trainer(job, plan, device=device).run()
    records = read_metrics(job.output_dir / "metrics.jsonl")
    pred = plan.prediction
    peak = max(r["device_max_allocated_bytes"] for r in records)
    step_time = statistics.median(r["step_time_s"] for r in records[1:] or records)
    print(f"plan for this GPU (cluster.preset: probe): {job.hardware.device_name}, seq_len "
          f"{seq_len}, bf16, {steps} steps on {device}")
    checks = []
    if pred.per_rank_peak_bytes:
        ratio = peak / pred.per_rank_peak_bytes
        checks.append((f"peak allocated: predicted {pred.per_rank_peak_bytes / 2**20:,.1f} MiB, "
                       f"measured {peak / 2**20:,.1f} MiB (x{ratio:.2f})",
                       abs(ratio - 1) <= PEAK_TOLERANCE, ""))
    if pred.step_time_s:
        ratio = step_time / pred.step_time_s
        checks.append((f"step time: predicted {pred.step_time_s * 1e3:,.2f} ms, measured "
                       f"{step_time * 1e3:,.2f} ms (x{ratio:.2f})",
                       1 / STEP_TIME_FACTOR <= ratio <= STEP_TIME_FACTOR, ""))
    return checks or [("prediction", False, "the plan predicts neither peak bytes nor time")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--skip-tests", action="store_true", help="only the probe-plan table")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no GPU: nothing checked")
        return 0
    print(f"GPU check on {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} "
          f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    with tempfile.TemporaryDirectory(prefix="disttrain-gpu-check-") as tmp:
        out = Path(tmp)
        checks = [] if args.skip_tests else gpu_tests(out)
        try:
            checks += probe_plan_run(out, args.steps, args.seq_len)
        except Exception as exc:  # reported as a failed check, not a traceback
            checks.append(("probe plan run", False, f"{type(exc).__name__}: {exc}"))
    for name, ok, note in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({note})" if note else ""))
    failed = sum(not ok for _, ok, _ in checks)
    print(f"verdict: {'PASS' if not failed else 'FAIL'} ({len(checks) - failed}/{len(checks)} "
          f"checks passed)")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
