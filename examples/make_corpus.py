"""Write examples/data/corpus.jsonl: the bundled corpus (disttrain/data/corpus.txt) cut into
documents, one paragraph per JSON line {"text": ...}, for the documents examples.

    python examples/make_corpus.py [OUT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs (blank-line separated), whitespace-normalised."""
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def main(out: Path) -> None:
    docs = paragraphs((ROOT / "disttrain" / "data" / "corpus.txt").read_text("utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    print(f"{out}: {len(docs)} documents, {sum(map(len, docs))} characters")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples" / "data" / "corpus.jsonl")
