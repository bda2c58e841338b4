"""Policy routing for ztunnel's spoofed-source replies (spec redirect-rules.md §6, §8), via pyroute2.

App replies to ztunnel's transparent inbound connections carry fwmark 0x111 (restored from connmark);
the ip rule sends them to table 100, whose `local` default route delivers them back to ztunnel's
socket instead of out of the pod. Runs INSIDE the pod netns on the NetnsWorker: the netlink socket
is created here so it binds to that netns, and closed before the worker returns home.

Why apply/remove do not use a pyroute2 `IPRoute` (measured per pod on the 2-core VM, fresh netns):
`IPRoute()` costs ~0.6 ms (it starts an asyncio machinery per object), `link_lookup("lo")` ~0.7 ms
(a link dump), and each request ~0.3 ms more: ~2-2.6 ms in all, more than the whole per-pod budget.
pyroute2 stays the netlink encoder: its `rtmsg`/`fibmsg` classes build the requests, encoded once per
variant and cached as bytes (~0.1 ms each to encode), and every request of one call goes to the
kernel in ONE datagram on a plain NETLINK_ROUTE socket created inside the netns. rtnetlink handles a
datagram's messages in order and acks each one (NLM_F_ACK) before `send` returns; "already there"
(EEXIST) and, on delete, "not there" (ENOENT/ESRCH) count as success. `lo`'s index comes from
`if_nametoindex` (an ioctl on a socket of the calling thread's netns, ~4 us; it is 1 in every netns,
but looking it up also proves `lo` exists). The whole apply is ~0.1 ms. One difference to
one-request-at-a-time: rtnetlink carries on after a failed message, so a failed route no longer
stops the rule from being added. Harmless (with table 100 empty, marked packets fall through to
`main`), and the error still fails the pod's install. `routes_present` (verify, not
on the per-pod path) still reads with `IPRoute` dumps.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_DELRULE, RTM_NEWROUTE, RTM_NEWRULE
from pyroute2.netlink.rtnl.fibmsg import FR_ACT_TO_TBL, fibmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from cni_agent.redirect.rules import CONNMARK, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY

_RT_SCOPE_HOST = 254
_RTN_LOCAL = 2
_RTPROT_BOOT = 3  # what `ip route replace` uses; keeps `ip route` output identical to the reference
_LO_LOOKUPS = 5
_LO_RETRY_DELAY = 0.05
_DISABLE_IPV6_LO = "/proc/sys/net/ipv6/conf/lo/disable_ipv6"
_NETLINK_ROUTE = 0
_ACK_TIMEOUT = 5.0
_RECV_BUFFER = 65536
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLMSGERR_CODE = struct.Struct("=i")
_GONE = frozenset({errno.ENOENT, errno.ESRCH})
_GONE_V6 = _GONE | {errno.EAFNOSUPPORT}
"""Deleting IPv6 state on a kernel without IPv6 (ipv6.disable=1): there is nothing to delete."""


class RoutesError(Exception):
    """A route or rule operation failed with something other than "already there"/"not there"."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


def lo_has_ipv6() -> bool:
    """Read in the current (pod) netns: /proc/sys/net follows the reading thread's netns."""
    try:
        with open(_DISABLE_IPV6_LO) as f:
            return f.read().strip() != "1"
    except FileNotFoundError:  # IPv6 compiled out or disabled on the kernel command line
        return False


def _lo_index() -> int:
    """`lo` exists in every netns, but a just-created netns may not be fully set up yet: retry briefly.

    `if_nametoindex` resolves in the calling thread's netns (glibc opens a socket there for the ioctl).
    """
    for attempt in range(_LO_LOOKUPS):
        try:
            return socket.if_nametoindex("lo")
        except OSError:
            if attempt + 1 < _LO_LOOKUPS:
                time.sleep(_LO_RETRY_DELAY)
    raise RoutesError("interface lo not found in the pod netns", errno.ENODEV)


def _families(ipv6: bool) -> tuple[socket.AddressFamily, ...]:
    return (socket.AF_INET, socket.AF_INET6) if ipv6 else (socket.AF_INET,)


def _default(family: int) -> str:
    return "0.0.0.0/0" if family == socket.AF_INET else "::/0"


# --- requests (pure: pyroute2 message classes -> bytes) --------------------------------------------


@dataclass(frozen=True)
class _Request:
    """One encoded netlink request, what it means (for errors) and which errnos count as success."""

    data: bytes
    what: str
    ok_errnos: frozenset[int]


def _encode(msg: Any, msg_type: int, flags: int, seq: int) -> bytes:
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0  # to the kernel
    msg.encode()
    return bytes(msg.data)


def _rule_msg(family: int, msg_type: int, flags: int, seq: int) -> bytes:
    """`ip rule add|del fwmark 0x111/0xfff pref 32764 lookup 100` for one family."""
    msg = fibmsg()
    msg["family"] = family
    msg["table"] = ROUTE_TABLE  # < 256: the header field works; FRA_TABLE says the same
    msg["action"] = FR_ACT_TO_TBL
    msg["attrs"] = [("FRA_TABLE", ROUTE_TABLE), ("FRA_PRIORITY", RULE_PRIORITY),
                    ("FRA_FWMARK", CONNMARK), ("FRA_FWMASK", MARK_MASK)]
    return _encode(msg, msg_type, flags, seq)


def _route_msg(family: int, lo: int, msg_type: int, flags: int, seq: int) -> bytes:
    """`ip route replace|del local <default> dev lo table 100` (scope host, proto boot on add).

    No RTA_DST: a zero-length prefix is the default route. Delete omits the protocol (the kernel
    then matches any), but must carry the scope, as `apply` set it.
    """
    msg = rtmsg()
    msg["family"] = family
    msg["dst_len"] = 0
    msg["table"] = ROUTE_TABLE
    msg["type"] = _RTN_LOCAL
    msg["scope"] = _RT_SCOPE_HOST
    msg["proto"] = _RTPROT_BOOT if msg_type == RTM_NEWROUTE else 0
    msg["attrs"] = [("RTA_TABLE", ROUTE_TABLE), ("RTA_OIF", lo)]
    return _encode(msg, msg_type, flags, seq)


def _fam(family: int) -> str:
    return "-6 " if family == socket.AF_INET6 else ""


@functools.lru_cache(maxsize=16)
def _apply_requests(ipv6: bool, v6_route: bool, lo: int) -> tuple[_Request, ...]:
    """Routes first, then rules (spec §6 order); the v6 rule regardless of lo (spec §6.2).

    With IPv6 off, the same datagram also deletes our IPv6 rule and route: a pod enrolled while IPv6
    was on must not keep them (verify checks their absence). Not-found is success, so on a pod that
    never had them this costs two acks in the same round trip.
    """
    replace = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    add = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    out: list[_Request] = []
    for family in _families(ipv6):
        if family == socket.AF_INET6 and not v6_route:
            continue
        out.append(_Request(_route_msg(family, lo, RTM_NEWROUTE, replace, len(out) + 1),
                            f"ip {_fam(family)}route replace local {_default(family)} dev lo table "
                            f"{ROUTE_TABLE}", frozenset()))
    for family in _families(ipv6):
        out.append(_Request(_rule_msg(family, RTM_NEWRULE, add, len(out) + 1),
                            f"ip {_fam(family)}rule add fwmark {CONNMARK:#x}/{MARK_MASK:#x} pref "
                            f"{RULE_PRIORITY} lookup {ROUTE_TABLE}", frozenset({errno.EEXIST})))
    if not ipv6:
        out.extend(_delete_requests(socket.AF_INET6, lo, len(out)))
    return tuple(out)


def _delete_requests(family: int, lo: int, before: int) -> list[_Request]:
    """Rule then route delete for one family; `before` requests precede them in the datagram."""
    ok = _GONE_V6 if family == socket.AF_INET6 else _GONE
    return [
        _Request(_rule_msg(family, RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK, before + 1),
                 f"ip {_fam(family)}rule del pref {RULE_PRIORITY}", ok),
        _Request(_route_msg(family, lo, RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, before + 2),
                 f"ip {_fam(family)}route del local {_default(family)} table {ROUTE_TABLE}", ok),
    ]


@functools.lru_cache(maxsize=16)
def _remove_requests(ipv6: bool, lo: int) -> tuple[_Request, ...]:
    out: list[_Request] = []
    for family in _families(ipv6):
        out.extend(_delete_requests(family, lo, len(out)))
    return tuple(out)


# --- transport (I/O) -------------------------------------------------------------------------------


def _acks(buf: bytes) -> list[tuple[int, int]]:
    """(sequence, errno) of each NLMSG_ERROR (0 = success ack) in one received datagram."""
    out: list[tuple[int, int]] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(buf):
        length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(buf, offset)
        if length < _NLMSGHDR.size:
            break
        if msg_type == NLMSG_ERROR and length >= _NLMSGHDR.size + _NLMSGERR_CODE.size:
            (code,) = _NLMSGERR_CODE.unpack_from(buf, offset + _NLMSGHDR.size)
            out.append((seq, -code))
        offset += (length + 3) & ~3
    return out


def _transact(requests: tuple[_Request, ...]) -> None:
    """Send all requests in one datagram on a fresh NETLINK_ROUTE socket (bound to THIS thread's
    netns at creation) and check every ack; the first unexpected error is raised after all acks."""
    if not requests:
        return
    pending = {seq: req for seq, req in enumerate(requests, start=1)}
    failure: RoutesError | None = None
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE) as sock:
        sock.settimeout(_ACK_TIMEOUT)
        sock.bind((0, 0))
        sock.send(b"".join(r.data for r in requests))
        while pending:
            try:
                data = sock.recv(_RECV_BUFFER)
            except TimeoutError as exc:
                raise RoutesError(f"no netlink ack for: {'; '.join(r.what for r in pending.values())}",
                                  errno.ETIMEDOUT) from exc
            for seq, code in _acks(data):
                req = pending.pop(seq, None)
                if req is None or code == 0 or code in req.ok_errnos:
                    continue
                if failure is None:
                    failure = RoutesError(f"{req.what}: {errno.errorcode.get(code, code)} "
                                          f"({os.strerror(code)})", code)
    if failure is not None:
        raise failure


def apply_routes(ipv6: bool) -> None:
    """Local default route in table 100 and the fwmark rule; re-applying is a no-op.

    With IPv6 off, our IPv6 rule and route (left from a time IPv6 was on) are deleted too.
    """
    _transact(_apply_requests(ipv6, ipv6 and lo_has_ipv6(), _lo_index()))


def remove_routes() -> None:
    """Delete the rule(s) and route(s) of BOTH families; absent ones count as deleted.

    Both whatever the IPv6 setting: the pod may have been enrolled while IPv6 was on.
    """
    _transact(_remove_requests(True, _lo_index()))


def _ours(ipr: IPRoute, family: int) -> tuple[bool, bool]:
    """(our fwmark rule exists, our local default route in table 100 exists) for one family."""
    rule = any(
        r.get("priority") == RULE_PRIORITY and r.get("fwmark") == CONNMARK
        and r.get("fwmask") == MARK_MASK and r.get("table") == ROUTE_TABLE
        for r in ipr.get_rules(family=family)
    )
    route = any(
        r["type"] == _RTN_LOCAL and r["dst_len"] == 0
        for r in ipr.get_routes(family=family, table=ROUTE_TABLE)
    )
    return rule, route


def routes_present(ipv6: bool) -> bool:
    """True when the state is what `apply_routes(ipv6)` makes: its rule(s) and local route(s) exist,
    and with IPv6 off, neither our IPv6 rule nor our IPv6 route does."""
    v6_route = ipv6 and lo_has_ipv6()
    with IPRoute() as ipr:
        rule4, route4 = _ours(ipr, socket.AF_INET)
        if not (rule4 and route4):
            return False
        try:
            rule6, route6 = _ours(ipr, socket.AF_INET6)
        except NetlinkError as exc:  # a kernel without IPv6 has none of ours
            if ipv6 or exc.code != errno.EAFNOSUPPORT:
                raise
            return True
    if ipv6:
        return rule6 and (route6 or not v6_route)
    return not (rule6 or route6)
