"""Policy routing for ztunnel's spoofed-source replies (spec redirect-rules.md §6, §8), via pyroute2.

App replies to ztunnel's transparent inbound connections carry fwmark 0x111 (restored from connmark);
the ip rule sends them to table 100, whose `local` default route delivers them back to ztunnel's
socket instead of out of the pod. Runs INSIDE the pod netns on the NetnsWorker: the netlink socket
is created here so it binds to that netns, and closed before the worker returns home.
"""

from __future__ import annotations

import errno
import socket
import time
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from cni_agent.redirect.rules import CONNMARK, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY

_RT_SCOPE_HOST = 254
_RTPROT_BOOT = 3  # what `ip route replace` uses; keeps `ip route` output identical to the reference
_LO_LOOKUPS = 5
_LO_RETRY_DELAY = 0.05
_DISABLE_IPV6_LO = "/proc/sys/net/ipv6/conf/lo/disable_ipv6"


class RoutesError(Exception):
    """A route or rule operation failed with something other than "already there"/"not there"."""


def lo_has_ipv6() -> bool:
    """Read in the current (pod) netns: /proc/sys/net follows the reading thread's netns."""
    try:
        with open(_DISABLE_IPV6_LO) as f:
            return f.read().strip() != "1"
    except FileNotFoundError:  # IPv6 compiled out or disabled on the kernel command line
        return False


def _lo_index(ipr: Any) -> int:
    """`lo` exists in every netns, but a just-created netns may not be fully set up yet: retry briefly."""
    for attempt in range(_LO_LOOKUPS):
        found = ipr.link_lookup(ifname="lo")
        if found:
            return int(found[0])
        if attempt + 1 < _LO_LOOKUPS:
            time.sleep(_LO_RETRY_DELAY)
    raise RoutesError("interface lo not found in the pod netns")


def _families(ipv6: bool) -> tuple[socket.AddressFamily, ...]:
    return (socket.AF_INET, socket.AF_INET6) if ipv6 else (socket.AF_INET,)


def _default(family: int) -> str:
    return "0.0.0.0/0" if family == socket.AF_INET else "::/0"


def _rule_args(family: int) -> dict[str, Any]:
    return {"family": family, "fwmark": CONNMARK, "fwmask": MARK_MASK, "priority": RULE_PRIORITY,
            "table": ROUTE_TABLE}


def _route_args(family: int, lo: int) -> dict[str, Any]:
    return {"family": family, "dst": _default(family), "type": "local", "table": ROUTE_TABLE, "oif": lo,
            "scope": _RT_SCOPE_HOST, "proto": _RTPROT_BOOT}


def apply_routes(ipv6: bool) -> None:
    """Local default route in table 100 and the fwmark rule; re-applying is a no-op."""
    v6_route = ipv6 and lo_has_ipv6()
    with IPRoute() as ipr:
        lo = _lo_index(ipr)
        for family in _families(ipv6):
            if family == socket.AF_INET6 and not v6_route:
                continue
            try:
                ipr.route("replace", **_route_args(family, lo))
            except NetlinkError as exc:
                raise RoutesError(f"ip route replace local {_default(family)} dev lo table {ROUTE_TABLE}: "
                                  f"{exc}") from exc
        for family in _families(ipv6):  # v6 rule regardless of lo (spec §6.2)
            try:
                ipr.rule("add", **_rule_args(family))
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise RoutesError(f"ip rule add fwmark {CONNMARK:#x}/{MARK_MASK:#x} pref {RULE_PRIORITY}"
                                      f" lookup {ROUTE_TABLE} (family {family}): {exc}") from exc


def remove_routes(ipv6: bool) -> None:
    """Delete the rule(s) and route(s); absent ones count as deleted."""
    gone = (errno.ENOENT, errno.ESRCH)
    with IPRoute() as ipr:
        lo = _lo_index(ipr)
        for family in _families(ipv6):
            try:
                ipr.rule("del", **_rule_args(family))
            except NetlinkError as exc:
                if exc.code not in gone:
                    raise RoutesError(f"ip rule del pref {RULE_PRIORITY} (family {family}): {exc}") from exc
            try:
                # scope must match (pyroute2 does not send "any" like `ip route del`); proto may differ
                args = _route_args(family, lo)
                del args["proto"]
                ipr.route("del", **args)
            except NetlinkError as exc:
                if exc.code not in gone:
                    raise RoutesError(f"ip route del local {_default(family)} table {ROUTE_TABLE}: "
                                      f"{exc}") from exc


def routes_present(ipv6: bool) -> bool:
    """True when the rule(s) and the local route(s) that `apply_routes` would create all exist."""
    v6_route = ipv6 and lo_has_ipv6()
    with IPRoute() as ipr:
        for family in _families(ipv6):
            rules = [
                r for r in ipr.get_rules(family=family)
                if r.get("priority") == RULE_PRIORITY and r.get("fwmark") == CONNMARK
                and r.get("fwmask") == MARK_MASK and r.get("table") == ROUTE_TABLE
            ]
            if not rules:
                return False
            if family == socket.AF_INET6 and not v6_route:
                continue
            routes = [
                r for r in ipr.get_routes(family=family, table=ROUTE_TABLE)
                if r["type"] == 2 and r["dst_len"] == 0  # RTN_LOCAL default
            ]
            if not routes:
                return False
    return True
