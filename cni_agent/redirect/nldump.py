"""Netlink dumps on raw NETLINK_NETFILTER sockets: the one loop every raw reader here shares.

Used by the host probe's set readers and the tests' kernel-state dumps. A socket binds to the netns
of the thread that creates it; see hostprobe.py for why its sockets are kept open.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSGHDR = struct.Struct("=IHHII")


def netfilter_socket(timeout: float = 5.0) -> socket.socket:
    """A bound NETLINK_NETFILTER socket in the calling thread's netns."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    return sock


def dump_request(msg_type: int, body: bytes, seq: int) -> bytes:
    """A dump request message (`body` starts with the nfgenmsg)."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def dump(sock: socket.socket, request: bytes) -> Iterator[tuple[int, bytes, int, int]]:
    """Send one dump request (see `dump_request`) and yield (type, buffer, body start, body end) for
    each reply carrying its sequence number; replies with another one (left on a kept socket by an
    earlier, abandoned request) are skipped.

    Ends at NLMSG_DONE. Raises OSError with the kernel's errno when the dump ends in an error
    (NLMSG_ERROR, or NLMSG_DONE carrying a negative errno), EPROTO for a truncated reply.
    """
    seq = NLMSGHDR.unpack_from(request)[3]
    sock.send(request)
    while True:
        buf = sock.recv(1 << 20)
        for rtype, rseq, start, end in messages(buf):
            if rseq != seq:
                continue
            if rtype in (NLMSG_ERROR, NLMSG_DONE):  # both end the dump, with an errno
                code = error_code(buf, start, end)
                if code:
                    raise OSError(code, os.strerror(code))
                return
            yield rtype, buf, start, end


def messages(buf: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, sequence number, body start, body end) of each netlink message in one datagram;
    EPROTO for a truncated one."""
    offset = 0
    while offset + NLMSGHDR.size <= len(buf):
        length, rtype, _flags, rseq, _pid = NLMSGHDR.unpack_from(buf, offset)
        if length < NLMSGHDR.size or offset + length > len(buf):
            raise OSError(errno.EPROTO, "truncated or malformed netlink reply")
        yield rtype, rseq, offset + NLMSGHDR.size, offset + length
        offset += (length + 3) & ~3


def error_code(buf: bytes, start: int, end: int) -> int:
    """The errno of an NLMSG_ERROR / NLMSG_DONE body (0: success), as a positive number."""
    if end - start < 4:
        raise OSError(errno.EPROTO, "netlink reply without its error code")
    (code,) = struct.unpack_from("=i", buf, start)
    return -int(code)
