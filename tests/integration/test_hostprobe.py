"""Host probe SNAT rules and probe sets against the real kernel, in a FAKE host netns.

Host-side rules change the netns they run in, so these tests never run them in the real host: a
test-created netns H plays the host. The NetnsWorker is started from a thread that has entered H, so
its "home" (where `call_host` runs and where it returns after every pod job) is H; ipsets, iptables
and nft tables are all per netns, which the tests check against the real host's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from cni_agent.redirect.dataplane import KernelDataplane
from cni_agent.redirect.hostprobe import (
    BACKEND_IPTABLES,
    BACKEND_NFTABLES,
    HostProbe,
    HostProbeConfig,
    HostProbeError,
    NftHostProbe,
    make_host_probe,
    render_iptables_host_restore,
    render_nft_host_text,
)
from cni_agent.redirect.netns import NetnsWorker, current_netns_identity, netns_identity
from cni_agent.redirect.rules import PROBE_SNAT_IPV4, PROBE_SNAT_IPV6, RuleSettings
from cni_agent.testing.capture import CaptureListeners
from cni_agent.testing.netns import NetnsFactory, TestNetns

pytestmark = pytest.mark.root

BACKENDS = (BACKEND_IPTABLES, BACKEND_NFTABLES)
SETS = ("istio-inpod-probes-v4", "istio-inpod-probes-v6")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


# --- fixtures and helpers ----------------------------------------------------------------------------


def worker_homed_in(ns: TestNetns) -> NetnsWorker:
    """A NetnsWorker whose host netns is `ns`: threads inherit the netns of the thread creating them."""
    fd = ns.open()
    box: dict[str, Any] = {}

    def boot() -> None:
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the fake host failed")
            box["worker"] = NetnsWorker(name="fake-host-worker")
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=boot)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    worker: NetnsWorker = box["worker"]
    assert worker.host_identity == netns_identity(fd) != current_netns_identity()
    return worker


def real_host_state() -> dict[str, str]:
    """Read-only snapshot of everything a host probe could touch in the real host netns."""
    def run(*argv: str) -> str:
        res = subprocess.run(argv, capture_output=True, text=True)
        return res.stdout

    return {
        "iptables": _strip_counters(run("iptables-legacy-save")),  # no -t: must not instantiate tables
        "ip6tables": _strip_counters(run("ip6tables-legacy-save")),
        "ipsets": run("ipset", "list", "-n"),
        "nft": run("nft", "list", "tables"),
    }


def _strip_counters(save: str) -> str:
    return "\n".join(
        line.rsplit(" [", 1)[0] if line.startswith(":") else line
        for line in save.splitlines() if not line.startswith("#")
    )


@pytest.fixture
def host_untouched() -> Iterator[None]:
    before = real_host_state()
    yield
    assert real_host_state() == before


@pytest.fixture
def fake_host(host_untouched: None) -> Iterator[tuple[TestNetns, NetnsWorker]]:
    ns = TestNetns().create()
    try:
        worker = worker_homed_in(ns)
        try:
            yield ns, worker
        finally:
            worker.close()
    finally:
        ns.cleanup()


def nat_save(ns: TestNetns, family: int) -> str:
    tool = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    return _strip_counters(ns.exec([tool, "-t", "nat"], check=True).stdout)


def nft_table(ns: TestNetns) -> str:
    res = ns.exec(["nft", "list", "table", "inet", "istio-ambient-nat"])
    return res.stdout if res.returncode == 0 else ""


_ELEMENT = re.compile(r'([0-9a-fA-F.:]+) comment "([^"]*)"')


def set_members(ns: TestNetns, backend: str, name: str) -> dict[str, str]:
    """The set as the stock CLI shows it: an independent reading of what the kernel holds."""
    if backend == BACKEND_IPTABLES:
        res = ns.exec(["ipset", "list", name])
    else:
        res = ns.exec(["nft", "list", "set", "inet", "istio-ambient-nat", name])
    if res.returncode != 0:
        return {}
    return dict(_ELEMENT.findall(res.stdout))


def probe(backend: str, worker: NetnsWorker, **cfg: Any) -> HostProbe:
    if backend == BACKEND_NFTABLES:
        cfg.setdefault("kubelet_uid", 0)
    return make_host_probe(backend, worker, HostProbeConfig(**cfg))


def make_dataplane(worker: NetnsWorker, backend: str, ipv6: bool,
                   probe_snat: dict[int, str] | None = None) -> KernelDataplane:
    return KernelDataplane(worker, backend=backend, ipv6=ipv6, probe_snat=probe_snat)


# --- rules: exact spec shape, idempotent, replaces stale state, per netns -----------------------------


def test_iptables_install_equals_spec_restore_and_repairs(
    fake_host: tuple[TestNetns, NetnsWorker], new_ns: NetnsFactory
) -> None:
    host, worker = fake_host
    ref = new_ns()
    for name, fam in zip(SETS, ("inet", "inet6"), strict=True):
        ref.exec(["ipset", "create", name, "hash:ip", "family", fam, "comment"], check=True)
    for family in (4, 6):
        tool = "iptables-legacy-restore" if family == 4 else "ip6tables-legacy-restore"
        ref.exec([tool, "--noflush", "-v"], input=render_iptables_host_restore(family), check=True)

    p = probe(BACKEND_IPTABLES, worker, ipv6=True)
    p.install()
    p.install()  # idempotent: one copy of everything
    for family in (4, 6):
        assert nat_save(host, family) == nat_save(ref, family), family
    assert "--socket-exists" in nat_save(host, 4)  # not vacuous
    sets_here = host.exec(["ipset", "list", "-n"], check=True).stdout.split()
    assert sorted(sets_here) == sorted(SETS)
    assert not set(SETS) & set(real_host_state()["ipsets"].split())  # ipsets are per netns

    # Stale state from an older agent: a stray rule, a duplicate jump; a foreign rule must survive.
    p.upsert("10.200.0.1", "uid-a")
    for args in (["-A", "ISTIO_POSTRT", "-j", "RETURN"], ["-A", "POSTROUTING", "-j", "ISTIO_POSTRT"],
                 ["-A", "POSTROUTING", "-p", "udp", "--dport", "7777", "-j", "RETURN"]):
        host.exec(["iptables-legacy", "-t", "nat", *args], check=True)
    p.install()
    save = nat_save(host, 4)
    assert save.count("-j ISTIO_POSTRT") == 1
    assert save.index("-A POSTROUTING -j ISTIO_POSTRT") < save.index("--dport 7777")  # inserted first
    assert "-A ISTIO_POSTRT -j RETURN" not in save
    assert save.replace("-A POSTROUTING -p udp -m udp --dport 7777 -j RETURN\n", "") == nat_save(ref, 4)
    assert set_members(host, BACKEND_IPTABLES, SETS[0]) == {"10.200.0.1": "uid-a"}  # install never flushes

    p.uninstall()
    p.uninstall()  # idempotent
    for family in (4, 6):
        assert "ISTIO_POSTRT" not in nat_save(host, family)
    assert "--dport 7777" in nat_save(host, 4)
    assert host.exec(["ipset", "list", "-n"], check=True).stdout.split() == []


def test_nft_install_equals_spec_text_and_repairs(
    fake_host: tuple[TestNetns, NetnsWorker], new_ns: NetnsFactory
) -> None:
    host, worker = fake_host
    ref = new_ns()
    cfg = HostProbeConfig(ipv6=True, kubelet_uid=1234)
    sets = "".join(f"add set inet istio-ambient-nat {n} {{ type {t} ; }}\n"
                   for n, t in zip(SETS, ("ipv4_addr", "ipv6_addr"), strict=True))
    ref.exec(["nft", "-f", "-"], input="add table inet istio-ambient-nat\n" + sets
             + render_nft_host_text(1234, cfg), check=True)

    p = make_host_probe(BACKEND_NFTABLES, worker, cfg)
    p.install()
    p.install()
    assert nft_table(host) == nft_table(ref) != ""
    assert "meta skuid 1234 ip6 daddr @istio-inpod-probes-v6" in nft_table(host)

    # Stale state: the chain redefined with another priority plus a stray rule; elements must survive.
    p.upsert("10.200.0.1", "uid-a")
    p.upsert("fd00:ac::1", "uid-b")
    host.exec(["nft", "delete", "chain", "inet", "istio-ambient-nat", "postrouting"], check=True)
    host.exec(["nft", "add", "chain", "inet", "istio-ambient-nat", "postrouting",
               "{ type nat hook postrouting priority 50 ; }"], check=True)
    host.exec(["nft", "add", "rule", "inet", "istio-ambient-nat", "postrouting", "counter", "accept"],
              check=True)
    p.install()
    assert set_members(host, BACKEND_NFTABLES, SETS[0]) == {"10.200.0.1": "uid-a"}
    assert set_members(host, BACKEND_NFTABLES, SETS[1]) == {"fd00:ac::1": "uid-b"}
    ref.exec(["nft", "-f", "-"], check=True, input=(
        'add element inet istio-ambient-nat istio-inpod-probes-v4 { 10.200.0.1 comment "uid-a" }\n'
        'add element inet istio-ambient-nat istio-inpod-probes-v6 { fd00:ac::1 comment "uid-b" }\n'))
    assert nft_table(host) == nft_table(ref)

    p.uninstall()
    p.uninstall()
    assert "istio-ambient-nat" not in host.exec(["nft", "list", "tables"], check=True).stdout


def test_nft_discovers_kubelet_uid_from_proc(fake_host: tuple[TestNetns, NetnsWorker], tmp_path: Any) -> None:
    host, worker = fake_host
    d = tmp_path / "321"
    d.mkdir()
    (d / "comm").write_text("kubelet\n")
    (d / "cmdline").write_bytes(b"/usr/bin/kubelet\0")
    (d / "status").write_text("Name:\tkubelet\nUid:\t777\t777\t777\t777\n")
    p = make_host_probe(BACKEND_NFTABLES, worker, HostProbeConfig(proc_root=str(tmp_path)))
    p.install()
    assert isinstance(p, NftHostProbe) and p.kubelet_uid == 777
    assert "meta skuid 777 ip daddr @istio-inpod-probes-v4" in nft_table(host)
    assert "ip6 daddr" not in nft_table(host)  # IPv6 off by default
    p.uninstall()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_switched_off_install_and_uninstall_remove_the_v6_rule(
    backend: str, fake_host: tuple[TestNetns, NetnsWorker]
) -> None:
    """An agent that ran with IPv6 on, restarted with it off: startup drops the old v6 rule, and
    uninstall removes every rule (the v6 one references the v6 set, which must then be destroyed)."""
    host, worker = fake_host

    def v6_rule() -> bool:
        if backend == BACKEND_IPTABLES:
            return "istio-inpod-probes-v6" in nat_save(host, 6)
        return "@istio-inpod-probes-v6" in nft_table(host)

    p6, p4 = probe(backend, worker, ipv6=True), probe(backend, worker, ipv6=False)
    p6.install()
    p6.upsert("fd00:ac::1", "uid-b")
    assert v6_rule()  # not vacuous
    p4.install()
    assert not v6_rule()
    v4_rule = nat_save(host, 4) if backend == BACKEND_IPTABLES else nft_table(host)
    assert "istio-inpod-probes-v4" in v4_rule

    p6.install()
    assert v6_rule()
    p4.uninstall()
    if backend == BACKEND_IPTABLES:
        for family in (4, 6):
            assert "ISTIO_POSTRT" not in nat_save(host, family)
        assert host.exec(["ipset", "list", "-n"], check=True).stdout.split() == []
    else:
        assert nft_table(host) == ""
    p4.uninstall()  # idempotent


# --- set semantics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_semantics(backend: str, fake_host: tuple[TestNetns, NetnsWorker]) -> None:
    host, worker = fake_host
    p = probe(backend, worker, ipv6=True)
    p.install()
    v4, v6 = SETS

    p.upsert("10.200.0.1", "uid-a")
    p.upsert("10.200.0.1", "uid-b")  # replace: last writer wins
    p.upsert("::ffff:10.200.0.2", "uid-c")  # v4-mapped goes to the v4 set
    p.upsert("fd00:ac::5", "uid-d")
    assert set_members(host, backend, v4) == {"10.200.0.1": "uid-b", "10.200.0.2": "uid-c"}
    assert set_members(host, backend, v6) == {"fd00:ac::5": "uid-d"}
    assert p.entries() == {"10.200.0.1": "uid-b", "10.200.0.2": "uid-c", "fd00:ac::5": "uid-d"}

    with capture_logs() as logs:
        assert p.remove("10.200.0.1", "uid-a") is False  # the old pod's DEL must not remove the new pod
    assert any(e["log_level"] == "warning" for e in logs)
    assert set_members(host, backend, v4)["10.200.0.1"] == "uid-b"
    assert p.remove("10.200.0.1", "uid-b") is True
    assert p.remove("10.200.0.1", "uid-b") is False
    assert p.remove("fd00:ac::5", "uid-d") is True
    assert set_members(host, backend, v4) == {"10.200.0.2": "uid-c"}
    assert set_members(host, backend, v6) == {}

    # Startup with a pod whose IP is unknown: add, but keep everything else.
    p.upsert("10.200.0.9", "uid-gone")
    report = p.sync({"10.200.0.2": "uid-c", "10.200.0.3": "uid-e", "fd00:ac::6": "uid-f"}, prune=False)
    assert set(report.upserted) == {"10.200.0.3", "fd00:ac::6"} and report.pruned == ()
    assert set_members(host, backend, v4) == {"10.200.0.2": "uid-c", "10.200.0.3": "uid-e",
                                              "10.200.0.9": "uid-gone"}
    # Every pod's IP known: prune what is not wanted.
    report = p.sync({"10.200.0.2": "uid-c", "10.200.0.3": "uid-e", "fd00:ac::6": "uid-f"}, prune=True)
    assert report.pruned == ("10.200.0.9",) and report.upserted == ()
    assert p.entries() == {"10.200.0.2": "uid-c", "10.200.0.3": "uid-e", "fd00:ac::6": "uid-f"}

    p.uninstall()
    assert p.entries() == {}
    assert set_members(host, backend, v4) == {}


# --- real traffic ------------------------------------------------------------------------------------

ADDRS = {
    4: {"pod": "10.243.1.2", "host": "10.243.1.1", "remote": "10.243.2.2", "host2": "10.243.2.1", "plen": 24,
        "snat": PROBE_SNAT_IPV4, "any": "0.0.0.0"},
    6: {"pod": "fd00:ac:1::2", "host": "fd00:ac:1::1", "remote": "fd00:ac:2::2", "host2": "fd00:ac:2::1",
        "plen": 64, "snat": PROBE_SNAT_IPV6, "any": "::"},
}


def _topology(host: TestNetns, new_ns: NetnsFactory, family: int) -> tuple[TestNetns, TestNetns]:
    """pod P and remote R, both wired to the fake host H, which routes between them."""
    a = ADDRS[family]
    pod, remote = new_ns(), new_ns()
    for ns in (host, pod, remote):  # no DAD on the veths' link-local addresses (ND would wait for it)
        ns.exec(["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"],
                check=True)
    p_link, h_link = pod.veth(host, "10.243.1.2/24", "10.243.1.1/24")
    r_link, h2_link = remote.veth(host, "10.243.2.2/24", "10.243.2.1/24")
    if family == 6:
        for ns, link, addr in ((pod, p_link, a["pod"]), (host, h_link, a["host"]),
                               (remote, r_link, a["remote"]), (host, h2_link, a["host2"])):
            ns.exec(["ip", "-6", "addr", "add", f"{addr}/{a['plen']}", "dev", link, "nodad"], check=True)
    ip = ["ip", "-6"] if family == 6 else ["ip"]
    pod.exec([*ip, "route", "add", "default", "via", str(a["host"])], check=True)
    remote.exec([*ip, "route", "add", "default", "via", str(a["host2"])], check=True)
    knob = "net.ipv4.ip_forward=1" if family == 4 else "net.ipv6.conf.all.forwarding=1"
    host.exec(["sysctl", "-qw", knob], check=True)  # the fake host's own sysctl (per netns)
    return pod, remote


def _client(family: int) -> socket.socket:
    s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(5)
    return s


def _capture(family: int, pod_fd: int, worker: NetnsWorker) -> CaptureListeners:
    return CaptureListeners(pod_fd, worker=worker, families=(family,))


CUSTOM_SNAT = {4: "169.254.99.1", 6: "fd00:5a:7::1"}


@pytest.mark.parametrize("snat", ["spec", "custom"])
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("backend", BACKENDS)
def test_host_probe_traffic(
    backend: str, family: int, snat: str, fake_host: tuple[TestNetns, NetnsWorker], new_ns: NetnsFactory
) -> None:
    """`custom`: the operator moved the probe source (--probe-snat-ipv4/-ipv6, spec agent-behaviour
    §15.8); host rule and in-pod accept rules must both follow, or probes would be redirected."""
    host, worker = fake_host
    a = {**ADDRS[family], **({"snat": CUSTOM_SNAT[family]} if snat == "custom" else {})}
    pod, remote = _topology(host, new_ns, family)
    pod_fd, remote_fd = pod.open(), remote.open()
    dp = make_dataplane(worker, backend, ipv6=family == 6,
                        probe_snat=CUSTOM_SNAT if snat == "custom" else None)
    asyncio.run(dp.install(pod_fd, RuleSettings(dns_capture=False)))
    snat_cfg = {"snat_ipv4": CUSTOM_SNAT[4], "snat_ipv6": CUSTOM_SNAT[6]} if snat == "custom" else {}
    p = probe(backend, worker, ipv6=family == 6, **snat_cfg)
    p.install()
    p.upsert(str(a["pod"]), "pod-uid")
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    app = worker.call(pod_fd, lambda: socket.create_server((str(a["any"]), 8080), family=af))
    app.settimeout(5)
    target = (str(a["pod"]), 8080)
    try:
        with _capture(family, pod_fd, worker) as cap:
            # A local host socket (kubelet) to the enrolled pod: SNATed, accepted in-pod, reaches the app.
            with worker.call_host(lambda: _client(family)) as c:
                c.connect(target)
                conn, peer = app.accept()
                conn.close()
            assert peer[0] == a["snat"]

            # Forwarded through the host (kube-proxy, another node): no local socket, keeps its source,
            # captured in-pod like any inbound connection.
            with worker.call(remote_fd, lambda: _client(family)) as c:
                c.connect(target)
            fwd = cap.wait_for(lambda i: i.peer[0] == a["remote"])
            assert fwd.port == 15006 and fwd.original_dst == target

            # Pod IP no longer in the set: the same host connection is not SNATed and is captured.
            assert p.remove(str(a["pod"]), "pod-uid")
            with worker.call_host(lambda: _client(family)) as c:
                c.connect(target)
            direct = cap.wait_for(lambda i: i.peer[0] == a["host"])
            assert direct.port == 15006 and direct.original_dst == target
            app.setblocking(False)
            with pytest.raises(BlockingIOError):
                app.accept()
    finally:
        app.close()
        p.uninstall()


def test_nft_probe_snat_matches_only_the_kubelet_uid(
    fake_host: tuple[TestNetns, NetnsWorker], new_ns: NetnsFactory
) -> None:
    """skuid is what makes nft's rule kubelet-only: a socket of another uid is not SNATed."""
    host, worker = fake_host
    pod, _remote = _topology(host, new_ns, 4)
    pod_fd = pod.open()
    asyncio.run(make_dataplane(worker, BACKEND_NFTABLES, ipv6=False).install(pod_fd, RuleSettings()))
    p = probe(BACKEND_NFTABLES, worker, kubelet_uid=4242)  # we are uid 0, not the "kubelet"
    p.install()
    p.upsert("10.243.1.2", "pod-uid")
    try:
        with CaptureListeners(pod_fd, worker=worker) as cap, worker.call_host(lambda: _client(4)) as c:
            c.connect(("10.243.1.2", 8080))
            got = cap.wait_for(lambda i: i.original_dst == ("10.243.1.2", 8080))
        assert got.port == 15006 and got.peer[0] == "10.243.1.1"
    finally:
        p.uninstall()
    with contextlib.suppress(Exception):
        asyncio.run(make_dataplane(worker, BACKEND_NFTABLES, ipv6=False).uninstall(pod_fd))


def test_kept_ipset_socket_recovers_from_a_broken_socket(fake_host: tuple[TestNetns, NetnsWorker]) -> None:
    """The iptables probe keeps one ipset netlink socket for the host; if it dies, one call fails
    and the next opens a fresh one (instead of every later ADD failing until a restart). The nft
    probe's write socket lives inside the libnftables context; both probes' raw read socket has
    its own replacement test (test_hostprobe_pure, the abandoned-read case below)."""
    _host, worker = fake_host
    p = probe(BACKEND_IPTABLES, worker)
    p.install()
    p.upsert("10.200.0.1", "uid-a")
    assert p._ips is not None  # type: ignore[attr-defined]

    class DeadSocket:  # what a kept socket that lost its fd answers (EBADF), without reusing fds
        def __getattr__(self, name: str) -> Any:
            if name == "close":
                return lambda: None
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    p._ips = DeadSocket()  # type: ignore[attr-defined]
    with pytest.raises(HostProbeError, match="Bad file descriptor"):
        p.upsert("10.200.0.2", "uid-b")
    assert p._ips is None  # type: ignore[attr-defined]
    p.upsert("10.200.0.3", "uid-c")
    assert p.entries() == {"10.200.0.1": "uid-a", "10.200.0.3": "uid-c"}
    p.uninstall()


def test_raw_ipset_listing_equals_pyroute2s(fake_host: tuple[TestNetns, NetnsWorker]) -> None:
    """The probe reads its sets over raw netlink (10x faster than pyroute2's decoder); both must
    see the same {ip: comment}, for both families, odd comments and an absent set (ENOENT)."""
    from pyroute2.ipset import IPSet

    from cni_agent.redirect.hostprobe import ipset_list_entries

    host, worker = fake_host
    host.exec(["ipset", "create", "t4", "hash:ip", "comment"], check=True)
    host.exec(["ipset", "create", "t6", "hash:ip", "family", "inet6", "comment"], check=True)
    want4 = {f"10.77.{i // 200}.{i % 200 + 1}": f"uid-{i}" for i in range(300)}  # several netlink messages
    want4["10.77.9.9"] = "odd é; spaces, too"
    for ip, uid in want4.items():
        host.exec(["ipset", "add", "t4", ip, "comment", uid], check=True)
    host.exec(["ipset", "add", "t6", "fd00:77::1", "comment", "v6-uid"], check=True)
    host.exec(["ipset", "add", "t6", "fd00:77::2"], check=True)  # no comment

    def read() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        def via_pyroute2(name: str) -> dict[str, str]:
            out: dict[str, str] = {}
            with IPSet() as ips:
                for msg in ips.list(name):
                    adt = msg.get_attr("IPSET_ATTR_ADT")
                    for data in adt.get_attrs("IPSET_ATTR_DATA") if adt else ():
                        ip = data.get_attr("IPSET_ATTR_IP_FROM")
                        addr = ip.get_attr("IPSET_ATTR_IPADDR_IPV4") or ip.get_attr("IPSET_ATTR_IPADDR_IPV6")
                        out[str(addr)] = str(data.get_attr("IPSET_ATTR_COMMENT") or "")
            return out

        assert ipset_list_entries("t6") == via_pyroute2("t6")
        return ipset_list_entries("t4"), via_pyroute2("t4"), ipset_list_entries("t6")

    raw4, ref4, raw6 = worker.call_host(read)
    assert raw4 == ref4 == want4
    assert raw6 == {"fd00:77::1": "v6-uid", "fd00:77::2": ""}
    with pytest.raises(OSError) as exc:
        worker.call_host(lambda: ipset_list_entries("absent"))
    assert exc.value.errno == errno.ENOENT


def _getsetelem_request(table: str, name: str, seq: int) -> bytes:
    """NFT_MSG_GETSETELEM dump request for an inet table/set."""
    import struct as _struct

    def nla(kind: int, payload: bytes) -> bytes:
        ln = 4 + len(payload)
        return _struct.pack("=HH", ln, kind) + payload + b"\0" * (-ln % 4)

    body = _struct.pack("=BBH", 1, 0, 0) + nla(1, table.encode() + b"\0") + nla(2, name.encode() + b"\0")
    return _struct.pack("=IHHII", 16 + len(body), (10 << 8) | 13, 0x301, seq, 0) + body


def test_raw_nft_set_listing_equals_libnftables(fake_host: tuple[TestNetns, NetnsWorker]) -> None:
    """The nft probe reads its sets over raw netlink; it must see what nft's own listing shows."""
    import json as _json

    from cni_agent.redirect.hostprobe import nft_set_entries, parse_nft_set_elements

    host, worker = fake_host
    script = ["add table inet tt", "add set inet tt s4 { type ipv4_addr ; }",
              "add set inet tt s6 { type ipv6_addr ; }"]
    want4 = {f"10.78.{i // 200}.{i % 200 + 1}": f"uid-{i}" for i in range(300)}
    want4["10.78.9.9"] = ""
    elems = ", ".join(f'{ip} comment "{c}"' if c else ip for ip, c in want4.items())
    script.append(f"add element inet tt s4 {{ {elems} }}")
    script.append('add element inet tt s6 { fd00:78::1 comment "v6 uid é", fd00:78::2 }')
    host.exec(["nft", "-f", "-"], input="\n".join(script) + "\n", check=True)

    def listed(name: str) -> dict[str, str]:
        out = host.exec(["nft", "-j", "list", "set", "inet", "tt", name], check=True).stdout
        return parse_nft_set_elements(_json.loads(out))

    raw4, raw6 = worker.call_host(lambda: (nft_set_entries("tt", "s4"), nft_set_entries("tt", "s6")))
    assert raw4 == listed("s4") == want4

    def after_an_abandoned_read() -> dict[str, str]:
        """A kept socket whose last dump was never read to the end (the kernel then refuses a new
        dump with EBUSY) must still give the right answer: a fresh socket, transparently."""
        from cni_agent.redirect.hostprobe import _KeptNetfilterSocket

        kept = _KeptNetfilterSocket()
        sock, seq = kept.socket_and_seq()
        sock.send(_getsetelem_request("tt", "s6", seq))  # a dump of s6 nobody reads
        try:
            return kept.read(lambda k: nft_set_entries("tt", "s4", k))
        finally:
            kept.close()

    assert worker.call_host(after_an_abandoned_read) == want4
    assert raw6 == listed("s6") == {"fd00:78::1": "v6 uid é", "fd00:78::2": ""}
    for table, name in (("tt", "absent"), ("no-such-table", "s4")):
        with pytest.raises(OSError) as exc:
            worker.call_host(lambda t=table, n=name: nft_set_entries(t, n))  # type: ignore[misc]
        assert exc.value.errno == errno.ENOENT
