"""peak_rss_bytes: this process's own high-water mark, not one inherited from its parent."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from disttrain import metrics
from disttrain.metrics import peak_rss_bytes

MIB = 2**20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_child_process_does_not_inherit_the_parents_peak():
    block = bytearray(256 * MIB)
    block[::4096] = b"x" * len(block[::4096])  # touch every page: resident
    parent = peak_rss_bytes()
    del block
    child = subprocess.run(
        [sys.executable, "-c", "from disttrain.metrics import peak_rss_bytes; print(peak_rss_bytes())"],
        capture_output=True, text=True, cwd=ROOT, check=True)
    assert parent >= 256 * MIB
    assert int(child.stdout) < parent - 128 * MIB  # ru_maxrss would report >= parent's peak


def test_falls_back_to_ru_maxrss_without_proc(monkeypatch):
    def no_proc(self, *args, **kwargs):
        raise FileNotFoundError(self)

    monkeypatch.setattr(metrics.Path, "read_text", no_proc)
    expected = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    assert peak_rss_bytes() == pytest.approx(expected, rel=0.05)
