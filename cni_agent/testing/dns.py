"""A ztunnel-like DNS proxy inside a pod netns, for proving DNS capture with real traffic.

With DNS capture on, the in-pod rules REDIRECT UDP and TCP port 53 to 15053, where ztunnel listens on
127.0.0.1 and [::1] with SO_MARK 0x539 (its own upstream queries must not be captured again). This
helper binds the same sockets (created in the pod netns on the NetnsWorker), records each query, and
answers `b"ans:" + query` so a test can also check the reply path: conntrack must un-NAT the answer so
the client sees it come from the address it asked. TCP uses DNS's 2-byte length framing.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cni_agent.redirect.netns import NetnsWorker
from cni_agent.redirect.rules import DNS_CAPTURE_PORT, ZTUNNEL_MARK
from cni_agent.testing.capture import SO_MARK, original_dst
from cni_agent.testing.capture6 import original_dst6

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


def _bind(family: int, kind: int, host: str, port: int, mark: int) -> socket.socket:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    sock = socket.socket(af, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if family == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


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


class DnsListeners:
    """UDP and TCP listeners on <loopback>:15053 per family inside a netns, answering every query."""

    def __init__(
        self,
        netns_fd: int,
        *,
        worker: NetnsWorker,
        families: Sequence[int] = (4, 6),
        port: int = DNS_CAPTURE_PORT,
        mark: int = ZTUNNEL_MARK,
    ) -> None:
        self._netns_fd = netns_fd
        self._worker = worker
        self._families = tuple(families)
        self._port = port
        self._mark = mark
        self._queries: list[DnsQuery] = []
        self._cond = threading.Condition()
        self._socks: list[tuple[socket.socket, int, int]] = []  # (socket, family, kind)
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def queries(self) -> list[DnsQuery]:
        with self._cond:
            return list(self._queries)

    def start(self) -> DnsListeners:
        def create() -> list[tuple[socket.socket, int, int]]:
            made: list[tuple[socket.socket, int, int]] = []
            try:
                for family in self._families:
                    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                        made.append(
                            (_bind(family, kind, _LOOPBACK[family], self._port, self._mark), family, kind)
                        )
            except BaseException:
                for s, _, _ in made:
                    s.close()
                raise
            return made

        self._socks = self._worker.call(self._netns_fd, create)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._loop, name="dns-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None and self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._thread.join()
            self._thread = None
        for sock in (*(s for s, _, _ in self._socks), self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._socks = []
        self._wake_r = self._wake_w = None

    def __enter__(self) -> DnsListeners:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, pred: Callable[[DnsQuery], bool], timeout: float = 5.0) -> DnsQuery:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self._queries:
                    if pred(item):
                        return item
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching DNS query within {timeout}s; saw {self._queries}")
                self._cond.wait(remaining)

    def _record(self, query: DnsQuery) -> None:
        with self._cond:
            self._queries.append(query)
            self._cond.notify_all()

    def _loop(self) -> None:
        assert self._wake_r is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            for sock, family, kind in self._socks:
                sel.register(sock, selectors.EVENT_READ, (family, kind))
            while True:
                for key, _ in sel.select():
                    if key.data is None:
                        return
                    family, kind = key.data
                    assert isinstance(key.fileobj, socket.socket)
                    with contextlib.suppress(OSError):
                        if kind == socket.SOCK_DGRAM:
                            self._serve_udp(key.fileobj, family)
                        else:
                            self._serve_tcp(key.fileobj, family)

    def _serve_udp(self, sock: socket.socket, family: int) -> None:
        try:
            payload, peer = sock.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            return
        self._record(DnsQuery("udp", family, (str(peer[0]), int(peer[1])), None, payload))
        sock.sendto(ANSWER_PREFIX + payload, peer)

    def _serve_tcp(self, listener: socket.socket, family: int) -> None:
        try:
            conn, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.setblocking(True)
            conn.settimeout(5)
            dst = original_dst(conn) if family == 4 else original_dst6(conn)
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
