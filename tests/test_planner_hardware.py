"""probe(): measures this machine, cleans up its temp file, and falls back without NVML."""

from __future__ import annotations

import sys
import types

import planner.hardware as hardware


def test_probe_measures_and_removes_its_file(tmp_path):
    spec = hardware.probe(nvme_path=str(tmp_path), nvme_test_bytes=8 * 2**20)
    assert spec.name == "probe"
    assert spec.host_link_bw > 1e8 and spec.nvme_write_bw > 1e6 and spec.nvme_read_bw > 1e6
    assert spec.nvme_capacity_bytes > 0 and spec.nvme_path == str(tmp_path)
    assert list(tmp_path.iterdir()) == []          # the timed file was removed
    assert spec.host_memory_bytes > 2**30


def test_nvml_error_falls_back(monkeypatch):
    fake = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        raise NVMLError("LibraryNotFound")

    fake.NVMLError, fake.nvmlInit = NVMLError, init
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert hardware._nvml_devices() == []


def test_nvml_devices_are_read(monkeypatch):
    fake = types.ModuleType("pynvml")
    fake.NVMLError = Exception
    fake.nvmlInit = fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetName = lambda h: b"A800-SXM4-80GB"
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 2**30)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert hardware._nvml_devices() == [("A800-SXM4-80GB", 80 * 2**30)] * 2
