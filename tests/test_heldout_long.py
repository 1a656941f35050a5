"""The held-out long-sequence rows (bench/heldout_long.py): every spec parses, every row has a
spec, an exact source and a kernel the spec names, and a published layout that fits the spec's
cluster (the planner would otherwise reject it for the wrong reason)."""

import dataclasses
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import heldout_long  # noqa: E402

from disttrain.spec import load_job  # noqa: E402
from planner.request import PlanRequest  # noqa: E402

SPEC_FILES = sorted(heldout_long.SPECS.glob("long-*.yaml"))


def test_rows_and_spec_files_match():
    assert SPEC_FILES, "no long-* specs"
    assert {p.stem for p in SPEC_FILES} == set(heldout_long.ROWS)
    assert set(heldout_long.SOURCES) == set(heldout_long.ROWS)
    assert set(heldout_long.KERNELS) == set(heldout_long.ROWS)
    assert set(heldout_long.EXPECT_FEASIBLE) == set(heldout_long.ROWS)


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_spec_parses_and_row_is_sourced(path):
    job = load_job(path)
    name = path.stem
    assert job.spec.name == name
    assert job.spec.train.seq_len >= 32768, "long-sequence rows only"
    source = heldout_long.SOURCES[name]
    # an exact source: a repository with its commit, or an arXiv id
    assert re.search(r"\b[0-9a-f]{7,40}\b", source) or re.search(r"arXiv \d{4}\.\d{4,5}", source), source
    assert f"attention kernel: {heldout_long.KERNELS[name]}" in path.read_text()
    kernel = heldout_long.KERNELS[name]
    if kernel == "flash-attn-1":      # the planner has its table: the spec must price with it
        assert job.hardware.attention_kernel == kernel
    assert job.hardware.attention_kernel in (None, kernel)
    row = heldout_long.ROWS[name]
    assert row["tok_s"] is None or row["tok_s"] > 0
    layout = row["layout"]
    if layout:
        fields = {f.name for f in dataclasses.fields(PlanRequest)}
        assert set(layout) <= fields, set(layout) - fields
        degrees = [layout.get(k) for k in ("dp", "sp", "pp", "tp")]
        if None not in degrees:
            assert degrees[0] * degrees[1] * degrees[2] * degrees[3] == job.hardware.world_size
            mbs = job.spec.train.micro_batch_size
            assert job.spec.train.global_batch_size % (degrees[0] * (1 if mbs == "auto" else mbs)) == 0
