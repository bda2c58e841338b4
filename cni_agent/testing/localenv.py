"""A whole local node in one object: agent process, CNI-wired node, ztunnel-like peer.

Shared by the integration tests and `cni-agent demo` so both exercise exactly the same path: the
runtime-style CNI chain → our shim → a real `cni-agent run --pod-source local` → real rules and a
real ZDS peer that listens inside each pod.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from cni_agent.redirect.backend import STATE_FILE
from cni_agent.redirect.netns import NetnsWorker, open_netns
from cni_agent.testing.agentproc import AgentProcess
from cni_agent.testing.node import LocalNode, NodePod
from cni_agent.testing.ztunnel import FakeZtunnel

# Our rules in a pod with the default settings (IPv4 + IPv6, DNS capture on), as istio_rules() counts them:
# iptables: Block A (18 rules incl. jumps) in iptables plus its IPv6 twin in ip6tables;
# nft: Block F/G in inet tables: nat 2 jumps + 14, mangle 2 + 2, raw 2 + 2.
EXPECTED_RULES = {"iptables-legacy": 36, "nftables": 24}


def wait_for(pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll `pred` until true or `timeout`; returns its last value (callers assert with context)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


class LocalEnv:
    def __init__(
        self, workdir: Path, shim: Path, *, rules_backend: str = "auto", agent_args: tuple[str, ...] = ()
    ) -> None:
        agent_dir = workdir / "ag"
        self.node = LocalNode(workdir / "node", shim, AgentProcess(agent_dir).plugin_socket)
        # The agent runs inside the node netns: its "host" side (probe SNAT, probe sets) is the node's.
        self.agent = AgentProcess(
            agent_dir, extra_args=("--rules-backend", rules_backend, *agent_args), netns=self.node.node_netns
        )
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

    def listen(self, netns_path: str, port: int) -> socket.socket:
        """A plain TCP listener (an "app") inside `netns_path`; the socket stays in that netns."""
        fd = open_netns(netns_path)
        try:

            def bind() -> socket.socket:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("0.0.0.0", port))
                sock.listen(16)
                sock.settimeout(5)
                return sock

            return self.worker.call(fd, bind)
        finally:
            os.close(fd)

    @property
    def node_netns_path(self) -> str:
        return f"/var/run/netns/{self.node.node_netns}"

    @property
    def backend(self) -> str:
        """The backend the agent chose (it persists the choice in its run dir)."""
        return (self.agent.run_dir / STATE_FILE).read_text().strip()

    def istio_rules(self, pod: NodePod) -> list[str]:
        """Our rules in the pod, one line each, from whichever backend the agent uses."""
        lines: list[str] = []
        if self.backend == "nftables":
            out = self.node.exec(pod.netns_name, ["nft", "-j", "list", "ruleset"]).stdout
            for obj in json.loads(out or '{"nftables": []}')["nftables"]:
                rule = obj.get("rule")
                if rule and str(rule.get("table", "")).startswith("istio-ambient-"):
                    lines.append(f"{rule['table']} {rule['chain']}: {json.dumps(rule['expr'])}")
            return lines
        for save in ("iptables-legacy-save", "ip6tables-legacy-save"):
            for table in ("mangle", "nat", "raw"):
                out = self.node.exec(pod.netns_name, [save, "-t", table]).stdout
                lines += [
                    f"{save} {table}: {ln}"
                    for ln in out.splitlines()
                    if ln.startswith("-A") and "ISTIO_" in ln
                ]
        return lines

    def break_rules(self, pod: NodePod) -> None:
        """Flush our outbound chain by hand, as a careless operator or another agent might."""
        argv = (
            ["nft", "flush", "chain", "inet", "istio-ambient-nat", "istio-output"]
            if self.backend == "nftables"
            else ["iptables-legacy", "-t", "nat", "-F", "ISTIO_OUTPUT"]
        )
        self.node.exec(pod.netns_name, argv, check=True)
