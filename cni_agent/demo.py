"""`cni-agent demo`: the agent's main job on a throwaway node, end to end, with no cluster.

It builds a node netns with a bridge, creates pod namespaces wired by Debian's CNI plugins and our
shim (exactly the chain a runtime runs), starts the agent in local mode and a ztunnel-like peer,
opens real TCP connections and reports, per pod, what happened. Everything it creates lives in
namespaces and a temp dir it removes again, also on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cni_agent.ops import logging as ops_logging
from cni_agent.redirect.netns import NetnsWorker, open_netns
from cni_agent.testing.cniexec import CniExecError
from cni_agent.testing.node import LocalNode, NodePod
from cni_agent.testing.ztunnel import FakeZtunnel


def say(msg: str) -> None:
    print(msg, flush=True)


def _check_prereqs(plugin: Path) -> str | None:
    if os.geteuid() != 0:
        return "the demo creates network namespaces and iptables rules: run it as root (sudo make demo)"
    if not plugin.exists():
        return f"the CNI shim is not built at {plugin}: run `make plugin` (or `make demo`, which builds it)"
    for tool in ("ip", "iptables-legacy-save"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: `make deps` installs iproute2 and iptables"
    if not Path("/usr/lib/cni/bridge").exists():
        return (
            "Debian's CNI plugins are missing (/usr/lib/cni/bridge): "
            "`make deps` installs containernetworking-plugins"
        )
    return None


def _connect(worker: NetnsWorker, netns_path: str, dst: tuple[str, int]) -> None:
    fd = open_netns(netns_path)
    try:

        def dial() -> None:
            with socket.create_connection(dst, timeout=3):
                pass

        worker.call(fd, dial)
    finally:
        os.close(fd)


def _rules_installed(node: LocalNode, pod: NodePod) -> int:
    total = 0
    for table in ("mangle", "nat", "raw"):
        out = node.exec(pod.netns_name, ["iptables-legacy-save", "-t", table]).stdout
        total += sum(1 for line in out.splitlines() if line.startswith("-A") and "ISTIO_" in line)
    return total


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def run_demo(plugin: Path, keep_logs: bool = False) -> int:
    ops_logging.configure("warning")  # the report is the output; the agent's own log goes to a file
    problem = _check_prereqs(plugin)
    if problem:
        print(f"cni-agent demo: {problem}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="cni-agent-demo-"))
    run_dir, zsock = workdir / "run", workdir / "ztunnel" / "ztunnel.sock"
    agent_log = workdir / "agent.log"
    agent: subprocess.Popen[bytes] | None = None
    ztunnel: FakeZtunnel | None = None
    worker = NetnsWorker()
    node = LocalNode(workdir / "node", plugin, run_dir / "plugin.sock")
    ok = False
    try:
        say(f"==> throwaway node in {workdir}")
        node.__enter__()
        say(f"    node netns {node.node_netns}, bridge acni0, pod subnet {node.subnet}")
        say("==> starting cni-agent (local mode)")
        with agent_log.open("wb") as logf:
            agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cni_agent",
                    "run",
                    "--pod-source",
                    "local",
                    "--run-dir",
                    str(run_dir),
                    "--ztunnel-socket",
                    str(zsock),
                    "--metrics-port",
                    "0",
                    "--health-port",
                    "0",
                    "--rules-backend",
                    "iptables-legacy",
                ],
                stdout=logf,
                stderr=logf,
                start_new_session=True,
            )
        _wait(
            lambda: (run_dir / "ready").exists() or agent.poll() is not None, 20, "the agent to become ready"
        )
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited with {agent.returncode}; log:\n{agent_log.read_text()}")
        say(f"    ready: plugin socket {run_dir / 'plugin.sock'}")
        say("==> starting the ztunnel-like peer")
        ztunnel = FakeZtunnel(str(zsock))
        ztunnel.start()
        _wait(lambda: ztunnel is not None and ztunnel.snapshot_received, 10, "the ztunnel peer's snapshot")
        say("    connected, hello sent, snapshot acked")

        say("==> creating pods (loopback, bridge + host-local, then ambient-cni)")
        pods: dict[str, NodePod] = {}
        for name, ns in (("client", "demo"), ("server", "demo"), ("coredns", "kube-system")):
            t0 = time.monotonic()
            try:
                pods[name] = node.add_pod(name, ns)
            except CniExecError as exc:
                raise RuntimeError(f"CNI ADD for {ns}/{name} failed: {exc}") from exc
            say(f"    {ns}/{name}: ADD ok in {(time.monotonic() - t0) * 1000:.0f} ms, ip {pods[name].ip}")

        say("==> traffic")
        client, server = pods["client"], pods["server"]
        _connect(worker, client.netns_path, (server.ip, 8080))
        say(f"    client -> {server.ip}:8080")
        _connect(worker, f"/var/run/netns/{node.node_netns}", (server.ip, 80))
        say(f"    node   -> {server.ip}:80")
        time.sleep(0.2)

        say("==> report")
        ok = True
        for pod in pods.values():
            running = ztunnel.running.get(pod.uid)
            rules = _rules_installed(node, pod)
            enrolled = running is not None or rules > 0
            say(f"  {pod.namespace}/{pod.name} ({pod.ip})")
            say(f"    enrolled:        {'yes' if enrolled else 'no (namespace excluded)'}")
            say(f"    rules installed: {f'yes, {rules} ISTIO_* rules' if rules else 'no'}")
            say(f"    ztunnel acked:   {'yes' if running is not None else 'no'}")
            for seen in running.listeners.intercepted if running is not None else []:
                say(
                    f"    intercepted:     {seen.peer[0]}:{seen.peer[1]} -> port {seen.port}, "
                    f"original destination {seen.original_dst[0]}:{seen.original_dst[1]}"
                )
            want_enrolled = pod.namespace != "kube-system"
            ok &= enrolled == want_enrolled and (running is not None) == want_enrolled
        ok &= any(
            s.port == 15001 and s.original_dst == (server.ip, 8080)
            for s in ztunnel.running[client.uid].listeners.intercepted
        )
        ok &= any(
            s.port == 15006 and s.original_dst == (server.ip, 80)
            for s in ztunnel.running[server.uid].listeners.intercepted
        )

        say("==> deleting pods (CNI DEL)")
        for pod in list(pods.values()):
            node.remove_pod(pod)
        _wait(lambda: ztunnel is not None and not ztunnel.running, 5, "ztunnel to drop the pods")
        say("    ztunnel dropped every pod")
    except KeyboardInterrupt:
        say("\ninterrupted: cleaning up")
        ok = False
    except Exception as exc:
        print(f"cni-agent demo failed: {exc}", file=sys.stderr)
        ok = False
    finally:
        _cleanup(node, ztunnel, agent, worker, workdir, agent_log, show_log=keep_logs or not ok)
    say("==> demo " + ("succeeded" if ok else "FAILED") + "; nothing left behind")
    return 0 if ok else 1


def _cleanup(
    node: LocalNode,
    ztunnel: FakeZtunnel | None,
    agent: subprocess.Popen[Any] | None,
    worker: NetnsWorker,
    workdir: Path,
    agent_log: Path,
    *,
    show_log: bool,
) -> None:
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abort the cleanup
    try:
        node.close()
        if ztunnel is not None:
            ztunnel.stop()
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
        worker.close()
        if show_log and agent_log.exists():
            print("---- agent log ----\n" + agent_log.read_text()[-8000:], file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    finally:
        signal.signal(signal.SIGINT, old)
