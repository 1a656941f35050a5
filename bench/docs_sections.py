"""docs/benchmarks.md is written by several scripts: each owns one section between marker
comments and regenerates only that section, so the scripts can run in any order.

    <!-- bench:peers:begin -->  ...  <!-- bench:peers:end -->
"""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
BENCHMARKS_MD = DOCS / "benchmarks.md"
SECTION_ORDER = ("peers", "fidelity", "estimators", "published", "heldout")
HEADER = ("# Benchmarks\n\nEvery number on this page is printed by a script under `bench/` "
          "(`disttrain bench` runs them all and rewrites this page section by section). "
          "Machine: shared 2-core CPU, no GPU, 2 gloo ranks with one thread each.\n")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def write_section(name: str, markdown: str, path: Path = BENCHMARKS_MD) -> Path:
    """Replace section `name` of `path` (created with a header and empty sections if missing)."""
    if name not in SECTION_ORDER:
        raise ValueError(f"name: unknown benchmark section {name!r}; known: {SECTION_ORDER}")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else HEADER + "".join(
        f"\n{_markers(n)[0]}\n_not run yet_\n{_markers(n)[1]}\n" for n in SECTION_ORDER)
    begin, end = _markers(name)
    if begin not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{markdown.strip()}\n{end}{tail}")
    return path


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table; floats are expected to be formatted by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.1f}"
