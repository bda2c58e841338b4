"""Netlink attributes (pure: bytes in, bytes or ranges out): the one encoder and the one walker
every raw netlink module here uses (nftbatch, nft, hostprobe)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

NLA = struct.Struct("=HH")
NLA_F_NESTED = 0x8000
TYPE_MASK = 0x3FFF  # drops NLA_F_NESTED and NLA_F_NET_BYTEORDER


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = NLA.size + len(payload)
    return NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def walk(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type without flags, payload start, payload end) of each attribute in buf[start:end]; stops at
    a malformed length."""
    pos = start
    while pos + NLA.size <= end:
        length, kind = NLA.unpack_from(buf, pos)
        if length < NLA.size:
            return
        yield kind & TYPE_MASK, pos + NLA.size, min(pos + length, end)
        pos += (length + 3) & ~3
