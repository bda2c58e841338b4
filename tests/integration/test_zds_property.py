"""Property (hypothesis): whatever the order of pod adds/removes and ztunnel connects, disconnects,
restarts and overlapping upgrades, the last ztunnel ends up running exactly the agent's enrolled pods,
each on the enrolled netns, and no fd is leaked.

Real ZdsServer, real SEQPACKET sockets, real netns fds and FakeZtunnel peers: the model is the
agent's pod cache itself, the observation is the last peer's `running` map.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni_agent.redirect.netns import netns_identity
from cni_agent.testing.netns import NetnsPool
from cni_agent.testing.zdsharness import fd_count, info
from cni_agent.testing.ztunnel import FakeZtunnel, NoListeners
from cni_agent.zds.protocol import ZdsError
from cni_agent.zds.server import SnapshotEntry, ZdsServer

pytestmark = pytest.mark.root

UIDS = ("p0", "p1", "p2", "p3", "p4")
NETNS_COUNT = 3
MAX_PEERS = 3


@dataclass(frozen=True)
class Pool:
    fds: tuple[int, ...]


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    """A few real netns, shared by all examples (creating one per example would dominate the run)."""
    with NetnsPool() as made:
        yield Pool(tuple(made.new().fd for _ in range(NETNS_COUNT)))


Op = tuple[str, int, int]

OPS = st.one_of(
    st.tuples(st.just("add"), st.integers(0, len(UIDS) - 1), st.integers(0, NETNS_COUNT - 1)),
    st.tuples(st.just("remove"), st.integers(0, len(UIDS) - 1), st.just(0)),
    # the agent restarted and could not find this pod's netns: it is sent as Keep from now on
    st.tuples(st.just("forget_netns"), st.integers(0, len(UIDS) - 1), st.just(0)),
    # the agent restarts: new server on the same path, fresh fds to the same netns
    st.tuples(st.just("agent_restart"), st.just(0), st.just(0)),
    st.tuples(st.just("reconnect"), st.just(0), st.just(0)),  # last peer: connection only
    st.tuples(st.just("restart"), st.just(0), st.just(0)),  # last peer: new process
    st.tuples(st.just("new_peer"), st.just(0), st.just(0)),  # upgrade: another ztunnel connects
    st.tuples(st.just("stop_oldest"), st.just(0), st.just(0)),  # upgrade: the old one drains
    st.tuples(st.just("stop_last"), st.just(0), st.just(0)),  # no ztunnel for a while
)


async def _run_ops(ops: list[Op], pool: Pool, path: str) -> None:
    cache: dict[str, int | None] = {}  # the agent's enrolled pods -> netns fd (None: unknown)
    added_on: dict[str, set[tuple[int, int]]] = {}  # every netns each pod was added with
    fresh: list[int] = []  # fds opened by "agent restarts", closed at the end

    def snapshot() -> list[SnapshotEntry]:
        return [SnapshotEntry(uid, info(uid), fd) for uid, fd in cache.items()]

    def make_server() -> ZdsServer:
        # a short keepalive: a ztunnel that went away is noticed (and its successor promoted) quickly
        return ZdsServer(path, snapshot, accept_interval=0.005, ack_timeout=2.0, keepalive_idle=0.1)

    server = make_server()
    await server.start_accepting()
    peers: list[FakeZtunnel] = []

    def new_peer() -> FakeZtunnel:
        fake = FakeZtunnel(path, listener_factory=NoListeners, max_backoff=0.02)
        fake.start()
        peers.append(fake)
        return fake

    async def resynced(fakes: list[FakeZtunnel], counts: list[int]) -> None:
        """Each peer has a new connection whose snapshot is done, so the next op sees it as live.

        Sequencing ops this way makes their order matter (Add-to-newest, Del-to-all); the churn
        scenario in test_zds_scenarios covers ops racing with reconnects.
        """
        for fake, n in zip(fakes, counts, strict=True):

            def fresh_snapshot(z: FakeZtunnel, n: int = n) -> bool:
                return z.connections > n and z.snapshot_received

            await asyncio.to_thread(fake.wait_until, fresh_snapshot, 5.0)

    try:
        await resynced([await asyncio.to_thread(new_peer)], [0])
        for kind, i, j in ops:
            uid = UIDS[i]
            try:
                if kind == "add":
                    cache[uid] = pool.fds[j]  # pods enter the cache before their Add ...
                    added_on.setdefault(uid, set()).add(netns_identity(pool.fds[j]))
                    await server.add_workload(uid, info(uid), pool.fds[j])
                elif kind == "forget_netns":
                    if uid in cache:
                        cache[uid] = None
                elif kind == "agent_restart":
                    counts = [z.connections for z in peers]
                    await server.close()
                    for u, fd in cache.items():
                        if fd is not None:
                            fresh.append(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC))
                            cache[u] = fresh[-1]
                    server = make_server()
                    await server.start_accepting()
                    await resynced(peers, counts)
                elif kind == "remove":
                    if uid in cache:
                        del cache[uid]  # ... and leave it before their Del
                        await server.del_workload(uid)
                elif kind in ("reconnect", "restart") and peers:
                    n = peers[-1].connections
                    await asyncio.to_thread(getattr(peers[-1], kind))
                    await resynced(peers[-1:], [n])
                elif kind == "new_peer" and len(peers) < MAX_PEERS:
                    await resynced([await asyncio.to_thread(new_peer)], [0])
                elif kind == "stop_oldest" and len(peers) > 1:
                    await asyncio.to_thread(peers.pop(0).stop)
                elif kind == "stop_last" and peers:
                    await asyncio.to_thread(peers.pop().stop)
            except ZdsError as exc:
                # every failure the orchestrator can see must be one it may retry later
                assert exc.retryable, exc.msg
        # The upgrade completes: only the most recently started ztunnel stays. Which connection the
        # server saw last is arbitrary after reconnects (Adds went to that one), so this also needs
        # the server to bring the surviving connection up to date when newer ones go away.
        last = peers[-1] if peers else await asyncio.to_thread(new_peer)
        while len(peers) > 1:
            await asyncio.to_thread(peers.pop(0).stop)

        # Pods with a known netns must run, on that netns. A pod sent as Keep (netns unknown) may
        # still run from an earlier Add (Keep shields it), on a netns it was once added with (the
        # agent cannot tell which one a ztunnel has). Nothing the agent does not enroll may run.
        want = {uid: netns_identity(fd) for uid, fd in cache.items() if fd is not None}
        kept = {uid: added_on.get(uid, set()) for uid, fd in cache.items() if fd is None}

        def settled(z: FakeZtunnel) -> bool:
            got = {u: r.netns for u, r in z.running.items()}
            return (
                z.connected
                and z.snapshot_received
                and all(got.get(u) == n for u, n in want.items())
                and all(want.get(u) == n or n in kept.get(u, ()) for u, n in got.items())
            )

        try:
            await asyncio.to_thread(last.wait_until, settled, 5.0)
        except TimeoutError:
            with last._cond:
                got = {u: r.netns for u, r in last.running.items()}
            pytest.fail(f"last peer runs {got}, agent enrolled {want} + kept {kept}; ops={ops}")
        assert last.exited is None
    finally:
        for fake in peers:
            await asyncio.to_thread(fake.stop)
        await server.close()
        for fd in fresh:
            os.close(fd)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=14))
def test_last_peer_runs_exactly_the_enrolled_pods(pool: Pool, ops: list[Op]) -> None:
    with tempfile.TemporaryDirectory(prefix="zdsp") as tmp:
        path = os.path.join(tmp, "ztunnel.sock")
        before = fd_count()
        asyncio.run(asyncio.wait_for(_run_ops(ops, pool, path), 30))
        # every dup the server made, every fd the peers received and every socket is gone again
        deadline = time.monotonic() + 2
        while fd_count() != before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fd_count() == before
