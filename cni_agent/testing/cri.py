"""A small CRI v1 client: drive pod sandboxes over a runtime's gRPC socket the way kubelet does.

The e2e tests must exercise our CNI plugin through the exact path a Kubernetes node uses (kubelet →
CRI `RunPodSandbox` → containerd → libcni → our shim), without a kubelet. Only the sandbox calls are
needed, so this wraps the generated stubs for the subset in `proto/cri/api.proto` and fills in the
request fields kubelet would (metadata, labels, log directory, Linux security context defaults).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from cni_agent.testing._cri import api_pb2, api_pb2_grpc

# kubelet's well-known labels on every sandbox (pkg/kubelet/types/labels.go).
LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_UID = "io.kubernetes.pod.uid"

READY = "SANDBOX_READY"
NOT_READY = "SANDBOX_NOTREADY"


class CriError(RuntimeError):
    """A CRI call failed: `code` is the gRPC status name, `details` the runtime's error text."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"CRI {method} failed: {code}: {details}")
        self.method, self.code, self.details = method, code, details


class SandboxStatus(NamedTuple):
    """What the tests need from PodSandboxStatus; `netns` is "" when the runtime does not expose it."""

    state: str
    ip: str
    netns: str


def netns_from_info(info: Mapping[str, str]) -> str:
    """containerd's verbose status carries the OCI runtime spec as JSON; the netns is in it."""
    for raw in info.values():
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        spec = doc.get("runtimeSpec") if isinstance(doc, dict) else None
        namespaces: Any = (spec or {}).get("linux", {}).get("namespaces", [])
        for ns in namespaces if isinstance(namespaces, list) else []:
            if isinstance(ns, dict) and ns.get("type") == "network" and ns.get("path"):
                return str(ns["path"])
    return ""


class CriClient:
    """Blocking client; `log_root` and `cgroup_parent` play kubelet's role for every sandbox created."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout: float = 60.0,
        log_root: Path | None = None,
        cgroup_parent: str = "",
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.log_root = log_root
        self.cgroup_parent = cgroup_parent
        self._channel = grpc.insecure_channel(f"unix://{self.socket_path}")
        self._runtime = api_pb2_grpc.RuntimeServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self._runtime, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") and exc.code() is not None else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise CriError(method, str(code), str(details or "")) from None

    def version(self, timeout: float | None = None) -> api_pb2.VersionResponse:
        resp: api_pb2.VersionResponse = self._call("Version", api_pb2.VersionRequest(version="v1"), timeout)
        return resp

    def sandbox_config(
        self,
        name: str,
        namespace: str,
        uid: str,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        dns: api_pb2.DNSConfig | None = None,
        attempt: int = 0,
    ) -> api_pb2.PodSandboxConfig:
        """The PodSandboxConfig kubelet builds for a plain pod (no host network, no special profile)."""
        log_dir = ""
        if self.log_root is not None:
            path = self.log_root / f"{namespace}_{name}_{uid}"
            path.mkdir(parents=True, exist_ok=True)
            log_dir = str(path)
        all_labels = {
            **(labels or {}),
            LABEL_POD_NAME: name,
            LABEL_POD_NAMESPACE: namespace,
            LABEL_POD_UID: uid,
        }
        all_annotations = {"kubernetes.io/config.source": "api", **(annotations or {})}
        security = api_pb2.LinuxSandboxSecurityContext(
            namespace_options=api_pb2.NamespaceOption(
                network=api_pb2.POD, pid=api_pb2.CONTAINER, ipc=api_pb2.POD
            ),
            # kubelet's default when the pod names no seccomp profile.
            seccomp=api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.Unconfined),
        )
        linux = api_pb2.LinuxPodSandboxConfig(security_context=security)
        if self.cgroup_parent:
            linux.cgroup_parent = f"{self.cgroup_parent.rstrip('/')}/pod{uid}"
        config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=attempt),
            hostname=name[:63],
            log_directory=log_dir,
            labels=all_labels,
            annotations=all_annotations,
            linux=linux,
        )
        if dns is not None:
            config.dns_config.CopyFrom(dns)
        return config

    def run_pod_sandbox(
        self,
        name: str,
        namespace: str,
        uid: str,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        dns: api_pb2.DNSConfig | None = None,
        runtime_handler: str = "",
        timeout: float | None = None,
    ) -> str:
        """Create and start a sandbox (CNI ADD runs inside this call); returns the sandbox id."""
        config = self.sandbox_config(name, namespace, uid, labels=labels, annotations=annotations, dns=dns)
        req = api_pb2.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        resp: api_pb2.RunPodSandboxResponse = self._call("RunPodSandbox", req, timeout)
        return resp.pod_sandbox_id

    def stop_pod_sandbox(self, sandbox_id: str, timeout: float | None = None) -> None:
        """Kill the sandbox and tear its network down (CNI DEL with the netns)."""
        self._call("StopPodSandbox", api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout)

    def remove_pod_sandbox(self, sandbox_id: str, timeout: float | None = None) -> None:
        """Forget the sandbox (containerd runs CNI DEL again, possibly without a netns)."""
        self._call("RemovePodSandbox", api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout)

    def pod_sandbox_status_raw(
        self, sandbox_id: str, verbose: bool = True
    ) -> api_pb2.PodSandboxStatusResponse:
        req = api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose)
        resp: api_pb2.PodSandboxStatusResponse = self._call("PodSandboxStatus", req)
        return resp

    def pod_sandbox_status(self, sandbox_id: str) -> SandboxStatus:
        resp = self.pod_sandbox_status_raw(sandbox_id, verbose=True)
        state = api_pb2.PodSandboxState.Name(resp.status.state)
        return SandboxStatus(state, resp.status.network.ip, netns_from_info(resp.info))

    def list_pod_sandboxes(self) -> list[api_pb2.PodSandbox]:
        resp: api_pb2.ListPodSandboxResponse = self._call("ListPodSandbox", api_pb2.ListPodSandboxRequest())
        return list(resp.items)
