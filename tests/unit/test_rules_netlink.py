"""The netlink messages behind routes.py and the nft table check, encoded and parsed without a kernel.

`apply_routes`/`remove_routes` send pre-encoded pyroute2 messages on a raw socket, and the nft
backend parses a raw table dump; these tests decode what we send with pyroute2's own classes and
feed hand-built replies to the parsers, so a wrong field or offset fails here before any netns.
"""

from __future__ import annotations

import errno
import socket
import struct

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_DELRULE, RTM_NEWROUTE, RTM_NEWRULE
from pyroute2.netlink.rtnl.fibmsg import FR_ACT_TO_TBL, fibmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from cni_agent.redirect import nft, routes
from cni_agent.redirect.rules import CONNMARK, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY

HDR = struct.Struct("=IHHII")


def _split(data: bytes) -> list[bytes]:
    out = []
    offset = 0
    while offset < len(data):
        length = HDR.unpack_from(data, offset)[0]
        out.append(data[offset:offset + length])
        offset += (length + 3) & ~3
    return out


def _decode(raw: bytes, cls: type) -> dict[str, object]:
    msg = cls(raw)
    msg.decode()
    return {"type": msg["header"]["type"], "flags": msg["header"]["flags"],
            "seq": msg["header"]["sequence_number"], "msg": msg}


def test_apply_requests_routes_then_rules_with_the_spec_values() -> None:
    reqs = routes._apply_requests(True, True, 1)
    kinds = [HDR.unpack_from(r.data)[1] for r in reqs]
    assert kinds == [RTM_NEWROUTE, RTM_NEWROUTE, RTM_NEWRULE, RTM_NEWRULE]
    assert [HDR.unpack_from(r.data)[3] for r in reqs] == [1, 2, 3, 4]  # sequence = position
    for req, family in zip(reqs[:2], (socket.AF_INET, socket.AF_INET6), strict=True):
        d = _decode(req.data, rtmsg)
        m = d["msg"]
        assert d["flags"] == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        assert (m["family"], m["dst_len"], m["table"], m["type"], m["scope"], m["proto"]) == (
            family, 0, ROUTE_TABLE, 2, 254, 3)  # local, scope host, proto boot
        assert m.get_attr("RTA_OIF") == 1 and m.get_attr("RTA_TABLE") == ROUTE_TABLE
        assert req.ok_errnos == frozenset()
    for req, family in zip(reqs[2:], (socket.AF_INET, socket.AF_INET6), strict=True):
        d = _decode(req.data, fibmsg)
        m = d["msg"]
        assert d["flags"] == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        assert (m["family"], m["action"]) == (family, FR_ACT_TO_TBL)
        assert (m.get_attr("FRA_PRIORITY"), m.get_attr("FRA_FWMARK"), m.get_attr("FRA_FWMASK"),
                m.get_attr("FRA_TABLE")) == (RULE_PRIORITY, CONNMARK, MARK_MASK, ROUTE_TABLE)
        assert req.ok_errnos == frozenset({errno.EEXIST})


def test_v6_rule_is_added_even_without_a_v6_route() -> None:
    """Spec §6.2: the IPv6 rule does not depend on lo having IPv6; the route does."""
    kinds = [(HDR.unpack_from(r.data)[1], r.data[16]) for r in routes._apply_requests(True, False, 1)]
    assert kinds == [(RTM_NEWROUTE, socket.AF_INET), (RTM_NEWRULE, socket.AF_INET),
                     (RTM_NEWRULE, socket.AF_INET6)]



def test_apply_without_ipv6_deletes_our_ipv6_rule_and_route() -> None:
    """IPv6 off: the same datagram deletes IPv6 leftovers; absent (or no IPv6 at all) is success."""
    reqs = routes._apply_requests(False, False, 1)
    kinds = [(HDR.unpack_from(r.data)[1], r.data[16]) for r in reqs]
    assert kinds == [(RTM_NEWROUTE, socket.AF_INET), (RTM_NEWRULE, socket.AF_INET),
                     (RTM_DELRULE, socket.AF_INET6), (RTM_DELROUTE, socket.AF_INET6)]
    assert [HDR.unpack_from(r.data)[3] for r in reqs] == [1, 2, 3, 4]  # sequence = position
    assert all(r.ok_errnos == frozenset({errno.ENOENT, errno.ESRCH, errno.EAFNOSUPPORT}) for r in reqs[2:])


def test_remove_requests_cover_both_families_in_order() -> None:
    reqs = routes._remove_requests(True, 1)
    kinds = [(HDR.unpack_from(r.data)[1], r.data[16]) for r in reqs]
    assert kinds == [(RTM_DELRULE, socket.AF_INET), (RTM_DELROUTE, socket.AF_INET),
                     (RTM_DELRULE, socket.AF_INET6), (RTM_DELROUTE, socket.AF_INET6)]
    assert [HDR.unpack_from(r.data)[3] for r in reqs] == [1, 2, 3, 4]


def test_remove_requests_accept_not_found_and_carry_no_protocol() -> None:
    reqs = routes._remove_requests(False, 7)
    assert [HDR.unpack_from(r.data)[1] for r in reqs] == [RTM_DELRULE, RTM_DELROUTE]
    route = _decode(reqs[1].data, rtmsg)["msg"]
    assert route["proto"] == 0 and route["scope"] == 254 and route.get_attr("RTA_OIF") == 7
    assert all(r.ok_errnos == frozenset({errno.ENOENT, errno.ESRCH}) for r in reqs)


def _ack(seq: int, code: int, echo: bytes = b"") -> bytes:
    body = struct.pack("=i", -code) + (echo or HDR.pack(16, 0, 0, seq, 0))
    return HDR.pack(16 + len(body), 2, 0, seq, 4242) + body


def test_acks_parse_every_error_message_in_a_datagram() -> None:
    data = _ack(1, 0) + _ack(2, errno.EEXIST) + _ack(3, errno.ENODEV)
    assert routes._acks(data) == [(1, 0), (2, errno.EEXIST), (3, errno.ENODEV)]
    assert routes._acks(b"") == []
    assert routes._acks(HDR.pack(8, 2, 0, 1, 0)) == []  # malformed length: stop, do not loop


def test_request_bytes_concatenate_into_valid_messages() -> None:
    data = b"".join(r.data for r in routes._apply_requests(True, True, 1))
    assert len(_split(data)) == 4


def _newtable(name: bytes, family: int = 1) -> bytes:
    attr_name = name + b"\0"
    nla = struct.pack("=HH", 4 + len(attr_name), 1) + attr_name
    nla += b"\0" * ((-len(nla)) % 4)
    flags_nla = struct.pack("=HHI", 8, 2, 0)  # NFTA_TABLE_FLAGS before/after the name must not matter
    payload = struct.pack("=BBH", family, 0, 0) + flags_nla + nla
    return HDR.pack(16 + len(payload), (10 << 8) | 0, 2, 1, 0) + payload


def test_table_name_parser_finds_the_name_attribute() -> None:
    msg = _newtable(b"istio-ambient-nat")
    assert nft._table_name(msg, 0, len(msg)) == "istio-ambient-nat"
    assert nft._table_name(msg[:24], 0, 24) is None  # truncated: no name, no crash


def test_gettable_request_is_an_inet_dump() -> None:
    length, msg_type, flags, _seq, pid = HDR.unpack_from(nft._GETTABLE_INET)
    assert (length, msg_type, flags, pid) == (20, (10 << 8) | 1, 0x301, 0)
    assert nft._GETTABLE_INET[16] == 1  # NFPROTO_INET
