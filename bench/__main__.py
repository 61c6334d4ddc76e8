"""Run every benchmark in turn (`make bench`), or the ones named: `python -m bench b1_edge`."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    names = sorted(
        m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("b")
    )
    wanted = [a for a in argv if not a.startswith("-")] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {names}")
        return 2
    if not names:
        print("no benchmarks yet")
    for name in wanted:
        print(f"== {name}")
        importlib.import_module(f"bench.{name}").main([a for a in argv if a.startswith("-")])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
