"""The ZDS server: the asyncio socket adapter around `cni_agent.zds.protocol`.

The agent is the server and ztunnel the client (spec zds.md §8). This module owns what the pure
protocol object cannot: the SOCK_SEQPACKET listener, per-connection tasks, SCM_RIGHTS, deadlines,
accept rate limiting and keepalive probes. Every read and write on a connection happens while holding
that connection's lock, so there is exactly one request outstanding and replies correlate by order.

Overlapping connections (an upgrade): Add goes to the newest, Del to all. When the newest goes away
while an older one is live (a rolled-back upgrade), the older one is sent Add for every cached pod,
since Adds made meanwhile never reached it; for pods it already runs on that netns this is a no-op.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from cni_agent.zds.protocol import (
    HELLO_V1,
    Acked,
    AddRequest,
    ConnectionClosed,
    DelRequest,
    HelloReceived,
    KeepRequest,
    Outgoing,
    ProtocolError,
    Request,
    SnapshotItem,
    WorkloadInfo,
    ZdsConnection,
    ZdsError,
    encode_request,
)

log = structlog.get_logger(__name__)

ACK_BUFFER = 64 * 1024
"""Nack texts can exceed ztunnel's own 1024-byte limit; read acks with room to spare."""
_CMSG_BUFFER = socket.CMSG_SPACE(16 * array.array("i").itemsize)
"""Room for a few fds: ztunnel never sends any, but if it did we must receive and close them."""
_GONE_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED, errno.EBADF}


@dataclass(frozen=True)
class SnapshotEntry:
    """A cached pod. `netns_fd` is owned by the pod cache; the server dup()s it for each send."""

    uid: str
    info: WorkloadInfo
    netns_fd: int | None


class _PeerGone(Exception):
    """The connection ended (EOF, EPIPE, ECONNRESET) before a reply: try another connection."""


class _Skip(Exception):
    """A resync entry became stale (the pod was added or removed since): do not send it."""


class _PeerBroken(ZdsError):
    """The peer broke the protocol (garbage, unsolicited fd); the connection has been dropped.

    A subclass of ZdsError so that a single-connection caller sees a retryable error, while
    `add_workload` can tell it apart from a timeout and fall back to an older connection at once.
    """

    def __init__(self, msg: str) -> None:
        super().__init__(msg, retryable=True)


class _Conn:
    """One accepted ztunnel connection: socket, protocol state, and the lock that serialises its I/O."""

    def __init__(self, sock: socket.socket, cid: int, now: float) -> None:
        self.sock = sock
        self.id = cid
        self.proto = ZdsConnection()
        self.lock = asyncio.Lock()
        self.last_io = now
        self.task: asyncio.Task[None] | None = None
        self.dropped = False
        self.ready = asyncio.Event()
        """Set once the snapshot is acked (or the connection is dropped): live requests queue behind it."""
        self._waiter: tuple[asyncio.Future[None], int, bool] | None = None

    async def _wait(self, writable: bool, timeout: float) -> None:
        """Wait until the socket is readable/writable; abort() wakes this with _PeerGone."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()
        if fd < 0:
            raise _PeerGone("socket closed")

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if writable:
            loop.add_writer(fd, ready)
        else:
            loop.add_reader(fd, ready)
        self._waiter = (fut, fd, writable)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            if self._waiter is not None:  # abort() has not already unregistered it
                self._waiter = None
                if writable:
                    loop.remove_writer(fd)
                else:
                    loop.remove_reader(fd)

    def abort(self) -> None:
        """Close the socket, first unregistering and failing any pending wait (so it does not sit
        until its deadline, and a reused fd number is never unregistered by mistake)."""
        if self._waiter is not None:
            fut, fd, writable = self._waiter
            self._waiter = None
            loop = asyncio.get_running_loop()
            if writable:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)
            if not fut.done():
                fut.set_exception(_PeerGone("connection closed locally"))
        self.sock.close()

    async def send(self, out: Outgoing, timeout: float) -> None:
        """Write one record (+ the Add's fd). Raises TimeoutError or _PeerGone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                if out.fd is not None:
                    socket.send_fds(self.sock, [out.payload], [out.fd])
                else:
                    self.sock.send(out.payload)
                self.last_io = loop.time()
                return
            except BlockingIOError:
                await self._wait(True, max(0.0, deadline - loop.time()))
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    raise _PeerGone(f"write failed: {exc.strerror}") from exc
                raise

    async def recv(self, timeout: float) -> tuple[bytes, int, bool]:
        """Read one record: (data, number of fds received and closed, MSG_TRUNC). `b""` = EOF."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(ACK_BUFFER, _CMSG_BUFFER, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                await self._wait(False, max(0.0, deadline - loop.time()))
                continue
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    return b"", 0, False
                raise
            self.last_io = loop.time()
            nfds = 0
            for level, kind, blob in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
                    for fd in fds:
                        nfds += 1
                        with contextlib.suppress(OSError):
                            os.close(fd)
            return data, nfds, bool(flags & socket.MSG_TRUNC)


class ZdsServer:
    """Serves ztunnel connections: snapshot on each, steady-state Add/Del, keepalive.

    `snapshot` is called once per connection, right after the hello, and must return the pod cache
    as it is now. `on_change(count)` is called whenever the number of connections changes (metrics).
    """

    def __init__(
        self,
        path: str,
        snapshot: Callable[[], list[SnapshotEntry]],
        *,
        hello_timeout: float = 5.0,
        ack_timeout: float = 5.0,
        keepalive_idle: float = 5.0,
        keepalive_probe: float = 0.01,
        accept_interval: float = 0.2,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.path = path
        self._snapshot = snapshot
        self._hello_timeout = hello_timeout
        self._ack_timeout = ack_timeout
        self._keepalive_idle = keepalive_idle
        self._keepalive_probe = keepalive_probe
        self._accept_interval = accept_interval  # 5 accepts/s, burst 1
        self.on_change = on_change
        self._listener: socket.socket | None = None
        self._listener_ino: int | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: list[_Conn] = []  # oldest first
        self._next_id = 1
        self._closing = False
        self._resyncs: set[asyncio.Task[None]] = set()
        self._resync_touched: list[set[str]] = []  # uids requested since each running resync began

    # -- lifecycle -----------------------------------------------------------------------------

    async def bind(self) -> None:
        """Unlink a stale socket file, bind and listen; nothing is accepted until start_accepting()."""
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(self.path)
            sock.listen(16)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._listener_ino = os.stat(self.path).st_ino
        log.info("zds.listening", path=self.path)

    async def start_accepting(self) -> None:
        if self._listener is None:
            await self.bind()
        if self._accept_task is None:
            self._accept_task = asyncio.create_task(self._accept_loop(), name="zds-accept")

    async def close(self) -> None:
        """Stop accepting, drop every connection, remove our socket file (not a successor's)."""
        self._closing = True
        resyncs = list(self._resyncs)
        for resync in resyncs:
            resync.cancel()
        for resync in resyncs:
            with contextlib.suppress(asyncio.CancelledError):
                await resync
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        tasks = [c.task for c in self._conns if c.task is not None]
        for conn in list(self._conns):
            self._drop(conn, "server closing")
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._listener_ino:
                    os.unlink(self.path)

    @property
    def connected(self) -> int:
        return sum(1 for c in self._conns if not c.dropped)

    # -- requests ------------------------------------------------------------------------------

    async def add_workload(self, uid: str, info: WorkloadInfo, netns_fd: int) -> None:
        """Send Add(+fd) to the newest connection and wait for its ack.

        If that connection turns out to be gone (EOF, reset) or breaks the protocol, it is dropped and
        the next-newest is tried. Raises ZdsError(retryable=True) for "no ztunnel connected", a nack
        ("got ack error: <ztunnel's text>"), or a timeout (that connection is then closed; ztunnel
        reconnects and gets a snapshot). Raises ZdsError(retryable=False) for input the protocol
        cannot carry (empty uid, a name over its Kubernetes limit, a record over 1024 bytes, a closed fd).
        """
        encode_request(AddRequest(uid, info))  # refuse bad input before looking for a connection
        self._touch(uid)
        try:
            fd = os.dup(netns_fd)
        except OSError as exc:
            msg = f"netns fd {netns_fd} for {uid} is not open: {exc.strerror}"
            raise ZdsError(msg, retryable=False) from exc
        gone = ""
        try:
            for conn in reversed(list(self._conns)):
                if conn.dropped:
                    continue
                try:
                    error = await self._request(conn, functools.partial(conn.proto.send_add, uid, info, fd))
                except (_PeerGone, _PeerBroken) as exc:
                    # That ztunnel is gone (its successor gets a snapshot); the next-newest serves the pod.
                    log.info("zds.add_fallback", uid=uid, conn=conn.id, reason=str(exc))
                    gone = f" (connection {conn.id} went away: {exc})"
                    continue
                if error:
                    raise ZdsError(f"got ack error: {error}", retryable=True)
                log.debug("zds.added", uid=uid, conn=conn.id)
                return
            raise ZdsError("no ztunnel connected" + gone, retryable=True)
        finally:
            os.close(fd)

    async def del_workload(self, uid: str) -> None:
        """Send Del to every connection and aggregate; a connection that goes away counts as done
        (its successor gets a snapshot without the pod)."""
        encode_request(DelRequest(uid))
        self._touch(uid)
        conns = [c for c in self._conns if not c.dropped]
        results = await asyncio.gather(*(self._del_one(c, uid) for c in conns), return_exceptions=True)
        failures: list[str] = []
        retryable = True
        for conn, result in zip(conns, results, strict=True):
            if isinstance(result, ZdsError):
                failures.append(f"conn {conn.id}: {result.msg}")
                retryable = retryable and result.retryable
            elif isinstance(result, BaseException):
                raise result
        if failures:
            raise ZdsError(f"del {uid}: " + "; ".join(failures), retryable=retryable)

    async def _del_one(self, conn: _Conn, uid: str) -> None:
        try:
            error = await self._request(conn, functools.partial(conn.proto.send_del, uid))
        except (_PeerGone, _PeerBroken) as exc:
            log.info("zds.del_conn_gone", uid=uid, conn=conn.id, reason=str(exc))
            return
        if error:
            raise ZdsError(f"got ack error: {error}", retryable=True)

    async def _request(self, conn: _Conn, make: Callable[[], Outgoing]) -> str:
        """One lock-step exchange on `conn`; returns the ack's error text ("" = success).

        Waits for the connection's snapshot first: a request that won the lock before the
        connection's own task read the hello would otherwise hit a phase error.
        """
        await conn.ready.wait()
        async with conn.lock:
            if conn.dropped or conn.proto.closed:
                raise _PeerGone("connection closed")
            out = make()
            try:
                return await self._exchange(conn, out)
            except asyncio.CancelledError:
                # The request is on the wire (or half-written) and its ack will never be read here:
                # the connection's lock-step state is unknowable. Close it; ztunnel reconnects and
                # gets a full snapshot (zds.md §8.16), instead of every later request failing.
                self._drop(conn, f"request cancelled ({_describe(out.request)})")
                raise

    async def _exchange(self, conn: _Conn, out: Outgoing) -> str:
        """Write `out` and read its ack; caller holds conn.lock. Closes the connection on any failure."""
        what = _describe(out.request)
        try:
            await conn.send(out, self._ack_timeout)
        except TimeoutError:
            self._drop(conn, f"write timeout ({what})")
            msg = f"timed out writing {what} to ztunnel; connection closed"
            raise ZdsError(msg, retryable=True) from None
        except _PeerGone:
            self._drop(conn, "peer gone on write")
            raise
        except OSError as exc:  # after TimeoutError, which is an OSError too
            self._drop(conn, f"write error: {exc}")
            raise ZdsError(f"writing {what} to ztunnel failed: {exc}", retryable=True) from exc
        try:
            data, nfds, truncated = await conn.recv(self._ack_timeout)
        except TimeoutError:
            self._drop(conn, f"ack timeout ({what})")
            msg = (
                f"timed out after {self._ack_timeout:g}s waiting for ztunnel's ack of {what}; "
                "connection closed"
            )
            raise ZdsError(msg, retryable=True) from None
        except OSError as exc:  # after TimeoutError, which is an OSError too
            self._drop(conn, f"read error: {exc}")
            raise ZdsError(f"reading ztunnel's ack of {what} failed: {exc}", retryable=True) from exc
        if conn.dropped:  # closed locally (server closing) while the read was in flight
            raise _PeerGone("connection closed locally")
        for event in conn.proto.receive(data, fds=nfds, truncated=truncated):
            if isinstance(event, Acked):
                return event.error
            if isinstance(event, ProtocolError):
                self._drop(conn, f"protocol error: {event.reason}")
                raise _PeerBroken(f"protocol error from ztunnel: {event.reason}")
            if isinstance(event, ConnectionClosed):
                self._drop(conn, "EOF")
                raise _PeerGone("EOF before ack")
        self._drop(conn, "no event for response")
        raise ZdsError("ztunnel response produced no ack", retryable=True)

    # -- per-connection task -------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.warning("zds.accept_failed", error=str(exc))
                await asyncio.sleep(self._accept_interval)
                continue
            sock.setblocking(False)
            conn = _Conn(sock, self._next_id, loop.time())
            self._next_id += 1
            self._conns.append(conn)
            log.info("zds.accepted", conn=conn.id, connections=self.connected)
            self._notify()
            conn.task = asyncio.create_task(self._serve(conn), name=f"zds-conn-{conn.id}")
            # ztunnel reconnects without delay after EOF: never accept more than 5/s.
            await asyncio.sleep(self._accept_interval)

    async def _serve(self, conn: _Conn) -> None:
        try:
            async with conn.lock:
                if not await self._hello(conn):
                    return
                await self._send_snapshot(conn)
            conn.ready.set()
            await self._keepalive(conn)
        except asyncio.CancelledError:
            raise
        except (ZdsError, _PeerGone) as exc:
            log.warning("zds.connection_failed", conn=conn.id, error=str(exc))
        except Exception:
            log.exception("zds.connection_crashed", conn=conn.id)
        finally:
            self._drop(conn, "connection task ended")

    async def _hello(self, conn: _Conn) -> bool:
        try:
            data, nfds, truncated = await conn.recv(self._hello_timeout)
        except TimeoutError:
            log.warning("zds.no_hello", conn=conn.id, timeout=self._hello_timeout)
            return False
        for event in conn.proto.receive(data, fds=nfds, truncated=truncated):
            if isinstance(event, HelloReceived):
                if event.version != HELLO_V1:
                    log.warning("zds.unknown_hello_version", conn=conn.id, version=event.version)
                log.info("zds.hello", conn=conn.id, version=event.version)
                return True
            log.warning("zds.bad_hello", conn=conn.id, event=repr(event))
        return False

    async def _send_snapshot(self, conn: _Conn) -> None:
        """Add(+fd) for each pod with a known netns, Keep for the rest, then SnapshotSent; each acked."""
        entries = self._snapshot()
        dups: list[int] = []
        items: list[SnapshotItem] = []
        try:
            for entry in entries:
                fd: int | None = None
                if entry.netns_fd is not None:
                    try:
                        fd = os.dup(entry.netns_fd)
                        dups.append(fd)
                    except OSError as exc:
                        log.warning("zds.snapshot_bad_fd", uid=entry.uid, error=str(exc))
                req: Request = AddRequest(entry.uid, entry.info) if fd is not None else KeepRequest(entry.uid)
                try:
                    encode_request(req)
                except ZdsError as exc:
                    log.error("zds.snapshot_skip", uid=entry.uid, error=exc.msg)
                    continue
                items.append(SnapshotItem(entry.uid, entry.info, fd))
            nacks = 0
            out: Outgoing | None = conn.proto.start_snapshot(items)
            while out is not None:
                error = await self._exchange(conn, out)
                if error:
                    nacks += 1
                    log.warning(
                        "zds.snapshot_nack", conn=conn.id, request=_describe(out.request), error=error
                    )
                out = conn.proto.next_outgoing()
            adds = sum(1 for i in items if i.fd is not None)
            log.info("zds.snapshot_sent", conn=conn.id, adds=adds, keeps=len(items) - adds, nacks=nacks)
        finally:
            for fd in dups:
                os.close(fd)

    async def _keepalive(self, conn: _Conn) -> None:
        """After `keepalive_idle` without traffic, a very short read: timeout = alive, EOF = gone,
        data = protocol violation (ztunnel never speaks unprompted)."""
        loop = asyncio.get_running_loop()
        while not conn.dropped:
            wait = conn.last_io + self._keepalive_idle - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            async with conn.lock:
                if conn.dropped:
                    return
                if loop.time() - conn.last_io < self._keepalive_idle:
                    continue
                try:
                    data, nfds, truncated = await conn.recv(self._keepalive_probe)
                except TimeoutError:
                    conn.last_io = loop.time()
                    continue
                for event in conn.proto.receive(data, fds=nfds, truncated=truncated):
                    if isinstance(event, ConnectionClosed):
                        log.info("zds.disconnected", conn=conn.id)
                    elif isinstance(event, ProtocolError):
                        log.warning("zds.protocol_error", conn=conn.id, reason=event.reason)
                if conn.proto.closed:
                    return

    # -- promotion of the next-newest connection ----------------------------------------------------

    def _touch(self, uid: str) -> None:
        for touched in self._resync_touched:
            touched.add(uid)

    def _promote(self, conn: _Conn) -> None:
        """The newest connection went away and `conn`, already past its snapshot, is newest again.

        Adds made while a newer ztunnel was connected went only to that one (§8.7), so `conn` may be
        missing pods (a rolled-back upgrade: the new ztunnel dies, the old one stays). Re-send Add for
        every cached pod with a known netns; for pods `conn` already runs on that netns it is a no-op.
        """
        touched: set[str] = set()
        self._resync_touched.append(touched)
        task = asyncio.create_task(self._resync(conn, touched), name=f"zds-resync-{conn.id}")
        self._resyncs.add(task)
        task.add_done_callback(self._resyncs.discard)

    async def _resync(self, conn: _Conn, touched: set[str]) -> None:
        dups: list[tuple[str, WorkloadInfo, int]] = []
        sent = nacks = 0
        try:
            # dup now: the cache may close a pod's fd while we work through the list
            for entry in self._snapshot():
                if entry.netns_fd is not None:
                    with contextlib.suppress(OSError):
                        dups.append((entry.uid, entry.info, os.dup(entry.netns_fd)))
            for uid, info, fd in dups:
                if conn.dropped or not self._conns or self._conns[-1] is not conn:
                    break  # gone, or a newer ztunnel connected (it gets a full snapshot)

                def make(uid: str = uid, info: WorkloadInfo = info, fd: int = fd) -> Outgoing:
                    # checked under the connection lock: an add/del for this pod since the cache was
                    # read is newer than our entry, and has already gone (or is going) to this ztunnel
                    if uid in touched:
                        raise _Skip(uid)
                    return conn.proto.send_add(uid, info, fd)

                try:
                    error = await self._request(conn, make)
                except _Skip:
                    continue
                except (_PeerGone, ZdsError) as exc:
                    log.warning("zds.resync_aborted", conn=conn.id, uid=uid, error=str(exc))
                    break
                sent += 1
                if error:
                    nacks += 1
                    log.warning("zds.resync_nack", conn=conn.id, uid=uid, error=error)
            log.info("zds.resynced", conn=conn.id, adds=sent, nacks=nacks)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("zds.resync_crashed", conn=conn.id)
        finally:
            for _, _, fd in dups:
                os.close(fd)
            self._resync_touched.remove(touched)

    def _drop(self, conn: _Conn, reason: str) -> None:
        """Close `conn` once; idempotent. Cancels its task unless called from it. If it was the newest
        and an older connection is live, that one is brought up to date (`_promote`)."""
        if conn.dropped:
            return
        was_newest = bool(self._conns) and self._conns[-1] is conn
        conn.dropped = True
        conn.ready.set()
        conn.proto.close()
        conn.abort()
        with contextlib.suppress(ValueError):
            self._conns.remove(conn)
        log.info("zds.dropped", conn=conn.id, reason=reason, connections=self.connected)
        if conn.task is not None and conn.task is not asyncio.current_task():
            conn.task.cancel()
        self._notify()
        if was_newest and self._conns and not self._closing:
            successor = self._conns[-1]
            # Even one still in its snapshot: that snapshot may have been read before pods that
            # since went only to `conn`. _resync's requests wait for the snapshot to finish; Adds
            # for pods it already runs on the same netns are no-ops in ztunnel.
            if not successor.dropped:
                log.info("zds.promote", conn=successor.id, dropped=conn.id)
                self._promote(successor)

    def _notify(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self.connected)
            except Exception:
                log.exception("zds.on_change_failed")


def _describe(req: Request) -> str:
    uid = getattr(req, "uid", None)
    return f"{type(req).__name__}({uid})" if uid is not None else type(req).__name__
