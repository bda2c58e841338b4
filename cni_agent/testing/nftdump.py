"""What the kernel holds for `inet` nf_tables objects, as raw netlink dumps (tests only).

Used to prove that two ways of installing the same rule set (libnftables' JSON transaction and the
precompiled `nftbatch`) leave byte-identical kernel state: tables, chains and rules are dumped with
NFT_MSG_GET*, the per-namespace handles are dropped, and the remaining attributes compared as bytes.
A listing through nft would hide differences nft's printer normalizes; this does not.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from cni_agent.redirect import nldump

_SUBSYS = 10
_GET = {"table": 1, "chain": 4, "rule": 7}
_HANDLE_ATTRS = {"table": {4}, "chain": {2}, "rule": {3, 6}}
"""Per-namespace numbering: NFTA_TABLE_HANDLE, NFTA_CHAIN_HANDLE, NFTA_RULE_HANDLE and
NFTA_RULE_POSITION (the previous rule's handle)."""
_NLA = struct.Struct("=HH")
_NFPROTO_INET = 1


@dataclass(frozen=True)
class Dumped:
    """One object: kind, its attributes without the handle (raw), and the full message for decoding."""

    kind: str
    attrs: bytes
    message: bytes

    def decoded(self) -> Any:
        """pyroute2's view of the message, for readable failure output."""
        from pyroute2.netlink.nfnetlink import nftsocket

        cls = {"table": nftsocket.nft_table_msg, "chain": nftsocket.nft_chain_msg,
               "rule": nftsocket.nft_rule_msg}[self.kind]
        msg = cls(self.message)
        msg.decode()
        return msg


def _strip(kind: str, attrs: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while pos + _NLA.size <= len(attrs):
        length, attr_type = _NLA.unpack_from(attrs, pos)
        if length < _NLA.size:
            break
        padded = (length + 3) & ~3
        if attr_type & 0x3FFF not in _HANDLE_ATTRS[kind]:
            out += attrs[pos:pos + padded]
        pos += padded
    return bytes(out)


def dump(kind: str) -> list[Dumped]:
    """All `inet` objects of one kind in the calling thread's netns, in kernel order."""
    out: list[Dumped] = []
    with nldump.netfilter_socket() as sock:
        nfgenmsg = struct.pack("=BBH", _NFPROTO_INET, 0, 0)
        request = nldump.dump_request((_SUBSYS << 8) | _GET[kind], nfgenmsg, 1)
        for _rtype, buf, start, end in nldump.dump(sock, request):
            out.append(Dumped(kind, _strip(kind, buf[start + 4:end]), bytes(buf[start - 16:end])))
    return out


def dump_all() -> dict[str, list[Dumped]]:
    return {kind: dump(kind) for kind in ("table", "chain", "rule")}
