"""The fresh-pod nf_tables batch, as bytes: framing, order, flags and the statement compiler.

Kernel equivalence with libnftables is proven in tests/integration/test_nft_batch.py; these pin
the parts a kernel would accept either way (flags, order, ack placement) and the compiler's edges.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from pyroute2.netlink.nfnetlink import nftsocket

from cni_agent.redirect import nftbatch
from cni_agent.redirect.nftbatch import Unsupported, compile_statement, encode_batch
from cni_agent.redirect.rules import RuleSettings, build_ruleset, nft_commands

_HDR = struct.Struct("=IHHII")
_CLASSES = {nftbatch.NFT_MSG_NEWTABLE: nftsocket.nft_table_msg,
            nftbatch.NFT_MSG_NEWCHAIN: nftsocket.nft_chain_msg,
            nftbatch.NFT_MSG_NEWRULE: nftsocket.nft_rule_msg}


def split(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, seq, whole message) per netlink message."""
    out, offset = [], 0
    while offset < len(data):
        length, msg_type, flags, seq, _pid = _HDR.unpack_from(data, offset)
        out.append((msg_type, flags, seq, data[offset:offset + length]))
        offset += (length + 3) & ~3
    assert offset == len(data)
    return out


def decode(msg_type: int, raw: bytes) -> Any:
    msg = _CLASSES[msg_type & 0xFF](raw)
    msg.decode()
    return msg


def expr_names(msg: Any) -> list[str]:
    return [e.get_attr("NFTA_EXPR_NAME") for e in msg.get_attr("NFTA_RULE_EXPRESSIONS")]


def test_framing_flags_and_ack_placement() -> None:
    rs = [build_ruleset(RuleSettings(), 4), build_ruleset(RuleSettings(), 6)]
    batch = encode_batch(rs)
    msgs = split(batch.data)
    begin, *body, end = msgs
    assert begin[0] == nftbatch.NFNL_MSG_BATCH_BEGIN and end[0] == nftbatch.NFNL_MSG_BATCH_END
    for _t, _f, _s, raw in (begin, end):
        assert raw[16:20] == b"\x00\x00\x00\x0a"  # nfgenmsg: AF_UNSPEC, v0, res_id NFNL_SUBSYS_NFTABLES (BE)
    assert [m[2] for m in msgs] == list(range(1, len(msgs) + 1))
    assert batch.messages == len(body) and batch.last_seq == body[-1][2]
    acked = [m for m in body if m[1] & nftbatch.NLM_F_ACK]
    assert acked == [body[-1]], "only the last message asks for the ack that confirms the commit"
    for msg_type, flags, _seq, raw in body:
        assert raw[16] == nftbatch.NFPROTO_INET
        kind = msg_type & 0xFF
        want = {nftbatch.NFT_MSG_NEWTABLE: nftbatch.NLM_F_CREATE | nftbatch.NLM_F_EXCL,
                nftbatch.NFT_MSG_NEWCHAIN: nftbatch.NLM_F_CREATE,
                nftbatch.NFT_MSG_NEWRULE: nftbatch.NLM_F_CREATE | nftbatch.NLM_F_APPEND}[kind]
        assert flags & ~nftbatch.NLM_F_ACK == nftbatch.NLM_F_REQUEST | want


@pytest.mark.parametrize("settings", [RuleSettings(), RuleSettings(dns_capture=False),
                                      RuleSettings(bypass_inbound=True, reroute_interfaces=("net1",))],
                         ids=["default", "dns-off", "bypass+iface"])
def test_same_objects_in_the_same_order_as_the_spec_transaction(settings: RuleSettings) -> None:
    rs = [build_ruleset(settings, 4), build_ruleset(settings, 6)]
    want: list[tuple[str, ...]] = []
    for _text, cmd in nft_commands(rs):
        if "flush" in cmd:
            continue  # flushing a table created in the same batch does nothing
        if "delete" in cmd:  # an unused table: absent in a fresh pod, so neither created nor deleted
            want.remove(("table", cmd["delete"]["table"]["name"]))
            continue
        (kind, body), = cmd["add"].items()
        if kind == "table":
            want.append(("table", body["name"]))
        elif kind == "chain":
            want.append(("chain", body["table"], body["name"], body.get("hook", "")))
        else:
            want.append(("rule", body["table"], body["chain"]))
    got: list[tuple[str, ...]] = []
    for msg_type, _f, _s, raw in split(encode_batch(rs).data)[1:-1]:
        kind = msg_type & 0xFF
        msg = decode(msg_type, raw)
        if kind == nftbatch.NFT_MSG_NEWTABLE:
            got.append(("table", msg.get_attr("NFTA_TABLE_NAME")))
        elif kind == nftbatch.NFT_MSG_NEWCHAIN:
            hook = msg.get_attr("NFTA_CHAIN_HOOK")
            hooknum = hook.get_attr("NFTA_HOOK_HOOKNUM") if hook else None
            got.append(("chain", msg.get_attr("NFTA_CHAIN_TABLE"), msg.get_attr("NFTA_CHAIN_NAME"),
                        {None: "", 0: "prerouting", 3: "output"}[hooknum]))
        else:
            got.append(("rule", msg.get_attr("NFTA_RULE_TABLE"), msg.get_attr("NFTA_RULE_CHAIN")))
    assert got == want
    assert ("table", "istio-ambient-raw") in got or not settings.dns_capture


def _statements(*stmts: Any) -> list[str]:
    deps = nftbatch._Deps()
    out: list[str] = []
    for stmt in stmts:
        for raw in compile_statement(stmt, deps):
            out.append(raw[8:].split(b"\0", 1)[0].decode())  # LIST_ELEM > EXPR_NAME string
    return out


def _m(op: str, left: Any, right: Any) -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


IP_DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}
TCP_DPORT = {"payload": {"protocol": "tcp", "field": "dport"}}
L4_TCP = _m("==", {"meta": {"key": "l4proto"}}, "tcp")


def test_implicit_protocol_dependencies_like_nft() -> None:
    # `ip daddr != X tcp dport 53`: nfproto check, then the l4proto check nft inserts before the port
    assert _statements(_m("!=", IP_DADDR, "127.0.0.1"), _m("==", TCP_DPORT, 53)) == [
        "meta", "cmp", "payload", "cmp", "meta", "cmp", "payload", "cmp"]
    # an explicit `meta l4proto tcp` already establishes the transport protocol
    assert _statements(L4_TCP, _m("==", TCP_DPORT, 53)) == ["meta", "cmp", "payload", "cmp"]
    # a negated l4proto match establishes nothing
    assert _statements(_m("!=", {"meta": {"key": "l4proto"}}, "tcp"), _m("==", TCP_DPORT, 53)) == [
        "meta", "cmp", "meta", "cmp", "payload", "cmp"]


def test_or_after_and_becomes_mask_and_xor() -> None:
    ct_mark = {"ct": {"key": "mark"}}
    value = {"|": [{"&": [ct_mark, 0xFFFFF000]}, 0x111]}
    load, bitwise, store = compile_statement({"mangle": {"key": ct_mark, "value": value}}, nftbatch._Deps())
    assert struct.pack("=I", 0xFFFFF000) in bitwise and struct.pack("=I", 0x111) in bitwise
    assert b"ct\0" in load and b"ct\0" in store


@pytest.mark.parametrize("stmt", [
    _m("==", {"meta": {"key": "iifname"}}, "veth*"),                 # nft wildcard
    _m("==", IP_DADDR, "10.0.0.0/8"),                                # prefixes need a mask
    _m("==", {"payload": {"protocol": "ip6", "field": "daddr"}}, "10.0.0.1"),  # wrong family
    _m("<", TCP_DPORT, 1024),
    _m("==", {"meta": {"key": "l4proto"}}, "sctp"),
    {"masquerade": None},
    {"redirect": {"port": 1, "flags": ["random"]}},
], ids=["wildcard", "prefix", "family", "operator", "l4proto", "statement", "redirect-flags"])
def test_unknown_input_is_unsupported_not_guessed(stmt: Any) -> None:
    with pytest.raises(Unsupported):
        compile_statement(stmt, nftbatch._Deps())


def test_fresh_batch_returns_none_for_unsupported_variants() -> None:
    rs = (build_ruleset(RuleSettings(dns_capture=False, reroute_interfaces=("veth*",)), 4),)
    assert nftbatch.fresh_batch(rs) is None
    assert nftbatch.fresh_batch((build_ruleset(RuleSettings(), 4),)) is not None


def test_any_encoding_surprise_costs_the_fast_path_not_the_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    rs = (build_ruleset(RuleSettings(bypass_inbound=True, reroute_interfaces=("x9",)), 6),)

    def boom(_rs: Any) -> Any:
        raise KeyError("unexpected shape")

    nftbatch.fresh_batch.cache_clear()
    monkeypatch.setattr(nftbatch, "encode_batch", boom)
    try:
        assert nftbatch.fresh_batch(rs) is None
    finally:
        nftbatch.fresh_batch.cache_clear()


@pytest.mark.parametrize("name", ["abcdefghijklmn\u00e9", "@set", "veth*", "a\\b"])
def test_interface_names_nft_reads_otherwise_are_left_to_libnftables(name: str) -> None:
    with pytest.raises(Unsupported):
        nftbatch._ifname(name)


def test_foreign_table_names_need_not_be_utf8() -> None:
    """A pod may create an inet table with any bytes as its name; the dump must still parse."""
    from cni_agent.redirect.nft import _table_name

    raw_name = b"bad\xff\xfe\0"
    attr = struct.pack("=HH", 4 + len(raw_name), 1) + raw_name + b"\0" * (-(4 + len(raw_name)) % 4)
    msg = struct.pack("=IHHII", 16 + 4 + len(attr), 0xA00, 0, 1, 0) + b"\x01\x00\x00\x00" + attr
    name = _table_name(msg, 0, len(msg))
    assert name is not None and name.startswith("bad") and name not in ("istio-ambient-nat",)
