"""The no-cluster pod source: pods known from CNI requests, persisted in the run dir.

Persisting lets a restarted agent replay the full snapshot to ztunnel (so running proxies survive
the restart) without any API server. Writes are atomic (temp file + rename), so an agent crash
mid-write leaves the previous registry, never a torn one. No fsync: it guards only against the
node itself crashing, after which every recorded netns is gone anyway (and the run dir is usually
tmpfs); on a disk-backed run dir it cost ~1 ms per pod, on the event loop.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import structlog

from cni_agent.pods.model import Pod

log = structlog.get_logger(__name__)

FORMAT_VERSION = 1


NetnsId = tuple[int, int]


def _pod_to_json(pod: Pod, netns_id: NetnsId | None) -> dict[str, Any]:
    return {
        "netns_id": list(netns_id) if netns_id else None,
        "uid": pod.uid,
        "name": pod.name,
        "namespace": pod.namespace,
        "service_account": pod.service_account,
        "ips": list(pod.ips),
        "annotations": dict(pod.annotations),
        "netns_path": pod.netns_path,
        "container_id": pod.container_id,
    }


def _pod_from_json(obj: dict[str, Any]) -> tuple[Pod, NetnsId | None]:
    raw_id = obj.get("netns_id")
    netns_id = (int(raw_id[0]), int(raw_id[1])) if isinstance(raw_id, list) and len(raw_id) == 2 else None
    return Pod(
        uid=str(obj["uid"]),
        name=str(obj.get("name", "")),
        namespace=str(obj.get("namespace", "")),
        service_account=str(obj.get("service_account", "")),
        ips=tuple(str(ip) for ip in obj.get("ips", ())),
        annotations={str(k): str(v) for k, v in dict(obj.get("annotations", {})).items()},
        netns_path=str(obj.get("netns_path", "")),
        container_id=str(obj.get("container_id", "")),
    ), netns_id


class LocalRegistry:
    """The registry file. `save` is called on every ADD and DEL with the whole node's pods, so each
    pod's record is serialized once and reused while the same pod object is saved again: a save
    costs a string join over the node's pods, not a JSON encoding of all of them."""

    def __init__(self, path: Path) -> None:
        self._records: dict[str, tuple[Pod, NetnsId | None, str]] = {}
        self.path = path

    def load(self) -> list[tuple[Pod, NetnsId | None]]:
        """Read the registry: each pod with the (st_dev, st_ino) of the netns it was enrolled in.

        A missing file is an empty node; a corrupt one is kept aside and reported.
        """
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            aside = self.path.with_suffix(".corrupt")
            os.replace(self.path, aside)
            log.error(
                "local registry unreadable; starting empty",
                path=str(self.path),
                kept_as=str(aside),
                error=str(exc),
            )
            return []
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            log.error("local registry has an unknown format; ignoring it", path=str(self.path))
            return []
        return [_pod_from_json(p) for p in data.get("pods", [])]

    def save(self, pods: list[tuple[Pod, NetnsId | None]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records: dict[str, tuple[Pod, NetnsId | None, str]] = {}
        for pod, netns_id in pods:
            known = self._records.get(pod.uid)
            if known is not None and known[0] is pod and known[1] == netns_id:
                records[pod.uid] = known
            else:
                text = json.dumps(_pod_to_json(pod, netns_id), separators=(",", ":"))
                records[pod.uid] = (pod, netns_id, text)
        body = (f'{{"version":{FORMAT_VERSION},"pods":['
                + ",".join(records[uid][2] for uid in sorted(records)) + "]}")
        fd, tmp = tempfile.mkstemp(prefix=".local-pods.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(body + "\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._records = records
