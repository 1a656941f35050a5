"""probe(): measures this machine, cleans up its temp file, and falls back without NVML."""

from __future__ import annotations

import sys
import types

import pytest

import planner.hardware as hardware
import planner.probe_gpu as probe_gpu


def test_probe_measures_and_removes_its_file(tmp_path):
    spec = hardware.probe(nvme_path=str(tmp_path), nvme_test_bytes=8 * 2**20, collectives=False)
    assert spec.name == "probe"
    assert spec.host_link_bw > 1e8 and spec.nvme_write_bw > 1e6 and spec.nvme_read_bw > 1e6
    assert spec.nvme_capacity_bytes > 0 and spec.nvme_path == str(tmp_path)
    assert list(tmp_path.iterdir()) == []          # the timed file was removed
    assert spec.host_memory_bytes > 2**30


@pytest.mark.parametrize("direct_refused", [False, True])
def test_disk_is_written_as_the_swap_store_writes_it(tmp_path, monkeypatch, direct_refused):
    """O_DIRECT writes (the store's: no page cache) where the filesystem takes them; where it
    refuses them, buffered writes, timed all the same; the file is removed either way."""
    import os

    direct = getattr(os, "O_DIRECT", 0)
    flags, real_open = [], os.open

    def spy(path, flag, *args):
        if os.fspath(path).startswith(str(tmp_path)):
            flags.append(flag)
            if direct_refused and direct and flag & direct:
                raise OSError(22, "Invalid argument")
        return real_open(path, flag, *args)

    monkeypatch.setattr(os, "open", spy)
    write_bw, read_bw, free = hardware._timed_nvme(str(tmp_path), 8 * 2**20)
    assert write_bw > 1e6 and read_bw > 1e6 and free > 0
    writes = [f for f in flags if f & os.O_WRONLY]
    assert writes and (not direct or bool(writes[0] & direct))
    if direct_refused and direct:
        assert not writes[-1] & direct
    assert list(tmp_path.iterdir()) == []


def test_nvml_error_falls_back(monkeypatch):
    fake = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        raise NVMLError("LibraryNotFound")

    fake.NVMLError, fake.nvmlInit = NVMLError, init
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert probe_gpu.nvml_devices() == []


def test_nvml_devices_are_read(monkeypatch):
    fake = types.ModuleType("pynvml")
    fake.NVMLError = Exception
    fake.nvmlInit = fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetName = lambda h: b"A800-SXM4-80GB"
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 2**30)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert probe_gpu.nvml_devices() == [("A800-SXM4-80GB", 80 * 2**30)] * 2


def test_nvml_error_after_init_falls_back_too(monkeypatch):
    fake = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def count():
        raise NVMLError("GPU is lost")

    fake.NVMLError, fake.nvmlInit, fake.nvmlShutdown = NVMLError, lambda: None, lambda: None
    fake.nvmlDeviceGetCount = count
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert probe_gpu.nvml_devices() == []


def test_gpu_device_names_map_to_their_datasheet_preset():
    assert probe_gpu._known_device("NVIDIA A800-SXM4-80GB")["device_name"] == "A800-80G"
    assert probe_gpu._known_device("NVIDIA H100 80GB HBM3")["device_name"] == "H100-80G"
    assert probe_gpu._known_device("NVIDIA GeForce RTX 4090")["device_name"] == "RTX4090-24G"
    assert probe_gpu._known_device("Tesla T4") is None


@pytest.mark.gpu
def test_probe_on_a_gpu_node_measures_the_gpu(tmp_path):
    import torch

    spec = hardware.probe(nvme_path=str(tmp_path), nvme_test_bytes=8 * 2**20)
    assert spec.device_name != "cpu" and spec.devices_per_node == torch.cuda.device_count()
    total = torch.cuda.get_device_properties(0).total_memory  # NVML counts a little more
    assert total <= spec.device_memory_bytes <= 1.05 * total
    assert spec.host_link_bw > 1e9  # pinned PCIe / NVLink-C2C copies, not a host memcpy
    assert spec.flops("bf16") > spec.flops("fp32") > 1e12


def test_fit_latency_bandwidth_recovers_known_values():
    sent = [2**k for k in range(14, 25, 2)]
    times = [2e-4 + n / 0.5e9 for n in sent]
    latency, bw = hardware.fit_latency_bandwidth(sent, times)
    assert latency == pytest.approx(2e-4, rel=1e-6) and bw == pytest.approx(0.5e9, rel=1e-6)
    # noise that would make a free fit's latency negative is clamped to zero
    latency, bw = hardware.fit_latency_bandwidth([1e6, 2e6], [0.9e-3, 2.0e-3])
    assert latency >= 0 and bw > 0
    # a busy host can time the large call as fast as the small one: no bandwidth is resolved,
    # so the largest call's own rate bounds it instead of an unbounded fit
    latency, bw = hardware.fit_latency_bandwidth([65536, 2**20], [3.0e-3, 3.0e-3])
    assert bw == pytest.approx(2**20 / 3.0e-3) and 0 <= latency <= 3.0e-3


def test_sent_bytes_convention_matches_the_cost_model():
    assert hardware.collective_sent_bytes("all_to_all", 8, 2) == 4
    assert hardware.collective_sent_bytes("reduce_scatter", 8, 4) == 6
    assert hardware.collective_sent_bytes("all_reduce", 8, 2) == 8   # reduce-scatter + all-gather


def test_timed_collectives_between_two_local_processes():
    fit = hardware.timed_collectives(2, threads=1, sizes=(64 * 2**10, 2**20), repeats=2)
    assert set(fit["samples"]) == {(k, n) for k in hardware.COLLECTIVE_KINDS for n in (64 * 2**10, 2**20)}
    assert all(t > 0 for t in fit["samples"].values())
    assert fit["latency_s"] >= 0 and 1e6 < fit["bandwidth"] < 1e12
    assert set(fit["by_kind"]) == set(hardware.COLLECTIVE_KINDS)
    with pytest.raises(ValueError):
        hardware.timed_collectives(1)


def test_probe_takes_the_measured_collectives(tmp_path, monkeypatch):
    from planner.costmodel import CostParams
    fake = {"latency_s": 3e-4, "bandwidth": 0.8e9, "by_kind": {k: (1e-4, 0.5e9) for k in hardware.COLLECTIVE_KINDS}}
    monkeypatch.setattr(hardware, "timed_collectives", lambda world: fake)
    spec = hardware.probe(nvme_path=str(tmp_path), nvme_test_bytes=2**20)
    assert spec.intra_node_latency_s == 3e-4
    assert spec.intra_node_bw * CostParams().comm_efficiency == pytest.approx(0.8e9)
    assert spec.intra_node_collective_bw == {k: 0.5e9 for k in hardware.COLLECTIVE_KINDS}

    def broken(world):
        raise RuntimeError("no loopback")
    monkeypatch.setattr(hardware, "timed_collectives", broken)
    spec = hardware.probe(nvme_path=str(tmp_path), nvme_test_bytes=2**20)
    preset = hardware.CLUSTER_PRESETS["cpu-local"]
    assert (spec.intra_node_bw, spec.intra_node_collective_bw) == (preset.intra_node_bw,
                                                                   preset.intra_node_collective_bw)


def test_collective_fields_validated_and_optional():
    preset = hardware.CLUSTER_PRESETS["cpu-local"]
    assert set(preset.intra_node_collective_bw) == set(hardware.COLLECTIVE_KINDS)
    assert preset.intra_node_latency_s > 0
    with pytest.raises(ValueError, match="intra_node_latency_s"):
        preset.replace(intra_node_latency_s=-1.0)
    with pytest.raises(ValueError, match="intra_node_collective_bw"):
        preset.replace(intra_node_collective_bw={"all_to_all": 0.0})
    old = {k: v for k, v in preset.to_dict().items()
           if k not in ("intra_node_latency_s", "intra_node_collective_bw")}
    loaded = hardware.HardwareSpec.from_dict(old)      # plans written before these fields
    assert loaded.intra_node_latency_s == 0.0 and loaded.intra_node_collective_bw == {}
