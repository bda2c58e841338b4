"""A ztunnel-like ZDS client for tests and the demo (spec zds.md §6, §7).

Real ztunnel needs a control plane before it ever connects (§7), so tests and `make demo` use this
stand-in. It reproduces what matters to the agent: the hello, lock-step acks, snapshot reconcile,
netns identity by (st_dev, st_ino), pending proxies, and the exact reactions to bad input (nack +
reconnect for read errors, nack + exit for protocol misuse). It is deliberately thread-based with
blocking sockets so that synchronous tests can drive an asyncio agent without sharing its loop.

For each started proxy it creates listeners in the pod netns through `listener_factory(netns_fd)`
(default: `cni_agent.testing.capture.CaptureListeners`). The fake owns the netns fd and closes it
when the proxy is drained; the factory must not close it.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from cni_agent.testing.capture import CaptureListeners, Intercepted
from cni_agent.zds.protocol import (
    MAX_RECORD,
    AddRequest,
    DelRequest,
    KeepRequest,
    Request,
    SnapshotSentRequest,
    WorkloadInfo,
    ZdsError,
    decode_request,
    encode_ack,
    encode_hello,
)

log = structlog.get_logger(__name__)

DEFAULT_SOCKET = "/var/run/ztunnel/ztunnel.sock"
_FD_SIZE = array.array("i").itemsize
_CMSG_ONE_FD = socket.CMSG_SPACE(_FD_SIZE)  # what ztunnel allocates: room for exactly one fd


class Listeners(Protocol):
    """The proxy's sockets inside the pod netns (see cni_agent.testing.capture)."""

    def start(self) -> object: ...

    def stop(self) -> None: ...

    @property
    def intercepted(self) -> list[Intercepted]: ...

    def wait_for(self, pred: Callable[[Intercepted], bool], timeout: float = 5.0) -> Intercepted: ...


ListenerFactory = Callable[[int], Listeners]
NackHook = Callable[[Request], "str | None"]
RawReplyHook = Callable[[Request], "bytes | None"]


def capture_factory(netns_fd: int) -> Listeners:
    """The default: real listeners on 15008/15006/15001 (SO_MARK 1337) inside the pod netns."""
    return CaptureListeners(netns_fd)


class NoListeners:
    """A proxy that binds nothing (`--listeners none`): for protocol-only runs."""

    def __init__(self, netns_fd: int) -> None:
        self.netns_fd = netns_fd

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    @property
    def intercepted(self) -> list[Intercepted]:
        return []

    def wait_for(self, pred: Callable[[Intercepted], bool], timeout: float = 5.0) -> Intercepted:
        raise TimeoutError("this proxy has no listeners (--listeners none)")


@dataclass
class RunningProxy:
    """A started proxy: ztunnel keeps the netns fd open for as long as the proxy exists."""

    uid: str
    info: WorkloadInfo
    netns: tuple[int, int]  # (st_dev, st_ino) of the netns fd
    fd: int
    listeners: Listeners


@dataclass
class PendingProxy:
    """An Add whose proxy failed to start; retried every `pending_retry` s while connected."""

    uid: str
    info: WorkloadInfo
    netns: tuple[int, int]
    fd: int
    error: str


class _Fatal(Exception):
    """ztunnel would nack with a ProtocolError and exit the process."""


class FakeZtunnel:
    """Connects to the agent's ZDS socket and behaves like ztunnel.

    State survives reconnects (`running`); `restart()` simulates a new process (everything drained).
    Tests observe `running`, `requests`, `acks_sent`, `connections`, `snapshots`, `exited`, and wait
    with `wait_until(pred)`. Failure hooks (things a real ztunnel does not do, to test the agent):
    `auto_ack=False` (read requests, never answer), `nack_with` (a string to nack every Add with, or a
    callable request -> nack text or None), `raw_reply` (request -> bytes to send instead of the ack,
    or None for the normal ack) and `send_unsolicited(data)`.
    """

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        *,
        listener_factory: ListenerFactory | None = None,
        auto_ack: bool = True,
        nack_with: str | NackHook | None = None,
        raw_reply: RawReplyHook | None = None,
        pending_retry: float = 5.0,
        max_backoff: float = 15.0,
    ) -> None:
        self.socket_path = socket_path
        self.listener_factory: ListenerFactory = listener_factory or capture_factory
        self.auto_ack = auto_ack
        self.nack_with = nack_with
        self.raw_reply = raw_reply
        self.pending_retry = pending_retry
        self.max_backoff = max_backoff

        self._cond = threading.Condition(threading.RLock())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

        # survives reconnects
        self.running: dict[str, RunningProxy] = {}
        # per connection
        self.pending: dict[str, PendingProxy] = {}
        self.snapshot_names: set[str] = set()
        self.snapshot_received = False
        # observations
        self.connected = False
        self.connections = 0
        self.snapshots = 0
        self.requests: list[Request] = []
        self.acks_sent: list[tuple[Request | None, str]] = []
        self.exited: str | None = None
        self._exit_reason = ""

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the client thread: connect (retrying while the socket is missing), hello, serve."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        with self._cond:
            self.exited = None
        self._thread = threading.Thread(target=self._run, name="fake-ztunnel", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Like a ztunnel drain: close the stream (agent sees EOF), then drain every proxy."""
        self._stop.set()
        self._kick()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._cond:
            for uid in list(self.running):
                self._drain(uid)
            self._drop_pending()
            # a stopped process has no connection and no snapshot: waiters must not see stale state
            self.snapshot_received = False
            self.snapshot_names = set()
            self._cond.notify_all()

    def restart(self) -> None:
        """A new ztunnel process: nothing survives, the agent must resend everything."""
        self.stop()
        self.start()

    def reconnect(self) -> None:
        """Drop the connection only (as after a read error); running proxies survive."""
        self._kick()

    def send_unsolicited(self, data: bytes) -> None:
        """Write a record the agent did not ask for (ztunnel never does: a protocol violation)."""
        with self._cond:
            sock = self._sock
        if sock is None:
            raise ConnectionError("fake ztunnel is not connected")
        sock.send(data)

    def _kick(self) -> None:
        with self._cond:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FakeZtunnel:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation ---------------------------------------------------------------------------

    def wait_until(self, pred: Callable[[FakeZtunnel], bool], timeout: float = 5.0, what: str = "") -> None:
        """Block until `pred(self)` holds (checked under the state lock); TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: pred(self), timeout):
                raise TimeoutError(
                    f"fake ztunnel: condition {what or pred!r} not met in {timeout}s "
                    f"(running={sorted(self.running)}, connected={self.connected}, exited={self.exited})"
                )

    def running_uids(self) -> set[str]:
        with self._cond:
            return set(self.running)

    # -- client thread -------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.005
        while not self._stop.is_set():
            sock = self._connect()
            if sock is None:
                return
            try:
                sock.sendall(encode_hello())
            except OSError as exc:
                log.warning("ztunnel.hello_failed", error=str(exc))
                sock.close()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.005
            with self._cond:
                self._sock = sock
                self.connected = True
                self.connections += 1
                self.pending = {}
                self.snapshot_names = set()
                self.snapshot_received = False
                self._cond.notify_all()
            log.info("ztunnel.connected", socket=self.socket_path)
            try:
                outcome = self._serve(sock)
            finally:
                with self._cond:
                    self._sock = None
                    self.connected = False
                    self._drop_pending()
                    self._cond.notify_all()
                sock.close()
            log.info("ztunnel.disconnected", outcome=outcome)
            if outcome == "exit":
                # the process is gone: its proxies with it, all at once as far as observers can tell
                with self._cond:
                    for uid in list(self.running):
                        self._drain(uid)
                    self.exited = self._exit_reason
                    self._cond.notify_all()
                return
            # EOF or read error: reconnect at once, no sleep (§7).

    def _connect(self) -> socket.socket | None:
        delay = 0.02
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(self.socket_path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                self._stop.wait(delay)
                delay = min(delay * 2, self.max_backoff)
        return None

    def _serve(self, sock: socket.socket) -> str:
        sock.settimeout(0.1)  # wake up to honour stop() and retry pending proxies
        next_retry = time.monotonic() + self.pending_retry
        while not self._stop.is_set():
            try:
                data, ancdata, flags, _ = sock.recvmsg(MAX_RECORD, _CMSG_ONE_FD, socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                if time.monotonic() >= next_retry:
                    next_retry = time.monotonic() + self.pending_retry
                    self._retry_pending()
                continue
            except OSError as exc:
                log.info("ztunnel.read_error", error=str(exc))
                return "read-error"
            fds = _collect_fds(ancdata)
            if not data and not flags & socket.MSG_TRUNC:
                _close_all(fds)
                return "eof"
            try:
                outcome = self._handle(sock, data, fds, flags)
            except _Fatal as exc:
                self._exit_reason = str(exc)
                log.error("ztunnel.exit", reason=str(exc))
                return "exit"
            except OSError as exc:  # the ack could not be written
                log.info("ztunnel.write_error", error=str(exc))
                return "write-error"
            if outcome is not None:
                return outcome
        return "stopped"

    def _handle(self, sock: socket.socket, data: bytes, fds: list[int], flags: int) -> str | None:
        """One request → at most one response. Returns an outcome to end the connection, else None."""
        error: str | None = None
        req: Request | None = None
        if flags & socket.MSG_TRUNC:
            error = "received truncated message"
        elif flags & socket.MSG_CTRUNC:
            error = "truncated"
        else:
            try:
                req = decode_request(data)
            except ZdsError as exc:
                error = exc.msg
            if isinstance(req, AddRequest):
                if not fds:
                    error = "No control message"
                elif len(fds) > 1:
                    error = f"Expected 1 FD, got {len(fds)}"
            elif req is not None and fds:
                error = "Unexpected control message"
        if error is not None or req is None:
            _close_all(fds)
            self._reply(sock, None, f"failure to read message : {error}")
            return "read-error"

        with self._cond:
            self.requests.append(req)
            self._cond.notify_all()
        fd = fds[0] if fds else None
        if not self.auto_ack:
            if fd is not None:
                os.close(fd)
            return None
        raw = self.raw_reply(req) if self.raw_reply is not None else None
        if raw is not None:
            if fd is not None:
                os.close(fd)
            sock.send(raw)
            return None
        nack = self._nack_for(req)
        if nack is not None:
            if fd is not None:
                os.close(fd)
            self._reply(sock, req, nack)
            return None
        with self._cond:
            try:
                text = self._apply(req, fd)
            except _Fatal as exc:
                self._reply(sock, req, f'failure to process message : ProtocolError("{exc}")')
                raise
            finally:
                self._cond.notify_all()
        self._reply(sock, req, text)
        return None

    def _nack_for(self, req: Request) -> str | None:
        hook = self.nack_with
        if hook is None:
            return None
        if isinstance(hook, str):
            return hook if isinstance(req, AddRequest) else None
        return hook(req)

    def _apply(self, req: Request, fd: int | None) -> str:
        """ztunnel's per-connection state machine (zds.md §6); caller holds the lock."""
        if isinstance(req, AddRequest):
            assert fd is not None
            if req.info is None:
                os.close(fd)
                raise _Fatal("workload_info is required but not present")
            if not self.snapshot_received:
                self.snapshot_names.add(req.uid)
            start_error = self._start_proxy(req.uid, req.info, fd)
            return "" if start_error is None else f"failure to start proxy : {start_error}"
        if isinstance(req, KeepRequest):
            if self.snapshot_received:
                raise _Fatal("pod keep received after snapshot")
            self.snapshot_names.add(req.uid)
            return ""
        if isinstance(req, DelRequest):
            pending = self.pending.pop(req.uid, None)
            if pending is not None:
                os.close(pending.fd)
            if not self.snapshot_received:
                self.snapshot_names.discard(req.uid)  # reconcile will stop a running proxy
            elif req.uid in self.running:
                self._drain(req.uid)
            return ""
        assert isinstance(req, SnapshotSentRequest)
        if self.snapshot_received:
            raise _Fatal("pod snapshot received already")
        for uid in [u for u in self.running if u not in self.snapshot_names]:
            self._drain(uid)
        self.snapshot_names.clear()
        self.snapshot_received = True
        self.snapshots += 1
        return ""

    def _start_proxy(self, uid: str, info: WorkloadInfo, fd: int) -> str | None:
        """Takes ownership of `fd`. Returns None on success or the start error (uid goes pending)."""
        st = os.fstat(fd)
        netns = (st.st_dev, st.st_ino)
        current = self.running.get(uid)
        if current is not None and current.netns == netns:
            os.close(fd)
            self._forget_pending(uid)
            return None
        if current is not None:
            self._drain(uid)
        listeners: Listeners | None = None
        try:
            listeners = self.listener_factory(fd)
            listeners.start()
        except Exception as exc:
            if listeners is not None:
                with contextlib.suppress(Exception):
                    listeners.stop()
            self._forget_pending(uid)
            self.pending[uid] = PendingProxy(uid, info, netns, fd, repr(exc))
            log.warning("ztunnel.proxy_pending", uid=uid, error=repr(exc))
            return repr(exc)
        self._forget_pending(uid)
        assert listeners is not None
        self.running[uid] = RunningProxy(uid, info, netns, fd, listeners)
        log.info("ztunnel.proxy_started", uid=uid, pod=f"{info.namespace}/{info.name}", netns_ino=netns[1])
        return None

    def _retry_pending(self) -> None:
        with self._cond:
            for uid, pend in list(self.pending.items()):
                del self.pending[uid]
                self._start_proxy(uid, pend.info, pend.fd)
            self._cond.notify_all()

    def _forget_pending(self, uid: str) -> None:
        old = self.pending.pop(uid, None)
        if old is not None:
            os.close(old.fd)

    def _drop_pending(self) -> None:
        """Pending proxies never ran: dropped (not drained) when the connection ends."""
        for pend in self.pending.values():
            os.close(pend.fd)
        self.pending = {}

    def _drain(self, uid: str) -> None:
        proxy = self.running.pop(uid)
        try:
            proxy.listeners.stop()
        except Exception as exc:
            log.warning("ztunnel.listener_stop_failed", uid=uid, error=repr(exc))
        os.close(proxy.fd)
        log.info("ztunnel.proxy_drained", uid=uid)

    def _reply(self, sock: socket.socket, req: Request | None, error: str) -> None:
        # Record first: once the bytes are out the agent (and a test) may already look at acks_sent.
        with self._cond:
            self.acks_sent.append((req, error))
            self._cond.notify_all()
        sock.sendall(encode_ack(error))


def _collect_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(blob[: len(blob) - len(blob) % _FD_SIZE])
            fds.extend(arr)
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- CLI -------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake until SIGINT/SIGTERM, logging workloads and intercepted connections."""
    parser = argparse.ArgumentParser(prog="python -m cni_agent.testing.ztunnel", description=__doc__)
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="agent ZDS socket path")
    parser.add_argument("--pending-retry", type=float, default=5.0)
    parser.add_argument(
        "--listeners",
        choices=("capture", "none"),
        default="capture",
        help="bind capture listeners in each pod netns (default) or nothing",
    )
    args = parser.parse_args(argv)

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    factory: ListenerFactory = capture_factory if args.listeners == "capture" else NoListeners
    fake = FakeZtunnel(args.socket, listener_factory=factory, pending_retry=args.pending_retry)
    fake.start()
    seen: dict[str, int] = {}
    known: set[str] = set()
    try:
        while not done.wait(0.2):
            with fake._cond:
                proxies = dict(fake.running)
            for uid in known - proxies.keys():
                log.info("ztunnel.workload_removed", uid=uid)
                seen.pop(uid, None)
            for uid, proxy in proxies.items():
                if uid not in known:
                    info = proxy.info
                    log.info(
                        "ztunnel.workload",
                        uid=uid,
                        namespace=info.namespace,
                        name=info.name,
                        service_account=info.service_account,
                        netns_ino=proxy.netns[1],
                    )
                intercepted: list[Any] = list(getattr(proxy.listeners, "intercepted", []))
                for item in intercepted[seen.get(uid, 0) :]:
                    log.info("ztunnel.intercepted", uid=uid, pod=proxy.info.name, connection=repr(item))
                seen[uid] = len(intercepted)
            known = set(proxies)
            if fake.exited is not None:
                log.error("ztunnel.exited", reason=fake.exited)
                return 1
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
