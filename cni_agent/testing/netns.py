"""Throw-away named network namespaces for tests (root only).

Tests prove behaviour with real kernel objects, so they need pod-like namespaces that are cheap to
create, wire together with veth pairs and reliably delete. Addresses live only inside namespaces
created here; nothing touches the caller's netns unless a veth end is explicitly left there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Callable, Sequence

from cni_agent.redirect.netns import netns_identity, open_netns

_NETNS_DIR = "/var/run/netns"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class TestNetns:
    """A named netns with `lo` up; deleted (with its links) on exit."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"acni-t-{secrets.token_hex(3)}"
        self._host_links: list[str] = []
        self._fds: list[int] = []
        self._fd: int | None = None
        self._created = False

    @property
    def path(self) -> str:
        return os.path.join(_NETNS_DIR, self.name)

    def create(self) -> TestNetns:
        _ip("netns", "add", self.name)
        self._created = True
        _ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def __enter__(self) -> TestNetns:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def open(self) -> int:
        """An O_CLOEXEC netns fd, closed by `cleanup` unless the caller closes it first."""
        fd = open_netns(self.path)
        self._fds.append(fd)
        return fd

    @property
    def fd(self) -> int:
        """One long-lived fd owned by this netns (what a pod cache would hold); opened on first use."""
        if self._fd is None:
            self._fd = self.open()
        return self._fd

    @property
    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino): how ztunnel and the agent tell namespaces apart, whatever the fd number."""
        return netns_identity(self.fd)

    def fresh_fd(self) -> int:
        """Another fd to the same netns, owned by the caller: a different fd number, the same identity."""
        return open_netns(self.path)

    def exec(
        self, argv: Sequence[str], *, input: str | None = None, check: bool = False, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the netns (via `ip netns exec`), capturing text output."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def veth(self, other: TestNetns | None, addr: str, other_addr: str | None = None) -> tuple[str, str]:
        """A veth pair: one end here with `addr` (CIDR), the other in `other` (None = caller's netns).

        Returns (local link name, peer link name). Both ends are set up.
        """
        suffix = secrets.token_hex(3)
        here, there = f"acv{suffix}a", f"acv{suffix}b"
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        try:
            _ip("link", "set", here, "netns", self.name)
            if other is None:
                self._host_links.append(there)
            else:
                _ip("link", "set", there, "netns", other.name)
        except subprocess.CalledProcessError:
            subprocess.run(["ip", "link", "del", here], capture_output=True)
            raise
        _ip("-n", self.name, "addr", "add", addr, "dev", here)
        _ip("-n", self.name, "link", "set", here, "up")
        there_ns = ("-n", other.name) if other is not None else ()
        if other_addr is not None:
            _ip(*there_ns, "addr", "add", other_addr, "dev", there)
        _ip(*there_ns, "link", "set", there, "up")
        return here, there

    def cleanup(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._fd = None
        for link in self._host_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self._host_links.clear()
        if self._created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self._created = False


NetnsFactory = Callable[[], TestNetns]
"""What the `new_ns`/`netns` fixtures hand a test: call it for another throw-away netns."""


class NetnsPool:
    """Creates TestNetns on demand and deletes every one of them at exit (a per-test factory)."""

    def __init__(self, *, hold_fd: bool = False) -> None:
        # hold_fd: open `fd` at creation, so fd counts taken later in a test do not see it appear
        self._hold_fd = hold_fd
        self.made: list[TestNetns] = []

    def new(self) -> TestNetns:
        ns = TestNetns()
        self.made.append(ns)
        ns.create()
        if self._hold_fd:
            _ = ns.fd
        return ns

    def __enter__(self) -> NetnsPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        for ns in self.made:
            ns.cleanup()
        self.made.clear()
