"""`python -m sct.bench NAME [options]` runs `sct.bench.NAME.main(options)`."""
from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("jvp", "dist", "step", "sample")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m sct.bench {{{','.join(BENCHMARKS)}}} [options]  (-h after the name for its options)", file=sys.stderr)
        return 2
    return importlib.import_module(f"sct.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
