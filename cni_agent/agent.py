"""The orchestrator: the order of operations for adding and removing pods, startup and shutdown.

It owns no sockets and no kernel state itself; it sequences the adapters (dataplane, ZDS server,
pod cache, pod source) and turns their failures into the two kinds of errors that cross the CNI
boundary: temporary (code 11, the runtime retries) and permanent (code 7, bad netns or rules).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from cni_agent.cni.request import CniError, CniRequest
from cni_agent.config import Settings
from cni_agent.local.registry import LocalRegistry
from cni_agent.pods.cache import PodCache
from cni_agent.pods.model import Pod
from cni_agent.pods.netnspath import NetnsPathError, host_netns_path
from cni_agent.pods.policy import Decision, local_decision
from cni_agent.redirect.dataplane import Dataplane, DataplaneError
from cni_agent.redirect.hostprobe import DisabledHostProbe, HostProbe
from cni_agent.redirect.netns import netns_identity, open_netns
from cni_agent.redirect.rules import RuleSettings, settings_from_annotations
from cni_agent.zds.protocol import WorkloadInfo, ZdsError
from cni_agent.zds.server import SnapshotEntry

log = structlog.get_logger(__name__)

# CNI error codes we emit (cni.md §8).
CODE_INVALID_ENV = 4
CODE_INVALID_CONFIG = 7
CODE_TRY_AGAIN = 11
CODE_NOT_AVAILABLE = 50


class Ztunnels(Protocol):
    """What the orchestrator needs from the ZDS server (cni_agent.zds.server.ZdsServer)."""

    async def add_workload(self, uid: str, info: WorkloadInfo, netns_fd: int) -> None: ...
    async def del_workload(self, uid: str) -> None: ...

    @property
    def connected(self) -> int: ...


@dataclass
class PodStatus:
    """What `status`/`inspect` report per pod: the three facts an operator asks first."""

    enrolled: bool = False
    rules: bool = False
    ztunnel_acked: bool = False
    last_error: str = ""


@dataclass
class Agent:
    settings: Settings
    dataplane: Dataplane
    ztunnels: Ztunnels
    registry: LocalRegistry
    cache: PodCache = field(default_factory=PodCache)
    probe: HostProbe = field(default_factory=DisabledHostProbe)
    open_netns: Callable[[str], int] = open_netns
    status: dict[str, PodStatus] = field(default_factory=dict)
    ready: bool = False
    _locks: dict[str, tuple[asyncio.Lock, list[int]]] = field(default_factory=dict)
    _host_ids: set[tuple[int, int]] | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def restore(self) -> None:
        """Reload the local registry so the first ztunnel snapshot names every pod we enrolled.

        A pod whose netns is gone died while we were down (its DEL never reached us): forget it
        rather than put a stale pod in a snapshot (agent-behaviour.md §15.11). Surviving pods get
        their rules re-applied, which is a no-op when they are intact and a repair when not.
        """
        kept = 0
        for pod, saved_id in self.registry.load():
            try:
                fd = self._open_pod_netns(pod)
            except CniError as exc:
                log.info(
                    "dropping pod whose netns is gone",
                    pod=str(pod.ref),
                    uid=pod.uid,
                    netns=pod.netns_path,
                    error=exc.msg,
                )
                continue
            if saved_id is not None and netns_identity(fd) != saved_id:
                # the path now names another namespace (e.g. a reused /proc/<pid>): never touch it
                os.close(fd)
                log.info(
                    "dropping pod whose netns was replaced",
                    pod=str(pod.ref),
                    uid=pod.uid,
                    netns=pod.netns_path,
                )
                continue
            cached = self.cache.upsert(pod, fd)
            assert cached.netns_fd is not None
            try:
                await self.dataplane.install(cached.netns_fd, self._rule_settings(pod))
            except DataplaneError as exc:
                log.error("could not re-apply rules for restored pod", uid=pod.uid, error=str(exc))
                self.status[pod.uid] = PodStatus(enrolled=True, last_error=str(exc))
            else:
                self.status[pod.uid] = PodStatus(enrolled=True, rules=True)
            kept += 1
        self._persist()
        log.info("local registry restored", pods=kept)
        await self._sync_probes()

    async def _sync_probes(self) -> None:
        """Reconcile the probe address set with the enrolled pods (never a flush: probes keep working).

        Pruning is skipped while any enrolled pod has no IP yet, so its entry is not removed by mistake.
        """
        pods = [e.pod for e in self.cache.entries()]
        wanted = {ip: pod.uid for pod in pods for ip in pod.ips}
        prune = all(pod.ips for pod in pods)
        report = await asyncio.to_thread(self.probe.sync, wanted, prune=prune)
        log.info(
            "probe set reconciled",
            upserted=len(report.upserted),
            pruned=len(report.pruned),
            prune_skipped=report.prune_skipped,
        )

    def mark_ready(self) -> None:
        self.ready = True

    def snapshot(self) -> list[SnapshotEntry]:
        """Every cached pod, for a (re)connecting ztunnel: Add with fd when known, else Keep."""
        return [
            SnapshotEntry(uid=e.pod.uid, info=_workload_info(e.pod), netns_fd=e.netns_fd)
            for e in self.cache.entries()
        ]

    def close(self) -> None:
        self.cache.close()

    # ---- CNI handler (cni_agent.cni.server.CniHandler) ---------------------------------------

    async def cni_add(self, req: CniRequest) -> None:
        pod = pod_from_request(req)
        decision = self._decide(pod, req)
        if not decision.enroll:
            log.info("pod not enrolled", pod=str(pod.ref), reason=decision.reason)
            return
        async with self._pod_lock(pod.uid):
            await self._add(pod)

    async def cni_del(self, req: CniRequest) -> None:
        uid = self._uid_for(req)
        if uid is None:
            return
        async with self._pod_lock(uid):
            await self._remove(uid, pod_deleted=True)

    async def cni_check(self, req: CniRequest) -> None:
        uid = self._uid_for(req) or ""
        async with self._pod_lock(uid):  # a concurrent DEL must not close the fd under verify
            entry = self.cache.get(uid) if uid else None
            if entry is None:
                pod = pod_from_request(req)
                if not self._decide(pod, req).enroll:
                    return
                raise CniError(
                    CODE_TRY_AGAIN, f"pod {pod.ref} is not enrolled", "the agent has no record of this pod"
                )
            if entry.netns_fd is None or not await self.dataplane.verify(
                entry.netns_fd, self._rule_settings(entry.pod)
            ):
                raise CniError(
                    CODE_TRY_AGAIN,
                    f"pod {entry.pod.ref}: redirect rules missing or different",
                    "restarting the agent re-applies every enrolled pod's rules; see `cni-agent inspect`",
                )
            st = self.status.get(entry.pod.uid)
            if st is None or not st.ztunnel_acked:
                raise CniError(
                    CODE_TRY_AGAIN,
                    f"pod {entry.pod.ref}: ztunnel has not acknowledged it",
                    st.last_error if st else "",
                )

    async def cni_status(self) -> None:
        if not self.ready:
            raise CniError(
                CODE_NOT_AVAILABLE, "cni-agent is starting", "ADD requests will be served once ready"
            )

    async def cni_gc(self, req: CniRequest, valid: list[tuple[str, str]]) -> None:
        keep = {cid for cid, _ifname in valid}
        for entry in self.cache.entries():
            cid = entry.pod.container_id
            if cid and cid not in keep:
                async with self._pod_lock(entry.pod.uid):
                    await self._remove(entry.pod.uid, pod_deleted=True)

    # ---- flows -------------------------------------------------------------------------------

    async def _add(self, pod: Pod) -> None:
        """agent-behaviour.md §4: netns → routes+rules → cache → ztunnel Add (ack) → probe set.

        The pod enters the cache (which feeds every ztunnel snapshot) only once its rules are in
        place, so no ztunnel ever gets an Add for a pod whose traffic is not yet redirected.
        The "pod enrolled" line carries each step's milliseconds: where a slow pod start went.
        """
        steps = _Stopwatch()
        fd = self._open_pod_netns(pod)
        steps.lap("netns_ms")
        try:
            await self.dataplane.install(fd, self._rule_settings(pod))
        except DataplaneError as exc:
            os.close(fd)
            raise CniError(
                CODE_INVALID_CONFIG,
                f"pod {pod.ref}: installing redirect rules failed: {exc}",
                "the pod was not enrolled; see the agent log",
            ) from exc
        except BaseException:
            os.close(fd)
            raise
        cached = self.cache.upsert(pod, fd)
        assert cached.netns_fd is not None
        st = self.status.setdefault(pod.uid, PodStatus())
        st.enrolled = True
        st.rules = True
        steps.lap("rules_ms")
        self._persist()
        steps.lap("persist_ms")
        try:
            await self.ztunnels.add_workload(pod.uid, _workload_info(pod), cached.netns_fd)
        except ZdsError as exc:
            if not exc.retryable:
                # ztunnel can never take this pod as it is (e.g. a name over the protocol's limits):
                # retrying would loop forever, so fail for good and forget it.
                self._forget(pod.uid)
                raise CniError(
                    CODE_INVALID_CONFIG,
                    f"pod {pod.ref}: {exc}",
                    "ztunnel cannot accept this pod; it was not enrolled",
                ) from exc
            st.ztunnel_acked, st.last_error = False, str(exc)
            raise CniError(
                CODE_TRY_AGAIN,
                f"pod {pod.ref}: {exc}",
                "rules are in place; the runtime will retry once a ztunnel is connected and acks",
            ) from exc
        st.ztunnel_acked, st.last_error = True, ""
        steps.lap("ztunnel_ms")
        try:
            for ip in pod.ips:
                await self.probe.upsert_async(ip, pod.uid)
        except Exception as exc:
            st.last_error = f"probe set: {exc}"
            raise CniError(
                CODE_TRY_AGAIN,
                f"pod {pod.ref}: updating the probe address set failed: {exc}",
                "kubelet probes would not be SNATed; the runtime will retry",
            ) from exc
        steps.lap("probe_ms")
        log.info("pod enrolled", pod=str(pod.ref), uid=pod.uid, netns=pod.netns_path, ips=list(pod.ips),
                 **steps.laps)

    async def _remove(self, uid: str, *, pod_deleted: bool) -> None:
        """agent-behaviour.md §5: probe set → in-pod rules (live pods only) → forget → ztunnel Del.

        For a deleted pod the rules die with its netns. The pod leaves the cache *before* the Del
        goes out, so a ztunnel that connects (or is resynced) meanwhile never gets it back in a
        snapshot; the netns fd is kept until rule deletion is done.
        """
        entry = self.cache.get(uid)
        if entry is None:
            log.debug("DEL for unknown pod", uid=uid)
        for ip in entry.pod.ips if entry is not None else ():
            try:
                await self.probe.remove_async(ip, uid)
            except Exception as exc:
                log.warning("could not remove pod IP from the probe set", uid=uid, ip=ip, error=str(exc))
        if entry is not None and not pod_deleted and entry.netns_fd is not None:
            await self.dataplane.uninstall(entry.netns_fd)
        if entry is not None:
            self._forget(uid)
        try:
            await self.ztunnels.del_workload(uid)
        except ZdsError as exc:
            log.warning(
                "ztunnel did not confirm removal; its next snapshot will drop the pod",
                uid=uid,
                error=str(exc),
            )
        if entry is not None:
            log.info("pod removed", pod=str(entry.pod.ref), uid=uid)

    # ---- helpers -----------------------------------------------------------------------------

    @asynccontextmanager
    async def _pod_lock(self, uid: str) -> AsyncIterator[None]:
        """ADD, DEL and audits of one pod never interleave; different pods run in parallel."""
        lock, users = self._locks.setdefault(uid, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:  # nobody holds or waits for it: do not keep one lock per pod ever seen
                del self._locks[uid]

    def _decide(self, pod: Pod, req: CniRequest) -> Decision:
        """The agent's exclusions and the ones in the request's conflist entry both apply."""
        return local_decision(
            pod,
            exclude_namespaces=self.settings.exclude_namespaces | frozenset(req.settings.exclude_namespaces),
            own_namespace=req.settings.pod_namespace,
            own_name_prefix=req.settings.pod_name_prefix,
        )

    def _persist(self) -> None:
        self.registry.save([(e.pod, e.netns_id) for e in self.cache.entries()])

    def _forget(self, uid: str) -> None:
        self.cache.forget(uid)
        self.status.pop(uid, None)
        self._persist()

    def _uid_for(self, req: CniRequest) -> str | None:
        """The pod a DEL/CHECK is about, or None when it names another sandbox of the pod.

        A pod keeps its UID across sandbox re-creations and containerd repeats DEL for the old
        sandbox at removal: that DEL must not remove the pod's current sandbox from ztunnel.
        """
        uid = req.pod_uid or self.cache.find_container(req.container_id) or req.container_id
        entry = self.cache.get(uid) if uid else None
        if entry is not None and req.container_id and entry.pod.container_id not in ("", req.container_id):
            log.info(
                "request names an older sandbox of this pod; leaving the current one alone",
                command=req.command,
                uid=uid,
                request_container=req.container_id,
                current_container=entry.pod.container_id,
            )
            return None
        return uid or None

    def _rule_settings(self, pod: Pod) -> RuleSettings:
        settings, warnings = settings_from_annotations(pod.annotations, self.settings.dns_capture)
        for warning in warnings:
            log.warning("ignoring pod annotation", pod=str(pod.ref), problem=warning)
        return settings

    def _open_pod_netns(self, pod: Pod) -> int:
        """Open the pod's netns, refusing paths outside the netns roots and the host's own netns.

        Installing pod rules into the host (or the agent's) netns would capture the whole node's
        traffic (agent-behaviour.md §15.12), so identity is checked after opening, on the fd.
        """
        if not pod.netns_path:
            raise CniError(
                CODE_INVALID_ENV, f"pod {pod.ref}: CNI_NETNS is empty", "ADD needs the pod's netns path"
            )
        try:
            path = host_netns_path(
                pod.netns_path, prefix=self.settings.netns_host_prefix, host_proc=str(self.settings.host_proc)
            )
        except (NetnsPathError, OSError) as exc:
            raise CniError(
                CODE_INVALID_ENV, f"pod {pod.ref}: {exc}", "CNI_NETNS must name the pod's netns"
            ) from exc
        try:
            fd = self.open_netns(path)
        except (OSError, ValueError) as exc:
            raise CniError(
                CODE_INVALID_CONFIG,
                f"pod {pod.ref}: cannot open netns {pod.netns_path}: {exc}",
                "CNI_NETNS must name the pod's network namespace",
            ) from exc
        if netns_identity(fd) in self._host_netns_ids():
            os.close(fd)
            raise CniError(
                CODE_INVALID_CONFIG,
                f"pod {pod.ref}: CNI_NETNS {pod.netns_path} is the host's network namespace",
                "refusing to install pod redirection on the node itself",
            )
        return fd

    def _host_netns_ids(self) -> set[tuple[int, int]]:
        """The host's and the agent's own netns; they do not change, so looked up once."""
        if self._host_ids is None:
            ids = set()
            for path in (f"{self.settings.host_proc}/1/ns/net", "/proc/self/ns/net", "/proc/1/ns/net"):
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                ids.add((st.st_dev, st.st_ino))
            self._host_ids = ids
        return self._host_ids


def pod_from_request(req: CniRequest) -> Pod:
    """Local mode identity: the K8S_POD_* args when present, otherwise the container id."""
    return Pod(
        uid=req.pod_uid or req.container_id,
        name=req.pod_name or req.container_id,
        namespace=req.pod_namespace,
        ips=req.ips,
        netns_path=req.netns,
        container_id=req.container_id,
    )


def _workload_info(pod: Pod) -> WorkloadInfo:
    return WorkloadInfo(name=pod.name, namespace=pod.namespace, service_account=pod.service_account)


class _Stopwatch:
    """Milliseconds per named step, for the enrolment log line."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round((now - self._last) * 1000, 2)
        self._last = now
