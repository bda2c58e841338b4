"""Which pods the agent enrols: pure decisions, so every pod source (local, Kubernetes) agrees.

Local mode knows pods only from CNI requests: every pod outside the excluded namespaces is enrolled,
except the agent's own pods (enrolling them would make the agent depend on itself to start).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from cni_agent.pods.model import Pod


@dataclass(frozen=True, slots=True)
class Decision:
    enroll: bool
    reason: str


def local_decision(
    pod: Pod,
    *,
    exclude_namespaces: Collection[str],
    own_namespace: str = "",
    own_name_prefix: str = "",
) -> Decision:
    if pod.host_network:
        return Decision(False, "host-network pod")
    if (
        own_namespace
        and own_name_prefix
        and pod.namespace == own_namespace
        and pod.name.startswith(own_name_prefix)
    ):
        return Decision(False, "the agent's own pod")
    if pod.namespace in exclude_namespaces:
        return Decision(False, f"namespace {pod.namespace} is excluded")
    return Decision(True, "local mode enrols every pod outside excluded namespaces")


DEFAULT_NETNS_ROOTS: tuple[str, ...] = ("/var/run/netns", "/run/netns")


def netns_path_allowed(
    resolved: str, *, roots: Iterable[str] = DEFAULT_NETNS_ROOTS, proc: str = "/proc"
) -> bool:
    """Is an already *resolved* (realpath) netns path one we are willing to open?

    Only bind-mounted namespaces under the runtime's netns dirs or a process's `ns/net` qualify: a
    CNI request must not make the agent open (and hand to ztunnel) arbitrary files.
    """
    norm = os.path.normpath(resolved)
    if norm != resolved or not os.path.isabs(resolved):
        return False
    for root in roots:
        root = os.path.normpath(root)
        parent, _, name = norm.rpartition("/")
        if parent == root and name not in ("", ".", ".."):
            return True
    proc = os.path.normpath(proc)
    parts = norm[len(proc) + 1 :].split("/") if norm.startswith(proc + "/") else []
    if len(parts) == 3 and parts[0].isdigit() and parts[1:] == ["ns", "net"]:
        return True
    return (
        len(parts) == 5
        and parts[0].isdigit()
        and parts[1] == "task"
        and parts[2].isdigit()
        and parts[3:]
        == [
            "ns",
            "net",
        ]
    )
