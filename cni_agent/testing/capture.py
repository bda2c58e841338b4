"""ztunnel-like capture listeners inside a pod netns, for proving redirection with real traffic.

ztunnel creates its in-pod listeners by entering the pod netns on one thread, creating the sockets
and leaving again (zds.md §9); the sockets stay in the pod netns. `NetnsListeners` is that machinery
once: sockets made on a NetnsWorker, served from one background thread (accept/recv work from any
netns), every served item recorded for `wait_for`. `CaptureListeners` builds on it for ztunnel's TCP
ports in IPv4 and/or IPv6 and records, per connection, which listener got it and the pre-NAT
destination (SO_ORIGINAL_DST); `cni_agent.testing.dns` builds the DNS proxy on it.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Self, TypeVar

from cni_agent.redirect.netns import NetnsWorker
from cni_agent.redirect.rules import INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, ZTUNNEL_MARK

SO_ORIGINAL_DST = 80  # IP6T_SO_ORIGINAL_DST has the same number at SOL_IPV6
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_MARK = getattr(socket, "SO_MARK", 36)
ZTUNNEL_PORTS: tuple[int, ...] = (INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT)
WILDCARD = {4: "0.0.0.0", 6: "::"}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
# Per address family: (getsockopt level, sockaddr size, layout after sa_family -> (port, address)).
_ORIGINAL_DST = {
    socket.AF_INET: (socket.SOL_IP, 16, "!H4s"),  # sockaddr_in
    socket.AF_INET6: (socket.IPPROTO_IPV6, 28, "!H4x16s"),  # sockaddr_in6, flowinfo skipped
}

R = TypeVar("R")


@dataclass(frozen=True)
class Intercepted:
    """One accepted connection: the listener port, the client, and where the client meant to go."""

    port: int
    peer: tuple[str, int]
    original_dst: tuple[str, int]


def original_dst(conn: socket.socket) -> tuple[str, int]:
    """Pre-NAT destination from conntrack (IPv4 or IPv6); the local address when it was not NATed."""
    level, size, layout = _ORIGINAL_DST[conn.family]
    try:
        raw = conn.getsockopt(level, SO_ORIGINAL_DST, size)
    except OSError:
        host, port = conn.getsockname()[:2]
        return str(host), int(port)
    port, addr = struct.unpack_from(layout, raw, 2)
    return socket.inet_ntop(conn.family, addr), int(port)


def bound_socket(
    family: int,
    kind: int,
    host: str,
    port: int,
    mark: int = ZTUNNEL_MARK,
    *,
    reuse_port: bool = False,
    transparent: bool = False,
) -> socket.socket:
    """A non-blocking bound socket (listening if TCP) with ztunnel's mark; IPv6 ones are v6-only
    so that the IPv4 ports stay free for IPv4 sockets."""
    sock = socket.socket(_AF[family], kind)
    try:
        if family == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # REUSEPORT lets an old and a new proxy hold the same ports during a ztunnel handover.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT if reuse_port else socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if transparent:
            if family == 4:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class NetnsListeners(Generic[R]):
    """Sockets created inside a netns, served by one background thread; records what they serve.

    Subclasses yield their sockets from `_bind` (run inside the netns) and handle readiness in
    `_serve`, calling `_record` for each item a test may wait for.
    """

    _what = "item"  # for the timeout message
    _thread_name = "netns-listeners"

    def __init__(self, netns_fd: int, *, worker: NetnsWorker | None = None) -> None:
        self._netns_fd = netns_fd
        self._worker = worker
        self._records: list[R] = []
        self._cond = threading.Condition()
        self._socks: list[socket.socket] = []
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def _bind(self) -> Iterator[socket.socket]:
        raise NotImplementedError

    def _serve(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def _snapshot(self) -> list[R]:
        with self._cond:
            return list(self._records)

    def _record(self, item: R) -> None:
        with self._cond:
            self._records.append(item)
            self._cond.notify_all()

    def start(self) -> Self:
        """Create the sockets inside the netns (first bind failure aborts, like ztunnel), start serving."""

        def create() -> list[socket.socket]:
            made: list[socket.socket] = []
            try:
                made.extend(self._bind())
            except BaseException:
                for s in made:
                    s.close()
                raise
            return made

        if self._worker is not None:
            self._socks = self._worker.call(self._netns_fd, create)
        else:
            with NetnsWorker(name=f"{self._thread_name}-setns") as worker:
                self._socks = worker.call(self._netns_fd, create)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._loop, name=self._thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None and self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._thread.join()
            self._thread = None
        for sock in (*self._socks, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._socks = []
        self._wake_r = self._wake_w = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, pred: Callable[[R], bool], timeout: float = 5.0) -> R:
        """The first recorded item matching `pred`, waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self._records:
                    if pred(item):
                        return item
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching {self._what} within {timeout}s; saw {self._records}")
                self._cond.wait(remaining)

    def _loop(self) -> None:
        assert self._wake_r is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            for sock in self._socks:
                sel.register(sock, selectors.EVENT_READ, sock)
            while True:
                for key, _ in sel.select():
                    if key.data is None:
                        return
                    # One bad peer (reset mid-accept, short read) must not end the serving thread.
                    with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
                        self._serve(key.data)


class CaptureListeners(NetnsListeners[Intercepted]):
    """Listeners on ztunnel's ports inside a netns (IPv4 by default; `families=(6,)` or `(4, 6)`
    for IPv6); records every connection, then closes it."""

    _what = "connection"
    _thread_name = "capture-accept"

    def __init__(
        self,
        netns_fd: int,
        *,
        worker: NetnsWorker | None = None,
        ports: Sequence[int] = ZTUNNEL_PORTS,
        families: Sequence[int] = (4,),
        host: str | None = None,
        mark: int = ZTUNNEL_MARK,
    ) -> None:
        super().__init__(netns_fd, worker=worker)
        if host is not None and len(families) != 1:
            raise ValueError("an explicit host needs exactly one address family")
        self._ports = tuple(ports)
        self._families = tuple(families)
        self._host = host
        self._mark = mark

    @property
    def intercepted(self) -> list[Intercepted]:
        """A snapshot copy (thread-safe)."""
        return self._snapshot()

    def _bind(self) -> Iterator[socket.socket]:
        for family in self._families:
            host = WILDCARD[family] if self._host is None else self._host
            for port in self._ports:
                yield bound_socket(
                    family, socket.SOCK_STREAM, host, port, self._mark, reuse_port=True, transparent=True
                )

    def _serve(self, sock: socket.socket) -> None:
        conn, peer = sock.accept()
        with conn:
            dst = original_dst(conn)
        port = int(sock.getsockname()[1])
        self._record(Intercepted(port=port, peer=(str(peer[0]), int(peer[1])), original_dst=dst))
