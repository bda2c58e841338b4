"""A fresh pod's nft transaction as one pre-encoded nf_tables netlink batch (pure: rule sets -> bytes).

Why this exists: libnftables spends ~0.7-1.0 ms per pod parsing the JSON, resolving symbols,
fetching its cache (five netlink round trips) and linearizing the same ~25 rules into bytecode,
although a fresh pod's transaction only ever differs between a handful of variants (spec §5 Blocks
F-J). Here the spec rules are compiled ONCE per variant into a netlink batch with the bytecode nft
generates for them (as `nft --debug=netlink` shows it, nftables 1.0.6); applying it is one `send`
and one `recv`. What the kernel then holds is proven identical to what the installed libnftables
leaves by a test that dumps both namespaces' tables, chains and rules and compares the bytes
(tests/integration/test_nft_batch.py) for every variant and family combination. Verification
(`matches`) compares nft's listing, so a newer nft that linearizes differently still agrees.

Only the hot path uses this: a pod netns holding none of our tables. Everything else (reconcile,
repair, listing, delete) stays on libnftables' JSON API, which remains the authority: anything this
compiler does not know raises `Unsupported`, and the caller falls back to the JSON transaction.

The tables are created with NLM_F_EXCL, so one that appeared after the caller's check aborts the
whole batch (EEXIST) instead of getting a second copy of our rules. A table the variant does not use
(raw with DNS capture off) is not in the batch at all: the check just saw it absent, and deleting it
"just in case" would cost 10-15 ms (see `_batch_messages`).

Constants are the kernel UAPI's (linux/netfilter/nf_tables.h, nfnetlink.h, netfilter.h).
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cni_agent.redirect import nlattr
from cni_agent.redirect.rules import (
    NFT_BASE_CHAINS,
    NFT_REGULAR_CHAINS,
    NFT_TABLES,
    NftRule,
    RuleSet,
    nft_rules,
)

# netlink / nfnetlink
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWTABLE = 0
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWCHAIN = 3
NFT_MSG_NEWRULE = 6
NFPROTO_UNSPEC = 0
NFPROTO_INET = 1
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10

# attributes
_TABLE_NAME, _TABLE_FLAGS = 1, 2
_CHAIN_TABLE, _CHAIN_NAME, _CHAIN_HOOK, _CHAIN_POLICY, _CHAIN_TYPE = 1, 3, 4, 5, 7
_HOOK_HOOKNUM, _HOOK_PRIORITY = 1, 2
_RULE_TABLE, _RULE_CHAIN, _RULE_EXPRESSIONS = 1, 2, 4
_LIST_ELEM = 1
_EXPR_NAME, _EXPR_DATA = 1, 2
_DATA_VALUE, _DATA_VERDICT = 1, 2
_VERDICT_CODE, _VERDICT_CHAIN = 1, 2

_REG_VERDICT, _REG_1 = 0, 1
_NF_ACCEPT, _NFT_JUMP, _NFT_RETURN = 1, -3, -5
_CMP_EQ, _CMP_NEQ = 0, 1
_PAYLOAD_NETWORK, _PAYLOAD_TRANSPORT = 1, 2
_META_KEYS = {"mark": 3, "iifname": 6, "oifname": 7, "nfproto": 15, "l4proto": 16}
_CT_KEYS = {"mark": 3, "zone": 0x11}
_NF_NAT_RANGE_PROTO_SPECIFIED = 0x2
_HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
_L4PROTO = {"tcp": 6, "udp": 17}
_NFPROTO_OF = {"ip": NFPROTO_IPV4, "ip6": NFPROTO_IPV6}
_PAYLOAD_FIELDS: dict[tuple[str, str], tuple[int, int, int]] = {  # (protocol, field) -> base, offset, len
    ("ip", "saddr"): (_PAYLOAD_NETWORK, 12, 4),
    ("ip", "daddr"): (_PAYLOAD_NETWORK, 16, 4),
    ("ip6", "saddr"): (_PAYLOAD_NETWORK, 8, 16),
    ("ip6", "daddr"): (_PAYLOAD_NETWORK, 24, 16),
    ("tcp", "sport"): (_PAYLOAD_TRANSPORT, 0, 2),
    ("tcp", "dport"): (_PAYLOAD_TRANSPORT, 2, 2),
    ("udp", "sport"): (_PAYLOAD_TRANSPORT, 0, 2),
    ("udp", "dport"): (_PAYLOAD_TRANSPORT, 2, 2),
}
_IFNAMSIZ = 16
_CHAIN_POLICY_ACCEPT = 1

_NLMSGHDR = struct.Struct("=IHHII")


class Unsupported(ValueError):
    """The rule set uses something this compiler does not encode; use libnftables instead."""


# --- attribute encoding ------------------------------------------------------------------------------


def _nest(kind: int, *children: bytes) -> bytes:
    return nlattr.attr(kind | nlattr.NLA_F_NESTED, b"".join(children))


def _u32(kind: int, value: int) -> bytes:
    return nlattr.attr(kind, struct.pack(">I", value))


def _s32(kind: int, value: int) -> bytes:
    return nlattr.attr(kind, struct.pack(">i", value))


def _u64(kind: int, value: int) -> bytes:
    return nlattr.attr(kind, struct.pack(">Q", value))


def _str(kind: int, value: str) -> bytes:
    return nlattr.attr(kind, value.encode() + b"\0")


def _data_value(kind: int, value: bytes) -> bytes:
    return _nest(kind, nlattr.attr(_DATA_VALUE, value))


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nest(_LIST_ELEM, _str(_EXPR_NAME, name), _nest(_EXPR_DATA, *attrs))


# --- expressions (each the bytecode `nft --debug=netlink` shows for the spec statement) ---------------


def _meta_load(key: str) -> bytes:
    return _expr("meta", _u32(1, _REG_1), _u32(2, _META_KEYS[key]))  # DREG, KEY


def _meta_set(key: str) -> bytes:
    return _expr("meta", _u32(2, _META_KEYS[key]), _u32(3, _REG_1))  # KEY, SREG


def _ct_load(key: str) -> bytes:
    return _expr("ct", _u32(1, _REG_1), _u32(2, _CT_KEYS[key]))  # DREG, KEY


def _ct_set(key: str) -> bytes:
    return _expr("ct", _u32(2, _CT_KEYS[key]), _u32(4, _REG_1))  # KEY, SREG


def _cmp(op: int, value: bytes) -> bytes:
    return _expr("cmp", _u32(1, _REG_1), _u32(2, op), _data_value(3, value))  # SREG, OP, DATA


def _payload_load(base: int, offset: int, length: int) -> bytes:
    return _expr("payload", _u32(1, _REG_1), _u32(2, base), _u32(3, offset), _u32(4, length))


def _bitwise(mask: int, xor: int) -> bytes:
    """`reg 1 = (reg 1 & mask) ^ xor` on a host-order u32 (marks are host order in the kernel)."""
    return _expr("bitwise", _u32(1, _REG_1), _u32(2, _REG_1), _u32(3, 4),  # SREG, DREG, LEN
                 _data_value(4, struct.pack("=I", mask)), _data_value(5, struct.pack("=I", xor)))


def _counter() -> bytes:
    return _expr("counter", _u64(1, 0), _u64(2, 0))  # BYTES, PACKETS


def _verdict(code: int, chain: str | None = None) -> bytes:
    verdict = [_s32(_VERDICT_CODE, code)]
    if chain is not None:
        verdict.append(_str(_VERDICT_CHAIN, chain))
    return _expr("immediate", _u32(1, _REG_VERDICT), _nest(2, _nest(_DATA_VERDICT, *verdict)))


def _immediate(value: bytes) -> bytes:
    return _expr("immediate", _u32(1, _REG_1), _data_value(2, value))


def _redirect(port: int) -> list[bytes]:
    return [_immediate(struct.pack(">H", port)),
            _expr("redir", _u32(1, _REG_1), _u32(3, _NF_NAT_RANGE_PROTO_SPECIFIED))]  # PROTO_MIN, FLAGS


# --- compiler: spec JSON statements -> bytecode --------------------------------------------------------


@dataclass
class _Deps:
    """Protocol context nft establishes implicitly: an `ip daddr` match in an `inet` table first
    checks `meta nfproto ipv4`, a `tcp dport` match first checks `meta l4proto tcp` (once per rule)."""

    nfproto: int | None = None
    l4proto: int | None = None


def _key(expr: Any, kind: str) -> str | None:
    if isinstance(expr, dict) and set(expr) == {kind} and isinstance(expr[kind], dict):
        key = expr[kind].get("key")
        return key if isinstance(key, str) else None
    return None


def _ifname(value: object) -> bytes:
    """IFNAMSIZ bytes, NUL-padded: what nft compares for an exact name. Anything nft would read
    differently (`*` wildcard, `\\` escape, leading `@` set reference) or refuse (16+ bytes) is left
    to libnftables, so both paths accept and reject the same names."""
    if not isinstance(value, str) or value.startswith("@") or any(c in value for c in "*\\\0"):
        raise Unsupported(f"interface name {value!r}")
    raw = value.encode()
    if not 0 < len(raw) < _IFNAMSIZ:
        raise Unsupported(f"interface name {value!r} is {len(raw)} bytes")
    return raw.ljust(_IFNAMSIZ, b"\0")


def _address(protocol: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise Unsupported(f"{protocol} address {value!r}")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise Unsupported(f"{protocol} address {value!r}: {exc}") from exc
    if net.prefixlen != net.max_prefixlen or net.version != (4 if protocol == "ip" else 6):
        raise Unsupported(f"{protocol} address {value!r} (only single addresses)")
    return net.network_address.packed


def _match(match: Any, deps: _Deps) -> list[bytes]:
    op = {"==": _CMP_EQ, "!=": _CMP_NEQ}.get(match.get("op"))
    if op is None:
        raise Unsupported(f"match operator {match.get('op')!r}")
    left, right = match.get("left"), match.get("right")
    meta = _key(left, "meta")
    if meta in ("l4proto", "nfproto"):
        table = _L4PROTO if meta == "l4proto" else _NFPROTO_OF
        if not isinstance(right, str) or right not in table:
            raise Unsupported(f"meta {meta} {right!r}")
        number = table[right]
        if op == _CMP_EQ:
            setattr(deps, meta, number)
        return [_meta_load(meta), _cmp(op, bytes([number]))]
    if meta in ("iifname", "oifname"):
        return [_meta_load(meta), _cmp(op, _ifname(right))]
    if isinstance(left, dict) and "payload" in left:
        protocol, field = left["payload"].get("protocol"), left["payload"].get("field")
        where = _PAYLOAD_FIELDS.get((protocol, field))
        if where is None or not isinstance(right, (str, int)) or isinstance(right, bool):
            raise Unsupported(f"payload {protocol} {field} {right!r}")
        out: list[bytes] = []
        if protocol in _NFPROTO_OF:
            if deps.nfproto != _NFPROTO_OF[protocol]:
                deps.nfproto = _NFPROTO_OF[protocol]
                out += [_meta_load("nfproto"), _cmp(_CMP_EQ, bytes([deps.nfproto]))]
            data = _address(protocol, right)
        else:
            if deps.l4proto != _L4PROTO[protocol]:
                deps.l4proto = _L4PROTO[protocol]
                out += [_meta_load("l4proto"), _cmp(_CMP_EQ, bytes([deps.l4proto]))]
            if not isinstance(right, int) or not 0 <= right <= 0xFFFF:
                raise Unsupported(f"{protocol} {field} {right!r}")
            data = struct.pack(">H", right)
        return [*out, _payload_load(*where), _cmp(op, data)]
    if isinstance(left, dict) and set(left) == {"&"}:
        operand, mask = left["&"]
        if not (_u32_value(mask) and _u32_value(right)):
            raise Unsupported(f"masked match {left!r} {right!r}")
        if _key(operand, "meta") == "mark":
            load = _meta_load("mark")
        elif _key(operand, "ct") == "mark":
            load = _ct_load("mark")
        else:
            raise Unsupported(f"masked match {left!r}")
        return [load, _bitwise(mask, 0), _cmp(op, struct.pack("=I", right))]
    raise Unsupported(f"match {match!r}")


def _u32_value(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFFFFFF


def _mangle(mangle: Any) -> list[bytes]:
    key, value = mangle.get("key"), mangle.get("value")
    if _key(key, "ct") == "zone" and isinstance(value, int) and 0 <= value <= 0xFFFF:
        return [_immediate(struct.pack("=H", value)), _ct_set("zone")]
    if _key(key, "meta") == "mark" and _key(value, "ct") == "mark":
        return [_ct_load("mark"), _meta_set("mark")]
    if _key(key, "ct") == "mark" and isinstance(value, dict) and set(value) == {"|"}:
        inner, set_bits = value["|"]
        if isinstance(inner, dict) and set(inner) == {"&"} and _u32_value(set_bits):
            operand, keep = inner["&"]
            if _key(operand, "ct") == "mark" and _u32_value(keep):
                # (x & keep) | bits == (x & (keep & ~bits)) ^ bits: what nft emits
                return [_ct_load("mark"), _bitwise(keep & ~set_bits & 0xFFFFFFFF, set_bits), _ct_set("mark")]
    raise Unsupported(f"mangle {mangle!r}")


def compile_statement(stmt: Any, deps: _Deps) -> list[bytes]:
    """One JSON statement of `rules.NftRule.expr()` as nf_tables expressions."""
    if not isinstance(stmt, dict) or len(stmt) != 1:
        raise Unsupported(f"statement {stmt!r}")
    (kind, arg), = stmt.items()
    if kind == "match":
        return _match(arg, deps)
    if kind == "counter":
        return [_counter()]
    if kind == "accept":
        return [_verdict(_NF_ACCEPT)]
    if kind == "return":
        return [_verdict(_NFT_RETURN)]
    if kind == "jump":
        return [_verdict(_NFT_JUMP, str(arg["target"]))]
    if (kind == "redirect" and isinstance(arg, dict) and set(arg) == {"port"}
            and isinstance(arg["port"], int) and 0 < arg["port"] <= 0xFFFF):
        return _redirect(arg["port"])
    if kind == "mangle":
        return _mangle(arg)
    raise Unsupported(f"statement {stmt!r}")


def compile_rule(rule: NftRule) -> bytes:
    """NFTA_RULE_EXPRESSIONS for one rule."""
    deps = _Deps()
    exprs: list[bytes] = []
    for stmt in rule.expr():
        exprs += compile_statement(stmt, deps)
    return _nest(_RULE_EXPRESSIONS, *exprs)


# --- messages and the batch ---------------------------------------------------------------------------


def _message(msg_type: int, flags: int, seq: int, family: int, attrs: Iterable[bytes],
             res_id: int = 0) -> bytes:
    body = struct.pack("=BB", family, 0) + struct.pack(">H", res_id) + b"".join(attrs)  # nfgenmsg
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def _nft_type(msg: int) -> int:
    return (NFNL_SUBSYS_NFTABLES << 8) | msg


@dataclass(frozen=True)
class Batch:
    """The encoded batch and the sequence number whose acknowledgement says it was committed."""

    data: bytes
    last_seq: int
    messages: int


def _batch_messages(rulesets: Sequence[RuleSet]) -> list[tuple[int, int, int, list[bytes]]]:
    """(type, flags, family, attrs) per message, in the spec §5 order of `rules.nft_commands`."""
    rules = nft_rules(rulesets)
    out: list[tuple[int, int, int, list[bytes]]] = []
    for table in NFT_TABLES:
        mine = [r for r in rules if r.table == table]
        if not mine:
            # Unused by this variant (raw with DNS capture off): the caller has just seen that none
            # of our tables exists, so there is nothing to delete. Deliberately no create+delete
            # guard here: a transaction that deletes anything makes closing its netlink socket wait
            # for an RCU grace period (10-15 ms on this VM; engineering notes).
            continue
        out.append((_nft_type(NFT_MSG_NEWTABLE), NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL, NFPROTO_INET,
                    [_str(_TABLE_NAME, table), _u32(_TABLE_FLAGS, 0)]))
        for base in NFT_BASE_CHAINS[table]:
            hook = _nest(_CHAIN_HOOK, _u32(_HOOK_HOOKNUM, _HOOKS[base.hook]), _s32(_HOOK_PRIORITY, base.prio))
            out.append((_nft_type(NFT_MSG_NEWCHAIN), NLM_F_REQUEST | NLM_F_CREATE, NFPROTO_INET,
                        [_str(_CHAIN_TABLE, table), _str(_CHAIN_NAME, base.name), hook,
                         _u32(_CHAIN_POLICY, _CHAIN_POLICY_ACCEPT), _str(_CHAIN_TYPE, base.type)]))
        for name in NFT_REGULAR_CHAINS:
            out.append((_nft_type(NFT_MSG_NEWCHAIN), NLM_F_REQUEST | NLM_F_CREATE, NFPROTO_INET,
                        [_str(_CHAIN_TABLE, table), _str(_CHAIN_NAME, name)]))
        for rule in mine:
            out.append((_nft_type(NFT_MSG_NEWRULE), NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND, NFPROTO_INET,
                        [_str(_RULE_TABLE, table), _str(_RULE_CHAIN, rule.chain), compile_rule(rule)]))
    return out


def _framed(messages: list[tuple[int, int, int, list[bytes]]]) -> Batch:
    """BATCH_BEGIN, the messages (the last one asks for an ACK), BATCH_END."""
    parts = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, NFPROTO_UNSPEC, (),
                      res_id=NFNL_SUBSYS_NFTABLES)]
    seq = 1
    for i, (msg_type, flags, family, attrs) in enumerate(messages):
        seq += 1
        if i == len(messages) - 1:
            flags |= NLM_F_ACK  # the kernel acks it after the commit, or reports why the batch failed
        parts.append(_message(msg_type, flags, seq, family, attrs))
    parts.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 1, NFPROTO_UNSPEC, (),
                          res_id=NFNL_SUBSYS_NFTABLES))
    return Batch(b"".join(parts), seq, len(messages))


def _delete_messages() -> list[tuple[int, int, int, list[bytes]]]:
    messages: list[tuple[int, int, int, list[bytes]]] = []
    for table in NFT_TABLES:
        messages.append((_nft_type(NFT_MSG_NEWTABLE), NLM_F_REQUEST | NLM_F_CREATE, NFPROTO_INET,
                         [_str(_TABLE_NAME, table), _u32(_TABLE_FLAGS, 0)]))
        messages.append((_nft_type(NFT_MSG_DELTABLE), NLM_F_REQUEST, NFPROTO_INET,
                         [_str(_TABLE_NAME, table)]))
    return messages


@functools.lru_cache(maxsize=128)
def replace_batch(rulesets: tuple[RuleSet, ...]) -> Batch | None:
    """Delete our tables and create them anew with the rule sets' content, in ONE transaction (no
    moment without our rules, none with two copies): the repair for a pod whose tables differ.
    None when the compiler cannot encode the variant."""
    try:
        return _framed(_delete_messages() + _batch_messages(rulesets))
    except (Unsupported, ValueError, KeyError, TypeError, IndexError, struct.error):
        return None


@functools.cache
def delete_batch() -> Batch:
    """Spec §8 for nft: `add table` + `delete table` for each of our tables, one transaction, so a
    missing table is no error. Sent on a raw socket (see `nft.NftablesBackend.remove` for why)."""
    return _framed(_delete_messages())


def encode_batch(rulesets: Sequence[RuleSet]) -> Batch:
    """BATCH_BEGIN, the fresh-pod messages (the last one asks for an ACK), BATCH_END. Raises Unsupported."""
    messages = _batch_messages(rulesets)
    if not messages:
        raise Unsupported("empty rule set")
    return _framed(messages)


@functools.lru_cache(maxsize=128)
def fresh_batch(rulesets: tuple[RuleSet, ...]) -> Batch | None:
    """Cached per rule-set variant; None when the compiler cannot encode it (use libnftables).

    Not only `Unsupported`: any surprise in an input shape must cost the fast path, never the apply.
    """
    try:
        return encode_batch(rulesets)
    except (Unsupported, ValueError, KeyError, TypeError, IndexError, struct.error):
        return None
