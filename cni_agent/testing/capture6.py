"""IPv6 ztunnel-like capture listeners, for proving IPv6 redirection with real traffic.

`cni_agent.testing.capture.CaptureListeners` is IPv4-only (it binds 0.0.0.0 and decodes a
sockaddr_in). ztunnel listens on both families; the IPv6 REDIRECT lands on `::` sockets and the
pre-NAT destination comes from IP6T_SO_ORIGINAL_DST at SOL_IPV6 as a sockaddr_in6. This helper has
the same surface (`start`/`stop`, `intercepted`, `wait_for`) and records the same `Intercepted`
items, so tests can treat both families alike. Sockets are created inside the pod netns on the
NetnsWorker (as ztunnel does) and accepted from a background thread.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence

from cni_agent.redirect.netns import NetnsWorker
from cni_agent.redirect.rules import ZTUNNEL_MARK
from cni_agent.testing.capture import SO_MARK, ZTUNNEL_PORTS, Intercepted

IP6T_SO_ORIGINAL_DST = 80
IPV6_TRANSPARENT = 75
_SOCKADDR_IN6_LEN = 28


def original_dst6(conn: socket.socket) -> tuple[str, int]:
    """Pre-NAT IPv6 destination from conntrack; the local address when it was not NATed."""
    try:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
    except OSError:
        host, port = conn.getsockname()[:2]
        return str(host), int(port)
    port, _flowinfo, addr = struct.unpack_from("!HI16s", raw, 2)  # family, port, flowinfo, addr, scope
    return socket.inet_ntop(socket.AF_INET6, addr), int(port)


def listener6(
    port: int, host: str = "::", mark: int = ZTUNNEL_MARK, *, transparent: bool = True
) -> socket.socket:
    """A non-blocking IPv6-only TCP listener with ztunnel's socket options."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # leave the v4 ports to v4 listeners
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if transparent:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class CaptureListeners6:
    """IPv6 listeners on ztunnel's ports inside a netns; records every connection, then closes it."""

    def __init__(
        self,
        netns_fd: int,
        *,
        worker: NetnsWorker,
        ports: Sequence[int] = ZTUNNEL_PORTS,
        host: str = "::",
        mark: int = ZTUNNEL_MARK,
    ) -> None:
        self._netns_fd = netns_fd
        self._worker = worker
        self._ports = tuple(ports)
        self._host = host
        self._mark = mark
        self._intercepted: list[Intercepted] = []
        self._cond = threading.Condition()
        self._listeners: list[socket.socket] = []
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def intercepted(self) -> list[Intercepted]:
        with self._cond:
            return list(self._intercepted)

    def start(self) -> CaptureListeners6:
        def create() -> list[socket.socket]:
            made: list[socket.socket] = []
            try:
                for port in self._ports:
                    made.append(listener6(port, self._host, self._mark))
            except BaseException:
                for s in made:
                    s.close()
                raise
            return made

        self._listeners = self._worker.call(self._netns_fd, create)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._loop, name="capture6-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None and self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._thread.join()
            self._thread = None
        for sock in (*self._listeners, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._listeners = []
        self._wake_r = self._wake_w = None

    def __enter__(self) -> CaptureListeners6:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, pred: Callable[[Intercepted], bool], timeout: float = 5.0) -> Intercepted:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self._intercepted:
                    if pred(item):
                        return item
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching connection within {timeout}s; saw {self._intercepted}")
                self._cond.wait(remaining)

    def _loop(self) -> None:
        assert self._wake_r is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            for sock in self._listeners:
                sel.register(sock, selectors.EVENT_READ, sock.getsockname()[1])
            while True:
                for key, _ in sel.select():
                    if key.data is None:
                        return
                    assert isinstance(key.fileobj, socket.socket)
                    self._accept(key.fileobj, int(key.data))

    def _accept(self, listener: socket.socket, port: int) -> None:
        try:
            conn, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            dst = original_dst6(conn)
        record = Intercepted(port=port, peer=(str(peer[0]), int(peer[1])), original_dst=dst)
        with self._cond:
            self._intercepted.append(record)
            self._cond.notify_all()
