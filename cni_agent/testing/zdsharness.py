"""Shared pieces of the ZDS tests: a pod cache as ZDS sees it, recording proxies, asyncio waits.

The ZDS tests run a real ZdsServer on an asyncio loop in the test thread and FakeZtunnel peers on
their own threads with blocking sockets; every blocking wait on a peer therefore goes through
`asyncio.to_thread`. These helpers keep that plumbing in one place so each test states only its
scenario and its assertions.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cni_agent.redirect.netns import netns_identity
from cni_agent.testing.ztunnel import FakeZtunnel, NoListeners
from cni_agent.zds import protocol as p
from cni_agent.zds.protocol import SnapshotSentRequest, WorkloadInfo
from cni_agent.zds.server import SnapshotEntry

HELLO = bytes.fromhex("0801")
"""ztunnel's hello (zds.md): the first record on every connection, sent unprompted."""


def info(uid: str) -> WorkloadInfo:
    """The workload info every test pod gets: derived from the uid so replies are easy to check."""
    return WorkloadInfo(f"pod-{uid}", "default", "sa")


def fd_count() -> int:
    """Open fds of this process: fd leaks show up as a change of this number."""
    return len(os.listdir("/proc/self/fd"))


class RecordingListeners(NoListeners):
    """A proxy that binds nothing but proves which netns it was started in, and how often."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.netns = netns_identity(fd)
        self.started = 0
        self.stopped = 0

    def start(self) -> None:
        self.started += 1

    def stop(self) -> None:
        self.stopped += 1


class PodCache:
    """The agent's pod cache as far as ZDS cares: uid -> (info, netns fd or None).

    Pods enter before their Add and leave before their Del, as in the agent.
    """

    def __init__(self) -> None:
        self.pods: dict[str, tuple[WorkloadInfo, int | None]] = {}

    def put(self, uid: str, fd: int | None) -> None:
        self.pods[uid] = (info(uid), fd)

    def snapshot(self) -> list[SnapshotEntry]:
        return [SnapshotEntry(uid, i, fd) for uid, (i, fd) in self.pods.items()]

    def with_fds(self) -> set[str]:
        return {uid for uid, (_, fd) in self.pods.items() if fd is not None}

    def expected(self) -> dict[str, tuple[int, int]]:
        """uid -> netns identity, for every pod whose netns is known."""
        return {uid: netns_identity(fd) for uid, (_, fd) in self.pods.items() if fd is not None}


class RawAgent:
    """The agent's end of the ZDS socket, driven by hand: accept, read the hello, send exact records
    and fds, read replies. Checks a peer's reactions to input a real ZdsServer would never send."""

    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(4)
        self.conn: socket.socket | None = None

    def accept(self, timeout: float = 5.0) -> socket.socket:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.listener.settimeout(timeout)
        conn, _ = self.listener.accept()
        conn.settimeout(5)
        assert conn.recv(1024) == HELLO  # the hello comes first, unprompted
        self.conn = conn
        return conn

    def send(self, payload: bytes, fds: list[int] | None = None) -> None:
        assert self.conn is not None
        if fds:
            socket.send_fds(self.conn, [payload], fds)
        else:
            self.conn.send(payload)

    def reply(self) -> str:
        assert self.conn is not None
        data = self.conn.recv(65536)
        assert data, "fake closed the connection instead of replying"
        return p.decode_ack(data)

    def request(self, payload: bytes, fds: list[int] | None = None) -> str:
        self.send(payload, fds)
        return self.reply()

    def expect_eof(self) -> None:
        assert self.conn is not None
        assert self.conn.recv(1024) == b""

    def expect_no_reply(self, wait: float = 0.3) -> None:
        """Lock-step: nothing arrives unless asked."""
        assert self.conn is not None
        self.conn.settimeout(wait)
        try:
            data = self.conn.recv(1024)
        except TimeoutError:
            pass
        else:
            raise AssertionError(f"peer sent {data!r} unasked")
        finally:
            self.conn.settimeout(5)

    def snapshot_done(self) -> None:
        assert self.request(p.encode_request(SnapshotSentRequest())) == ""

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def fake_peer(path: str, **kw: Any) -> FakeZtunnel:
    """A FakeZtunnel with recording proxies and a short reconnect backoff (tests wait on reconnects)."""
    kw.setdefault("listener_factory", RecordingListeners)
    kw.setdefault("max_backoff", 0.05)
    return FakeZtunnel(path, **kw)


def running(fake: FakeZtunnel) -> dict[str, tuple[int, int]]:
    """uid -> netns identity of every proxy the peer runs, read under the peer's lock."""
    with fake._cond:
        return {uid: r.netns for uid, r in fake.running.items()}


async def until(fake: FakeZtunnel, pred: Callable[[FakeZtunnel], bool], timeout: float = 5.0) -> None:
    """Wait for the peer's state without blocking the loop the server runs on."""
    await asyncio.to_thread(fake.wait_until, pred, timeout)


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition while the loop keeps serving; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def run(coro: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    """Run one test body on a fresh loop, bounded so a hang fails instead of stalling the run."""
    asyncio.run(asyncio.wait_for(coro(), timeout))
