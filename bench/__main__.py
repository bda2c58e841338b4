"""`make bench` / `python -m bench`: run every benchmark and print medians and ratios."""

from __future__ import annotations

import sys

from bench import shim_roundtrip


def main() -> int:
    return shim_roundtrip.main()


if __name__ == "__main__":
    sys.exit(main())
