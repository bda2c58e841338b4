"""ZDS scenarios from issue 3: restarts under churn, overlapping ztunnels (upgrade), a peer that never
acks, a peer that sends garbage. Real ZdsServer, real SEQPACKET sockets, real netns fds, FakeZtunnel
peers on their own threads (so every blocking wait on a peer goes through `asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import time
from collections.abc import Awaitable

import pytest

from cni_agent.testing.capture import CaptureListeners
from cni_agent.testing.netns import NetnsFactory
from cni_agent.testing.zdsharness import PodCache, eventually, fake_peer, info, run, running, until
from cni_agent.testing.ztunnel import FakeZtunnel, Listeners
from cni_agent.zds import protocol as p
from cni_agent.zds.protocol import AddRequest, DelRequest, WorkloadInfo, ZdsError
from cni_agent.zds.server import ZdsServer

pytestmark = pytest.mark.root


async def settle(fake: FakeZtunnel, cache: PodCache) -> None:
    """Connected, snapshot received on this connection, and exactly the cached pods running."""
    try:
        await until(fake, lambda z: z.connected and z.snapshot_received and running(z) == cache.expected())
    except TimeoutError:
        assert running(fake) == cache.expected()  # a readable diff
        raise


# ---- restarts under churn -------------------------------------------------------------------------


def test_peer_restarts_20_times_while_pods_churn(sock_path: str, netns: NetnsFactory) -> None:
    """Adds/removes (including a netns replacement) run concurrently with 20 ztunnel restarts and a few
    bare reconnects. Every failure seen by the agent must be retryable; after the last restart the
    peer runs exactly the enrolled pods, each on the enrolled netns."""
    nss = [netns() for _ in range(3)]
    cache = PodCache()
    rng = random.Random(3)
    uids = [f"p{i}" for i in range(8)]
    errors: list[ZdsError] = []

    async def churn(stop: asyncio.Event, server: ZdsServer) -> int:
        ops = 0
        while not stop.is_set() or ops < 40:
            uid = rng.choice(uids)
            if uid in cache.pods and rng.random() < 0.5:
                del cache.pods[uid]
                call: Awaitable[None] = server.del_workload(uid)
            else:
                ns = rng.choice(nss)  # a different netns for a cached uid = sandbox recreated
                cache.put(uid, ns.fd)
                call = server.add_workload(uid, info(uid), ns.fd)
            try:
                await call
            except ZdsError as exc:
                errors.append(exc)
            ops += 1
            await asyncio.sleep(rng.random() * 0.01)
        return ops

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot)  # default accept rate limit: 5/s
        await server.start_accepting()
        fake = fake_peer(sock_path)
        fake.start()
        stop = asyncio.Event()
        try:
            await until(fake, lambda z: z.snapshots == 1)
            churner = asyncio.create_task(churn(stop, server))
            for i in range(20):
                await asyncio.sleep(rng.random() * 0.05)
                if i % 5 == 4:
                    await asyncio.to_thread(fake.reconnect)  # connection only: proxies survive
                    await asyncio.sleep(0.02)
                n = fake.snapshots
                await asyncio.to_thread(fake.restart)  # a new process: nothing survives
                await until(fake, lambda z, n=n: z.snapshots > n)  # type: ignore[misc]
            stop.set()
            ops = await churner
            assert ops >= 40
            await settle(fake, cache)
            assert fake.exited is None
            assert fake.connections >= 21 and fake.snapshots >= 21
            assert all(e.retryable for e in errors), [e.msg for e in errors]
            # the server let go of every dead connection it touched; at most the live one remains
            await eventually(lambda: server.connected >= 1)
        finally:
            stop.set()
            await asyncio.to_thread(fake.stop)
            await server.close()

    run(body)


# ---- two peers at once (upgrade) ------------------------------------------------------------------


def test_upgrade_overlap_with_real_listeners(sock_path: str, netns: NetnsFactory) -> None:
    """zds.md §8.7 + §9: old ztunnel serving pods; the new one connects and gets a full snapshot while
    the old keeps its proxies (both bind the pod's ports thanks to SO_REUSEPORT). Add goes to the new
    one only, Del to both. The old one drains (EOF) and the new one carries on alone."""
    a, b, c = netns(), netns(), netns()
    for ns in (a, b, c):
        subprocess.run(["ip", "-n", ns.name, "link", "set", "lo", "up"], check=True)
    cache = PodCache()

    def capture(fd: int) -> Listeners:
        return CaptureListeners(fd)

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot, accept_interval=0.01, keepalive_idle=0.3)
        await server.start_accepting()
        old = fake_peer(sock_path, listener_factory=capture)
        new = fake_peer(sock_path, listener_factory=capture)
        old.start()
        try:
            await until(old, lambda z: z.snapshots == 1)
            for uid, ns in (("a", a), ("b", b)):
                cache.put(uid, ns.fd)
                await server.add_workload(uid, info(uid), ns.fd)
            assert running(old) == {"a": a.identity, "b": b.identity}

            new.start()
            await until(new, lambda z: z.snapshots == 1)
            await eventually(lambda: server.connected == 2)
            # both processes now hold listeners on 15008/15006/15001 in a's and b's netns
            assert running(new) == running(old) == {"a": a.identity, "b": b.identity}
            assert old.running["a"].listeners is not new.running["a"].listeners

            cache.put("c", c.fd)
            await server.add_workload("c", info("c"), c.fd)
            assert "c" in new.running and "c" not in old.running
            assert AddRequest("c", info("c")) not in old.requests

            del cache.pods["a"]
            await server.del_workload("a")
            assert DelRequest("a") in old.requests and DelRequest("a") in new.requests
            assert "a" not in old.running and "a" not in new.running

            # the old one drains: closes its stream, then its proxies
            await asyncio.to_thread(old.stop)
            assert running(old) == {}
            await eventually(lambda: server.connected == 1, 3)  # noticed by the keepalive probe
            await server.del_workload("b")  # goes to the survivor only, no error for the dead one
            del cache.pods["b"]
            assert running(new) == {"c": c.identity}
            # the new ztunnel's listeners in c's netns accept real connections
            lst = new.running["c"].listeners
            assert isinstance(lst, CaptureListeners)
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    c.name,
                    "python3",
                    "-c",
                    "import socket; socket.create_connection(('127.0.0.1', 15006), 2).close()",
                ],
                check=True,
                capture_output=True,
            )
            got = await asyncio.to_thread(lst.wait_for, lambda i: i.port == 15006, 3)
            assert got.port == 15006
        finally:
            await asyncio.to_thread(new.stop)
            await asyncio.to_thread(old.stop)
            await server.close()

    run(body)


def test_add_falls_back_when_newest_is_gone_and_snapshot_catches_up(
    sock_path: str, netns: NetnsFactory
) -> None:
    """Newest gone without the server noticing: the Add lands on the previous one. When a new ztunnel
    connects it receives that pod in its snapshot."""
    a, b = netns(), netns()
    cache = PodCache()

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot, accept_interval=0.01)
        await server.start_accepting()
        old, new = fake_peer(sock_path), fake_peer(sock_path)
        old.start()
        await until(old, lambda z: z.snapshots == 1)
        new.start()
        try:
            await until(new, lambda z: z.snapshots == 1)
            await eventually(lambda: server.connected == 2)
            await asyncio.to_thread(new.stop)
            cache.put("a", a.fd)
            await server.add_workload("a", info("a"), a.fd)
            assert running(old) == {"a": a.identity}
            assert server.connected == 1
            third = fake_peer(sock_path)
            third.start()
            try:
                await settle(third, cache)
                cache.put("b", b.fd)
                await server.add_workload("b", info("b"), b.fd)  # newest again
                assert running(third) == cache.expected() and "b" not in old.running
            finally:
                await asyncio.to_thread(third.stop)
        finally:
            await asyncio.to_thread(old.stop)
            await asyncio.to_thread(new.stop)
            await server.close()

    run(body)


def test_rolled_back_upgrade_brings_the_old_ztunnel_up_to_date(
    sock_path: str, netns: NetnsFactory
) -> None:
    """Old and new ztunnel connected; pods added meanwhile went to the new one only. The new one dies
    and the old one stays (a rollback): the server re-sends Add for every cached pod to the old one,
    except pods added/removed while that catch-up is in progress (a Del must not be overtaken)."""
    a, b, c = netns(), netns(), netns()
    cache = PodCache()

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot, keepalive_idle=0.2, accept_interval=0.01)
        await server.start_accepting()
        old, new = fake_peer(sock_path), fake_peer(sock_path)
        old.start()
        await until(old, lambda z: z.snapshots == 1)
        cache.put("c", c.fd)
        await server.add_workload("c", info("c"), c.fd)  # the old one already runs c
        new.start()
        try:
            await until(new, lambda z: z.snapshots == 1)
            await eventually(lambda: server.connected == 2)
            for uid, ns in (("a", a), ("b", b)):
                cache.put(uid, ns.fd)
                await server.add_workload(uid, info(uid), ns.fd)
            assert running(old) == {"c": c.identity}
            assert running(new) == cache.expected()
            old_c = old.running["c"]

            def slow_on_a(req: p.Request) -> str | None:
                if req == AddRequest("a", info("a")):
                    time.sleep(0.4)  # hold the catch-up here while the agent removes b
                return None

            old.nack_with = slow_on_a
            await asyncio.to_thread(new.stop)
            await until(old, lambda z: AddRequest("a", info("a")) in z.requests, 3)
            del cache.pods["b"]
            await server.del_workload("b")  # queued behind the catch-up's Add(a), on the old one
            await until(old, lambda z: running(z) == cache.expected(), 3)
            await asyncio.sleep(0.2)  # nothing else may follow
            assert running(old) == {"a": a.identity, "c": c.identity}
            assert old.running["c"] is old_c  # re-sent Add on the same netns: a no-op
            assert AddRequest("b", info("b")) not in old.requests
            assert server.connected == 1
        finally:
            await asyncio.to_thread(new.stop)
            await asyncio.to_thread(old.stop)
            await server.close()

    run(body)


# ---- a peer that never acks ------------------------------------------------------------------------


def test_peer_that_never_acks_the_snapshot_is_dropped_then_recovers(
    sock_path: str, netns: NetnsFactory
) -> None:
    a = netns()
    cache = PodCache()
    cache.put("a", a.fd)

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot, ack_timeout=0.3, accept_interval=0.01)
        await server.start_accepting()
        fake = fake_peer(sock_path, auto_ack=False)
        fake.start()
        try:
            # the snapshot's first Add is never acked: the server gives up and closes, the fake reconnects
            await until(fake, lambda z: z.connections >= 2 and len(z.requests) >= 2)
            assert all(r == AddRequest("a", info("a")) for r in fake.requests)
            assert not fake.snapshot_received
            fake.auto_ack = True
            await settle(fake, cache)
            await eventually(lambda: server.connected == 1)
        finally:
            await asyncio.to_thread(fake.stop)
            await server.close()

    run(body)


def test_stuck_peer_does_not_block_del_to_a_healthy_one(
    sock_path: str, netns: NetnsFactory
) -> None:
    a = netns()
    cache = PodCache()

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot, ack_timeout=0.3, accept_interval=0.01)
        await server.start_accepting()
        good, stuck = fake_peer(sock_path), fake_peer(sock_path)
        good.start()
        await until(good, lambda z: z.snapshots == 1)
        stuck.start()
        try:
            await until(stuck, lambda z: z.snapshots == 1)
            await eventually(lambda: server.connected == 2)
            cache.put("a", a.fd)
            await server.add_workload("a", info("a"), a.fd)  # to `stuck`, the newest
            stuck.auto_ack = False
            del cache.pods["a"]
            t0 = time.monotonic()
            with pytest.raises(ZdsError, match="timed out") as err:
                await server.del_workload("a")
            assert err.value.retryable
            assert time.monotonic() - t0 < 2  # the two connections are served in parallel
            assert DelRequest("a") in good.requests  # the healthy one got it and acked
            stuck.auto_ack = True
            # the stuck connection was closed; its ztunnel reconnects, and the snapshot drains "a"
            await settle(stuck, cache)
            assert running(stuck) == {} and server.connected >= 1
        finally:
            await asyncio.to_thread(good.stop)
            await asyncio.to_thread(stuck.stop)
            await server.close()

    run(body)


# ---- a peer that sends garbage ---------------------------------------------------------------------


def test_garbage_reply_drops_that_peer_and_add_falls_back(
    sock_path: str, netns: NetnsFactory
) -> None:
    a, b = netns(), netns()
    cache = PodCache()

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot, accept_interval=0.01)
        await server.start_accepting()
        good = fake_peer(sock_path)
        good.start()
        await until(good, lambda z: z.snapshots == 1)
        bad = fake_peer(sock_path)
        bad.start()
        try:
            await until(bad, lambda z: z.snapshots == 1)
            await eventually(lambda: server.connected == 2)
            bad.raw_reply = lambda req: bytes.fromhex("0aff")  # undecodable instead of an ack
            cache.put("a", a.fd)
            await server.add_workload("a", info("a"), a.fd)  # newest breaks the protocol -> previous
            assert running(good) == {"a": a.identity}
            assert AddRequest("a", info("a")) in bad.requests
            # the bad peer reconnects (the server closed it) and keeps answering garbage, so it never
            # finishes a snapshot; the good one keeps being served meanwhile
            await until(bad, lambda z: z.connections >= 3)
            assert not bad.snapshot_received
            cache.put("b", b.fd)
            await server.add_workload("b", info("b"), b.fd)
            assert running(good) == cache.expected()
            del cache.pods["a"]
            await server.del_workload("a")
            assert running(good) == cache.expected()
        finally:
            await asyncio.to_thread(bad.stop)
            await asyncio.to_thread(good.stop)
            await server.close()

    run(body)


def test_garbage_from_the_only_peer_is_reported_and_it_recovers(
    sock_path: str, netns: NetnsFactory
) -> None:
    a = netns()
    cache = PodCache()

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot, accept_interval=0.01)
        await server.start_accepting()
        fake = fake_peer(sock_path)
        fake.start()
        try:
            await until(fake, lambda z: z.snapshots == 1)
            fake.raw_reply = lambda req: b"\xff\xff\xff"
            cache.put("a", a.fd)
            with pytest.raises(ZdsError, match=r"no ztunnel connected .*protocol error from ztunnel") as err:
                await server.add_workload("a", info("a"), a.fd)
            assert err.value.retryable
            fake.raw_reply = None
            # the server closed it; the fake reconnects and the snapshot carries the pod
            await settle(fake, cache)
        finally:
            await asyncio.to_thread(fake.stop)
            await server.close()

    run(body)


def test_unsolicited_garbage_drops_that_peer_only(sock_path: str, netns: NetnsFactory) -> None:
    a = netns()
    cache = PodCache()

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot, keepalive_idle=0.2, accept_interval=0.01)
        await server.start_accepting()
        good = fake_peer(sock_path)
        good.start()
        await until(good, lambda z: z.snapshots == 1)
        try:
            # a raw client: hello, ack the (empty) snapshot, then speak unprompted
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            raw.settimeout(3)
            raw.connect(sock_path)
            raw.send(p.encode_hello())
            assert await asyncio.to_thread(raw.recv, 1024) == p.encode_request(p.SnapshotSentRequest())
            raw.send(p.encode_ack())
            await eventually(lambda: server.connected == 2)
            raw.send(b"\xde\xad\xbe\xef")
            await eventually(lambda: server.connected == 1, 3)
            assert await asyncio.to_thread(raw.recv, 1024) == b""  # the server closed it
            raw.close()
            cache.put("a", a.fd)
            await server.add_workload("a", info("a"), a.fd)
            assert running(good) == cache.expected()

            # a garbage hello is dropped at once, before any snapshot
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            raw.settimeout(3)
            raw.connect(sock_path)
            raw.send(bytes.fromhex("0aff"))
            assert await asyncio.to_thread(raw.recv, 1024) == b""
            raw.close()
            await server.del_workload("a")
            del cache.pods["a"]
            assert running(good) == {}
        finally:
            await asyncio.to_thread(good.stop)
            await server.close()

    run(body)


def test_unsolicited_data_from_fake_peer_is_a_protocol_violation(sock_path: str) -> None:
    async def body() -> None:
        server = ZdsServer(sock_path, list, keepalive_idle=0.2, accept_interval=0.01)
        await server.start_accepting()
        fake = fake_peer(sock_path)
        fake.start()
        try:
            await until(fake, lambda z: z.snapshots == 1)
            await eventually(lambda: server.connected == 1)
            await asyncio.to_thread(fake.send_unsolicited, p.encode_ack())
            # the server drops the connection; the fake reconnects and gets a fresh snapshot
            await until(fake, lambda z: z.snapshots == 2)
            assert fake.connections == 2
        finally:
            await asyncio.to_thread(fake.stop)
            await server.close()

    run(body)


# ---- size limits at the server ---------------------------------------------------------------------


def test_name_of_253_fits_and_254_is_refused(sock_path: str, netns: NetnsFactory) -> None:
    a = netns()

    async def body() -> None:
        server = ZdsServer(sock_path, list, accept_interval=0.01)
        await server.start_accepting()
        fake = fake_peer(sock_path)
        fake.start()
        try:
            await until(fake, lambda z: z.snapshots == 1)
            longest = WorkloadInfo("n" * 253, "s" * 63, "a" * 253)
            uid = "0b3c5d7e-1f2a-4b6c-8d9e-0a1b2c3d4e5f"
            await server.add_workload(uid, longest, a.fd)
            assert fake.running[uid].info == longest
            n = len(fake.requests)
            for bad in (
                WorkloadInfo("n" * 254, "default", "sa"),
                WorkloadInfo("n", "s" * 64, "sa"),
                WorkloadInfo("n", "default", "a" * 254),
            ):
                with pytest.raises(ZdsError, match=r"characters, over the (253|63)-character limit") as err:
                    await server.add_workload("u2", bad, a.fd)
                assert not err.value.retryable
            with pytest.raises(ZdsError, match="over the 1024-byte ZDS limit") as err:
                await server.add_workload("u" * 1000, info("x"), a.fd)
            assert not err.value.retryable
            with pytest.raises(ZdsError, match="over the 1024-byte ZDS limit"):
                await server.del_workload("u" * 1100)
            assert len(fake.requests) == n  # nothing was sent
            assert server.connected == 1  # and the connection is untouched
        finally:
            await asyncio.to_thread(fake.stop)
            await server.close()

    run(body)


# ---- review regressions ---------------------------------------------------------------------------


def test_cancelled_request_drops_the_connection_instead_of_wedging_it(
    sock_path: str, netns: NetnsFactory
) -> None:
    """A caller cancelled while waiting for an ack must not leave the connection with a request
    outstanding forever (every later Add/Del would fail); the connection is closed and ztunnel
    reconnects into a full snapshot."""
    a, b = netns(), netns()
    cache = PodCache()

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot, accept_interval=0.01)
        await server.start_accepting()
        fake = fake_peer(sock_path)
        fake.start()
        try:
            await settle(fake, cache)
            fake.auto_ack = False
            cache.put("a", a.fd)
            task = asyncio.create_task(server.add_workload("a", info("a"), a.fd))
            await eventually(lambda: any(isinstance(r, AddRequest) for r in fake.requests))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            fake.auto_ack = True
            # the next Add succeeds (on the reconnected peer), and the peer runs both pods
            cache.put("b", b.fd)
            await eventually(lambda: server.connected == 1 and fake.snapshots >= 2)
            await server.add_workload("b", info("b"), b.fd)
            await settle(fake, cache)
        finally:
            await asyncio.to_thread(fake.stop)
            await server.close()

    run(body)


def test_older_peer_still_in_its_snapshot_is_caught_up_when_the_newest_dies(
    sock_path: str, netns: NetnsFactory
) -> None:
    """Old ztunnel's snapshot was read before pod P existed; P's Add went to the newest ztunnel,
    which then died while the old one was still acking its snapshot: the old one must get P."""
    import threading

    a, pod = netns(), netns()
    cache = PodCache()
    cache.put("a", a.fd)
    release = threading.Event()

    def hold_snapshot(req: p.Request) -> bytes | None:
        release.wait(3)  # the old ztunnel is slow to ack its snapshot's first Add
        return None  # then process and ack normally

    async def body() -> None:
        server = ZdsServer(sock_path, cache.snapshot, accept_interval=0.01, keepalive_idle=0.1)
        await server.start_accepting()
        old = fake_peer(sock_path, raw_reply=hold_snapshot)  # connects first, acks its snapshot slowly
        newest = fake_peer(sock_path)
        old.start()
        try:
            await eventually(lambda: any(isinstance(r, AddRequest) for r in old.requests))
            newest.start()
            await settle(newest, cache)
            assert server.connected == 2
            # P arrives while `old` is still in its snapshot (read before P existed): P goes to the
            # newest connection only
            cache.put("p", pod.fd)
            await server.add_workload("p", info("p"), pod.fd)
            await asyncio.to_thread(newest.stop)
            await eventually(lambda: server.connected == 1)
            release.set()
            await settle(old, cache)
            assert set(running(old)) == {"a", "p"}
        finally:
            release.set()
            await asyncio.to_thread(newest.stop)
            await asyncio.to_thread(old.stop)
            await server.close()

    run(body)
