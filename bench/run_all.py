"""Run every benchmark and regenerate the docs sections they own (`make bench`,
`disttrain bench`): docs/benchmarks.md (peers, fidelity, estimators) and
docs/activation_runtime.md (long_sequence, overlap); comm_volume, activation_bytes,
copy_engine and cpu_optimizer_overlap only print. Each runs in its own process (high-water
marks stay its own).
`--quick` runs the smallest configuration of each, `--no-docs` only prints.

    .venv/bin/python bench/run_all.py [--quick] [--no-docs] [--only peers fidelity ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name: (script, full arguments, quick arguments, flag that makes it write its docs section)
BENCHES = {
    "peers": ("peers.py", [], ["--seq", "256", "512", "--steps", "2"], None),
    "fidelity": ("fidelity.py", [], ["--seq", "256", "--steps", "2"], None),
    "estimators": ("estimators.py", [], ["--io-mib", "16"], None),
    "long_sequence": ("long_sequence.py", [],
                      ["--seq-len", "1024", "--num-layers", "2", "--steps", "2"], "--write-docs"),
    "overlap": ("overlap.py", [], ["--seq-len", "1024", "--num-layers", "3", "--steps", "2"],
                "--write-docs"),
    "comm_volume": ("comm_volume.py", [], [], None),
    "activation_bytes": ("activation_bytes.py", [], ["--seq", "128", "256"], None),
    "copy_engine": ("copy_engine.py", [], ["--size-mib", "16", "--repeats", "1"], None),
    "cpu_optimizer_overlap": ("cpu_optimizer_overlap.py", [],
                              ["--num-layers", "2", "--steps", "3"], None),
    "published": ("published.py", [], ["--only", "megatron-1p7b-48xh100"], None),
}
"""Scripts without a docs flag write their section unless given `--no-docs` (peers, fidelity,
estimators), or print only."""
WRITES_BY_DEFAULT = ("peers", "fidelity", "estimators", "published")


def command(name: str, *, quick: bool, docs: bool) -> list[str]:
    script, full, small, docs_flag = BENCHES[name]
    argv = [sys.executable, str(HERE / script)] + (small if quick else full)
    if docs and docs_flag and not quick:
        argv.append(docs_flag)
    if name in WRITES_BY_DEFAULT and (quick or not docs):
        argv.append("--no-docs")
    return argv


def run(names: list[str], *, quick: bool = False, docs: bool = True) -> dict[str, float]:
    """Run the named benchmarks in order; returns seconds per benchmark. A quick run never
    rewrites docs (its numbers are not the documented configuration)."""
    seconds = {}
    for name in names:
        argv = command(name, quick=quick, docs=docs)
        print(f"== {name}: {' '.join(argv[1:])}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.run(argv, check=False).returncode
        if code:
            raise SystemExit(f"{name} exited with {code}")
        seconds[name] = time.perf_counter() - t0
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest configuration of each")
    parser.add_argument("--no-docs", action="store_true", help="print only, leave docs/ alone")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    args = parser.parse_args(argv)
    seconds = run(args.only, quick=args.quick, docs=not args.no_docs)
    print("== done: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
          + f", total {sum(seconds.values()) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
