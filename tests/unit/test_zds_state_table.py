"""Every state of the agent-side ZDS connection x every input and every action, table-driven.

Why a table: the pure `ZdsConnection` is where lock-step, phase rules and the never-send rules live
(zds.md §4, §8). A table forces a decision for each pair, including the bad ones, and a completeness
test fails when a state or an input is added without saying what it should do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from cni_agent.zds import protocol as p
from cni_agent.zds.protocol import (
    Acked,
    AddRequest,
    ConnectionClosed,
    DelRequest,
    HelloReceived,
    KeepRequest,
    Phase,
    ProtocolError,
    SnapshotItem,
    SnapshotSentRequest,
    WorkloadInfo,
    ZdsConnection,
    ZdsError,
)

INFO = WorkloadInfo("n", "ns", "sa")
ADD_A = AddRequest("a", INFO)
KEEP_B = KeepRequest("b")
DONE = SnapshotSentRequest()
ADD_L = AddRequest("l", INFO)
DEL_L = DelRequest("l")
OK = bytes.fromhex("0a00")
NACK = bytes.fromhex("0a030a0178")  # Ack{error: "x"}


# ---- states --------------------------------------------------------------------------------------
# Each builder drives a fresh connection into the state through the public API only.


def s_await_hello() -> ZdsConnection:
    return ZdsConnection()


def s_snapshot_idle() -> ZdsConnection:
    """Hello read, snapshot not yet planned: nothing outstanding."""
    conn = ZdsConnection()
    conn.receive(bytes.fromhex("0801"))
    return conn


def _snapshot_started() -> ZdsConnection:
    conn = s_snapshot_idle()
    first = conn.start_snapshot([SnapshotItem("a", INFO, 7), SnapshotItem("b", INFO, None)])
    assert first.request == ADD_A
    return conn


def s_snapshot_wait_add() -> ZdsConnection:
    return _snapshot_started()


def s_snapshot_between() -> ZdsConnection:
    """The Add was acked; the Keep is planned but not yet taken with next_outgoing()."""
    conn = _snapshot_started()
    conn.receive(OK)
    return conn


def s_snapshot_wait_keep() -> ZdsConnection:
    conn = s_snapshot_between()
    out = conn.next_outgoing()
    assert out is not None and out.request == KEEP_B
    return conn


def s_snapshot_wait_done() -> ZdsConnection:
    conn = s_snapshot_wait_keep()
    conn.receive(OK)
    out = conn.next_outgoing()
    assert out is not None and out.request == DONE
    return conn


def s_live_idle() -> ZdsConnection:
    conn = s_snapshot_wait_done()
    conn.receive(OK)
    return conn


def s_live_wait_add() -> ZdsConnection:
    conn = s_live_idle()
    conn.send_add("l", INFO, 9)
    return conn


def s_live_wait_del() -> ZdsConnection:
    conn = s_live_idle()
    conn.send_del("l")
    return conn


def s_closed() -> ZdsConnection:
    conn = s_live_idle()
    conn.close()
    return conn


STATES: dict[str, Callable[[], ZdsConnection]] = {
    "await_hello": s_await_hello,
    "snapshot_idle": s_snapshot_idle,
    "snapshot_wait_add": s_snapshot_wait_add,
    "snapshot_between": s_snapshot_between,
    "snapshot_wait_keep": s_snapshot_wait_keep,
    "snapshot_wait_done": s_snapshot_wait_done,
    "live_idle": s_live_idle,
    "live_wait_add": s_live_wait_add,
    "live_wait_del": s_live_wait_del,
    "closed": s_closed,
}

PHASE_OF = {
    "await_hello": Phase.AWAIT_HELLO,
    "snapshot_idle": Phase.SNAPSHOT,
    "snapshot_wait_add": Phase.SNAPSHOT,
    "snapshot_between": Phase.SNAPSHOT,
    "snapshot_wait_keep": Phase.SNAPSHOT,
    "snapshot_wait_done": Phase.SNAPSHOT,
    "live_idle": Phase.LIVE,
    "live_wait_add": Phase.LIVE,
    "live_wait_del": Phase.LIVE,
    "closed": Phase.CLOSED,
}

OUTSTANDING_OF: dict[str, p.Request | None] = {
    "await_hello": None,
    "snapshot_idle": None,
    "snapshot_wait_add": ADD_A,
    "snapshot_between": None,
    "snapshot_wait_keep": KEEP_B,
    "snapshot_wait_done": DONE,
    "live_idle": None,
    "live_wait_add": ADD_L,
    "live_wait_del": DEL_L,
    "closed": None,
}


@pytest.mark.parametrize("state", STATES)
def test_state_builders_reach_their_state(state: str) -> None:
    conn = STATES[state]()
    assert conn.phase is PHASE_OF[state]
    assert conn.outstanding == OUTSTANDING_OF[state]
    assert conn.closed is (state == "closed")


# ---- inputs: one record read from the socket -----------------------------------------------------


@dataclass(frozen=True)
class Input:
    data: bytes
    fds: int = 0
    truncated: bool = False


LONG_NACK_CUT = p.encode_ack("failure to start proxy : " + "z" * 300)[:80]

INPUTS: dict[str, Input] = {
    "hello": Input(bytes.fromhex("0801")),
    "hello_v7": Input(bytes.fromhex("0807")),
    "ack_ok": Input(OK),
    "nack": Input(NACK),
    "eof": Input(b""),
    "garbage": Input(bytes.fromhex("0aff")),  # length runs past the end: undecodable
    "not_an_ack": Input(bytes.fromhex("1200")),  # WorkloadResponse with no oneof set
    "ack_with_fd": Input(OK, fds=1),
    "truncated_nack": Input(LONG_NACK_CUT, truncated=True),
}

# Expected outcome kinds:
#   ("hello", version)        -> [HelloReceived(version)], phase SNAPSHOT
#   ("acked", error, phase)   -> [Acked(outstanding, error)], then `phase`, nothing outstanding
#   ("closed",)               -> [ConnectionClosed(outstanding)], CLOSED
#   ("proto_error", text)     -> [ProtocolError(reason containing text)], CLOSED
#   ("ignored",)              -> [], state unchanged (already closed)
Expect = tuple[object, ...]

UNSOLICITED = ("proto_error", "unsolicited")


def _waiting(after: Phase) -> dict[str, Expect]:
    """A state with a request outstanding: acks answer it, everything else is fatal to the connection."""
    return {
        "hello": ("proto_error", "no ack"),  # 08 01 is not a WorkloadResponse{ack}
        "hello_v7": ("proto_error", "no ack"),
        "ack_ok": ("acked", "", after),
        "nack": ("acked", "x", after),
        "eof": ("closed",),
        "garbage": ("proto_error", "undecodable"),
        "not_an_ack": ("proto_error", "no ack"),
        "ack_with_fd": ("proto_error", "file descriptor"),
        "truncated_nack": ("acked", "failure to start proxy : zz", after),
    }


def _idle() -> dict[str, Expect]:
    """Nothing outstanding: ztunnel never speaks unprompted, so any data is a violation."""
    return {
        "hello": UNSOLICITED,
        "hello_v7": UNSOLICITED,
        "ack_ok": UNSOLICITED,
        "nack": UNSOLICITED,
        "eof": ("closed",),
        "garbage": UNSOLICITED,
        "not_an_ack": UNSOLICITED,
        "ack_with_fd": ("proto_error", "file descriptor"),
        "truncated_nack": UNSOLICITED,
    }


RECEIVE_TABLE: dict[str, dict[str, Expect]] = {
    "await_hello": {
        "hello": ("hello", 1),
        "hello_v7": ("hello", 7),  # logged, not enforced
        "ack_ok": ("hello", 0),  # unknown fields are skipped: decodes as a hello without version
        "nack": ("hello", 0),
        "eof": ("closed",),
        "garbage": ("proto_error", "undecodable hello"),
        "not_an_ack": ("hello", 0),
        "ack_with_fd": ("proto_error", "file descriptor"),
        "truncated_nack": ("proto_error", "oversized hello"),
    },
    "snapshot_idle": _idle(),
    "snapshot_wait_add": _waiting(Phase.SNAPSHOT),
    "snapshot_between": _idle(),
    "snapshot_wait_keep": _waiting(Phase.SNAPSHOT),
    "snapshot_wait_done": _waiting(Phase.LIVE),  # even a nacked SnapshotSent ends the snapshot
    "live_idle": _idle(),
    "live_wait_add": _waiting(Phase.LIVE),
    "live_wait_del": _waiting(Phase.LIVE),
    "closed": dict.fromkeys(INPUTS, ("ignored",)),
}


def test_receive_table_is_complete() -> None:
    assert set(RECEIVE_TABLE) == set(STATES)
    for state, row in RECEIVE_TABLE.items():
        assert set(row) == set(INPUTS), state


@pytest.mark.parametrize(("state", "inp"), [(s, i) for s in STATES for i in INPUTS])
def test_receive(state: str, inp: str) -> None:
    conn = STATES[state]()
    before = conn.outstanding
    record = INPUTS[inp]
    events = conn.receive(record.data, fds=record.fds, truncated=record.truncated)
    expect = RECEIVE_TABLE[state][inp]
    kind = expect[0]
    if kind == "hello":
        assert events == [HelloReceived(int(expect[1]))]  # type: ignore[call-overload]
        assert conn.phase is Phase.SNAPSHOT and conn.hello_version == expect[1]
        assert conn.outstanding is None
    elif kind == "acked":
        [ev] = events
        assert isinstance(ev, Acked) and ev.request == before
        assert isinstance(expect[1], str) and ev.error.startswith(expect[1])
        assert ev.ok is (expect[1] == "")
        if record.truncated:
            assert ev.error.endswith("[truncated]")
        assert conn.phase is expect[2]
        assert conn.outstanding is None
    elif kind == "closed":
        assert events == [ConnectionClosed(before)]
        assert conn.closed and conn.outstanding is None
    elif kind == "proto_error":
        [ev] = events
        assert isinstance(ev, ProtocolError)
        assert str(expect[1]) in ev.reason
        assert conn.closed and conn.outstanding is None
    else:
        assert kind == "ignored"
        assert events == []
        assert conn.closed
    # whatever happened, a closed connection emits nothing more
    if conn.closed:
        assert conn.receive(OK) == []
        assert conn.next_outgoing() is None


# ---- actions: what the adapter asks the object to produce ----------------------------------------

ACTIONS: dict[str, Callable[[ZdsConnection], object]] = {
    "start_snapshot": lambda c: c.start_snapshot([SnapshotItem("s", INFO, 3)]),
    "next_outgoing": lambda c: c.next_outgoing(),
    "send_add": lambda c: c.send_add("n1", INFO, 4),
    "send_del": lambda c: c.send_del("n1"),
    "close": lambda c: c.close(),
}

# ("ok", request or None) -> returns an Outgoing for that request (None: returns None)
# ("error", text, retryable) -> ZdsError; the state is unchanged
# ("closes",) -> CLOSED
ActExpect = tuple[object, ...]

NEW_ADD = AddRequest("n1", INFO)
NEW_DEL = DelRequest("n1")
BUSY = ("error", "already outstanding", False)


def _wrong_phase(phase: str, retryable: bool = False) -> dict[str, ActExpect]:
    return {
        "send_add": ("error", f"cannot send AddRequest in phase {phase}", retryable),
        "send_del": ("error", f"cannot send DelRequest in phase {phase}", retryable),
    }


ACTION_TABLE: dict[str, dict[str, ActExpect]] = {
    "await_hello": {
        "start_snapshot": ("error", "cannot start a snapshot in phase await-hello", False),
        "next_outgoing": ("ok", None),
        **_wrong_phase("await-hello"),
        "close": ("closes",),
    },
    "snapshot_idle": {
        "start_snapshot": ("ok", AddRequest("s", INFO)),
        "next_outgoing": ("ok", None),  # nothing planned yet
        **_wrong_phase("snapshot"),
        "close": ("closes",),
    },
    "snapshot_wait_add": {
        "start_snapshot": ("error", "snapshot already started", False),
        "next_outgoing": ("ok", None),  # lock-step: the Add is outstanding
        **_wrong_phase("snapshot"),
        "close": ("closes",),
    },
    "snapshot_between": {
        "start_snapshot": ("error", "snapshot already started", False),
        "next_outgoing": ("ok", KEEP_B),
        **_wrong_phase("snapshot"),
        "close": ("closes",),
    },
    "snapshot_wait_keep": {
        "start_snapshot": ("error", "snapshot already started", False),
        "next_outgoing": ("ok", None),
        **_wrong_phase("snapshot"),
        "close": ("closes",),
    },
    "snapshot_wait_done": {
        "start_snapshot": ("error", "snapshot already started", False),
        "next_outgoing": ("ok", None),
        **_wrong_phase("snapshot"),
        "close": ("closes",),
    },
    "live_idle": {
        # no second snapshot, so no Keep/SnapshotSent once live
        "start_snapshot": ("error", "cannot start a snapshot in phase live", False),
        "next_outgoing": ("ok", None),
        "send_add": ("ok", NEW_ADD),
        "send_del": ("ok", NEW_DEL),
        "close": ("closes",),
    },
    "live_wait_add": {
        "start_snapshot": ("error", "cannot start a snapshot in phase live", False),
        "next_outgoing": ("ok", None),
        "send_add": BUSY,
        "send_del": BUSY,
        "close": ("closes",),
    },
    "live_wait_del": {
        "start_snapshot": ("error", "cannot start a snapshot in phase live", False),
        "next_outgoing": ("ok", None),
        "send_add": BUSY,
        "send_del": BUSY,
        "close": ("closes",),
    },
    "closed": {
        # retryable: the connection is gone, another (or the next) one may take the request
        "start_snapshot": ("error", "cannot start a snapshot in phase closed", True),
        "next_outgoing": ("ok", None),
        **_wrong_phase("closed", retryable=True),
        "close": ("closes",),
    },
}


def test_action_table_is_complete() -> None:
    assert set(ACTION_TABLE) == set(STATES)
    for state, row in ACTION_TABLE.items():
        assert set(row) == set(ACTIONS), state


@pytest.mark.parametrize(("state", "action"), [(s, a) for s in STATES for a in ACTIONS])
def test_action(state: str, action: str) -> None:
    conn = STATES[state]()
    before = (conn.phase, conn.outstanding)
    expect = ACTION_TABLE[state][action]
    if expect[0] == "error":
        with pytest.raises(ZdsError) as err:
            ACTIONS[action](conn)
        assert str(expect[1]) in err.value.msg
        assert err.value.retryable is expect[2]
        assert (conn.phase, conn.outstanding) == before  # a refused request changes nothing
    elif expect[0] == "closes":
        assert ACTIONS[action](conn) is None
        assert conn.closed and conn.outstanding is None
        assert conn.receive(OK) == []
    else:
        out = ACTIONS[action](conn)
        want = expect[1]
        if want is None:
            assert out is None
            assert (conn.phase, conn.outstanding) == before
        else:
            assert isinstance(out, p.Outgoing)
            assert out.request == want
            assert out.payload == p.encode_request(want)  # type: ignore[arg-type]
            assert 0 < len(out.payload) <= p.MAX_RECORD
            # the fd rides with an Add and only with an Add
            assert (out.fd is not None) is isinstance(want, AddRequest)
            assert conn.outstanding == want


# ---- whole-connection walks ------------------------------------------------------------------------


def test_snapshot_order_add_then_keep_then_snapshot_sent_with_nacks_in_between() -> None:
    """Nacks in the snapshot are reported and the snapshot goes on (the reference only logs them)."""
    conn = s_snapshot_idle()
    items = [SnapshotItem("a", INFO, 10), SnapshotItem("k", INFO, None), SnapshotItem("b", INFO, 11)]
    sent: list[p.Outgoing] = [conn.start_snapshot(items)]
    replies = [NACK, OK, NACK, OK]
    events: list[p.Event] = []
    for reply in replies:
        events += conn.receive(reply)
        nxt = conn.next_outgoing()
        if nxt is not None:
            sent.append(nxt)
    assert [o.request for o in sent] == [AddRequest("a", INFO), KeepRequest("k"), AddRequest("b", INFO), DONE]
    assert [o.fd for o in sent] == [10, None, 11, None]
    assert [e.error for e in events if isinstance(e, Acked)] == ["x", "", "x", ""]
    assert conn.phase is Phase.LIVE


def test_bad_snapshot_entry_fails_before_anything_is_sent() -> None:
    conn = s_snapshot_idle()
    with pytest.raises(ZdsError, match="over the 253-character limit"):
        conn.start_snapshot(
            [SnapshotItem("a", INFO, 3), SnapshotItem("b", WorkloadInfo("n" * 254, "", ""), 4)]
        )
    assert conn.outstanding is None and conn.phase is Phase.SNAPSHOT
    # the connection is still usable for a corrected snapshot
    assert conn.start_snapshot([SnapshotItem("a", INFO, 3)]).request == AddRequest("a", INFO)
