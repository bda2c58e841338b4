"""The ztunnel-like peer must itself behave like ztunnel (zds.md §1, §5, §6), or the agent's tests prove
nothing. A tiny raw SEQPACKET "agent" written here sends it exact bytes and fds, including every kind
of bad input, and checks the reply bytes, whether it reconnects or exits, and what it keeps running.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_agent.testing.netns import NetnsFactory, TestNetns
from cni_agent.testing.zdsharness import RawAgent, RecordingListeners, fd_count, info
from cni_agent.testing.ztunnel import FakeZtunnel
from cni_agent.zds import protocol as p
from cni_agent.zds.protocol import AddRequest, DelRequest, KeepRequest, SnapshotSentRequest

pytestmark = pytest.mark.root

enc = p.encode_request


class Recording(RecordingListeners):
    """Recording proxies that fail to start in the netns listed in `fail_for` (reset by `rig`)."""

    fail_for: set[tuple[int, int]] = set()

    def start(self) -> None:
        if self.netns in Recording.fail_for:
            raise OSError(98, "Address in use")
        super().start()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[RawAgent, FakeZtunnel]]:
    path = str(tmp_path / "zt" / "ztunnel.sock")
    agent = RawAgent(path)
    fake = FakeZtunnel(path, listener_factory=Recording, max_backoff=0.05, pending_retry=0.2)
    Recording.fail_for = set()
    fake.start()
    try:
        yield agent, fake
    finally:
        fake.stop()
        agent.close()




# ---- read errors: nack "failure to read message : ...", disconnect, reconnect ----------------------

# (case, payload builder, number of copies of the netns fd to attach, nack text after the prefix)
READ_ERRORS: list[tuple[str, bytes, int, str]] = [
    ("add without fd", enc(AddRequest("x", info("x"))), 0, "No control message"),
    ("fd on del", enc(DelRequest("x")), 1, "Unexpected control message"),
    ("fd on keep", enc(KeepRequest("x")), 1, "Unexpected control message"),
    ("fd on snapshot_sent", enc(SnapshotSentRequest()), 1, "Unexpected control message"),
    ("two fds", enc(AddRequest("x", info("x"))), 2, "Expected 1 FD, got 2"),
    ("three fds (control buffer fits one)", enc(AddRequest("x", info("x"))), 3, "truncated"),
    ("unknown oneof", bytes.fromhex("22040a027531"), 0, "no payload"),
    ("valid proto, no oneof", bytes.fromhex("3a00"), 0, "no payload"),
    ("undecodable", bytes.fromhex("0aff"), 0, "decode error"),
    ("record over 1024 bytes", b"\x0a" * 1100, 0, "received truncated message"),
    ("record over 1024 bytes with an fd", b"\x0a" * 1100, 1, "received truncated message"),
]


@pytest.mark.parametrize(
    ("payload", "nfds", "text"), [c[1:] for c in READ_ERRORS], ids=[c[0] for c in READ_ERRORS]
)
def test_read_error_nacks_and_reconnects(
    rig: tuple[RawAgent, FakeZtunnel], netns: NetnsFactory, payload: bytes, nfds: int, text: str
) -> None:
    agent, fake = rig
    ns, other = netns(), netns()
    agent.accept()
    # something running, to show it survives the reconnect
    assert agent.request(enc(AddRequest("keep", info("keep"))), [ns.fd]) == ""
    agent.snapshot_done()
    running_before = fake.running["keep"]
    count_before = fd_count()

    nack = agent.request(payload, [other.fd] * nfds)
    assert nack.startswith(f"failure to read message : {text}"), nack
    agent.expect_eof()  # the fake disconnects after the nack ...
    agent.accept()  # ... and reconnects at once with a new hello
    fake.wait_until(lambda z: z.connections == 2 and z.connected)
    assert fake.exited is None
    assert fake.running_uids() == {"keep"} and fake.running["keep"] is running_before
    assert not fake.snapshot_received  # per-connection state was reset
    # every fd it received with the bad record was closed (the agent's conn was replaced one for one)
    assert fd_count() == count_before
    assert (None, nack) in fake.acks_sent


def test_empty_record_is_eof_no_reply_and_reconnect(rig: tuple[RawAgent, FakeZtunnel]) -> None:
    agent, fake = rig
    agent.accept()
    agent.send(b"")
    agent.expect_eof()  # no response at all: a 0-byte record reads as EOF
    agent.accept()
    assert fake.acks_sent == []
    assert fake.exited is None


# ---- protocol errors: nack ProtocolError, then the process exits ---------------------------------


def _fatal_add_without_info_in_snapshot(agent: RawAgent, ns: TestNetns) -> str:
    return agent.request(bytes.fromhex("0a040a027531"), [ns.fd])


def _fatal_add_without_info_live(agent: RawAgent, ns: TestNetns) -> str:
    agent.snapshot_done()
    return agent.request(bytes.fromhex("0a040a027531"), [ns.fd])


def _fatal_keep_after_snapshot(agent: RawAgent, ns: TestNetns) -> str:
    agent.snapshot_done()
    return agent.request(enc(KeepRequest("run")))


def _fatal_second_snapshot_sent(agent: RawAgent, ns: TestNetns) -> str:
    agent.snapshot_done()
    return agent.request(enc(SnapshotSentRequest()))


FATAL = [
    (_fatal_add_without_info_in_snapshot, "workload_info is required but not present"),
    (_fatal_add_without_info_live, "workload_info is required but not present"),
    (_fatal_keep_after_snapshot, "pod keep received after snapshot"),
    (_fatal_second_snapshot_sent, "pod snapshot received already"),
]


@pytest.mark.parametrize(("drive", "reason"), FATAL, ids=[f[0].__name__[7:] for f in FATAL])
def test_protocol_error_nacks_and_exits(
    rig: tuple[RawAgent, FakeZtunnel],
    netns: NetnsFactory,
    drive: Callable[[RawAgent, TestNetns], str],
    reason: str,
) -> None:
    agent, fake = rig
    ns = netns()
    agent.accept()
    assert agent.request(enc(AddRequest("run", info("run"))), [ns.fresh_fd()]) == ""
    listeners = fake.running["run"].listeners
    nack = drive(agent, ns)
    assert nack == f'failure to process message : ProtocolError("{reason}")'
    agent.expect_eof()
    fake.wait_until(lambda z: z.exited is not None)
    assert fake.exited == reason
    # the process is gone: its proxies with it, and it does not reconnect
    assert fake.running_uids() == set()
    assert isinstance(listeners, Recording) and listeners.stopped == 1
    with pytest.raises(TimeoutError):
        agent.accept(timeout=0.3)


# ---- proxy identity, replacement, reconcile, pending ----------------------------------------------


def test_repeated_add_same_netns_is_noop_by_dev_and_ino(
    rig: tuple[RawAgent, FakeZtunnel], netns: NetnsFactory
) -> None:
    agent, fake = rig
    ns = netns()
    agent.accept()
    agent.snapshot_done()
    assert agent.request(enc(AddRequest("a", info("a"))), [ns.fd]) == ""
    proxy = fake.running["a"]
    count = fd_count()
    fresh = ns.fresh_fd()  # a different fd number and open file, same netns
    try:
        assert agent.request(enc(AddRequest("a", info("a"))), [fresh]) == ""
    finally:
        os.close(fresh)
    assert fake.running["a"] is proxy  # nothing restarted
    listeners = proxy.listeners
    assert isinstance(listeners, Recording) and (listeners.started, listeners.stopped) == (1, 0)
    assert fd_count() == count  # the fake closed the duplicate it received
    agent.expect_no_reply()


def test_add_of_a_different_netns_replaces_the_proxy(
    rig: tuple[RawAgent, FakeZtunnel], netns: NetnsFactory
) -> None:
    agent, fake = rig
    old_ns, new_ns = netns(), netns()
    agent.accept()
    agent.snapshot_done()
    assert agent.request(enc(AddRequest("a", info("a"))), [old_ns.fd]) == ""
    old = fake.running["a"]
    count = fd_count()
    assert agent.request(enc(AddRequest("a", info("a"))), [new_ns.fd]) == ""
    new = fake.running["a"]
    assert old.netns == old_ns.identity and new.netns == new_ns.identity
    assert isinstance(old.listeners, Recording) and old.listeners.stopped == 1  # drained at once
    assert isinstance(new.listeners, Recording) and new.listeners.started == 1
    assert fd_count() == count  # old netns fd closed, new one held


def test_snapshot_drains_pods_it_does_not_name(
    rig: tuple[RawAgent, FakeZtunnel], netns: NetnsFactory
) -> None:
    """Running a, b, c, d. New connection: Add a (same netns: no-op), Keep b, Del c, nothing for d.
    At SnapshotSent the fake drains c and d (not before), keeps a and b."""
    agent, fake = rig
    nss = {uid: netns() for uid in "abcd"}
    agent.accept()
    for uid, ns in nss.items():
        assert agent.request(enc(AddRequest(uid, info(uid))), [ns.fd]) == ""
    agent.snapshot_done()
    before = dict(fake.running)

    agent.accept()  # the agent restarted: a new connection, a new snapshot
    fake.wait_until(lambda z: z.connections == 2)
    assert agent.request(enc(AddRequest("a", info("a"))), [nss["a"].fresh_fd()]) == ""
    assert agent.request(enc(KeepRequest("b"))) == ""
    assert agent.request(enc(DelRequest("c"))) == ""
    assert fake.running_uids() == set("abcd")  # Del in the snapshot stops nothing yet
    agent.snapshot_done()
    assert fake.running_uids() == {"a", "b"}
    assert fake.running["a"] is before["a"] and fake.running["b"] is before["b"]
    for uid in "cd":
        lst = before[uid].listeners
        assert isinstance(lst, Recording) and lst.stopped == 1
    assert fake.snapshots == 2


def test_del_after_snapshot_drains_and_unknown_uid_acks(
    rig: tuple[RawAgent, FakeZtunnel], netns: NetnsFactory
) -> None:
    agent, fake = rig
    ns = netns()
    agent.accept()
    agent.snapshot_done()
    assert agent.request(enc(AddRequest("a", info("a"))), [ns.fd]) == ""
    assert agent.request(enc(DelRequest("a"))) == ""
    assert fake.running_uids() == set()
    assert agent.request(enc(DelRequest("never-added"))) == ""
    assert agent.request(enc(DelRequest("a"))) == ""  # twice: still fine


def test_start_failure_goes_pending_is_retried_and_dropped_on_disconnect(
    rig: tuple[RawAgent, FakeZtunnel], netns: NetnsFactory
) -> None:
    agent, fake = rig
    ns, ns2 = netns(), netns()
    agent.accept()
    agent.snapshot_done()
    Recording.fail_for = {ns.identity, ns2.identity}
    nack = agent.request(enc(AddRequest("p", info("p"))), [ns.fd])
    assert nack.startswith("failure to start proxy : ") and "Address in use" in nack
    assert set(fake.pending) == {"p"} and "p" not in fake.running
    # the connection is kept: the next request is served normally
    assert agent.request(enc(DelRequest("other"))) == ""
    # retried every pending_retry while connected; succeeds once the port is free
    Recording.fail_for = {ns2.identity}
    fake.wait_until(lambda z: "p" in z.running and not z.pending, timeout=3)
    assert fake.running["p"].netns == ns.identity

    # a pending entry never ran: a disconnect drops it without a drain, and closes its fd
    count = fd_count()
    assert agent.request(enc(AddRequest("q", info("q"))), [ns2.fd]).startswith("failure to start proxy")
    assert set(fake.pending) == {"q"}
    assert fd_count() == count + 1  # the fake holds q's netns fd while pending
    agent.accept()
    fake.wait_until(lambda z: z.connections == 2 and not z.pending)
    assert fake.running_uids() == {"p"}  # running survives, pending does not
    assert fd_count() == count


def test_del_removes_pending(rig: tuple[RawAgent, FakeZtunnel], netns: NetnsFactory) -> None:
    agent, fake = rig
    ns = netns()
    agent.accept()
    agent.snapshot_done()
    Recording.fail_for = {ns.identity}
    count = fd_count()
    assert agent.request(enc(AddRequest("p", info("p"))), [ns.fd]).startswith("failure to start proxy")
    assert agent.request(enc(DelRequest("p"))) == ""
    assert not fake.pending and fd_count() == count
    Recording.fail_for = set()
    time.sleep(0.4)  # past a retry period: nothing comes back
    assert fake.running_uids() == set()


def test_lock_step_one_reply_per_request(rig: tuple[RawAgent, FakeZtunnel]) -> None:
    agent, fake = rig
    agent.accept()
    agent.expect_no_reply()  # after the hello ztunnel never speaks unprompted
    for uid in ("a", "b", "c"):
        agent.send(enc(KeepRequest(uid)))
    assert [agent.reply() for _ in range(3)] == ["", "", ""]
    agent.expect_no_reply()
    assert fake.requests == [KeepRequest("a"), KeepRequest("b"), KeepRequest("c")]
