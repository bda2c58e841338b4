"""Health and metrics endpoints of a real agent process."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cni_agent.testing.agentproc import AgentProcess
from cni_agent.testing.ztunnel import FakeZtunnel

pytestmark = pytest.mark.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_health_and_metrics(workdir: Path) -> None:
    hp, mp = free_port(), free_port()
    agent = AgentProcess(workdir, extra_args=["--health-port", str(hp), "--metrics-port", str(mp)]).start()
    peer = FakeZtunnel(str(agent.ztunnel_socket))
    try:
        assert get(f"http://127.0.0.1:{hp}/healthz") == (200, "ok\n")
        assert get(f"http://127.0.0.1:{hp}/readyz") == (200, "ready\n")
        assert get(f"http://127.0.0.1:{hp}/nope")[0] == 404
        status, body = get(f"http://127.0.0.1:{mp}/metrics")
        assert status == 200
        assert "ztunnel_connected 0.0" in body
        peer.start()
        peer.wait_until(lambda z: z.snapshot_received, 5)
        _, body = get(f"http://127.0.0.1:{mp}/metrics")
        assert "ztunnel_connected 1.0" in body
        backend = (agent.run_dir / "rules-backend").read_text().strip()
        assert f'cni_agent_rules_backend{{backend="{backend}"}} 1.0' in body
    finally:
        peer.stop()
        assert agent.stop() == 0, agent.log()
