"""`/healthz` and `/readyz` on the health port: a tiny asyncio HTTP/1.1 responder.

Kept hand-rolled and dependency-free: two fixed GET endpoints do not justify a web framework, and
it runs on the agent's one event loop. `/readyz` says *why* it is not ready (agent-behaviour.md
§15.13): a probe that only says 503 leaves the operator guessing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

ReadyCheck = Callable[[], tuple[bool, str]]


class HealthServer:
    def __init__(self, port: int, ready: ReadyCheck, host: str = "0.0.0.0") -> None:
        self.port = port
        self.host = host
        self._ready = ready
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self.port == 0:
            return
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("health endpoints listening", port=self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            if path == "/healthz":
                status, body = 200, "ok"
            elif path == "/readyz":
                ok, why = self._ready()
                status, body = (200, "ready") if ok else (503, f"not ready: {why}")
            else:
                status, body = 404, "not found: try /healthz or /readyz"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            payload = (body + "\n").encode()
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
