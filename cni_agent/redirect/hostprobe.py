"""Host-side kubelet probe SNAT and the probe address sets (spec redirect-rules.md §9).

Kubelet probes come from a local host socket; without help they would be captured in-pod and sent
through ztunnel like any other inbound connection. So the host SNATs packets from local sockets to
enrolled pod IPs onto a fixed link-local source, and the in-pod rules ACCEPT that source before the
15006 REDIRECT. Forwarded traffic (kube-proxy, other nodes) has no local socket, keeps its source and
is captured as usual. Which pod IPs are "enrolled" is kept in a set (ipset `hash:ip` or nft set) whose
element comment is the pod UID, so a late DEL for an old pod cannot remove the entry of a new pod that
got the same IP.

Two backends behind the `HostProbe` protocol, matching the in-pod backend (spec §10 rule 3):
- `IptablesHostProbe`: nat `ISTIO_POSTRT` via python-iptables (one libiptc commit per family, so the
  old rules are replaced without a window), set writes through netlink with pyroute2's `IPSet`.
  Netlink instead of the `ipset` CLI: no fork/exec per pod, no binary needed in the image, errors
  as codes, and the socket binds to the netns of the thread that opens it (the worker's host thread).
- `NftHostProbe`: host table `inet istio-ambient-nat`, writes through libnftables' JSON API (one
  transaction per operation; JSON so a pod UID never has to be quoted into nft syntax). nft cannot
  express `--socket-exists`, so it matches the kubelet's socket UID, discovered from /proc.
Both read their sets over raw netlink (`ipset_list_entries`, `nft_set_entries`): every DEL reads
the whole set (the UID guard needs the comments) and the libraries' decoders cost 1-5 ms there.

All kernel work runs on the NetnsWorker's host thread: libiptc caches are process-wide and the
worker serialises them with in-pod work. The ipset socket, the libnftables context and the raw read
socket are opened on that thread inside a host job, so they bind to the host netns, and are then
kept: closing a netfilter socket in a netns where nf_tables just deleted something waits ~15 ms
(engineering notes). The sync methods block until the job is done (from asyncio, use
`asyncio.to_thread`); `upsert_async`/`remove_async` await the worker directly.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import iptc  # python-iptables
import structlog
from pyroute2 import NetlinkError
from pyroute2.ipset import IPSet

from cni_agent.redirect import nlattr, nldump
from cni_agent.redirect.iptc import RulesError, build_iptc_rule, existing_tables, iptc_session
from cni_agent.redirect.rules import (
    HOST_CHAIN_POSTRT,
    NFT_TABLE_NAT,
    PROBE_SET_V4,
    PROBE_SET_V6,
    PROBE_SNAT_IPV4,
    PROBE_SNAT_IPV6,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

BACKEND_IPTABLES = "iptables-legacy"
BACKEND_NFTABLES = "nftables"

NFT_HOST_CHAIN = "postrouting"
NFT_HOST_PRIORITY = 100
MAX_UID_LEN = 128
"""nft element comments are limited to 128 bytes (ipset allows 255); Kubernetes UIDs are 36."""

KUBELET_COMMS = frozenset({"kubelet", "kubelite"})
FALLBACK_KUBELET_UID = 0
"""No kubelet process found: kubelet runs as root in virtually every distribution, and uid 0 is
the closest nft equivalent of iptables' `--socket-exists` for it. A warning is logged; operators
with a rootless kubelet set `HostProbeConfig.kubelet_uid`."""


class HostProbeError(Exception):
    """A host probe rule or set operation failed; says which and what the kernel answered."""


@dataclass(frozen=True)
class HostProbeConfig:
    """Every knob of the host probe; defaults are the spec's constants."""

    enabled: bool = True
    ipv6: bool = False
    snat_ipv4: str = PROBE_SNAT_IPV4
    snat_ipv6: str = PROBE_SNAT_IPV6
    set_v4: str = PROBE_SET_V4
    set_v6: str = PROBE_SET_V6
    chain: str = HOST_CHAIN_POSTRT
    nft_table: str = NFT_TABLE_NAT
    kubelet_uid: int | None = None
    """nft only: the socket UID to SNAT; None = discover from `proc_root`."""
    proc_root: str = "/proc"

    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv6 else (4,)

    def set_name(self, family: int) -> str:
        return self.set_v4 if family == 4 else self.set_v6

    def snat(self, family: int) -> str:
        return self.snat_ipv4 if family == 4 else self.snat_ipv6


@dataclass(frozen=True)
class SyncReport:
    """What a startup reconcile changed (for the log line)."""

    upserted: tuple[str, ...] = ()
    pruned: tuple[str, ...] = ()
    prune_skipped: bool = False


# --- pure helpers --------------------------------------------------------------------------------


def normalize_ip(ip: str) -> tuple[int, str]:
    """(family, canonical text); v4-mapped IPv6 (::ffff:a.b.c.d) is unmapped, as the spec requires."""
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError as exc:
        raise ValueError(f"not an IP address: {ip!r}") from exc
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:  # a zone makes no sense in a set element
            raise ValueError(f"pod IP must not carry a zone: {ip!r}")
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
    return addr.version, str(addr)


def check_uid(uid: str) -> str:
    """Pod UIDs become set comments: non-empty, printable, short enough for both backends."""
    if not uid or len(uid.encode()) > MAX_UID_LEN or not uid.isprintable():
        raise ValueError(f"pod UID {uid!r} cannot be a probe set comment (1-{MAX_UID_LEN} printable bytes)")
    return uid


def plan_sync(
    current: Mapping[str, str], wanted: Mapping[str, str], *, prune: bool
) -> tuple[dict[str, str], list[str]]:
    """(entries to upsert, IPs to delete) turning `current` into `wanted`; keys are canonical IPs."""
    upserts = {ip: uid for ip, uid in wanted.items() if current.get(ip) != uid}
    deletes = sorted(ip for ip in current if ip not in wanted) if prune else []
    return upserts, deletes


def iptables_host_rule(family: int, config: HostProbeConfig = HostProbeConfig()) -> tuple[str, ...]:
    """Tokens after `-A ISTIO_POSTRT` (spec §9), in the spec's order."""
    return ("-m", "owner", "--socket-exists", "-p", "tcp", "-m", "set", "--match-set",
            config.set_name(family), "dst", "-j", "SNAT", "--to-source", config.snat(family))


def render_iptables_host_restore(family: int, config: HostProbeConfig = HostProbeConfig()) -> str:
    """The spec's `iptables-restore --noflush` input for the host rule of one family."""
    lines = ["* nat", f"-N {config.chain}", f"-I POSTROUTING 1 -j {config.chain}",
             " ".join(("-A", config.chain, *iptables_host_rule(family, config))), "COMMIT"]
    return "".join(f"{line}\n" for line in lines)


def render_nft_host_text(uid: int, config: HostProbeConfig = HostProbeConfig()) -> str:
    """The spec's nft text for the host rules (golden form; the backend sends the JSON twin)."""
    t = f"inet {config.nft_table}"
    lines = [f"add table {t}", f"flush table {t}",
             f"add chain {t} {NFT_HOST_CHAIN} {{ type nat hook postrouting priority {NFT_HOST_PRIORITY} ; }}"]
    for family in config.families():
        ip = "ip" if family == 4 else "ip6"
        lines.append(f"add rule {t} {NFT_HOST_CHAIN} meta l4proto tcp skuid {uid} {ip} daddr "
                     f"@{config.set_name(family)} counter snat to {config.snat(family)}")
    return "".join(f"{line}\n" for line in lines)


def _nft_obj(config: HostProbeConfig, **extra: Any) -> dict[str, Any]:
    return {"family": "inet", "table": config.nft_table, **extra}


def nft_host_rule(family: int, uid: int, config: HostProbeConfig = HostProbeConfig()) -> dict[str, Any]:
    """JSON form of one spec §9 nft rule."""
    proto = "ip" if family == 4 else "ip6"
    expr = [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": uid}},
        {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "daddr"}},
                   "right": f"@{config.set_name(family)}"}},
        {"counter": None},
        {"snat": {"family": proto, "addr": config.snat(family)}},
    ]
    return {"add": {"rule": _nft_obj(config, chain=NFT_HOST_CHAIN, expr=expr)}}


def nft_install_batch(uid: int, config: HostProbeConfig = HostProbeConfig()) -> dict[str, Any]:
    """One transaction: drop the old chain whatever its hook spec, recreate it, keep the sets' elements.

    `flush table` would not be enough (a chain with another priority cannot be redefined) and the
    spec forbids emptying the sets at startup; deleting only the chain does both right.
    """
    chain = _nft_obj(config, name=NFT_HOST_CHAIN)
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": "inet", "name": config.nft_table}}},
        {"add": {"chain": dict(chain)}},  # exists-ok guard so the delete below cannot fail
        {"flush": {"chain": dict(chain)}},
        {"delete": {"chain": dict(chain)}},
        {"add": {"chain": {**chain, "type": "nat", "hook": "postrouting", "prio": NFT_HOST_PRIORITY,
                           "policy": "accept"}}},
        {"add": {"set": _nft_obj(config, name=config.set_v4, type="ipv4_addr")}},
        {"add": {"set": _nft_obj(config, name=config.set_v6, type="ipv6_addr")}},
    ]
    cmds.extend(nft_host_rule(family, uid, config) for family in config.families())
    return {"nftables": cmds}


def nft_upsert_batch(
    family: int, ip: str, uid: str, config: HostProbeConfig = HostProbeConfig()
) -> dict[str, Any]:
    """Replace an element atomically: ensure it exists, delete it, add it with the new comment.

    nft has no "replace element" and `add` keeps the old comment of an existing element.
    """
    name = config.set_name(family)
    return {"nftables": [
        {"add": {"element": _nft_obj(config, name=name, elem=[ip])}},
        {"delete": {"element": _nft_obj(config, name=name, elem=[ip])}},
        {"add": {"element": _nft_obj(config, name=name, elem=[{"elem": {"val": ip, "comment": uid}}])}},
    ]}


def parse_nft_set_elements(doc: Mapping[str, Any]) -> dict[str, str]:
    """{canonical IP: comment} from `nft -j list set` output; uncommented elements map to "".

    The agent itself reads sets over netlink (`nft_set_entries`); this parses nft's own listing,
    which tests and operators' tooling compare against."""
    out: dict[str, str] = {}
    for item in doc.get("nftables", ()):
        nft_set = item.get("set") if isinstance(item, Mapping) else None
        if not isinstance(nft_set, Mapping):
            continue
        for element in nft_set.get("elem", ()):
            comment = ""
            value = element
            if isinstance(element, Mapping) and isinstance(element.get("elem"), Mapping):
                value = element["elem"].get("val")
                comment = str(element["elem"].get("comment", ""))
            if isinstance(value, str):  # prefixes/ranges are not ours
                out[normalize_ip(value)[1]] = comment
    return out


# --- kubelet UID discovery (nft) --------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    """What discovery needs from one /proc/<pid>."""

    pid: int
    comm: str
    argv: tuple[str, ...]
    uid: int


def parse_status_uid(status: str) -> int | None:
    """Real UID (first field of the `Uid:` line of /proc/<pid>/status)."""
    for line in status.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1])
    return None


def parse_cmdline(raw: bytes) -> tuple[str, ...]:
    """NUL-separated argv; the trailing NUL does not make an empty argument."""
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    if not raw:
        return ()
    return tuple(arg.decode(errors="replace") for arg in raw.split(b"\0"))


def is_kubelet(proc: ProcInfo) -> bool:
    """Spec §9: comm kubelet/kubelite, any argv element containing "kubelet" (any case), or k3s.

    k3s runs the kubelet in-process and renames itself `k3s-server`/`k3s-agent`, so `k3s-*` counts.
    """
    comm = proc.comm.strip()
    if comm in KUBELET_COMMS or comm == "k3s" or comm.startswith("k3s-"):
        return True
    return any("kubelet" in arg.lower() for arg in proc.argv)


def pick_kubelet_uid(procs: Iterable[ProcInfo]) -> int | None:
    """UID of the first (lowest PID) kubelet-like process, None when there is none."""
    for proc in sorted(procs, key=lambda p: p.pid):
        if is_kubelet(proc):
            return proc.uid
    return None


def scan_proc(root: str = "/proc") -> Iterator[ProcInfo]:
    """Processes under `root` in PID order; ones that vanish or cannot be read are skipped."""
    try:
        pids = sorted(int(name) for name in os.listdir(root) if name.isdigit())
    except OSError:
        return
    for pid in pids:
        base = os.path.join(root, str(pid))
        try:
            with open(os.path.join(base, "comm")) as f:
                comm = f.read().strip()
            with open(os.path.join(base, "cmdline"), "rb") as fb:
                argv = parse_cmdline(fb.read())
            with open(os.path.join(base, "status")) as f:
                uid = parse_status_uid(f.read())
        except OSError:
            continue
        if uid is not None:
            yield ProcInfo(pid, comm, argv, uid)


def discover_kubelet_uid(root: str = "/proc") -> int | None:
    """Lazily scans, so the common case stops at the kubelet instead of reading every process."""
    for proc in scan_proc(root):
        if is_kubelet(proc):
            return proc.uid
    return None


# --- the interface -----------------------------------------------------------------------------------


class HostProbe(Protocol):
    """What the orchestrator needs from the host probe rules and set."""

    def install(self, *, retries: int = 1, retry_delay: float = 2.0) -> None:
        """Startup: remove old host rules (errors ignored), create rules and sets (set contents kept)."""

    def upsert(self, ip: str, uid: str) -> None:
        """Pod added or its IP changed: the IP's entry now carries `uid` (last writer wins)."""

    def remove(self, ip: str, uid: str) -> bool:
        """Pod removed: delete the IP's entry only if it carries `uid`; False when kept or absent."""

    async def upsert_async(self, ip: str, uid: str) -> None:
        """`upsert` from the event loop: one hop to the worker instead of two (~0.12 ms per pod)."""

    async def remove_async(self, ip: str, uid: str) -> bool:
        """`remove` from the event loop."""

    def sync(self, wanted: Mapping[str, str], *, prune: bool) -> SyncReport:
        """Startup reconcile to `wanted` ({ip: uid}); never flushes; prune only when told to."""

    def entries(self) -> dict[str, str]:
        """Current {ip: uid} across the families' sets."""

    def uninstall(self) -> None:
        """Confirmed uninstall: remove the rules, then flush and destroy the sets."""


class HostRunner(Protocol):
    """Runs a job on the thread that owns host-side kernel state (NetnsWorker.call_host/run_host)."""

    def call_host(self, fn: Callable[[], T]) -> T: ...

    async def run_host(self, fn: Callable[[], T]) -> T: ...


class _ProbeBase:
    """The semantics shared by the backends, on top of five kernel primitives run on the host thread."""

    name = "base"

    def __init__(self, worker: HostRunner, config: HostProbeConfig = HostProbeConfig()) -> None:
        self._worker = worker
        self.config = config
        self._reader = _KeptNetfilterSocket()  # set reads; used inside host jobs only

    # primitives (run inside `_host`)
    def _k_install(self) -> None:
        raise NotImplementedError

    def _k_uninstall(self) -> None:
        raise NotImplementedError

    def _k_read(self, family: int) -> dict[str, str]:
        raise NotImplementedError

    def _k_put(self, family: int, ip: str, uid: str) -> None:
        raise NotImplementedError

    def _k_delete(self, family: int, ip: str) -> None:
        raise NotImplementedError

    def _host(self, fn: Callable[[], T]) -> T:
        return self._worker.call_host(fn)

    async def _host_async(self, fn: Callable[[], T]) -> T:
        return await self._worker.run_host(fn)

    def _prepare(self) -> None:
        """Work done before install that must not run on the worker (e.g. /proc scans)."""

    # public API
    def install(self, *, retries: int = 1, retry_delay: float = 2.0) -> None:
        self._prepare()
        attempts = max(1, retries)
        for attempt in range(1, attempts + 1):
            try:
                self._host(self._k_install)
            except (HostProbeError, OSError) as exc:
                if attempt == attempts:
                    raise
                log.warning("host probe install failed; retrying", backend=self.name, attempt=attempt,
                            retries=attempts, error=str(exc))
                time.sleep(retry_delay)
            else:
                log.info("host probe rules installed", backend=self.name, ipv6=self.config.ipv6)
                return

    def upsert(self, ip: str, uid: str) -> None:
        job = self._upsert_job(ip, uid)
        if job is not None:
            self._host(job)

    def remove(self, ip: str, uid: str) -> bool:
        return self._host(self._remove_job(ip, uid))

    async def upsert_async(self, ip: str, uid: str) -> None:
        job = self._upsert_job(ip, uid)
        if job is not None:
            await self._host_async(job)

    async def remove_async(self, ip: str, uid: str) -> bool:
        return await self._host_async(self._remove_job(ip, uid))

    def _upsert_job(self, ip: str, uid: str) -> Callable[[], None] | None:
        """Validate here (caller's thread), return the host job; None when the family is off."""
        family, canon = normalize_ip(ip)
        check_uid(uid)
        if family not in self.config.families():
            log.debug("host probe: IPv6 disabled, not adding", ip=canon, uid=uid)
            return None
        return lambda: self._k_put(family, canon, uid)

    def _remove_job(self, ip: str, uid: str) -> Callable[[], bool]:
        family, canon = normalize_ip(ip)

        def job() -> bool:
            have = self._k_read(family).get(canon)
            if have is None:
                return False
            if have != uid:
                log.warning("host probe entry belongs to another pod; kept", ip=canon, uid=uid, owner=have)
                return False
            self._k_delete(family, canon)
            return True

        return job

    def sync(self, wanted: Mapping[str, str], *, prune: bool) -> SyncReport:
        normalized: dict[int, dict[str, str]] = {f: {} for f in self.config.families()}
        for ip, uid in wanted.items():
            family, canon = normalize_ip(ip)
            if family in normalized:
                normalized[family][canon] = check_uid(uid)

        def job() -> SyncReport:
            upserted: list[str] = []
            pruned: list[str] = []
            for family, want in normalized.items():
                upserts, deletes = plan_sync(self._k_read(family), want, prune=prune)
                for ip, uid in upserts.items():
                    self._k_put(family, ip, uid)
                    upserted.append(ip)
                for ip in deletes:
                    self._k_delete(family, ip)
                    pruned.append(ip)
            return SyncReport(tuple(upserted), tuple(pruned), prune_skipped=not prune)

        report = self._host(job)
        log.info("host probe set synced", backend=self.name, upserted=len(report.upserted),
                 pruned=len(report.pruned), prune_skipped=report.prune_skipped)
        return report

    def entries(self) -> dict[str, str]:
        def job() -> dict[str, str]:
            out: dict[str, str] = {}
            for family in self.config.families():
                out.update(self._k_read(family))
            return out

        return self._host(job)

    def uninstall(self) -> None:
        self._host(self._k_uninstall)
        log.info("host probe rules and sets removed", backend=self.name)


# --- iptables-legacy + ipset -------------------------------------------------------------------------


_NETLINK_ERRORS = (NetlinkError, OSError)
"""pyroute2's ipset errors (IPSetError) are NetlinkErrors carrying the kernel/ipset code."""


def _ipset_af(family: int) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


_NFNL_SUBSYS_IPSET = 6
_IPSET_CMD_LIST = 7
_IPSET_PROTOCOL = 6  # the oldest protocol every ipset kernel module still accepts
_IPSET_ATTR_PROTOCOL, _IPSET_ATTR_SETNAME, _IPSET_ATTR_DATA, _IPSET_ATTR_ADT = 1, 2, 7, 8
_IPSET_ATTR_IP, _IPSET_ATTR_COMMENT = 1, 26
_IPSET_ATTR_IPADDR_IPV4, _IPSET_ATTR_IPADDR_IPV6 = 1, 2


def _v6_key(raw: bytes) -> str:
    """A key read from an IPv6 set, in the canonical text `normalize_ip` writes. A v4-mapped key is
    NOT unmapped: it is an entry of the v6 set (never one we wrote), and deleting it must name it so."""
    return str(ipaddress.IPv6Address(raw))


def _at(buf: bytes, start: int, end: int, *path: int) -> Iterator[tuple[int, int]]:
    """Payload ranges of the attributes reached by following `path` (one type per nesting level)."""
    if not path:
        yield start, end
        return
    for kind, a0, a1 in nlattr.walk(buf, start, end):
        if kind == path[0]:
            yield from _at(buf, a0, a1, *path[1:])


def _address(raw: bytes) -> str:
    """A 4- or 16-byte set key as text; "" for anything else (not one of our entries)."""
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    return _v6_key(raw) if len(raw) == 16 else ""


def parse_ipset_list(buf: bytes, start: int, end: int) -> dict[str, str]:
    """{ip: comment} from one IPSET_CMD_LIST reply message body (pure; attributes after nfgenmsg)."""
    out: dict[str, str] = {}
    for d0, d1 in _at(buf, start, end, _IPSET_ATTR_ADT, _IPSET_ATTR_DATA):
        ip = ""
        for e0, e1 in _at(buf, d0, d1, _IPSET_ATTR_IP):
            for kind, i0, i1 in nlattr.walk(buf, e0, e1):
                if kind in (_IPSET_ATTR_IPADDR_IPV4, _IPSET_ATTR_IPADDR_IPV6):
                    ip = _address(buf[i0:i1])
        comment = next((buf[c0:c1].split(b"\0", 1)[0].decode(errors="replace")
                        for c0, c1 in _at(buf, d0, d1, _IPSET_ATTR_COMMENT)), "")
        if ip:
            out[ip] = comment
    return out


def ipset_list_entries(name: str, sock: _KeptNetfilterSocket | None = None) -> dict[str, str]:
    """{ip: comment} of one ipset in the calling thread's netns, over raw netlink.

    Why not pyroute2's `IPSet.list`: it decodes every element into message objects, ~5 ms for 120
    pods' entries against ~0.5 ms here, and the probe `remove` of every DEL reads the whole set
    (the UID check needs the comments), on the worker that also serves other pods' ADDs. Raises
    OSError with the kernel's errno (ENOENT: no such set).
    """
    body = (struct.pack("=BBH", socket.AF_INET, 0, 0)
            + nlattr.attr(_IPSET_ATTR_PROTOCOL, bytes([_IPSET_PROTOCOL]))
            + nlattr.attr(_IPSET_ATTR_SETNAME, name.encode() + b"\0"))
    entries, _gens = _netfilter_dump((_NFNL_SUBSYS_IPSET << 8) | _IPSET_CMD_LIST, body, None,
                                     parse_ipset_list, sock)
    return entries


_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_NEWSETELEM, _NFT_MSG_GETSETELEM = 12, 13
_NFTA_SET_ELEM_LIST_TABLE, _NFTA_SET_ELEM_LIST_SET, _NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
_NFTA_LIST_ELEM, _NFTA_SET_ELEM_KEY, _NFTA_SET_ELEM_FLAGS, _NFTA_SET_ELEM_USERDATA = 1, 1, 3, 6
_NFTA_DATA_VALUE = 1
_NFT_SET_ELEM_INTERVAL_END = 0x1
_NFTNL_UDATA_SET_ELEM_COMMENT = 0
_NFPROTO_INET = 1
_DUMP_RETRIES = 3


def _udata_comment(buf: bytes) -> str:
    """The comment TLV of nftnl element userdata (u8 type, u8 length, value; NUL-terminated text)."""
    pos = 0
    while pos + 2 <= len(buf):
        kind, length = buf[pos], buf[pos + 1]
        if kind == _NFTNL_UDATA_SET_ELEM_COMMENT:
            return buf[pos + 2:pos + 2 + length].split(b"\0", 1)[0].decode(errors="replace")
        pos += 2 + length
    return ""


def parse_nft_setelems(buf: bytes, start: int, end: int) -> dict[str, str]:
    """{ip: comment} from one NFT_MSG_NEWSETELEM message body (pure; attributes after nfgenmsg).
    Keys of 4 bytes are IPv4, 16 bytes IPv6; interval ends, catch-all elements (no key) and other
    key sizes are not ours and are skipped."""
    out: dict[str, str] = {}
    for l0, l1 in _at(buf, start, end, _NFTA_SET_ELEM_LIST_ELEMENTS, _NFTA_LIST_ELEM):
        keys = _at(buf, l0, l1, _NFTA_SET_ELEM_KEY, _NFTA_DATA_VALUE)
        ip = next((_address(buf[k0:k1]) for k0, k1 in keys), "")
        flag_attrs = _at(buf, l0, l1, _NFTA_SET_ELEM_FLAGS)
        flags = next((struct.unpack_from(">I", buf, f0)[0] for f0, f1 in flag_attrs if f1 - f0 == 4), 0)
        userdata = _at(buf, l0, l1, _NFTA_SET_ELEM_USERDATA)
        comment = next((_udata_comment(buf[u0:u1]) for u0, u1 in userdata), "")
        if ip and not flags & _NFT_SET_ELEM_INTERVAL_END:
            out[ip] = comment
    return out


def nft_set_entries(table: str, name: str, sock: _KeptNetfilterSocket | None = None) -> dict[str, str]:
    """{ip: comment} of one `inet` nft set in the calling thread's netns, over raw netlink.

    Why not a libnftables listing: every DEL's probe remove reads the set (the UID check needs the
    comments) and libnftables renders the whole set as JSON first (~1.2 ms at 120 pods). A dump
    spanning several messages is only trusted when every message carries the same ruleset
    generation (nfgenmsg res_id); otherwise it is read again, like libnftables does. Raises OSError
    with the kernel's errno (ENOENT: no such table or set; EAGAIN: the set kept changing).
    """
    body = (struct.pack("=BBH", _NFPROTO_INET, 0, 0)
            + nlattr.attr(_NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
            + nlattr.attr(_NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0"))
    for _attempt in range(_DUMP_RETRIES):
        entries, generations = _netfilter_dump(
            (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETSETELEM, body,
            (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWSETELEM, parse_nft_setelems, sock)
        if len(generations) <= 1:
            return entries
    raise OSError(errno.EAGAIN, f"nft set {table}/{name} changed during every one of {_DUMP_RETRIES} reads")


def _netfilter_dump(
    msg_type: int, body: bytes, reply_type: int | None,
    parse: Callable[[bytes, int, int], dict[str, str]], kept: _KeptNetfilterSocket | None = None,
) -> tuple[dict[str, str], set[int]]:
    """One NETLINK_NETFILTER dump: merge `parse` over the replies of `reply_type` (None: any).
    Returns the entries and the nfgenmsg res_id values seen (nf_tables: the ruleset generation).

    `kept`: the socket to use (see `_KeptNetfilterSocket`); without one, a socket for this call.
    Errors as `nldump.dump` raises them.
    """
    if kept is None:
        kept = _KeptNetfilterSocket()
        try:
            return _netfilter_dump(msg_type, body, reply_type, parse, kept)
        finally:
            kept.close()
    sock, seq = kept.socket_and_seq()
    out: dict[str, str] = {}
    generations: set[int] = set()
    for rtype, buf, start, end in nldump.dump(sock, nldump.dump_request(msg_type, body, seq)):
        if reply_type is None or rtype == reply_type:
            if end - start < 4:
                raise OSError(errno.EPROTO, "netlink reply without its nfgenmsg")
            generations.add(struct.unpack_from(">H", buf, start + 2)[0])
            out.update(parse(buf, start + 4, end))
    return out, generations


class _KeptNetfilterSocket:
    """One raw NETLINK_NETFILTER socket for set reads in the host netns, opened on first use inside a
    host job and kept. Why kept: closing a netfilter socket in a netns where a deleting nf_tables
    transaction ran moments ago waits for an RCU grace period (~15 ms), and on a host that is any
    moment (our own element deletes, kube-proxy, firewalls). Any failed read but the kernel's
    "no such set" (ENOENT) drops it for a new one, so it can never stay out of step."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    def socket_and_seq(self) -> tuple[socket.socket, int]:
        if self._sock is None:
            self._sock = nldump.netfilter_socket()
        self._seq = self._seq % 0x7FFFFFFF + 1
        return self._sock, self._seq

    def read(self, fn: Callable[[_KeptNetfilterSocket], dict[str, str]]) -> dict[str, str]:
        for attempt in (1, 2):
            try:
                return fn(self)
            except BaseException as exc:
                if isinstance(exc, OSError) and exc.errno == errno.ENOENT:
                    raise
                self.close()
                # EBUSY: a dump left unfinished on this socket; a fresh socket has none
                if not (attempt == 1 and isinstance(exc, OSError) and exc.errno == errno.EBUSY):
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class IptablesHostProbe(_ProbeBase):
    """nat ISTIO_POSTRT with python-iptables, `hash:ip` ipsets with comments over netlink."""

    name = BACKEND_IPTABLES

    def __init__(self, worker: HostRunner, config: HostProbeConfig = HostProbeConfig()) -> None:
        super().__init__(worker, config)
        self._ips: Any = None

    @contextlib.contextmanager
    def _ipset(self) -> Iterator[Any]:
        """The host's ipset netlink socket, opened on first use and kept (one per job cost ~1 ms
        of pyroute2 set-up per pod). It binds to the netns of the thread creating it, so it is only
        created and used inside host jobs; a socket-level failure drops it for a fresh one."""
        if self._ips is None:
            self._ips = IPSet()
        try:
            yield self._ips
        except BaseException as exc:
            # callers wrap errors in HostProbeError: look at the cause. A kernel answer (NetlinkError)
            # leaves the socket fine; any other OSError means the socket itself is gone.
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            if isinstance(cause, OSError) and not isinstance(cause, NetlinkError):
                ips, self._ips = self._ips, None
                with contextlib.suppress(Exception):
                    ips.close()
            raise

    def _k_install(self) -> None:
        with self._ipset() as ips:
            for family in (4, 6):  # both sets always: cheap, and a later IPv6 switch finds them
                name = self.config.set_name(family)
                try:
                    ips.create(name, stype="hash:ip", family=_ipset_af(family), comment=True, exclusive=False)
                except _NETLINK_ERRORS as exc:
                    raise HostProbeError(f"ipset create {name} hash:ip family "
                                         f"{'inet' if family == 4 else 'inet6'} comment: {exc}; "
                                         "an existing set of another type must be removed by hand") from exc
        chain_name = self.config.chain
        for family in (4, 6):
            if family not in self.config.families():
                # Startup deletes old host rules (spec §9): a v6 rule from a run with IPv6 on goes.
                try:
                    self._remove_rules(family)
                except HostProbeError as exc:
                    log.warning("could not remove old host probe rule", family=family, error=str(exc))
        for family in self.config.families():
            try:
                with iptc_session(family, ("nat",)) as tables:
                    nat = tables.get("nat")
                    if nat is None:
                        raise HostProbeError(f"IPv{family} nat table is not available on the host")
                    self._drop_jumps(nat, chain_name)
                    if nat.is_chain(chain_name):
                        nat.flush_entries(chain_name)
                    else:
                        nat.create_chain(chain_name)
                    iptc.Chain(nat, chain_name).append_rule(
                        build_iptc_rule(family, iptables_host_rule(family, self.config)))
                    iptc.Chain(nat, "POSTROUTING").insert_rule(build_iptc_rule(family, ("-j", chain_name)), 0)
                    nat.commit()  # old rules out, new rules in: one commit, no window
            except (RulesError, iptc.IPTCError, iptc.XTablesError) as exc:
                raise HostProbeError(f"IPv{family} host probe rule: {exc}") from exc

    @staticmethod
    def _drop_jumps(nat: Any, chain_name: str) -> bool:
        changed = False
        for chain in nat.chains:
            if not nat.builtin_chain(chain.name):
                continue
            for rule in reversed(chain.rules):
                target = rule.target
                if target is not None and target.name == chain_name:
                    chain.delete_rule(rule)
                    changed = True
        return changed

    def _remove_rules(self, family: int) -> None:
        """Drop our POSTROUTING jump and chain for one family; a missing table or chain is fine."""
        chain_name = self.config.chain
        if "nat" not in existing_tables(family):
            return  # no nat table, so nothing of ours; opening it would create it
        try:
            with iptc_session(family, ("nat",)) as tables:
                nat = tables.get("nat")
                if nat is None:
                    return
                changed = self._drop_jumps(nat, chain_name)
                if nat.is_chain(chain_name):
                    nat.flush_entries(chain_name)
                    nat.delete_chain(chain_name)
                    changed = True
                if changed:
                    nat.commit()
        except (RulesError, iptc.IPTCError, iptc.XTablesError) as exc:
            raise HostProbeError(f"IPv{family} host probe rule removal: {exc}") from exc

    def _k_uninstall(self) -> None:
        # Both families whatever `ipv6` says now: an agent that ran with IPv6 on left a v6 rule that
        # references the v6 set, which could then not be destroyed.
        for family in (4, 6):
            self._remove_rules(family)
        with self._ipset() as ips:
            for family in (4, 6):
                name = self.config.set_name(family)
                for op in (ips.flush, ips.destroy):
                    try:
                        op(name)
                    except _NETLINK_ERRORS as exc:
                        if getattr(exc, "code", None) == errno.ENOENT:
                            break
                        raise HostProbeError(f"ipset {op.__name__} {name}: {exc}") from exc

    def _k_read(self, family: int) -> dict[str, str]:
        name = self.config.set_name(family)
        try:
            return self._reader.read(lambda kept: ipset_list_entries(name, kept))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return {}
            raise HostProbeError(f"ipset list {name}: {exc}") from exc

    def _k_put(self, family: int, ip: str, uid: str) -> None:
        name = self.config.set_name(family)
        with self._ipset() as ips:
            try:  # -exist: an existing entry gets the new comment (kernel re-inits extensions)
                ips.add(name, ip, family=_ipset_af(family), exclusive=False, comment=uid)
            except _NETLINK_ERRORS as exc:
                raise HostProbeError(f"ipset add -exist {name} {ip} comment {uid!r}: {exc}") from exc

    def _k_delete(self, family: int, ip: str) -> None:
        name = self.config.set_name(family)
        with self._ipset() as ips:
            try:
                ips.delete(name, ip, family=_ipset_af(family), exclusive=False)
            except _NETLINK_ERRORS as exc:
                raise HostProbeError(f"ipset del {name} {ip}: {exc}") from exc


# --- nftables ------------------------------------------------------------------------------------------


class _HostNft:
    """One libnftables context for the host netns, created on first use and kept.

    Why kept: closing a netfilter netlink socket whose transaction deleted anything (our upsert
    deletes and re-adds an element; remove deletes one) waits for an RCU grace period: 10-15 ms per
    pod on this VM with a context per call, 0.05 ms with one kept open. A context binds to the netns
    of the thread that creates it, so it is only ever created and used inside host jobs (`_host`),
    where the worker thread is in the host netns.

    With JSON output on, libnftables parses JSON input first and falls back to nft syntax; the
    probe sends it JSON transactions only (set reads go over raw netlink, `nft_set_entries`).
    """

    def __init__(self) -> None:
        self._nft: Any = None

    def run(self, batch: Mapping[str, Any] | str, what: str) -> str:
        if self._nft is None:
            import nftables  # lazily: a host on iptables-legacy needs no libnftables

            nft = nftables.Nftables()
            nft.set_json_output(True)
            self._nft = nft
        rc, out, err = self._nft.cmd(batch if isinstance(batch, str) else json.dumps(batch))
        if rc != 0:
            raise HostProbeError(f"nft {what}: {str(err).strip() or f'exit code {rc}'}")
        return str(out or "")


class NftHostProbe(_ProbeBase):
    """Host table `inet istio-ambient-nat`: skuid SNAT chain and the two probe sets."""

    name = BACKEND_NFTABLES

    def __init__(self, worker: HostRunner, config: HostProbeConfig = HostProbeConfig()) -> None:
        super().__init__(worker, config)
        self.kubelet_uid: int | None = None
        """The socket UID the SNAT rule matches; set by `install` (config override or discovery)."""
        self._nft = _HostNft()

    def _prepare(self) -> None:
        if self.config.kubelet_uid is not None:
            self.kubelet_uid = self.config.kubelet_uid
            return
        uid = discover_kubelet_uid(self.config.proc_root)
        if uid is None:
            log.warning("no kubelet process found; host probe SNAT matches socket uid 0",
                        proc_root=self.config.proc_root, uid=FALLBACK_KUBELET_UID)
            uid = FALLBACK_KUBELET_UID
        else:
            log.info("kubelet uid discovered", uid=uid, proc_root=self.config.proc_root)
        self.kubelet_uid = uid

    def _uid(self) -> int:
        if self.kubelet_uid is None:
            self._prepare()
        assert self.kubelet_uid is not None
        return self.kubelet_uid

    def _k_install(self) -> None:
        self._nft.run(nft_install_batch(self._uid(), self.config), "install host probe table")

    def _k_uninstall(self) -> None:
        table = {"table": {"family": "inet", "name": self.config.nft_table}}
        self._nft.run({"nftables": [{"add": table}, {"delete": table}]}, "delete host probe table")

    def _k_read(self, family: int) -> dict[str, str]:
        name = self.config.set_name(family)
        try:
            return self._reader.read(lambda kept: nft_set_entries(self.config.nft_table, name, kept))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return {}
            raise HostProbeError(f"nft list set inet {self.config.nft_table} {name}: {exc}") from exc

    def _k_put(self, family: int, ip: str, uid: str) -> None:
        self._nft.run(nft_upsert_batch(family, ip, uid, self.config), f"upsert {ip} ({uid})")

    def _k_delete(self, family: int, ip: str) -> None:
        elem = _nft_obj(self.config, name=self.config.set_name(family), elem=[ip])
        self._nft.run({"nftables": [{"delete": {"element": elem}}]}, f"delete element {ip}")


# --- disabled ------------------------------------------------------------------------------------------


class DisabledHostProbe:
    """Probe rewriting turned off: every call is a no-op, nothing is ever in the set."""

    name = "disabled"

    def install(self, *, retries: int = 1, retry_delay: float = 2.0) -> None:
        log.info("host probe SNAT disabled")

    def upsert(self, ip: str, uid: str) -> None:
        normalize_ip(ip)

    def remove(self, ip: str, uid: str) -> bool:
        normalize_ip(ip)
        return False

    async def upsert_async(self, ip: str, uid: str) -> None:
        self.upsert(ip, uid)

    async def remove_async(self, ip: str, uid: str) -> bool:
        return self.remove(ip, uid)

    def sync(self, wanted: Mapping[str, str], *, prune: bool) -> SyncReport:
        return SyncReport(prune_skipped=not prune)

    def entries(self) -> dict[str, str]:
        return {}

    def uninstall(self) -> None:
        return None


def make_host_probe(
    backend: str, worker: HostRunner, config: HostProbeConfig = HostProbeConfig()
) -> HostProbe:
    """The host probe for the node's rules backend (the same backend as the pods, spec §10)."""
    if not config.enabled:
        return DisabledHostProbe()
    if backend == BACKEND_IPTABLES:
        return IptablesHostProbe(worker, config)
    if backend == BACKEND_NFTABLES:
        return NftHostProbe(worker, config)
    raise ValueError(f"unknown rules backend {backend!r} (expected {BACKEND_IPTABLES} or {BACKEND_NFTABLES})")
