"""ZDS codec and state machine against the byte vectors and rules of spec zds.md (§2-§5, §8.11)."""

from __future__ import annotations

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
OK = bytes.fromhex("0a00")


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


# ---- byte vectors (§3) ----------------------------------------------------------------------------

REQUEST_VECTORS = [
    (SnapshotSentRequest(), "1a 00"),
    (DelRequest("u1"), "12 04 12 02 75 31"),
    (KeepRequest("u1"), "2a 04 0a 02 75 31"),
    (AddRequest("u1", INFO), "0a 11 0a 02 75 31 12 0b 0a 01 6e 12 02 6e 73 1a 02 73 61"),
    (AddRequest("u1", WorkloadInfo("", "", "")), "0a 06 0a 02 75 31 12 00"),
]

REALISTIC_ADD = """
0a 54 0a 24 30 62 33 63 35 64 37 65 2d 31 66 32 61 2d 34 62 36 63 2d 38 64 39 65 2d 30 61 31 62
32 63 33 64 34 65 35 66 12 2c 0a 18 68 74 74 70 62 69 6e 2d 37 64 39 64 35 62 35 35 62 39 2d 61
62 63 64 65 12 07 64 65 66 61 75 6c 74 1a 07 68 74 74 70 62 69 6e
"""


@pytest.mark.parametrize(("req", "hexbytes"), REQUEST_VECTORS)
def test_request_vectors_encode_and_decode(req: p.Request, hexbytes: str) -> None:
    assert p.encode_request(req) == h(hexbytes)
    assert p.decode_request(h(hexbytes)) == req


def test_realistic_add_is_86_bytes() -> None:
    req = AddRequest(
        "0b3c5d7e-1f2a-4b6c-8d9e-0a1b2c3d4e5f", WorkloadInfo("httpbin-7d9d5b55b9-abcde", "default", "httpbin")
    )
    wire = p.encode_request(req)
    assert wire == h(REALISTIC_ADD)
    assert len(wire) == 86
    assert p.decode_request(wire) == req


def test_hello_and_ack_vectors() -> None:
    assert p.encode_hello() == h("08 01")
    assert p.decode_hello(h("08 01")) == 1
    assert p.encode_ack("") == h("0a 00")
    assert p.encode_ack("x") == h("0a 03 0a 01 78")
    assert p.decode_ack(h("0a 00")) == ""
    assert p.decode_ack(h("0a 03 0a 01 78")) == "x"


def test_add_without_workload_info_decodes_as_missing_and_is_never_encoded() -> None:
    assert p.decode_request(h("0a 04 0a 02 75 31")) == AddRequest("u1", None)
    with pytest.raises(ZdsError, match="workload_info"):
        p.encode_request(AddRequest("u1", None))


def test_no_payload_and_unknown_oneof() -> None:
    with pytest.raises(ZdsError, match="no payload"):
        p.decode_request(b"")
    # field 4 (unused in the oneof) decodes to "no payload"; unknown fields are skipped.
    with pytest.raises(ZdsError, match="no payload"):
        p.decode_request(h("22 04 0a 02 75 31"))
    with pytest.raises(ZdsError, match="decode"):
        p.decode_request(h("0a ff"))


def test_upper_bound_add_fits() -> None:
    req = AddRequest("u" * 36, WorkloadInfo("n" * 253, "s" * 63, "a" * 253))
    wire = p.encode_request(req)
    assert len(wire) == 621
    assert len(wire) <= p.MAX_RECORD


def test_oversize_record_refused() -> None:
    """Names within their limits but a uid so long the record passes 1024 bytes: refused, not sent."""
    for req in (AddRequest("u" * 1100, INFO), DelRequest("u" * 1100), KeepRequest("u" * 1100)):
        with pytest.raises(ZdsError, match="over the 1024-byte ZDS limit") as err:
            p.encode_request(req)
        assert not err.value.retryable
    # the boundary: exactly 1024 bytes is allowed, 1025 is not (Del = 2 + 2 + len(uid) with 2-byte varints)
    assert len(p.encode_request(DelRequest("u" * 1018))) == 1024
    with pytest.raises(ZdsError, match="1025 bytes"):
        p.encode_request(DelRequest("u" * 1019))


@pytest.mark.parametrize(("field", "limit"), [("name", 253), ("namespace", 63), ("service_account", 253)])
def test_name_limits(field: str, limit: int) -> None:
    """A 253-character pod name (and the other Kubernetes maxima) fits; one more character is refused."""
    base = {"name": "n", "namespace": "ns", "service_account": "sa"}
    at_limit = WorkloadInfo(**{**base, field: "x" * limit})
    wire = p.encode_request(AddRequest("u1", at_limit))
    assert p.decode_request(wire) == AddRequest("u1", at_limit)
    over = WorkloadInfo(**{**base, field: "x" * (limit + 1)})
    with pytest.raises(ZdsError, match=f"{limit + 1} characters, over the {limit}-character limit") as err:
        p.encode_request(AddRequest("u1", over))
    assert not err.value.retryable


def test_empty_payload_is_never_produced() -> None:
    """Every encodable request is non-empty (a 0-byte record reads as EOF on ztunnel's side)."""
    empty_info = WorkloadInfo("", "", "")
    for req in (SnapshotSentRequest(), DelRequest("u"), KeepRequest("u"), AddRequest("u", empty_info)):
        assert len(p.encode_request(req)) >= 2
    assert p.encode_ack("") != b""


@pytest.mark.parametrize("req", [AddRequest("", INFO), KeepRequest(""), DelRequest("")])
def test_empty_uid_refused(req: p.Request) -> None:
    with pytest.raises(ZdsError, match="empty uid") as err:
        p.encode_request(req)
    assert not err.value.retryable


def test_truncated_long_nack_keeps_text() -> None:
    text = "failure to start proxy : " + "x" * 300
    full = p.encode_ack(text)
    cut = full[:100]
    got = p.decode_ack(cut, truncated=True)
    assert got.startswith("failure to start proxy : xxx")
    assert "truncated" in got


# ---- state machine ---------------------------------------------------------------------------------


def connected() -> ZdsConnection:
    conn = ZdsConnection()
    assert conn.receive(h("08 01")) == [HelloReceived(1)]
    return conn


def live(conn: ZdsConnection | None = None) -> ZdsConnection:
    conn = conn or connected()
    out = conn.start_snapshot([])
    assert out.payload == h("1a 00")
    assert conn.receive(OK) == [Acked(SnapshotSentRequest(), "")]
    assert conn.phase is Phase.LIVE
    return conn


def test_hello_then_snapshot_then_live() -> None:
    conn = ZdsConnection()
    assert conn.phase.value == "await-hello"
    with pytest.raises(ZdsError):
        conn.send_add("u1", INFO, 7)  # nothing before the hello
    conn.receive(h("08 01"))
    assert conn.phase.value == "snapshot"
    items = [SnapshotItem("a", INFO, 10), SnapshotItem("b", INFO, None)]
    first = conn.start_snapshot(items)
    assert first.request == AddRequest("a", INFO) and first.fd == 10 and first.with_fd
    assert conn.next_outgoing() is None  # lock-step: the Add is outstanding
    assert conn.receive(OK) == [Acked(AddRequest("a", INFO), "")]
    second = conn.next_outgoing()
    assert second is not None
    assert second.request == KeepRequest("b") and not second.with_fd
    assert second.payload == p.encode_request(KeepRequest("b"))
    # a nack in the snapshot is just reported; the snapshot goes on
    assert conn.receive(h("0a 03 0a 01 78")) == [Acked(KeepRequest("b"), "x")]
    third = conn.next_outgoing()
    assert third is not None and third.request == SnapshotSentRequest() and third.fd is None
    assert conn.phase.value == "snapshot"
    conn.receive(OK)
    assert conn.phase is Phase.LIVE
    assert conn.next_outgoing() is None


def test_unknown_hello_version_is_accepted() -> None:
    conn = ZdsConnection()
    assert conn.receive(h("08 07")) == [HelloReceived(7)]
    assert conn.phase is Phase.SNAPSHOT


def test_garbage_hello_is_protocol_error() -> None:
    conn = ZdsConnection()
    events = conn.receive(h("0a ff"))
    assert len(events) == 1 and isinstance(events[0], ProtocolError)
    assert conn.closed


def test_live_add_and_del_bytes_and_ack() -> None:
    conn = live()
    out = conn.send_add("u1", INFO, 5)
    assert out.payload == h("0a 11 0a 02 75 31 12 0b 0a 01 6e 12 02 6e 73 1a 02 73 61")
    assert out.fd == 5
    assert conn.receive(OK) == [Acked(AddRequest("u1", INFO), "")]
    out = conn.send_del("u1")
    assert out.payload == h("12 04 12 02 75 31") and out.fd is None
    [ev] = conn.receive(h("0a 03 0a 01 78"))
    assert isinstance(ev, Acked) and ev.request == DelRequest("u1") and not ev.ok and ev.error == "x"


def test_one_request_outstanding_at_a_time() -> None:
    conn = live()
    conn.send_add("u1", INFO, 5)
    with pytest.raises(ZdsError, match="outstanding"):
        conn.send_del("u2")
    conn.receive(OK)
    conn.send_del("u2")  # allowed once the ack arrived


def test_acks_correlate_by_order() -> None:
    conn = live()
    seen = []
    for uid in ("a", "b", "c"):
        conn.send_del(uid)
        [ev] = conn.receive(OK)
        assert isinstance(ev, Acked)
        seen.append(ev.request)
    assert seen == [DelRequest("a"), DelRequest("b"), DelRequest("c")]


@pytest.mark.parametrize("phase", ["snapshot-idle", "live"])
def test_unsolicited_data_is_protocol_error(phase: str) -> None:
    conn = connected()
    if phase == "live":
        live(conn)
    events = conn.receive(OK)
    assert len(events) == 1 and isinstance(events[0], ProtocolError)
    assert "unsolicited" in events[0].reason
    assert conn.closed
    with pytest.raises(ZdsError):
        conn.send_del("u1")


def test_keep_and_snapshot_sent_only_during_snapshot() -> None:
    conn = live()
    # the live API offers no Keep/SnapshotSent; starting another snapshot is refused
    with pytest.raises(ZdsError, match="phase live"):
        conn.start_snapshot([SnapshotItem("a", INFO, None)])
    assert conn.next_outgoing() is None


def test_snapshot_only_once() -> None:
    conn = connected()
    conn.start_snapshot([SnapshotItem("a", INFO, None)])
    with pytest.raises(ZdsError, match="already"):
        conn.start_snapshot([])


def test_snapshot_refuses_empty_uid() -> None:
    conn = connected()
    with pytest.raises(ZdsError, match="empty uid"):
        conn.start_snapshot([SnapshotItem("", INFO, 3)])


def test_live_refuses_empty_uid_without_consuming_the_slot() -> None:
    conn = live()
    with pytest.raises(ZdsError, match="empty uid"):
        conn.send_add("", INFO, 3)
    assert conn.outstanding is None
    conn.send_del("ok")


def test_fd_from_peer_is_protocol_error() -> None:
    conn = live()
    conn.send_del("u1")
    [ev] = conn.receive(OK, fds=1)
    assert isinstance(ev, ProtocolError) and conn.closed


def test_non_ack_response_is_protocol_error() -> None:
    conn = live()
    conn.send_del("u1")
    [ev] = conn.receive(h("12 00"))  # WorkloadResponse with unknown field 2: no ack
    assert isinstance(ev, ProtocolError)


def test_eof_reports_outstanding_request() -> None:
    conn = live()
    conn.send_del("u1")
    assert conn.receive(b"") == [ConnectionClosed(DelRequest("u1"))]
    assert conn.closed
    assert conn.receive(OK) == []  # nothing after close


def test_truncated_ack_becomes_nack() -> None:
    conn = live()
    conn.send_del("u1")
    cut = p.encode_ack("failure to read message : " + "y" * 200)[:64]
    [ev] = conn.receive(cut, truncated=True)
    assert isinstance(ev, Acked) and not ev.ok and ev.error.startswith("failure to read message")


def test_name_that_is_not_utf8_is_refused_not_crashing() -> None:
    """A lone surrogate (JSON "\\ud800") must be a clean, non-retryable refusal, never an exception
    that escapes the snapshot loop and breaks every ztunnel connection."""
    bad = WorkloadInfo("web-\ud800", "demo", "sa")
    with pytest.raises(ZdsError, match="not valid UTF-8") as err:
        p.encode_request(AddRequest("u1", bad))
    assert not err.value.retryable
