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
import sys
import tempfile
import time
from pathlib import Path

from cni_agent.ops import logging as ops_logging
from cni_agent.testing.cniexec import CniExecError
from cni_agent.testing.localenv import LocalEnv, wait_for
from cni_agent.testing.node import NodePod

DEMO_PODS = (("client", "demo"), ("server", "demo"), ("coredns", "kube-system"))


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


def _report(env: LocalEnv, pods: dict[str, NodePod]) -> bool:
    """Print per pod what an operator asks first; True when every expectation holds."""
    ok = True
    for pod in pods.values():
        running = env.ztunnel.running.get(pod.uid)
        rules = len(env.istio_rules(pod))
        enrolled = running is not None or rules > 0
        say(f"  {pod.namespace}/{pod.name} ({pod.ip})")
        say(f"    enrolled:        {'yes' if enrolled else 'no (namespace excluded)'}")
        say(f"    rules installed: {f'yes, {rules} rules ({env.backend})' if rules else 'no'}")
        say(f"    ztunnel acked:   {'yes' if running is not None else 'no'}")
        for seen in running.listeners.intercepted if running is not None else []:
            say(
                f"    intercepted:     {seen.peer[0]}:{seen.peer[1]} -> port {seen.port}, "
                f"original destination {seen.original_dst[0]}:{seen.original_dst[1]}"
            )
        want = pod.namespace != "kube-system"
        ok &= enrolled == want and (running is not None) == want
    return ok


def run_demo(plugin: Path, keep_logs: bool = False) -> int:
    ops_logging.configure("warning")  # the report is the output; the agent's own log goes to a file
    problem = _check_prereqs(plugin)
    if problem:
        print(f"cni-agent demo: {problem}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="cni-agent-demo-"))
    env = LocalEnv(workdir, plugin)
    ok = False
    try:
        say(f"==> throwaway node in {workdir}")
        env.start(progress=lambda msg: say(f"    {msg}"))

        say("==> creating pods (loopback, bridge + host-local, then ambient-cni)")
        pods: dict[str, NodePod] = {}
        for name, ns in DEMO_PODS:
            t0 = time.monotonic()
            try:
                pods[name] = env.node.add_pod(name, ns)
            except CniExecError as exc:
                raise RuntimeError(f"CNI ADD for {ns}/{name} failed: {exc}") from exc
            say(f"    {ns}/{name}: ADD ok in {(time.monotonic() - t0) * 1000:.0f} ms, ip {pods[name].ip}")

        say("==> traffic")
        client, server, outsider = pods["client"], pods["server"], pods["coredns"]
        env.connect(client.netns_path, (server.ip, 8080))
        say(f"    {'demo/client':<21}-> {server.ip}:8080  (outbound from an enrolled pod)")
        env.connect(outsider.netns_path, (server.ip, 80))
        say(f"    {'kube-system/coredns':<21}-> {server.ip}:80    (inbound to an enrolled pod)")
        with env.listen(server.netns_path, 8081) as app:
            env.connect(env.node_netns_path, (server.ip, 8081))
            probe_src = app.accept()[1][0]
        say(
            f"    {'node (kubelet probe)':<21}-> {server.ip}:8081  "
            f"reached the app from {probe_src} (SNAT, not captured)"
        )
        out_ok = env.ztunnel.running[client.uid].listeners.wait_for(lambda s: s.port == 15001, 3)
        in_ok = env.ztunnel.running[server.uid].listeners.wait_for(lambda s: s.port == 15006, 3)

        say("==> report")
        ok = _report(env, pods)
        ok &= out_ok.original_dst == (server.ip, 8080) and in_ok.original_dst == (server.ip, 80)
        ok &= probe_src == "169.254.7.127"

        say("==> deleting pods (CNI DEL)")
        for pod in list(pods.values()):
            env.node.remove_pod(pod)
        if not wait_for(lambda: not env.ztunnel.running, 5):
            raise RuntimeError(f"ztunnel still runs {sorted(env.ztunnel.running)} after DEL")
        say("    ztunnel dropped every pod")
    except KeyboardInterrupt:
        say("\ninterrupted: cleaning up")
        ok = False
    except Exception as exc:
        print(f"cni-agent demo failed: {exc}", file=sys.stderr)
        ok = False
    finally:
        _cleanup(env, workdir, show_log=keep_logs or not ok)
    say("==> demo " + ("succeeded" if ok else "FAILED") + "; nothing left behind")
    return 0 if ok else 1


def _cleanup(env: LocalEnv, workdir: Path, *, show_log: bool) -> None:
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abort the cleanup
    try:
        env.close()
        if show_log:
            print("---- agent log (tail) ----\n" + env.agent.log()[-8000:], file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    finally:
        signal.signal(signal.SIGINT, old)
