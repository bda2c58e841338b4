"""Fixtures for the containerd e2e tests: the built shim, one private containerd per module, a real agent.

containerd is started once per module (its cleanup walks mounts and processes); the agent and the
ztunnel-like peer are per test (see the test module) so that tests can stop them. The agent's socket
path is fixed per module because it is written into containerd's conflist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_agent.testing.agentproc import AgentProcess
from cni_agent.testing.containerd import ContainerdHarness

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "build" / "bin" / "ambient-cni"


@pytest.fixture(scope="session")
def shim() -> Path:
    """The shim as `make plugin` builds it; rebuilt when a Go source is newer than the binary."""
    sources = list((REPO / "plugin").glob("*.go"))
    if not SHIM.exists() or any(s.stat().st_mtime > SHIM.stat().st_mtime for s in sources):
        SHIM.parent.mkdir(parents=True, exist_ok=True)
        go = shutil.which("go") or "/usr/local/go/bin/go"
        subprocess.run([go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(SHIM), "."],
                       cwd=REPO / "plugin", check=True, env={**os.environ, "CGO_ENABLED": "0"})
    return SHIM


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short paths: Unix socket paths must fit in 108 bytes.
    return Path(tmp_path_factory.mktemp("e2e", numbered=True))


@pytest.fixture(scope="module")
def containerd(e2e_dir: Path, shim: Path) -> Iterator[ContainerdHarness]:
    agent_socket = AgentProcess(e2e_dir / "agent").plugin_socket
    # start() raises ContainerdError with the log tail: the tests error out, they never skip.
    harness = ContainerdHarness(e2e_dir / "ctd", shim=shim, agent_socket=agent_socket).start()
    try:
        yield harness
    finally:
        harness.close()
