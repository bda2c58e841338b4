"""The no-cluster pod source: pods known from CNI requests, persisted in the run dir.

Persisting lets a restarted agent replay the full snapshot to ztunnel (so running proxies survive
the restart) without any API server. Writes are atomic (temp file + fsync + rename) so a crash
mid-write leaves the previous registry, never a torn one.
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
    def __init__(self, path: Path) -> None:
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
        records = [_pod_to_json(p, i) for p, i in sorted(pods, key=lambda e: e[0].uid)]
        body = json.dumps({"version": FORMAT_VERSION, "pods": records}, indent=1)
        fd, tmp = tempfile.mkstemp(prefix=".local-pods.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(body + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
