"""The agent's end of the shim's Unix socket: one JSON request in, one JSON reply out, per connection.

The shim runs as root on the host and forwards its environment and stdin; this adapter checks who
is calling (SO_PEERCRED), parses the request with the pure `cni.request` module and hands it to the
orchestrator through the small `CniHandler` protocol. It owns the CNI *output* rules so that the
orchestrator never has to think about them: ADD prints the (converted) prevResult, DEL always
succeeds, unexpected failures become retryable errors (code 11) instead of killing the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog

from cni_agent.cni.request import (
    COMMANDS,
    CURRENT_VERSION,
    CniError,
    CniRequest,
    ErrorCode,
    emit_result,
    parse_del_lenient,
    parse_request,
    sniff_version,
    version_info,
)

log = structlog.get_logger(__name__)

PROTOCOL_VERSION: Final = 1
MAX_REQUEST: Final = 2 * 1024 * 1024
READ_TIMEOUT: Final = 10.0
READY_MARKER: Final = "ready"
_CHUNK: Final = 64 * 1024


class CniHandler(Protocol):
    """What the orchestrator implements. Raise `CniError` to fail a verb with a specific code."""

    async def cni_add(self, req: CniRequest) -> None: ...

    async def cni_del(self, req: CniRequest) -> None: ...

    async def cni_check(self, req: CniRequest) -> None: ...

    async def cni_status(self) -> None: ...

    async def cni_gc(self, req: CniRequest, valid: list[tuple[str, str]]) -> None: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """What the shim does: print `stdout` verbatim, `stderr` as diagnostics, exit with `exit_code`."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""

    def encode(self) -> bytes:
        return json.dumps(
            {"exit_code": self.exit_code, "stdout": self.stdout, "stderr": self.stderr}
        ).encode()


class _TooLarge(Exception):
    pass


def decode_envelope(data: bytes) -> tuple[dict[str, str], bytes]:
    """Unwrap the shim's `{"v": 1, "env": {...}, "stdin_b64": "..."}`; code 6 when it is not that."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(
            ErrorCode.DECODE_FAILURE, "malformed request from the ambient-cni shim", str(exc)
        ) from None
    if not isinstance(doc, dict):
        raise CniError(
            ErrorCode.DECODE_FAILURE, "malformed request from the ambient-cni shim", "not an object"
        )
    if doc.get("v") != PROTOCOL_VERSION:
        raise CniError(
            ErrorCode.DECODE_FAILURE,
            f"unsupported shim protocol version {doc.get('v')!r}",
            "the installed ambient-cni binary and the agent come from different releases; "
            "restarting the agent reinstalls the binary",
        )
    env = doc.get("env")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise CniError(
            ErrorCode.DECODE_FAILURE, "malformed request from the ambient-cni shim", "env must map str→str"
        )
    try:
        stdin = base64.b64decode(doc.get("stdin_b64", ""), validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise CniError(
            ErrorCode.DECODE_FAILURE, "malformed request from the ambient-cni shim", str(exc)
        ) from None
    return env, stdin


def _peer_uid(writer: asyncio.StreamWriter) -> int:
    sock: Any = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return -1
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


class PluginServer:
    """Unix STREAM listener for the shim. `responses` counts replies by (command, CNI code; 0 = ok)."""

    def __init__(
        self,
        path: str,
        handler: CniHandler,
        *,
        max_request: int = MAX_REQUEST,
        allowed_uids: frozenset[int] = frozenset({0}),
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.path = path
        self.handler = handler
        self.max_request = max_request
        self.allowed_uids = allowed_uids
        self.read_timeout = read_timeout
        self.responses: Counter[tuple[str, int]] = Counter()
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def ready_marker(self) -> str:
        """The shim's STATUS boot gate looks for this file next to the socket."""
        return os.path.join(os.path.dirname(self.path) or ".", READY_MARKER)

    def mark_ready(self) -> None:
        """Record "ready once since boot" (the run dir is tmpfs, so a reboot clears it)."""
        fd = os.open(self.ready_marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.close(fd)

    async def start(self) -> None:
        parent = os.path.dirname(self.path) or "."
        os.makedirs(parent, mode=0o700, exist_ok=True)
        await self._remove_stale()
        self._server = await asyncio.start_unix_server(self._on_connection, path=self.path)
        os.chmod(self.path, 0o600)
        self._inode = os.stat(self.path).st_ino
        log.info("plugin socket listening", path=self.path)

    async def _remove_stale(self) -> None:
        """A socket left by a previous agent is replaced; one still served is taken over (newest
        agent wins, e.g. during a DaemonSet surge) — the old agent's close() will not unlink ours."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{self.path} exists and is not a socket; refusing to replace it")
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.path), 1.0)
        except (OSError, TimeoutError):
            pass
        else:
            writer.close()
            log.warning("taking over plugin socket from a live agent", path=self.path)
        os.unlink(self.path)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            reply = await self._serve(reader, writer)
            writer.write(reply.encode())
            async with asyncio.timeout(self.read_timeout):
                await writer.drain()
        except (ConnectionError, TimeoutError) as exc:
            log.warning("plugin connection failed", error=repr(exc))
        except Exception:
            log.exception("plugin connection crashed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Reply:
        # Read before judging the peer: closing with unread data would make the shim see ECONNRESET.
        uid = _peer_uid(writer)
        try:
            async with asyncio.timeout(self.read_timeout):
                data = await self._read_all(reader)
        except TimeoutError:
            return self._fail(
                "", CniError(ErrorCode.IO_FAILURE, "timed out reading the request from the shim")
            )
        except _TooLarge:
            err = CniError(ErrorCode.INVALID_CONFIG, f"request exceeds {self.max_request} bytes")
            return self._fail("", err)
        if uid not in self.allowed_uids:
            log.warning("plugin request refused", uid=uid)
            err = CniError(
                ErrorCode.INVALID_CONFIG, f"permission denied: uid {uid}", "only root may call the agent"
            )
            return self._fail("", err)
        try:
            env, stdin = decode_envelope(data)
        except CniError as err:
            return self._fail("", err)
        return await self.handle(env, stdin)

    async def _read_all(self, reader: asyncio.StreamReader) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while chunk := await reader.read(_CHUNK):
            total += len(chunk)
            if total > self.max_request:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle(self, env: Mapping[str, str], stdin: bytes) -> Reply:
        """Serve one decoded request (the socket-free core, usable directly in tests)."""
        command = env.get("CNI_COMMAND", "")
        label = command if command in COMMANDS else ""
        started = time.monotonic()
        try:
            req = parse_request(env, stdin)
            stdout = await self._dispatch(req)
        except Exception as exc:
            if isinstance(exc, CniError):
                err = exc
            else:
                log.exception("CNI request failed unexpectedly", command=command, pod=_pod(env))
                err = CniError(
                    ErrorCode.TRY_AGAIN_LATER, f"ambient-cni agent error: {exc!r}", "the runtime will retry"
                )
            if command == "DEL":
                # Only validation can fail here (_dispatch never raises for DEL): still remove the pod.
                await self._del_best_effort(parse_del_lenient(env, stdin))
                return self._del_ignored(env, err)
            return self._fail(label, err, sniff_version(stdin), env)
        self.responses[(label, 0)] += 1
        log.info(
            "CNI request",
            command=command,
            pod=_pod(env),
            code=0,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return Reply(0, stdout)

    async def _dispatch(self, req: CniRequest) -> str:
        match req.command:
            case "ADD":
                # Build the output first: a result we cannot print must fail before the pod is enrolled.
                stdout = emit_result(req.prev_result, req.cni_version)
                await self.handler.cni_add(req)
                return stdout
            case "DEL":
                await self._del_best_effort(req)
                return ""
            case "CHECK":
                await self.handler.cni_check(req)
            case "STATUS":
                await self.handler.cni_status()
            case "GC":
                await self.handler.cni_gc(req, list(req.valid_attachments))
            case _:  # VERSION
                return version_info(req.cni_version)
        return ""

    async def _del_best_effort(self, req: CniRequest) -> None:
        try:
            await self.handler.cni_del(req)
        except Exception as exc:
            log.warning("DEL failed; reporting success (DEL must not fail)", pod=_pod_of(req), error=str(exc))

    def _del_ignored(self, env: Mapping[str, str], err: CniError) -> Reply:
        self.responses[("DEL", 0)] += 1
        log.warning("invalid DEL request; reporting success", pod=_pod(env), error=str(err))
        return Reply(0, "", f"ambient-cni: DEL: ignored: {err}")

    def _fail(
        self, label: str, err: CniError, version: str = CURRENT_VERSION, env: Mapping[str, str] | None = None
    ) -> Reply:
        self.responses[(label, err.code)] += 1
        log.warning(
            "CNI request failed",
            command=label,
            pod=_pod(env or {}),
            code=err.code,
            msg=err.msg,
            details=err.details,
        )
        return Reply(1, err.to_json(version), f"ambient-cni: {err}")


def _pod(env: Mapping[str, str]) -> str:
    """A log label for the caller: ns/name from CNI_ARGS, else the container id."""
    fields = dict(p.split("=", 1) for p in env.get("CNI_ARGS", "").split(";") if "=" in p)
    if "K8S_POD_NAME" in fields:
        return f"{fields.get('K8S_POD_NAMESPACE', '')}/{fields['K8S_POD_NAME']}"
    return env.get("CNI_CONTAINERID", "")


def _pod_of(req: CniRequest) -> str:
    return f"{req.pod_namespace}/{req.pod_name}" if req.pod_name else req.container_id
