"""ztunnel-like capture listeners inside a pod netns, for proving redirection with real traffic.

ztunnel creates its in-pod listeners by entering the pod netns on one thread, creating the sockets
and leaving again (zds.md §9); the sockets stay in the pod netns. This helper does the same with the
NetnsWorker, then accepts on a background thread (accept works from any netns) and records, per
connection, which listener got it and the pre-NAT destination (SO_ORIGINAL_DST). Used by the
redirect tests and by the ztunnel-like ZDS test peer.
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
from cni_agent.redirect.rules import INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, ZTUNNEL_MARK

SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
SO_MARK = getattr(socket, "SO_MARK", 36)
ZTUNNEL_PORTS: tuple[int, ...] = (INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT)


@dataclass(frozen=True)
class Intercepted:
    """One accepted connection: the listener port, the client, and where the client meant to go."""

    port: int
    peer: tuple[str, int]
    original_dst: tuple[str, int]


def original_dst(conn: socket.socket) -> tuple[str, int]:
    """Pre-NAT destination from conntrack; the local address when the connection was not NATed."""
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        host, port = conn.getsockname()[:2]
        return str(host), int(port)
    port, addr = struct.unpack_from("!H4s", raw, 2)  # struct sockaddr_in: family, port, addr
    return socket.inet_ntoa(addr), int(port)


def _listener(port: int, host: str, mark: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class CaptureListeners:
    """Listeners on ztunnel's ports inside a netns; records every connection, then closes it."""

    def __init__(
        self,
        netns_fd: int,
        *,
        worker: NetnsWorker | None = None,
        ports: Sequence[int] = ZTUNNEL_PORTS,
        host: str = "0.0.0.0",
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
        """A snapshot copy (thread-safe)."""
        with self._cond:
            return list(self._intercepted)

    def start(self) -> CaptureListeners:
        """Create the sockets inside the netns (first bind failure aborts, like ztunnel), start accepting."""

        def create() -> list[socket.socket]:
            made: list[socket.socket] = []
            try:
                for port in self._ports:
                    made.append(_listener(port, self._host, self._mark))
            except BaseException:
                for s in made:
                    s.close()
                raise
            return made

        if self._worker is not None:
            self._listeners = self._worker.call(self._netns_fd, create)
        else:
            with NetnsWorker(name="capture-setns") as worker:
                self._listeners = worker.call(self._netns_fd, create)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._loop, name="capture-accept", daemon=True)
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

    def __enter__(self) -> CaptureListeners:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, pred: Callable[[Intercepted], bool], timeout: float = 5.0) -> Intercepted:
        """The first recorded connection matching `pred`, waiting up to `timeout` seconds."""
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
                    self._accept(key.fileobj, int(key.data))  # type: ignore[arg-type]

    def _accept(self, listener: socket.socket, port: int) -> None:
        try:
            conn, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            dst = original_dst(conn)
        record = Intercepted(port=port, peer=(str(peer[0]), int(peer[1])), original_dst=dst)
        with self._cond:
            self._intercepted.append(record)
            self._cond.notify_all()
