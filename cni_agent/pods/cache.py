"""The pod cache: pod UID → what we know, including the open netns fd.

The fd is held for the pod's whole life because every ztunnel (re)connection needs a fresh dup of it
for the snapshot (zds.md §8.13). The cache is the single owner of those fds: it closes an fd exactly
when its entry is replaced by another netns or forgotten, which is what keeps the agent leak-free.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from cni_agent.pods.model import Pod
from cni_agent.redirect.netns import netns_identity


@dataclass(slots=True)
class CachedPod:
    pod: Pod
    netns_fd: int | None = None
    netns_id: tuple[int, int] | None = None  # (st_dev, st_ino): how ztunnel identifies a netns


class PodCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, CachedPod] = {}

    def upsert(self, pod: Pod, netns_fd: int | None) -> CachedPod:
        """Record `pod`; takes ownership of `netns_fd`.

        If the cached entry already points at the same netns, the new fd is closed and the old one
        kept (so ztunnel sees a stable netns); a different netns replaces and closes the old fd.
        """
        new_id = netns_identity(netns_fd) if netns_fd is not None else None
        to_close: int | None = None
        with self._lock:
            entry = self._pods.get(pod.uid)
            if entry is None:
                entry = CachedPod(pod, netns_fd, new_id)
                self._pods[pod.uid] = entry
            else:
                entry.pod = pod
                if netns_fd is not None:
                    if entry.netns_id == new_id and entry.netns_fd is not None:
                        to_close = netns_fd
                    else:
                        to_close, entry.netns_fd, entry.netns_id = entry.netns_fd, netns_fd, new_id
            result = CachedPod(entry.pod, entry.netns_fd, entry.netns_id)
        if to_close is not None:
            os.close(to_close)
        return result

    def get(self, uid: str) -> CachedPod | None:
        with self._lock:
            entry = self._pods.get(uid)
            return None if entry is None else CachedPod(entry.pod, entry.netns_fd, entry.netns_id)

    def find_container(self, container_id: str) -> str | None:
        if not container_id:
            return None
        with self._lock:
            for uid, entry in self._pods.items():
                if entry.pod.container_id == container_id:
                    return uid
        return None

    def forget(self, uid: str) -> bool:
        """Drop the entry and close its fd; forgetting an unknown uid is harmless."""
        with self._lock:
            entry = self._pods.pop(uid, None)
        if entry is None:
            return False
        if entry.netns_fd is not None:
            os.close(entry.netns_fd)
        return True

    def entries(self) -> list[CachedPod]:
        """A copy taken under the lock; fds stay owned by the cache."""
        with self._lock:
            return [CachedPod(e.pod, e.netns_fd, e.netns_id) for e in self._pods.values()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._pods)

    def close(self) -> None:
        with self._lock:
            entries, self._pods = list(self._pods.values()), {}
        for entry in entries:
            if entry.netns_fd is not None:
                os.close(entry.netns_fd)
