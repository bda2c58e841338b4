"""The issue's traffic matrix with real packets: each rules backend, IPv4 and IPv6.

A pod netns P (our rules installed by KernelDataplane, ztunnel-like listeners inside) is wired to an
"outside" netns O. Every case is decided by where a real connection or datagram ends up:
- TCP from the pod to an outside address → 15001, SO_ORIGINAL_DST intact;
- TCP to the pod's IP → 15006 (with bypass-inbound-capture it reaches the app instead);
- a connection from a socket marked 0x539 (ztunnel's own) is not redirected;
- DNS (UDP and TCP port 53) → 15053 only with DNS capture on, and the answer comes back un-NATed.
The host-probe case (SNAT from the host) lives in test_hostprobe.py, which needs a fake host netns.
Nothing here touches the real host netns: sockets and rules live only in P and O.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cni_agent.redirect.dataplane import KernelDataplane
from cni_agent.redirect.netns import NetnsWorker
from cni_agent.redirect.rules import ZTUNNEL_MARK, RuleSettings
from cni_agent.testing.capture import CaptureListeners
from cni_agent.testing.dns import ANSWER_PREFIX, DnsListeners, tcp_exchange, udp_exchange
from cni_agent.testing.netns import TestNetns

pytestmark = pytest.mark.root

BACKENDS = ("iptables-legacy", "nftables")


def make_dataplane(worker: NetnsWorker, backend: str, ipv6: bool) -> KernelDataplane:
    """The pod dataplane for `backend`; skips only while the nft pod backend does not exist yet."""
    if backend == "nftables":
        try:
            from cni_agent.redirect.nft import NftablesBackend
        except ImportError:
            pytest.skip("nft backend not available yet")
    if "backend" in inspect.signature(KernelDataplane).parameters:
        return KernelDataplane(worker, backend=backend, ipv6=ipv6)  # type: ignore[call-arg]
    dp = KernelDataplane(worker, ipv6=ipv6)
    if backend == "nftables":
        dp._backend = NftablesBackend()  # type: ignore[assignment]  # until KernelDataplane takes backend=
    return dp


@dataclass
class Pair:
    """Pod and outside netns, their fds and addresses for the family under test."""

    worker: NetnsWorker
    backend: str
    family: int
    pod: TestNetns
    outside: TestNetns
    pod_fd: int
    out_fd: int
    pod_ip: str
    out_ip: str

    @property
    def af(self) -> socket.AddressFamily:
        return socket.AF_INET if self.family == 4 else socket.AF_INET6

    @property
    def any(self) -> str:
        return "0.0.0.0" if self.family == 4 else "::"

    def install(self, settings: RuleSettings) -> None:
        dp = make_dataplane(self.worker, self.backend, ipv6=self.family == 6)
        asyncio.run(dp.install(self.pod_fd, settings))
        # Prove which backend is programming the pod, so the matrix cannot silently test one twice.
        nft_tables = self.pod.exec(["nft", "list", "tables"], check=True).stdout
        legacy_nat = self.pod.exec(["iptables-legacy-save", "-t", "nat"], check=True).stdout
        if self.backend == "nftables":
            assert "istio-ambient-nat" in nft_tables and "ISTIO_OUTPUT" not in legacy_nat
        else:
            assert "ISTIO_OUTPUT" in legacy_nat and "istio-ambient" not in nft_tables

    def sock(self, fd: int, kind: int = socket.SOCK_STREAM, mark: int | None = None) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(self.af, kind)
            if mark is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            s.settimeout(5)
            return s

        return self.worker.call(fd, make)

    def server(self, fd: int, ip: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(self.af, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ip, port))
            if kind == socket.SOCK_STREAM:
                s.listen(16)
            s.settimeout(5)
            return s

        return self.worker.call(fd, make)

    def capture(self) -> CaptureListeners:
        return CaptureListeners(self.pod_fd, worker=self.worker, families=(self.family,))


@pytest.fixture(scope="module")
def worker() -> Iterator[NetnsWorker]:
    with NetnsWorker(name="traffic-worker") as w:
        yield w


def _host_rules() -> str:
    out: list[str] = []
    for argv in (["iptables-legacy-save"], ["ip6tables-legacy-save"], ["nft", "list", "tables"]):
        res = subprocess.run(argv, capture_output=True, text=True)
        out.extend(line.rsplit(" [", 1)[0] for line in res.stdout.splitlines() if not line.startswith("#"))
    return "\n".join(out)


@pytest.fixture(params=[(b, f) for b in BACKENDS for f in (4, 6)],
                ids=[f"{b}-v{f}" for b in BACKENDS for f in (4, 6)])
def pair(request: pytest.FixtureRequest, worker: NetnsWorker) -> Iterator[Pair]:
    backend, family = request.param
    host_before = _host_rules()
    pod, outside = TestNetns().create(), TestNetns()
    try:
        outside.create()
        p_link, o_link = pod.veth(outside, "10.244.1.1/24", "10.244.1.2/24")
        pod_ip, out_ip = "10.244.1.1", "10.244.1.2"
        if family == 6:
            pod_ip, out_ip = "fd00:ac:3::1", "fd00:ac:3::2"
            pod.exec(["ip", "-6", "addr", "add", f"{pod_ip}/64", "dev", p_link, "nodad"], check=True)
            outside.exec(["ip", "-6", "addr", "add", f"{out_ip}/64", "dev", o_link, "nodad"], check=True)
        yield Pair(worker, backend, family, pod, outside, pod.open(), outside.open(), pod_ip, out_ip)
    finally:
        pod.cleanup()
        outside.cleanup()
    assert _host_rules() == host_before


# --- the matrix --------------------------------------------------------------------------------------


def test_outbound_tcp_lands_on_15001_with_original_dst(pair: Pair) -> None:
    pair.install(RuleSettings())
    with pair.capture() as cap:
        with pair.sock(pair.pod_fd) as c:
            c.connect((pair.out_ip, 8080))
        got = cap.wait_for(lambda i: i.original_dst == (pair.out_ip, 8080))
    assert got.port == 15001
    assert got.peer[0] == pair.pod_ip


def test_inbound_tcp_lands_on_15006(pair: Pair) -> None:
    pair.install(RuleSettings())
    app = pair.server(pair.pod_fd, pair.any, 9090)
    with app, pair.capture() as cap:
        with pair.sock(pair.out_fd) as c:
            c.connect((pair.pod_ip, 9090))
        got = cap.wait_for(lambda i: i.original_dst == (pair.pod_ip, 9090))
        app.setblocking(False)
        with pytest.raises(BlockingIOError):
            app.accept()  # the app never saw it
    assert got.port == 15006
    assert got.peer[0] == pair.out_ip


def test_bypass_inbound_reaches_the_app_but_outbound_is_still_captured(pair: Pair) -> None:
    pair.install(RuleSettings(bypass_inbound=True))
    app = pair.server(pair.pod_fd, pair.any, 9090)
    with app, pair.capture() as cap:
        with pair.sock(pair.out_fd) as c:
            c.connect((pair.pod_ip, 9090))
            conn, peer = app.accept()
            conn.close()
        assert peer[0] == pair.out_ip
        with pair.sock(pair.pod_fd) as c:
            c.connect((pair.out_ip, 8080))
        assert cap.wait_for(lambda i: i.original_dst == (pair.out_ip, 8080)).port == 15001
        assert not any(i.port == 15006 for i in cap.intercepted)


def test_ztunnel_marked_socket_is_not_redirected(pair: Pair) -> None:
    pair.install(RuleSettings())
    real = pair.server(pair.out_fd, pair.out_ip, 8081)
    with real, pair.capture() as cap:
        with pair.sock(pair.pod_fd, mark=ZTUNNEL_MARK) as c:
            c.connect((pair.out_ip, 8081))
            conn, peer = real.accept()
            conn.close()
        assert peer[0] == pair.pod_ip
        # Control: the same destination without the mark is captured, so the mark is what mattered.
        with pair.sock(pair.pod_fd) as c:
            c.connect((pair.out_ip, 8081))
        got = cap.wait_for(lambda i: i.original_dst == (pair.out_ip, 8081))
        assert got.port == 15001
        assert len([i for i in cap.intercepted if i.original_dst[1] == 8081]) == 1


@pytest.mark.parametrize("dns_capture", [True, False], ids=["dns-on", "dns-off"])
def test_dns_lands_on_15053_only_with_dns_capture(pair: Pair, dns_capture: bool) -> None:
    pair.install(RuleSettings(dns_capture=dns_capture))
    upstream_udp = pair.server(pair.out_fd, pair.out_ip, 53, socket.SOCK_DGRAM)
    dns_server = (pair.out_ip, 53)
    with upstream_udp, pair.capture() as cap, DnsListeners(
        pair.pod_fd, worker=pair.worker, families=(pair.family,)
    ) as proxy:
        with pair.sock(pair.pod_fd, socket.SOCK_DGRAM) as u:
            if dns_capture:
                answer, source = udp_exchange(u, dns_server, b"q-udp")
                assert answer == ANSWER_PREFIX + b"q-udp"
                assert source == dns_server  # conntrack un-NATs the proxy's answer
            else:
                u.sendto(b"q-udp", dns_server)
                data, client = upstream_udp.recvfrom(512)
                assert (data, client[0]) == (b"q-udp", pair.pod_ip)
        with pair.sock(pair.pod_fd) as t:
            if dns_capture:
                assert tcp_exchange(t, dns_server, b"q-tcp") == ANSWER_PREFIX + b"q-tcp"
            else:
                t.connect(dns_server)

        if dns_capture:
            udp = proxy.wait_for(lambda q: q.proto == "udp")
            tcp = proxy.wait_for(lambda q: q.proto == "tcp")
            assert (udp.payload, udp.peer[0], udp.family) == (b"q-udp", pair.pod_ip, pair.family)
            assert (tcp.payload, tcp.original_dst) == (b"q-tcp", dns_server)
            upstream_udp.setblocking(False)
            with pytest.raises(BlockingIOError):
                upstream_udp.recvfrom(512)  # nothing leaked past the proxy
            assert not any(i.original_dst == dns_server for i in cap.intercepted)
        else:
            # Without DNS capture, TCP 53 is ordinary outbound traffic: 15001, never 15053.
            got = cap.wait_for(lambda i: i.original_dst == dns_server)
            assert got.port == 15001
            assert proxy.queries == []
