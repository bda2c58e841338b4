"""The CNI contract through a real runtime: containerd 1.6 runs our chain as kubelet's CRI calls drive it.

Nothing here execs the shim directly (tests/integration/test_shim.py does that): containerd builds the
plugin's stdin, `CNI_ARGS` and netns, and decides what a failed ADD means. We check the outcomes a
cluster would see: sandboxes become ready only when redirected and acked, teardown releases them,
and with the agent down enrolled pods are held back while excluded pods and deletions still work.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni_agent.testing.agentproc import AgentProcess
from cni_agent.testing.containerd import SUBNET, ContainerdHarness
from cni_agent.testing.cri import LABEL_POD_UID, READY, CriError
from cni_agent.testing.ztunnel import FakeZtunnel

pytestmark = [pytest.mark.root, pytest.mark.e2e]


@dataclass
class E2E:
    ctd: ContainerdHarness
    agent: AgentProcess
    ztunnel: FakeZtunnel

    def registry(self) -> list[dict[str, Any]]:
        path = self.agent.run_dir / "local-pods.json"
        if not path.exists():
            return []
        pods: list[dict[str, Any]] = json.loads(path.read_text())["pods"]
        return pods


@pytest.fixture
def e2e(containerd: ContainerdHarness, e2e_dir: Path) -> Iterator[E2E]:
    agent = AgentProcess(e2e_dir / "agent", extra_args=["--rules-backend", "iptables-legacy"])
    assert agent.plugin_socket == containerd.agent_socket
    shutil.rmtree(agent.run_dir, ignore_errors=True)  # no registry carried over from the previous test
    agent.start()
    ztunnel = FakeZtunnel(str(agent.ztunnel_socket))
    ztunnel.start()
    env = E2E(containerd, agent, ztunnel)
    try:
        ztunnel.wait_until(lambda z: z.snapshot_received, 10, "the agent's first snapshot")
        yield env
    finally:
        # Pods go first, while the agent (if still running) sees their DELs.
        errors = containerd.remove_all_pods()
        ztunnel.stop()
        agent.stop()
        assert not errors, f"sandbox cleanup failed: {errors}"


def wait(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def istio_rules(netns: str) -> list[str]:
    """Our rules inside a pod netns, whichever backend the agent picked."""
    lines: list[str] = []
    for table in ("mangle", "nat", "raw"):
        out = subprocess.run(["nsenter", f"--net={netns}", "iptables-legacy-save", "-t", table],
                             capture_output=True, text=True, check=True).stdout
        lines += [f"{table}: {ln}" for ln in out.splitlines() if "ISTIO_" in ln]
    if not lines:
        out = subprocess.run(["nsenter", f"--net={netns}", "nft", "list", "ruleset"],
                             capture_output=True, text=True, check=False).stdout
        lines = [f"nft: {ln.strip()}" for ln in out.splitlines() if "ISTIO_" in ln or "istio" in ln]
    return lines


def new_uid() -> str:
    return str(uuid.uuid4())


def sandboxes_of(ctd: ContainerdHarness, uid: str) -> list[str]:
    return [s.id for s in ctd.cri.list_pod_sandboxes() if s.labels.get(LABEL_POD_UID) == uid]


def test_enrolled_pod_lifecycle(e2e: E2E) -> None:
    uid = new_uid()
    sid = e2e.ctd.run_pod("web", "demo", uid, labels={"app": "web"})

    # RunPodSandbox returned: ADD ran through containerd, the rules and the ztunnel ack came first.
    status = e2e.ctd.cri.pod_sandbox_status(sid)
    assert status.state == READY
    assert ipaddress.ip_address(status.ip) in ipaddress.ip_network(SUBNET)
    assert status.netns.startswith("/var/run/netns/cni-"), status
    assert uid in e2e.ztunnel.running_uids(), e2e.agent.log()[-3000:]
    info = e2e.ztunnel.running[uid].info
    assert (info.name, info.namespace) == ("web", "demo")
    rules = istio_rules(status.netns)
    chains = {"ISTIO_PRERT", "ISTIO_OUTPUT"}
    assert all(any(c in r for r in rules) for c in chains), rules
    assert any("REDIRECT" in r and "15001" in r for r in rules), rules

    # The agent learnt the pod from containerd's CNI_ARGS/env: its sandbox id, netns and IP.
    [entry] = [p for p in e2e.registry() if p["uid"] == uid]
    assert (entry["name"], entry["namespace"]) == ("web", "demo")
    assert entry["container_id"] == sid
    assert entry["netns_path"] == status.netns
    assert entry["ips"] == [status.ip]

    # StopPodSandbox: containerd runs DEL (with the netns); ztunnel drains the pod, the agent forgets it.
    e2e.ctd.cri.stop_pod_sandbox(sid)
    e2e.ztunnel.wait_until(lambda z: uid not in z.running, 10, "pod drained after StopPodSandbox")
    assert wait(lambda: all(p["uid"] != uid for p in e2e.registry())), e2e.registry()
    # RemovePodSandbox: containerd repeats DEL (netns already gone); must succeed and change nothing.
    e2e.ctd.cri.remove_pod_sandbox(sid)
    assert sandboxes_of(e2e.ctd, uid) == []
    assert not os.path.exists(status.netns)
    with pytest.raises(CriError) as err:
        e2e.ctd.cri.pod_sandbox_status(sid)
    assert err.value.code == "NOT_FOUND"
    assert e2e.agent.alive()


def test_excluded_namespace_pod_is_not_enrolled(e2e: E2E) -> None:
    uid = new_uid()
    sid = e2e.ctd.run_pod("coredns", "kube-system", uid)
    status = e2e.ctd.cri.pod_sandbox_status(sid)
    assert status.state == READY
    assert ipaddress.ip_address(status.ip) in ipaddress.ip_network(SUBNET)
    assert istio_rules(status.netns) == []
    assert uid not in e2e.ztunnel.running_uids()
    assert all(p["uid"] != uid for p in e2e.registry())
    e2e.ctd.remove_pod(sid)
    assert sandboxes_of(e2e.ctd, uid) == []


def test_agent_down_holds_enrolled_pods_but_not_excluded_ones_or_deletion(e2e: E2E) -> None:
    before_uid = new_uid()
    before = e2e.ctd.run_pod("before", "demo", before_uid)
    assert before_uid in e2e.ztunnel.running_uids()
    assert e2e.agent.stop() == 0, e2e.agent.log()[-3000:]

    # An enrolled pod must not start unredirected: ADD fails closed with our code-11 text naming the socket.
    held_uid = new_uid()
    with pytest.raises(CriError) as err:
        e2e.ctd.run_pod("held", "demo", held_uid)
    text = err.value.details
    assert f"ambient-cni agent unreachable at {e2e.agent.plugin_socket}" in text, text
    assert "pod demo/held" in text, text
    assert 'plugin type="ambient-cni"' in text, text
    # containerd tore the failed sandbox down, which needs our DEL to succeed without the agent.
    assert sandboxes_of(e2e.ctd, held_uid) == []

    # An excluded namespace does not depend on the agent.
    sys_uid = new_uid()
    sys_sid = e2e.ctd.run_pod("coredns", "kube-system", sys_uid)
    status = e2e.ctd.cri.pod_sandbox_status(sys_sid)
    assert status.state == READY and status.ip, status
    assert istio_rules(status.netns) == []

    # Deleting pods never waits for the agent: Stop + Remove succeed for the enrolled and the excluded pod.
    before_netns = e2e.ctd.cri.pod_sandbox_status(before).netns
    e2e.ctd.remove_pod(before)
    e2e.ctd.remove_pod(sys_sid)
    assert sandboxes_of(e2e.ctd, before_uid) == [] and sandboxes_of(e2e.ctd, sys_uid) == []
    assert not os.path.exists(before_netns)
