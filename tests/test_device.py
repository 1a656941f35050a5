"""The device interface (disttrain.device): CPU behaviour, launch-derived devices, and GPU jobs
refused before any work on a machine without the GPUs (local, torchrun, Ray). GPU-only checks
are marked `gpu` and skipped without CUDA."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import run_cli
from disttrain.device import CPU, Device, job_device, require_local_gpus, wants_gpu
from disttrain.spec import LaunchContext, SpecError, load_job
from planner.hardware import CLUSTER_PRESETS

GPU_JOB = {"cluster": {"preset": "1xa800-80g"}}
NO_CUDA = not torch.cuda.is_available()


def test_cpu_device_helpers_are_plain():
    assert (CPU.backend, CPU.torch_device, CPU.is_cuda) == ("gloo", torch.device("cpu"), False)
    assert CPU.copy_stream() is None and CPU.record_event() is None
    CPU.wait_event(None)  # no-op
    CPU.synchronize()
    host = CPU.pinned_empty(64, torch.float32)
    assert host.shape == (16,) and host.dtype == torch.float32 and not host.is_pinned()
    with pytest.raises(ValueError, match="multiple"):
        CPU.pinned_empty(6, torch.float32)
    assert CPU.max_memory_allocated() is None and CPU.memory_record() == {}
    with CPU.timer() as timer:
        sum(range(20000))
    assert timer.seconds > 0
    assert Device.from_torch("cuda:1") == Device("cuda", 1)
    with pytest.raises(ValueError, match="device.kind"):
        Device("tpu")


def test_cpu_jobs_stay_on_the_cpu_and_gpu_jobs_want_cuda():
    assert job_device(CLUSTER_PRESETS["cpu-local"], local_rank=3) == CPU
    assert wants_gpu(CLUSTER_PRESETS["8xa800-80g"]) and not wants_gpu(CLUSTER_PRESETS["cpu-local"])
    # a device written "CPU" is a CPU node to the planner (it lowercases): so to the runtime
    upper = dataclasses.replace(CLUSTER_PRESETS["cpu-local"], device_name="CPU")
    assert not wants_gpu(upper) and job_device(upper, local_rank=0) == CPU


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_gpu_job_without_cuda_is_refused_with_the_reason():
    with pytest.raises(SpecError, match=r"^cluster: the plan is for GPUs \(A800-80G\) but this "
                                        r"machine has none"):
        job_device(CLUSTER_PRESETS["1xa800-80g"], local_rank=0)
    require_local_gpus(CLUSTER_PRESETS["cpu-local"], 8)  # a CPU job needs no GPU


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("launcher", ["local", "torchrun", "ray"])
def test_gpu_plan_exits_2_before_any_work(write_spec, tmp_path, launcher):
    out = tmp_path / f"out-{launcher}"
    spec = write_spec({**GPU_JOB, "output_dir": str(out)})
    done = run_cli("train", spec, "--launcher", launcher, "--no-planner")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPUs (A800-80G)" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()  # nothing ran: no plan, no metrics, no checkpoint


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_torchrun_entry_refuses_a_gpu_plan_before_the_process_group(write_spec, monkeypatch,
                                                                     capsys):
    from launch import torchrun

    spec = write_spec(GPU_JOB)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert torchrun.main([str(spec), "--no-planner"]) == 2
    assert not dist.is_initialized()
    err = capsys.readouterr().err
    assert err.startswith("error: cluster: the plan is for GPUs") and err.count("\n") == 1


def test_launch_decides_the_world_size_and_only_explicit_conflicts_are_refused(write_spec):
    spec = write_spec()  # launch.launcher local, cpu-local preset: 1 device
    job = load_job(spec, launch=LaunchContext("torchrun", nodes=1, devices_per_node=2))
    assert job.hardware.world_size == 2
    explicit = write_spec({"cluster": {"devices_per_node": 1}})
    with pytest.raises(SpecError, match=r"^cluster.devices_per_node: 1, but torchrun started 2"):
        load_job(explicit, launch=LaunchContext("torchrun", nodes=1, devices_per_node=2))
    fixed = write_spec({"parallel": {"dp": 1, "sp": 1, "pp": 1}})
    with pytest.raises(SpecError, match=r"^parallel: dp\*sp\*pp = 1 must equal"):
        load_job(fixed, launch=LaunchContext("torchrun", nodes=1, devices_per_node=2))


@pytest.mark.slow
def test_torchrun_two_ranks_train_a_local_one_device_spec(write_spec, tmp_path):
    """What a new user types: `torchrun --nproc-per-node 2 -m launch.torchrun job.yaml` with the
    quickstart-like spec (launch.launcher local, 1 device) trains on 2 gloo ranks."""
    import subprocess

    from conftest import ROOT
    from disttrain.parallel.spawn import free_port

    spec = write_spec({"train": {"steps": 2, "checkpoint_every": 0}})
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                           "-m", "launch.torchrun", str(spec), "--no-planner"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "last loss" in done.stdout


# -- on a GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_copy_stream_events_pinned_memory_and_peaks():
    device = Device("cuda", 0)
    device.set_current()
    assert device.backend == "nccl"
    x = torch.randn(1 << 20, device=device.torch_device)
    host = device.pinned_empty(x.nbytes, torch.float32)
    assert host.is_pinned()
    stream = device.copy_stream()
    assert stream is device.copy_stream()  # one per device
    ready = device.record_event()
    device.wait_event(ready, stream)
    with device.stream(stream):
        host.copy_(x, non_blocking=True)
    done = device.record_event(stream)
    done.synchronize()
    assert torch.equal(host, x.cpu())
    with device.timer() as timer:
        y = x * 2
    assert timer.seconds > 0 and torch.equal(y, x + x)
    record = device.memory_record()
    assert record["device_max_allocated_bytes"] >= x.nbytes
    assert record["device_max_reserved_bytes"] >= record["device_max_allocated_bytes"]


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_gpu_check_without_a_gpu_claims_nothing():
    import subprocess

    from conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (done.returncode, done.stdout) == (0, "no GPU: nothing checked\n"), done.stderr


def test_ray_cluster_with_too_few_gpus_is_refused_before_any_worker(write_spec, monkeypatch):
    """A joined Ray cluster (its GPUs are not this machine's) is checked from its resources."""
    ray = pytest.importorskip("ray")
    from launch import ray as ray_launch

    job = load_job(write_spec({"cluster": {"preset": "8xa800-80g"},
                               "launch": {"launcher": "ray"}}))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 4.0})
    with pytest.raises(SpecError, match=r"^--launcher ray: the plan needs 8 workers with 1 GPU "
                                        r"each \(A800-80G\), the Ray cluster has 4 GPUs$"):
        ray_launch.fit(job, {}, num_workers=8, max_steps=None)
