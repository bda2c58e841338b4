"""The benchmarks still run: one sample of every variant, so a changed install step or API breaks CI
instead of the next person's `make bench`. Numbers are not checked here (timing is bench-only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


def _bench(name: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "bench", name], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_rules_bench_runs_every_variant() -> None:
    out = _bench("rules", BENCH_RULES_N="1")
    for variant in ("nftables agent v4+v6", "iptables-legacy agent v4+v6", "nft libnftables-json",
                    "nft-subprocess", "nft-text what-if", "istio-subprocess"):
        assert f"  {variant} " in out, out
    assert out.count("ms per pod (agent path)") == 2, out


def test_shim_bench_runs(shim: Path) -> None:
    out = _bench("shim", BENCH_N="3")
    assert "ambient-cni ADD, exec + agent round trip" in out, out


def test_pod_add_bench_runs(shim: Path) -> None:
    out = _bench("add", BENCH_ADD_N="2")
    for backend in ("nftables", "iptables-legacy"):
        assert f"  {backend} " in out, out
