"""What the agent knows about a pod, independent of where it learned it (CNI request, API, /proc).

Pure data: no I/O. Every other layer speaks in these types, so the pod sources (local registry,
Kubernetes watch) and the dataplane never need to know about each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PodRef:
    """Human-facing identity of a pod; the uid is the key everywhere else."""

    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod as the agent needs it to enrol it.

    `netns_path` is where the pod's network namespace can be opened (host path, already prefixed
    for a containerised agent); `ips` are plain addresses (no prefix length).
    """

    uid: str
    name: str
    namespace: str
    service_account: str = ""
    ips: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    netns_path: str = ""
    container_id: str = ""
    host_network: bool = False

    @property
    def ref(self) -> PodRef:
        return PodRef(self.namespace, self.name, self.uid)
