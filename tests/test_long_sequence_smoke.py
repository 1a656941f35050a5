"""bench/long_sequence.py and bench/overlap.py run end to end on a tiny configuration.

Each `measure()` plans a tiny job for a budget too small to keep everything, trains it under
the plan and under keep-all in fresh subprocesses, and returns its table's numbers. Checked
here: the structure, equal losses, and that swapping lowers the runtime-tracked resident
saved bytes. The real targets (factor within 10%, step time within 15%) are printed by the
scripts on the `small` preset; they are not asserted on a tiny model whose RSS is noise.
"""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import long_sequence  # noqa: E402
import overlap  # noqa: E402

TINY = dict(preset="tiny", seq_len=1024, num_layers=2, steps=2, memory_gib=0.03)


@pytest.mark.slow
def test_long_sequence_measure_on_a_tiny_job(tmp_path):
    result = long_sequence.measure(**TINY, nvme_gib=0.01, workdir=tmp_path)
    keep, swap = result["rows"]["keep-all"], result["rows"]["swap+recompute"]
    for row in (keep, swap):
        assert len(row["step_times"]) == len(row["losses"]) == TINY["steps"]
        assert row["peak_rss"] >= row["baseline_rss"] > 0
        assert set(long_sequence.COMPARABLE) <= set(row["predicted_categories"])
    assert result["losses_agree"]
    assert swap["peak_resident"] < keep["peak_resident"]
    assert max(swap["swapped_nvme"]) > 0 and max(keep["swapped_nvme"]) == 0
    assert result["predicted_factor"] > 1 and result["measured_factor"] > 0
    assert "reduction factor" in long_sequence.table(result)


@pytest.mark.slow
def test_overlap_measure_on_a_tiny_job(tmp_path):
    # recompute off: swapping every layer pays its rebuild + prefetch, so it needs 3 layers to win
    result = overlap.measure(**{**TINY, "num_layers": 3, "memory_gib": 0.04},
                             probe_bytes=8 * 2**20, workdir=tmp_path)
    keep, swap = result["rows"]["keep-all"], result["rows"]["swap-to-nvme"]
    assert keep["median_s"] > 0 and swap["median_s"] > 0
    assert swap["swapped_nvme"] > 0 and keep["swapped_nvme"] == 0
    assert result["disk_write_bw"] > 0 and result["disk_read_bw"] > 0
    assert result["required_bw"] > 0 and result["losses_agree"]
    assert "disk fast enough" in overlap.table(result)


def test_docs_sections_are_replaced_in_place(tmp_path):
    path = tmp_path / "activation_runtime.md"
    long_sequence.write_docs_section("overlap", "table one", "python bench/overlap.py", path)
    long_sequence.write_docs_section("long_sequence", "table two", "python bench/long_sequence.py",
                                     path)
    long_sequence.write_docs_section("overlap", "table three", "python bench/overlap.py", path)
    text = path.read_text()
    assert text.startswith("# Activation runtime")
    assert "table three" in text and "table two" in text and "table one" not in text
    assert text.index("Long sequence") < text.index("Overlap")
