"""ZdsServer against FakeZtunnel over a real SEQPACKET socket with real netns fds (spec zds.md §4-§8).

The server runs on an asyncio loop in the test thread; the fake runs on its own thread with
blocking sockets, so every blocking wait on the fake goes through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from cni_agent.testing.netns import NetnsFactory
from cni_agent.testing.zdsharness import (
    PodCache,
    RawAgent,
    RecordingListeners,
    eventually,
    fake_peer,
    info,
    run,
    until,
)
from cni_agent.testing.ztunnel import FakeZtunnel
from cni_agent.zds import protocol as p
from cni_agent.zds.protocol import DelRequest, KeepRequest, ZdsError
from cni_agent.zds.server import ZdsServer

pytestmark = pytest.mark.root


def fake_for(path: str, **kw: Any) -> FakeZtunnel:
    kw.setdefault("max_backoff", 0.1)
    return fake_peer(path, **kw)


def test_snapshot_then_live_add_and_del(sock_path: str, netns: NetnsFactory) -> None:
    a, b, c = netns(), netns(), netns()
    cache = PodCache()
    cache.put("a", a.fd)
    cache.put("b", b.fd)
    counts: list[int] = []

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot, on_change=counts.append)
        await server.bind()
        assert Path(sock_path).exists()
        await server.start_accepting()
        fake = fake_for(sock_path)
        fake.start()
        try:
            await until(fake, lambda z: z.snapshots == 1)
            assert fake.running_uids() == {"a", "b"}
            assert fake.running["a"].netns == a.identity
            assert fake.running["b"].netns == b.identity
            assert fake.running["a"].info == info("a")
            assert server.connected == 1 and counts[-1] == 1

            cache.put("c", c.fd)
            await server.add_workload("c", info("c"), c.fd)
            assert fake.running["c"].netns == c.identity
            listeners = fake.running["c"].listeners
            assert isinstance(listeners, RecordingListeners) and listeners.started == 1
            assert fake.acks_sent[-1] == (p.AddRequest("c", info("c")), "")

            del cache.pods["b"]
            await server.del_workload("b")
            assert fake.running_uids() == {"a", "c"}
            assert fake.requests[-1] == DelRequest("b")
            # our fds stay ours: the server dup()ed what it sent
            os.fstat(a.fd)
            os.fstat(c.fd)
        finally:
            await asyncio.to_thread(fake.stop)
            await server.close()
        assert not Path(sock_path).exists()
        assert counts[-1] == 0

    run(body)


def test_reconnect_resends_full_snapshot_and_reconciles(sock_path: str, netns: NetnsFactory) -> None:
    """Peer reconnects (running set survives): snapshot Adds are no-ops on the same netns, Keep shields,
    unnamed proxies are drained; after a full restart the running set equals the agent's set again."""
    a, b, c = netns(), netns(), netns()
    cache = PodCache()

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot)
        await server.start_accepting()
        fake = fake_for(sock_path)
        fake.start()
        try:
            await until(fake, lambda z: z.snapshots == 1)
            for uid, ns in (("a", a), ("b", b), ("c", c)):
                cache.put(uid, ns.fd)
                await server.add_workload(uid, info(uid), ns.fd)
            assert fake.running_uids() == {"a", "b", "c"}
            a_listeners = fake.running["a"].listeners

            # agent state changes: c is gone, b's netns is unknown (Keep)
            del cache.pods["c"]
            cache.put("b", None)
            fake.reconnect()
            await until(fake, lambda z: z.snapshots == 2)
            assert fake.connections == 2
            assert fake.running_uids() == {"a", "b"}
            assert fake.running["a"].listeners is a_listeners  # same netns: not restarted
            assert KeepRequest("b") in fake.requests

            # the stale connection is still counted until probed; the next Add goes to the newest
            cache.put("c", c.fd)
            await server.add_workload("c", info("c"), c.fd)
            assert fake.running_uids() == {"a", "b", "c"}

            # a new process: nothing survives; the snapshot restores every pod whose netns is known
            cache.put("b", b.fd)
            await asyncio.to_thread(fake.restart)
            await until(fake, lambda z: z.snapshots == 3)
            assert fake.running_uids() == cache.with_fds() == {"a", "b", "c"}
            assert {uid: r.netns for uid, r in fake.running.items()} == {
                "a": a.identity,
                "b": b.identity,
                "c": c.identity,
            }
        finally:
            await asyncio.to_thread(fake.stop)
            await server.close()

    run(body)


def test_add_to_replaced_netns_restarts_proxy(sock_path: str, netns: NetnsFactory) -> None:
    a1, a2 = netns(), netns()
    cache = PodCache()

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot)
        await server.start_accepting()
        fake = fake_for(sock_path)
        fake.start()
        try:
            await until(fake, lambda z: z.snapshots == 1)
            await server.add_workload("a", info("a"), a1.fd)
            first = fake.running["a"].listeners
            await server.add_workload("a", info("a"), a1.fd)  # same netns: no-op
            assert fake.running["a"].listeners is first
            await server.add_workload("a", info("a"), a2.fd)  # sandbox recreated: new netns
            assert fake.running["a"].netns == a2.identity
            assert isinstance(first, RecordingListeners) and first.stopped == 1
        finally:
            await asyncio.to_thread(fake.stop)
            await server.close()

    run(body)


def test_no_ztunnel_is_retryable(sock_path: str, netns: NetnsFactory) -> None:
    a = netns()

    async def body() -> None:
        server = ZdsServer(sock_path, list)
        await server.start_accepting()
        try:
            with pytest.raises(ZdsError, match="no ztunnel connected") as err:
                await server.add_workload("a", info("a"), a.fd)
            assert err.value.retryable
            await server.del_workload("a")  # nothing to tell: not an error
            with pytest.raises(ZdsError, match="empty uid") as bad:
                await server.add_workload("", info("a"), a.fd)
            assert not bad.value.retryable
        finally:
            await server.close()

    run(body)


def test_peer_that_never_acks_times_out_and_is_dropped(sock_path: str, netns: NetnsFactory) -> None:
    a = netns()

    async def body() -> None:
        server = ZdsServer(sock_path, list, ack_timeout=0.3)
        await server.start_accepting()
        fake = fake_for(sock_path)
        fake.start()
        try:
            await until(fake, lambda z: z.snapshots == 1)
            fake.auto_ack = False
            started = time.monotonic()
            with pytest.raises(ZdsError, match="timed out") as err:
                await server.add_workload("a", info("a"), a.fd)
            assert err.value.retryable
            assert time.monotonic() - started < 2
            assert "a" not in fake.running
            # the server closed that connection: the fake sees EOF and reconnects
            await until(fake, lambda z: z.connections >= 2)
            fake.auto_ack = True
            await eventually(lambda: server.connected == 1 and fake.snapshot_received, 5)
            await server.add_workload("a", info("a"), a.fd)
            assert fake.running["a"].netns == a.identity
        finally:
            await asyncio.to_thread(fake.stop)
            await server.close()

    run(body)


def test_nack_text_is_surfaced(sock_path: str, netns: NetnsFactory) -> None:
    a, b = netns(), netns()

    def refusing_factory(fd: int) -> RecordingListeners:
        listeners = RecordingListeners(fd)
        if listeners.netns == b.identity:
            raise OSError(98, "Address in use")
        return listeners

    async def body() -> None:
        server = ZdsServer(sock_path, list)
        await server.start_accepting()
        fake = fake_for(sock_path, listener_factory=refusing_factory)
        fake.start()
        try:
            await until(fake, lambda z: z.snapshots == 1)
            fake.nack_with = "failure to start proxy : custom"
            with pytest.raises(ZdsError, match="got ack error: failure to start proxy : custom") as err:
                await server.add_workload("a", info("a"), a.fd)
            assert err.value.retryable
            fake.nack_with = None
            # a real start failure: the fake keeps b pending and nacks
            with pytest.raises(ZdsError, match=r"got ack error: failure to start proxy : .*Address in use"):
                await server.add_workload("b", info("b"), b.fd)
            assert "b" in fake.pending and "b" not in fake.running
            # the connection survives a nack
            await server.add_workload("a", info("a"), a.fd)
            assert fake.running_uids() == {"a"}
            assert server.connected == 1
        finally:
            await asyncio.to_thread(fake.stop)
            await server.close()

    run(body)


def test_add_goes_to_newest_del_to_all_with_fallback(sock_path: str, netns: NetnsFactory) -> None:
    """Two ztunnels (an upgrade): Add to the newest only, Del to both; newest gone -> previous."""
    a, b = netns(), netns()

    async def body() -> None:
        server = ZdsServer(sock_path, list, accept_interval=0.01)
        await server.start_accepting()
        old, new = fake_for(sock_path), fake_for(sock_path)
        old.start()
        await until(old, lambda z: z.snapshots == 1)
        new.start()
        try:
            await until(new, lambda z: z.snapshots == 1)
            await eventually(lambda: server.connected == 2)
            await server.add_workload("a", info("a"), a.fd)
            assert new.running_uids() == {"a"} and old.running_uids() == set()
            await server.del_workload("a")
            assert DelRequest("a") in old.requests and DelRequest("a") in new.requests
            assert new.running_uids() == set()

            await asyncio.to_thread(new.stop)  # EOF not yet noticed by the server (no probe yet)
            await server.add_workload("b", info("b"), b.fd)
            assert old.running_uids() == {"b"}
            assert server.connected == 1
        finally:
            await asyncio.to_thread(old.stop)
            await asyncio.to_thread(new.stop)
            await server.close()

    run(body)


def test_keepalive_detects_gone_peer_and_unsolicited_data(sock_path: str) -> None:
    async def body() -> None:
        server = ZdsServer(sock_path, list, keepalive_idle=0.2, accept_interval=0.01)
        await server.start_accepting()
        fake = fake_for(sock_path)
        fake.start()
        try:
            await until(fake, lambda z: z.snapshots == 1)
            await eventually(lambda: server.connected == 1)
            await asyncio.to_thread(fake.stop)
            await eventually(lambda: server.connected == 0, 2)  # noticed by the probe, no request needed

            # a raw client that speaks unprompted after the snapshot is dropped
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            raw.settimeout(2)
            raw.connect(sock_path)
            raw.send(p.encode_hello())
            got = await asyncio.to_thread(raw.recv, 1024)  # never block the server's loop
            assert got == p.encode_request(p.SnapshotSentRequest())
            raw.send(p.encode_ack())
            await eventually(lambda: server.connected == 1)
            raw.send(p.encode_ack())  # unsolicited
            await eventually(lambda: server.connected == 0, 2)
            assert await asyncio.to_thread(raw.recv, 1024) == b""  # server closed it
            raw.close()
        finally:
            await asyncio.to_thread(fake.stop)
            await server.close()

    run(body)


def test_hello_deadline_and_accept_rate_limit(sock_path: str) -> None:
    async def body() -> None:
        Path(sock_path).parent.mkdir(parents=True)
        Path(sock_path).write_text("stale")  # a stale file is replaced
        server = ZdsServer(sock_path, list, hello_timeout=0.3)
        await server.start_accepting()
        try:
            silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            silent.settimeout(3)
            silent.connect(sock_path)
            t0 = time.monotonic()
            assert await asyncio.to_thread(silent.recv, 1024) == b""  # dropped: no hello in time
            assert 0.2 < time.monotonic() - t0 < 2
            silent.close()

            # three clients at once: accepted at most 5/s, burst 1
            clients = []
            for _ in range(3):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                c.settimeout(3)
                c.connect(sock_path)
                c.send(p.encode_hello())
                clients.append(c)

            def first_record_times() -> list[float]:
                times = []
                for c in clients:
                    assert c.recv(1024) == p.encode_request(p.SnapshotSentRequest())
                    times.append(time.monotonic())
                return times

            times = await asyncio.to_thread(first_record_times)
            assert times[2] - times[0] >= 0.3, times
            for c in clients:
                c.close()
        finally:
            await server.close()

    run(body)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fd_count_stable_over_1000_cycles(sock_path: str, netns: NetnsFactory) -> None:
    """1000 add/remove cycles, each with a pod-cache-owned netns fd opened for the pod and closed when
    the pod is forgotten, plus reconnects (snapshots dup too): /proc/self/fd ends where it started.
    The fake runs in this process, so a netns fd it fails to close would show up here as well."""
    a, b = netns(), netns()
    cache = PodCache()
    cache.put("keep", a.fd)

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot, accept_interval=0.01)
        await server.start_accepting()
        fake = fake_for(sock_path)
        fake.start()
        try:
            await until(fake, lambda z: z.snapshots == 1)
            # a first request waits for the snapshot to finish (and its dup()s to be closed)
            await server.del_workload("none")
            before = fd_count()
            for i in range(1000):
                uid = f"pod-{i}"
                fd = os.open(f"/var/run/netns/{(b if i % 2 else a).name}", os.O_RDONLY | os.O_CLOEXEC)
                cache.put(uid, fd)  # the pod cache owns this fd for the pod's life
                await server.add_workload(uid, info(uid), fd)
                assert uid in fake.running
                if i % 250 == 125:  # a reconnect with the pod still cached: it is in the snapshot
                    n = fake.snapshots
                    fake.reconnect()
                    await until(fake, lambda z, n=n: z.snapshots == n + 1)  # type: ignore[misc]
                    assert fake.running_uids() == {"keep", uid}
                del cache.pods[uid]
                await server.del_workload(uid)
                os.close(fd)  # forgotten: closed exactly now
            assert fake.running_uids() == {"keep"}
            assert fd_count() == before
        finally:
            await asyncio.to_thread(fake.stop)
            await server.close()

    run(body)


def test_fake_ztunnel_reactions(sock_path: str, netns: NetnsFactory) -> None:
    a = netns()
    agent = RawAgent(sock_path)
    fake = fake_for(sock_path)
    fake.start()
    enc = p.encode_request
    try:
        agent.accept()
        # bad input -> nack "failure to read message", then the fake reconnects at once
        cases = [
            (enc(p.AddRequest("a", info("a"))), None, "No control message"),
            (enc(DelRequest("a")), [a.fd], "Unexpected control message"),
            (enc(p.AddRequest("a", info("a"))), [a.fd, a.fd], "Expected 1 FD, got 2"),
            (bytes.fromhex("22 04 0a 02 75 31"), None, "no payload"),
            (b"\x0a" * 1100, None, "received truncated message"),
        ]
        for payload, fds, text in cases:
            assert agent.request(payload, fds) == f"failure to read message : {text}"
            agent.accept()
        # snapshot: Keep shields nothing yet, SnapshotSent acks; Add after snapshot starts a proxy
        assert agent.request(enc(KeepRequest("k"))) == ""
        assert agent.request(enc(p.SnapshotSentRequest())) == ""
        assert agent.request(enc(p.AddRequest("a", info("a"))), [a.fd]) == ""
        assert fake.running_uids() == {"a"}
        assert agent.request(enc(DelRequest("unknown"))) == ""
        # protocol misuse: nack with ProtocolError, then the process "exits" (everything drained)
        nack = agent.request(enc(KeepRequest("k")))
        assert nack == 'failure to process message : ProtocolError("pod keep received after snapshot")'
        fake.wait_until(lambda z: z.exited is not None and not z.running)
        assert agent.conn is not None and agent.conn.recv(1024) == b""

        # a restarted fake exits on an Add without workload_info, in any phase
        fake.restart()
        agent.accept()
        nack = agent.request(bytes.fromhex("0a 04 0a 02 75 31"), [a.fd])
        assert "workload_info is required but not present" in nack
        fake.wait_until(lambda z: z.exited is not None)
    finally:
        fake.stop()
        agent.close()
