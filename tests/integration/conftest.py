"""Fixtures for root integration tests: the built shim, a real agent process, a local node, netns."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_agent.redirect.netns import NetnsWorker
from cni_agent.testing.localenv import LocalEnv
from cni_agent.testing.netns import NetnsFactory, NetnsPool

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "build" / "bin" / "ambient-cni"


def _go() -> str:
    return shutil.which("go") or "/usr/local/go/bin/go"


@pytest.fixture(scope="session")
def shim() -> Path:
    """The shim as `make plugin` builds it; rebuilt when a Go source is newer than the binary."""
    sources = list((REPO / "plugin").glob("*.go"))
    if not SHIM.exists() or any(s.stat().st_mtime > SHIM.stat().st_mtime for s in sources):
        SHIM.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [_go(), "build", "-trimpath", "-ldflags=-s -w", "-o", str(SHIM), "."],
            cwd=REPO / "plugin",
            check=True,
            env={**os.environ, "CGO_ENABLED": "0"},
        )
    return SHIM


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Short paths: a Unix socket path must fit in 108 bytes.
    d = Path(tmp_path_factory.mktemp("a", numbered=True))
    yield d


@pytest.fixture(params=["iptables-legacy", "nftables"])
def env(request: pytest.FixtureRequest, workdir: Path, shim: Path) -> Iterator[LocalEnv]:
    """A started local node: agent in local mode, CNI-wired node netns, connected ztunnel-like peer."""
    e = LocalEnv(workdir, shim, rules_backend=request.param)
    try:
        yield e.start()
    finally:
        e.close()


@pytest.fixture
def new_ns() -> Iterator[NetnsFactory]:
    """Make throw-away netns (lo up); all deleted when the test ends."""
    with NetnsPool() as pool:
        yield pool.new


@pytest.fixture
def netns() -> Iterator[NetnsFactory]:
    """Like `new_ns`, each netns already holding its fd (a pod cache entry), so fd counts stay put."""
    with NetnsPool(hold_fd=True) as pool:
        yield pool.new


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    """A ZDS socket path whose parent dirs do not exist yet (the server must create them)."""
    return str(tmp_path / "run" / "ztunnel" / "ztunnel.sock")


@pytest.fixture(scope="module")
def worker() -> Iterator[NetnsWorker]:
    """One NetnsWorker per module: starting a thread per test would only slow the run."""
    with NetnsWorker() as w:
        yield w
