"""Held-out published runs (bench/heldout.py): every spec parses, every spec has exactly one
row with a source, and every published layout is a valid plan request. Not a band test (no
planning here: bench/heldout.py prints the ratios)."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import heldout  # noqa: E402
import published  # noqa: E402

from disttrain.spec import load_job  # noqa: E402

ROWS, SOURCES, MISSING, EXPECT = heldout.load_rows()
PATHS = sorted(heldout.SPECS.glob("*.yaml"))


def test_specs_and_rows_match():
    assert PATHS, "bench/heldout_specs/ is empty"
    assert {p.stem for p in PATHS} == set(ROWS)
    assert heldout.spec_paths(ROWS) == PATHS
    with pytest.raises(SystemExit, match="rows without a spec"):
        heldout.spec_paths({**ROWS, "short-nowhere-x-8": published._row(1, None, "x")})


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_spec_parses_and_row_has_a_source(path):
    job = load_job(path)
    name = path.stem
    assert job.spec.name == name
    assert name.startswith(("short-", "long-"))
    if name.startswith("short-"):
        assert job.spec.train.seq_len <= 16384, "short rows are <= 16K tokens"
    assert len(SOURCES.get(name, "")) > 20, f"{name}: no source"
    row = ROWS[name]
    assert set(row) == set(published._row(1, None, "")), f"{name}: not built with published._row"
    assert row["tok_s"] is None or (isinstance(row["tok_s"], int) and row["tok_s"] > 0)
    if row["layout"] is not None:
        request = dataclasses.replace(published.free_request(job), **row["layout"])
        degrees = (request.dp, request.sp, request.pp, request.tp or 1)
        if None not in degrees:   # a layout fixing every degree covers the GPUs exactly
            assert degrees[0] * degrees[1] * degrees[2] * degrees[3] == job.hardware.world_size, \
                f"{name}: layout does not cover the GPUs"


def test_missing_names_real_rows():
    assert set(MISSING) <= set(ROWS) and set(EXPECT) <= set(ROWS)
