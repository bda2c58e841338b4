"""ZDS wire codec and per-connection state machine, with no I/O (h11-style).

Why pure: every rule that keeps an unmodified ztunnel happy (one request outstanding, Keep and
SnapshotSent only in the snapshot, never an empty record, <= 1024 bytes, fd only with Add, never an
empty uid) lives here where unit tests can hit it with bytes alone. The socket adapter
(`cni_agent.zds.server`) only moves the bytes and fds this object tells it to, and feeds back what
it reads. The fd travelling with an Add is carried as an opaque integer; this module never touches it.

Phases of one connection (agent side)::

    AWAIT_HELLO --hello--> SNAPSHOT --ack of SnapshotSent--> LIVE
         any phase --EOF / protocol error / close()--> CLOSED
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from cni_agent.zds._pb import zds_pb2

MAX_RECORD = 1024
"""ztunnel reads into a 1024-byte buffer; a longer record is a read error on its side."""

HELLO_V1 = 1

MAX_NAME = 253
"""Kubernetes limit for a pod name and a service account name (DNS subdomain)."""
MAX_NAMESPACE = 63
"""Kubernetes limit for a namespace name (DNS label)."""


class ZdsError(Exception):
    """A ZDS request failed; `retryable` says whether trying again later can help.

    Retryable: no ztunnel connected, nack, timeout, connection lost. Not retryable: the agent asked
    for something the protocol forbids (empty uid, oversize record, wrong phase).
    """

    def __init__(self, msg: str, *, retryable: bool) -> None:
        super().__init__(msg)
        self.msg = msg
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """What ztunnel matches against xDS to find the local workload (must equal the pod's metadata)."""

    name: str
    namespace: str
    service_account: str


# ---- requests (agent -> ztunnel) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddRequest:
    """Start proxying `uid`; carries exactly one netns fd. `info` is None only when decoded from a
    malformed peer message (ztunnel treats that as fatal); the encoder refuses None."""

    uid: str
    info: WorkloadInfo | None


@dataclass(frozen=True, slots=True)
class KeepRequest:
    uid: str


@dataclass(frozen=True, slots=True)
class DelRequest:
    uid: str


@dataclass(frozen=True, slots=True)
class SnapshotSentRequest:
    pass


Request = AddRequest | KeepRequest | DelRequest | SnapshotSentRequest


def _check_uid(uid: str) -> None:
    if not uid:
        raise ZdsError(
            "refusing to send an empty uid (ztunnel would accept it as a real workload)", retryable=False
        )


def check_info(info: WorkloadInfo) -> None:
    """Refuse names Kubernetes cannot produce, with an error naming the limit.

    Why here and not only the 1024-byte record check: the limits below are what guarantee the record
    fits (36-char uid + 253 + 63 + 253 = 621 bytes); a caller passing a longer name has a bug or bad
    input, and "name is 300 characters, over the 253-character limit" says so better than a byte count.
    """
    for what, value, limit in (
        ("pod name", info.name, MAX_NAME),
        ("namespace", info.namespace, MAX_NAMESPACE),
        ("service account", info.service_account, MAX_NAME),
    ):
        if len(value) > limit:
            raise ZdsError(
                f"{what} is {len(value)} characters, over the {limit}-character limit; refusing to send it",
                retryable=False,
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # e.g. a lone surrogate from a JSON "\ud800" escape: protobuf could not encode it, and
            # failing mid-snapshot would break every ztunnel connection, not just this pod
            msg = f"{what} {value!r} is not valid UTF-8; refusing to send it"
            raise ZdsError(msg, retryable=False) from None


def _check_size(payload: bytes, what: str) -> bytes:
    if not payload:
        raise ZdsError(f"refusing to send an empty record for {what} (reads as EOF)", retryable=False)
    if len(payload) > MAX_RECORD:
        raise ZdsError(
            f"{what} encodes to {len(payload)} bytes, over the {MAX_RECORD}-byte ZDS limit", retryable=False
        )
    return payload


def encode_request(req: Request) -> bytes:
    """Serialize one WorkloadRequest record, enforcing the never-send rules that depend only on content."""
    msg = zds_pb2.WorkloadRequest()
    if isinstance(req, AddRequest):
        _check_uid(req.uid)
        if req.info is None:
            raise ZdsError("refusing to send an Add without workload_info (ztunnel exits)", retryable=False)
        check_info(req.info)
        msg.add.uid = req.uid
        # Touch the sub-message so it is present even when every string is empty (`12 00`).
        msg.add.workload_info.SetInParent()
        msg.add.workload_info.name = req.info.name
        msg.add.workload_info.namespace = req.info.namespace
        msg.add.workload_info.service_account = req.info.service_account
    elif isinstance(req, KeepRequest):
        _check_uid(req.uid)
        msg.keep.uid = req.uid
    elif isinstance(req, DelRequest):
        _check_uid(req.uid)
        getattr(msg, "del").uid = req.uid  # `del` is a Python keyword
    else:
        msg.snapshot_sent.SetInParent()
    return _check_size(msg.SerializeToString(), type(req).__name__)


def decode_request(data: bytes) -> Request:
    """Parse a WorkloadRequest record (the ztunnel side). Raises ZdsError on undecodable/no payload."""
    msg = zds_pb2.WorkloadRequest()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise ZdsError(f"decode error: {exc}", retryable=False) from exc
    kind = msg.WhichOneof("payload")
    if kind == "add":
        info = None
        if msg.add.HasField("workload_info"):
            wi = msg.add.workload_info
            info = WorkloadInfo(wi.name, wi.namespace, wi.service_account)
        return AddRequest(msg.add.uid, info)
    if kind == "keep":
        return KeepRequest(msg.keep.uid)
    if kind == "del":
        return DelRequest(getattr(msg, "del").uid)
    if kind == "snapshot_sent":
        return SnapshotSentRequest()
    raise ZdsError("no payload", retryable=False)


def encode_hello(version: int = HELLO_V1) -> bytes:
    """The hello ztunnel sends on connect (`08 01`)."""
    return zds_pb2.ZdsHello(version=version).SerializeToString()  # type: ignore[arg-type]


def decode_hello(data: bytes) -> int:
    """Return the hello's version number; unknown versions are returned, not rejected."""
    msg = zds_pb2.ZdsHello()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise ZdsError(f"undecodable hello: {exc}", retryable=True) from exc
    return int(msg.version)


def encode_ack(error: str = "") -> bytes:
    """One WorkloadResponse{ack}; success (`error == ""`) is `0a 00`, never an empty record."""
    msg = zds_pb2.WorkloadResponse()
    msg.ack.SetInParent()
    msg.ack.error = error
    return msg.SerializeToString()


def _salvage_truncated_ack(data: bytes) -> str | None:
    """Read the error text out of a cut-off `0a L 0a L text...` record (nack texts can be long)."""

    def varint(pos: int) -> tuple[int, int] | None:
        value, shift = 0, 0
        while pos < len(data):
            b = data[pos]
            value |= (b & 0x7F) << shift
            pos += 1
            if not b & 0x80:
                return value, pos
            shift += 7
        return None

    if len(data) < 2 or data[0] != 0x0A:
        return None
    outer = varint(1)
    if outer is None or outer[1] >= len(data) or data[outer[1]] != 0x0A:
        return None
    inner = varint(outer[1] + 1)
    if inner is None:
        return None
    return data[inner[1] :].decode("utf-8", errors="replace")


def decode_ack(data: bytes, *, truncated: bool = False) -> str:
    """Return the ack's error text ("" = success). Raises ZdsError if it is not an Ack at all.

    A truncated record (MSG_TRUNC even with a large buffer) keeps the cut text as the nack reason.
    """
    msg = zds_pb2.WorkloadResponse()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        if truncated:
            text = _salvage_truncated_ack(data)
            if text is not None:
                return text + " [truncated]"
        raise ZdsError(f"undecodable response from ztunnel: {exc}", retryable=True) from exc
    if msg.WhichOneof("payload") != "ack":
        raise ZdsError("response from ztunnel carries no ack", retryable=True)
    if truncated:
        return (msg.ack.error or "") + " [truncated]"
    return msg.ack.error


# ---- connection state machine -----------------------------------------------------------------


class Phase(enum.Enum):
    AWAIT_HELLO = "await-hello"
    SNAPSHOT = "snapshot"
    LIVE = "live"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One record to write. `fd` is the (caller-owned) netns fd to attach; set iff the request is an Add."""

    request: Request
    payload: bytes
    fd: int | None = None

    @property
    def with_fd(self) -> bool:
        return self.fd is not None


@dataclass(frozen=True, slots=True)
class SnapshotItem:
    """A cached pod as the snapshot needs it: Add (+fd) when the netns is known, Keep otherwise."""

    uid: str
    info: WorkloadInfo
    fd: int | None


@dataclass(frozen=True, slots=True)
class HelloReceived:
    version: int


@dataclass(frozen=True, slots=True)
class Acked:
    """The response to the outstanding `request`; `error` non-empty means a nack."""

    request: Request
    error: str

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The peer broke the protocol; the connection is now CLOSED and must be dropped."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """EOF from the peer (a 0-byte record); `outstanding` is the request that will never be answered."""

    outstanding: Request | None


Event = HelloReceived | Acked | ProtocolError | ConnectionClosed


class ZdsConnection:
    """Agent-side state of one ZDS connection. Feed it what was read; ask it what to write.

    Methods that produce records raise ZdsError(retryable=False) when the request is illegal now
    (wrong phase, something already outstanding): those are bugs in the caller, never sent.
    """

    def __init__(self) -> None:
        self.phase = Phase.AWAIT_HELLO
        self.hello_version: int | None = None
        self._outstanding: Request | None = None
        self._snapshot_queue: deque[Outgoing] | None = None

    @property
    def outstanding(self) -> Request | None:
        return self._outstanding

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    # -- input ---------------------------------------------------------------------------------

    def receive(self, data: bytes, *, fds: int = 0, truncated: bool = False) -> list[Event]:
        """Process one record read from the socket (`b""` = EOF). `fds`: count of fds that came with it."""
        if self.phase is Phase.CLOSED:
            return []
        if not data and not truncated:
            outstanding = self._outstanding
            self._close()
            return [ConnectionClosed(outstanding)]
        if fds:
            return [self._fail(f"peer sent {fds} unexpected file descriptor(s)")]
        if self.phase is Phase.AWAIT_HELLO:
            if truncated:
                return [self._fail("oversized hello")]
            try:
                version = decode_hello(data)
            except ZdsError as exc:
                return [self._fail(exc.msg)]
            self.hello_version = version
            self.phase = Phase.SNAPSHOT
            return [HelloReceived(version)]
        request = self._outstanding
        if request is None:
            return [self._fail(f"unsolicited data from ztunnel ({len(data)} bytes, no request outstanding)")]
        try:
            error = decode_ack(data, truncated=truncated)
        except ZdsError as exc:
            return [self._fail(exc.msg)]
        self._outstanding = None
        if isinstance(request, SnapshotSentRequest) and self.phase is Phase.SNAPSHOT:
            self.phase = Phase.LIVE
        return [Acked(request, error)]

    # -- output --------------------------------------------------------------------------------

    def start_snapshot(self, items: Iterable[SnapshotItem]) -> Outgoing:
        """Plan the whole snapshot (Add+fd / Keep per item, then SnapshotSent) and return its first record.

        Encoding happens here, up front, so a bad entry fails the snapshot before anything is sent.
        Call `next_outgoing()` after each ack for the rest.
        """
        self._require(Phase.SNAPSHOT, "start a snapshot")
        if self._snapshot_queue is not None:
            raise ZdsError("snapshot already started on this connection", retryable=False)
        queue: deque[Outgoing] = deque()
        for item in items:
            if item.fd is not None:
                add = AddRequest(item.uid, item.info)
                queue.append(Outgoing(add, encode_request(add), item.fd))
            else:
                keep = KeepRequest(item.uid)
                queue.append(Outgoing(keep, encode_request(keep)))
        done = SnapshotSentRequest()
        queue.append(Outgoing(done, encode_request(done)))
        self._snapshot_queue = queue
        first = self.next_outgoing()
        assert first is not None
        return first

    def next_outgoing(self) -> Outgoing | None:
        """Next snapshot record if nothing is outstanding, else None (also None once the snapshot is out)."""
        if self.phase is not Phase.SNAPSHOT or self._outstanding is not None or not self._snapshot_queue:
            return None
        out = self._snapshot_queue.popleft()
        self._outstanding = out.request
        return out

    def send_add(self, uid: str, info: WorkloadInfo, fd: int) -> Outgoing:
        """A steady-state Add; `fd` (the netns) must be attached to exactly this record."""
        return self._live(AddRequest(uid, info), fd)

    def send_del(self, uid: str) -> Outgoing:
        return self._live(DelRequest(uid), None)

    def close(self) -> None:
        """Local close (timeout, shutdown): no more records in or out."""
        self._close()

    # -- internals -----------------------------------------------------------------------------

    def _live(self, req: Request, fd: int | None) -> Outgoing:
        self._require(Phase.LIVE, f"send {type(req).__name__}")
        if self._outstanding is not None:
            raise ZdsError(f"a request is already outstanding ({self._outstanding})", retryable=False)
        out = Outgoing(req, encode_request(req), fd)
        self._outstanding = req
        return out

    def _require(self, phase: Phase, what: str) -> None:
        if self.phase is not phase:
            raise ZdsError(f"cannot {what} in phase {self.phase.value}", retryable=self.phase is Phase.CLOSED)

    def _fail(self, reason: str) -> ProtocolError:
        self._close()
        return ProtocolError(reason)

    def _close(self) -> None:
        self.phase = Phase.CLOSED
        self._outstanding = None
        self._snapshot_queue = None
