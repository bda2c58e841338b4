"""`make bench` / `python -m bench [shim|rules|add ...]`: run benchmarks (default: all); medians, ratios."""

from __future__ import annotations

import sys
from collections.abc import Callable

from bench import pod_add, rules_apply, shim_roundtrip

BENCHMARKS: dict[str, Callable[[], int]] = {
    "shim": shim_roundtrip.main,
    "rules": rules_apply.main,
    "add": pod_add.main,
}


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    rc = 0
    for name in names:
        rc = max(rc, BENCHMARKS[name]())
    return rc


if __name__ == "__main__":
    sys.exit(main())
