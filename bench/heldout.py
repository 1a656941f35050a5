"""The planner held against published GPU runs it was never calibrated on (issue 14): plan
every spec of `bench/heldout_specs/` free and with the published layout fixed, with
bench/published.py's pieces, and print the same four targets and the ratio table with each
row's source. Rows: `heldout_short.ROWS` (<= 16K tokens) and, when that module exists,
`heldout_long.ROWS`.

    .venv/bin/python bench/heldout.py [--only NAME ...] [--no-docs]

Without --no-docs (and without --only) it writes the "heldout" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from docs_sections import md_table, write_section  # noqa: E402
from published import (as_published_lines, measure, result_table, target_lines,  # noqa: E402
                       targets)

SPECS = HERE / "heldout_specs"
MODULES = ("heldout_short", "heldout_long")
"""Row modules, each with ROWS = {spec name: published._row(...)} and SOURCES = {name: text};
optional: MISSING or NOTES = {name: what the row shows / misses}, EXPECT_FEASIBLE = {name:
False where the published system used a mechanism disttrain lacks}."""


def load_rows() -> tuple[dict, dict, dict, dict]:
    """ROWS, SOURCES, MISSING (MISSING and NOTES: what a row outside the band misses) and
    EXPECT_FEASIBLE merged over the row modules that exist."""
    rows, sources, missing, expect = {}, {}, {}, {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        rows.update(module.ROWS)
        sources.update(module.SOURCES)
        missing.update(getattr(module, "NOTES", {}))
        missing.update(getattr(module, "MISSING", {}))
        expect.update(getattr(module, "EXPECT_FEASIBLE", {}))
    return rows, sources, missing, expect


def heldout_targets(rows: list[dict], expect: dict[str, bool]) -> list[tuple[str, bool, str]]:
    """bench/published.py's four targets; feasibility over the rows expected to be feasible
    (a row whose published system used a mechanism disttrain lacks is listed apart)."""
    results = targets(rows)
    apart = [r for r in rows if not expect.get(r["name"], True)]
    if apart:
        what, ok, detail = targets([r for r in rows if r not in apart])[0]
        shown = ", ".join(f"{r['name']} {'infeasible' if not r['free']['plan'].feasible else 'FEASIBLE'}"
                          for r in apart)
        results[0] = (what + " (rows expected feasible)", ok,
                      f"{detail}; expected infeasible: {shown}")
    return results


def spec_paths(rows: dict) -> list[Path]:
    """Every spec of SPECS; a spec without a row (or a row without a spec) is an error."""
    paths = sorted(SPECS.glob("*.yaml"))
    names = {p.stem for p in paths}
    if names != set(rows):
        raise SystemExit(f"heldout: specs without a row {sorted(names - set(rows))}, "
                         f"rows without a spec {sorted(set(rows) - names)}")
    return paths


def report(rows: list[dict], sources: dict, missing: dict, expect: dict | None = None) -> str:
    lines = ["## Held-out published GPU runs", "",
             "`bench/heldout.py` plans each spec of `bench/heldout_specs/`: published runs that "
             "are not in the calibration set (`bench/published.py`), priced by the same cost "
             "model, free and with the published layout fixed. Columns as in the published "
             "section. Every throughput below is published as tokens/s/GPU, so no FLOP "
             "convention enters the ratio.", "",
             result_table(rows), "", "Targets (the same four as the calibration set):", ""]
    lines += target_lines(rows, missing, heldout_targets(rows, expect or {}))
    lines += as_published_lines(rows)
    lines += ["", "Sources:", "",
              md_table(["spec", "source"], [[r["name"], sources[r["name"]]] for r in rows])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=[], help="spec names (file stems)")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args(argv)
    table, sources, missing, expect = load_rows()
    rows = measure(args.only, specs=spec_paths(table), published=table)
    text = report(rows, sources, missing, expect)
    print(text)
    if not args.no_docs and not args.only:
        write_section("heldout", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
