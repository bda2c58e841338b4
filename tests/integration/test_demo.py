"""`make demo` is one of the two README commands: it must succeed and leave nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root


def _host_state() -> tuple[str, str, list[str]]:
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links_names = sorted(line.split(":")[1].strip() for line in links.splitlines())
    legacy = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True, check=True).stdout
    return "\n".join(links_names), netns, [ln for ln in legacy.splitlines() if ln.startswith("-A")]


def test_demo_succeeds_and_cleans_up(shim: Path) -> None:
    before = _host_state()
    res = subprocess.run(
        [sys.executable, "-m", "cni_agent", "demo", "--plugin", str(shim)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "demo/client" in out and "demo/server" in out and "kube-system/coredns" in out
    assert "port 15001, original destination" in out
    assert "port 15006, original destination" in out
    assert "enrolled:        no (namespace excluded)" in out
    assert "ztunnel dropped every pod" in out
    assert "reached the app from 169.254.7.127 (SNAT, not captured)" in out
    assert _host_state() == before
