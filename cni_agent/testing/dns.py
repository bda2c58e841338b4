"""A ztunnel-like DNS proxy inside a pod netns, for proving DNS capture with real traffic.

With DNS capture on, the in-pod rules REDIRECT UDP and TCP port 53 to 15053, where ztunnel listens on
127.0.0.1 and [::1] with SO_MARK 0x539 (its own upstream queries must not be captured again). This
helper binds the same sockets (created in the pod netns on the NetnsWorker), records each query, and
answers `b"ans:" + query` so a test can also check the reply path: conntrack must un-NAT the answer so
the client sees it come from the address it asked. TCP uses DNS's 2-byte length framing.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cni_agent.redirect.netns import NetnsWorker
from cni_agent.redirect.rules import DNS_CAPTURE_PORT, ZTUNNEL_MARK
from cni_agent.testing.capture import NetnsListeners, bound_socket, original_dst

ANSWER_PREFIX = b"ans:"
_LOOPBACK = {4: "127.0.0.1", 6: "::1"}


@dataclass(frozen=True)
class DnsQuery:
    """One query the proxy received: protocol, family, client, pre-NAT destination (TCP only), bytes."""

    proto: str
    family: int
    peer: tuple[str, int]
    original_dst: tuple[str, int] | None
    payload: bytes


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed mid-message")
        data += chunk
    return data


def tcp_frame(payload: bytes) -> bytes:
    return struct.pack("!H", len(payload)) + payload


def read_tcp_frame(conn: socket.socket) -> bytes:
    (length,) = struct.unpack("!H", _recv_exact(conn, 2))
    return _recv_exact(conn, length)


class DnsListeners(NetnsListeners[DnsQuery]):
    """UDP and TCP listeners on <loopback>:15053 per family inside a netns, answering every query."""

    _what = "DNS query"
    _thread_name = "dns-proxy"

    def __init__(
        self,
        netns_fd: int,
        *,
        worker: NetnsWorker | None = None,
        families: Sequence[int] = (4, 6),
        port: int = DNS_CAPTURE_PORT,
        mark: int = ZTUNNEL_MARK,
    ) -> None:
        super().__init__(netns_fd, worker=worker)
        self._families = tuple(families)
        self._port = port
        self._mark = mark

    @property
    def queries(self) -> list[DnsQuery]:
        """A snapshot copy (thread-safe)."""
        return self._snapshot()

    def _bind(self) -> Iterator[socket.socket]:
        for family in self._families:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                yield bound_socket(family, kind, _LOOPBACK[family], self._port, self._mark)

    def _serve(self, sock: socket.socket) -> None:
        family = 4 if sock.family == socket.AF_INET else 6
        if sock.type == socket.SOCK_DGRAM:
            payload, peer = sock.recvfrom(65535)
            self._record(DnsQuery("udp", family, (str(peer[0]), int(peer[1])), None, payload))
            sock.sendto(ANSWER_PREFIX + payload, peer)
            return
        conn, peer = sock.accept()
        with conn:
            conn.setblocking(True)
            conn.settimeout(5)
            dst = original_dst(conn)
            payload = read_tcp_frame(conn)
            self._record(DnsQuery("tcp", family, (str(peer[0]), int(peer[1])), dst, payload))
            conn.sendall(tcp_frame(ANSWER_PREFIX + payload))


def udp_exchange(
    sock: socket.socket, server: tuple[str, int], payload: bytes
) -> tuple[bytes, tuple[str, int]]:
    """Send one datagram and return (answer, address the answer came from)."""
    sock.sendto(payload, server)
    data, src = sock.recvfrom(65535)
    return data, (str(src[0]), int(src[1]))


def tcp_exchange(sock: socket.socket, server: tuple[str, int], payload: bytes) -> bytes:
    """Connect, send one framed query, return the framed answer's payload."""
    sock.connect(server)
    sock.sendall(tcp_frame(payload))
    return read_tcp_frame(sock)
