"""A throwaway "node" for tests and the demo: a node netns, pod netns wired by the real CNI plugins.

Everything lives in namespaces this helper creates: the node netns holds the bridge and the veth
host ends, so the host's own network is never touched and deleting the namespaces cleans up all.
The chain is what a runtime would run: Debian's `loopback`, then `bridge` + `host-local` followed
by our `ambient-cni` shim, exec'd with the CNI protocol by `CniRunner`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_agent.testing.cniexec import CniRunner

SYSTEM_CNI_DIR = "/usr/lib/cni"


@dataclass
class NodePod:
    name: str
    namespace: str
    uid: str
    container_id: str
    netns_name: str
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns_name}"

    @property
    def ip(self) -> str:
        for entry in self.result.get("ips", []):
            addr = str(entry.get("address", ""))
            if addr:
                return addr.split("/", 1)[0]
        return ""

    @property
    def args(self) -> dict[str, str]:
        return {
            "IgnoreUnknown": "1",
            "K8S_POD_NAMESPACE": self.namespace,
            "K8S_POD_NAME": self.name,
            "K8S_POD_INFRA_CONTAINER_ID": self.container_id,
            "K8S_POD_UID": self.uid,
        }


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


class LocalNode:
    """Create with `with LocalNode(...) as node:`; `node.add_pod(...)` runs the full CNI ADD chain."""

    def __init__(
        self,
        workdir: Path,
        shim: Path,
        agent_socket: Path,
        *,
        subnet: str = "10.250.0.0/24",
        exclude_namespaces: tuple[str, ...] = ("kube-system",),
        cni_version: str = "1.0.0",
    ) -> None:
        self.workdir = workdir
        self.shim = shim
        self.agent_socket = agent_socket
        self.subnet = ipaddress.ip_network(subnet)
        tag = secrets.token_hex(3)
        self.tag = tag
        self.node_netns = f"acni-node-{tag}"
        self.bin_dir = workdir / "cni-bin"
        self.conflist: dict[str, Any] = {
            "cniVersion": cni_version,
            "name": "acni-local",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "acni0",
                    "isGateway": True,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.subnet)}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(workdir / "ipam"),
                    },
                },
                {
                    "type": "ambient-cni",
                    "agent_socket": str(agent_socket),
                    "exclude_namespaces": list(exclude_namespaces),
                    "pod_namespace": "istio-system",
                    "pod_name_prefix": "ambient-cni-node-",
                    "log_level": "info",
                },
            ],
        }
        self.loopback: dict[str, Any] = {
            "cniVersion": cni_version,
            "name": "cni-loopback",
            "plugins": [{"type": "loopback"}],
        }
        self.runner = CniRunner([str(self.bin_dir), SYSTEM_CNI_DIR], node_netns=self.node_netns)
        self.pods: list[NodePod] = []
        self._netns: list[str] = []
        self._lock = threading.Lock()  # pods may be added and removed from several threads at once
        self._serial = 0

    @property
    def gateway(self) -> str:
        return str(next(self.subnet.hosts()))

    def __enter__(self) -> LocalNode:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bin_dir.mkdir(exist_ok=True)
        link = self.bin_dir / "ambient-cni"
        if not link.exists():
            link.symlink_to(self.shim.resolve())
        (self.workdir / "conflist.json").write_text(json.dumps(self.conflist, indent=1))
        self._add_netns(self.node_netns)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._netns.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add_pod(self, name: str, namespace: str = "default", uid: str = "") -> NodePod:
        """Create a pod sandbox netns and run the ADD chain; the pod is recorded even if ADD fails.

        Pass the `uid` of an earlier pod to model kubelet re-creating a pod's sandbox.
        """
        with self._lock:
            pod = NodePod(
                name=name,
                namespace=namespace,
                uid=uid or str(uuid.uuid4()),
                container_id=secrets.token_hex(32),
                netns_name=f"acni-{self.tag}-{self._serial}",
            )
            self._serial += 1
            self.pods.append(pod)
            self._netns.append(pod.netns_name)
        _ip("netns", "add", pod.netns_name)
        self.runner.add(self.loopback, pod.container_id, pod.netns_path, "lo", pod.args)
        pod.result = self.runner.add(self.conflist, pod.container_id, pod.netns_path, "eth0", pod.args)
        return pod

    def remove_pod(self, pod: NodePod) -> None:
        """DEL as containerd does at sandbox stop, then drop the netns."""
        self.runner.delete(
            self.conflist, pod.container_id, pod.netns_path, "eth0", pod.args, pod.result or None
        )
        self.runner.delete(self.loopback, pod.container_id, pod.netns_path, "lo", pod.args)
        with self._lock:
            if pod in self.pods:
                self.pods.remove(pod)
        self._del_netns(pod.netns_name)

    def exec(self, netns: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, **kw)

    def _del_netns(self, name: str) -> None:
        with self._lock:
            if name in self._netns:
                self._netns.remove(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)

    def close(self) -> None:
        """Best-effort DEL for every pod (so IPAM and the agent see it), then delete all namespaces."""
        for pod in list(self.pods):
            try:
                self.remove_pod(pod)
            except Exception:
                self._del_netns(pod.netns_name)
        for name in list(self._netns):
            self._del_netns(name)
        shutil.rmtree(self.workdir / "ipam", ignore_errors=True)


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/var/run/netns/{name}")
