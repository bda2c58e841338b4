"""A whole local node in one object: agent process, CNI-wired node, ztunnel-like peer.

Shared by the integration tests and `cni-agent demo` so both exercise exactly the same path: the
runtime-style CNI chain → our shim → a real `cni-agent run --pod-source local` → real rules and a
real ZDS peer that listens inside each pod.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from cni_agent.redirect.netns import NetnsWorker, open_netns
from cni_agent.testing.agentproc import AgentProcess
from cni_agent.testing.node import LocalNode, NodePod
from cni_agent.testing.ztunnel import FakeZtunnel


def wait_for(pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll `pred` until true or `timeout`; returns its last value (callers assert with context)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


class LocalEnv:
    def __init__(self, workdir: Path, shim: Path, *, agent_args: tuple[str, ...] = ()) -> None:
        self.agent = AgentProcess(workdir / "ag", extra_args=agent_args)
        self.node = LocalNode(workdir / "node", shim, self.agent.plugin_socket)
        self.ztunnel = FakeZtunnel(str(self.agent.ztunnel_socket))
        self.worker = NetnsWorker()

    def start(self, timeout: float = 10.0, progress: Callable[[str], None] = lambda _msg: None) -> LocalEnv:
        """Node first, then the agent, then the peer; ready once the peer has its first snapshot."""
        self.node.__enter__()
        progress(f"node netns {self.node.node_netns}, bridge acni0, pod subnet {self.node.subnet}")
        self.agent.start()
        progress(f"cni-agent ready (local mode), plugin socket {self.agent.plugin_socket}")
        self.ztunnel.start()
        if not wait_for(lambda: self.ztunnel.snapshot_received, timeout):
            raise TimeoutError(f"the ztunnel peer got no snapshot within {timeout}s:\n{self.agent.log()}")
        progress("ztunnel-like peer connected: hello sent, snapshot acked")
        return self

    def close(self) -> None:
        """Pods get their DEL (so IPAM and the agent see it), then everything else stops."""
        self.node.close()
        self.ztunnel.stop()
        self.agent.stop()
        self.worker.close()

    def __enter__(self) -> LocalEnv:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, netns_path: str, dst: tuple[str, int], timeout: float = 3.0) -> None:
        """A real TCP connect from inside `netns_path` (on the netns worker thread)."""
        fd = open_netns(netns_path)
        try:

            def dial() -> None:
                with socket.create_connection(dst, timeout=timeout):
                    pass

            self.worker.call(fd, dial)
        finally:
            os.close(fd)

    @property
    def node_netns_path(self) -> str:
        return f"/var/run/netns/{self.node.node_netns}"

    def istio_rules(self, pod: NodePod) -> list[str]:
        """Our rules in the pod as `iptables-legacy-save` shows them, table-prefixed."""
        lines: list[str] = []
        for table in ("mangle", "nat", "raw"):
            out = self.node.exec(pod.netns_name, ["iptables-legacy-save", "-t", table]).stdout
            lines += [f"{table}: {ln}" for ln in out.splitlines() if ln.startswith("-A") and "ISTIO_" in ln]
        return lines
