"""Pure parts of the host probe (redirect-rules.md §9): rule text, set semantics, kubelet UID discovery."""

# ruff: noqa: E501  (golden rule text is copied verbatim from the spec; lines cannot be wrapped)

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from structlog.testing import capture_logs

from cni_agent.redirect.hostprobe import (
    BACKEND_IPTABLES,
    BACKEND_NFTABLES,
    DisabledHostProbe,
    HostProbeConfig,
    IptablesHostProbe,
    NftHostProbe,
    ProcInfo,
    _ProbeBase,
    check_uid,
    discover_kubelet_uid,
    is_kubelet,
    make_host_probe,
    nft_host_rule,
    nft_install_batch,
    nft_upsert_batch,
    normalize_ip,
    parse_cmdline,
    parse_nft_set_elements,
    parse_status_uid,
    pick_kubelet_uid,
    plan_sync,
    render_iptables_host_restore,
    render_nft_host_text,
    scan_proc,
)

T = TypeVar("T")

SPEC_IPTABLES_V4 = """\
* nat
-N ISTIO_POSTRT
-I POSTROUTING 1 -j ISTIO_POSTRT
-A ISTIO_POSTRT -m owner --socket-exists -p tcp -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127
COMMIT
"""

SPEC_NFT = """\
add table inet istio-ambient-nat
flush table inet istio-ambient-nat
add chain inet istio-ambient-nat postrouting { type nat hook postrouting priority 100 ; }
add rule inet istio-ambient-nat postrouting meta l4proto tcp skuid <uid> ip daddr @istio-inpod-probes-v4 counter snat to 169.254.7.127
add rule inet istio-ambient-nat postrouting meta l4proto tcp skuid <uid> ip6 daddr @istio-inpod-probes-v6 counter snat to fd16:9254:7127:1337:ffff:ffff:ffff:ffff
"""


# --- rule text ---------------------------------------------------------------------------------------


def test_iptables_host_rules_are_the_spec_text() -> None:
    assert render_iptables_host_restore(4) == SPEC_IPTABLES_V4
    v6 = SPEC_IPTABLES_V4.replace("istio-inpod-probes-v4", "istio-inpod-probes-v6").replace(
        "--to-source 169.254.7.127", "--to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
    assert render_iptables_host_restore(6) == v6


def test_nft_host_rules_are_the_spec_text() -> None:
    assert render_nft_host_text(1000, HostProbeConfig(ipv6=True)) == SPEC_NFT.replace("<uid>", "1000")
    v4_only = "".join(line + "\n" for line in SPEC_NFT.splitlines() if " ip6 daddr" not in line)
    assert render_nft_host_text(0) == v4_only.replace("<uid>", "0")


def test_configured_addresses_and_names_flow_into_the_rules() -> None:
    cfg = HostProbeConfig(ipv6=True, snat_ipv4="169.254.9.9", snat_ipv6="fd00::9", set_v4="p4", set_v6="p6",
                          chain="MY_POSTRT", nft_table="my-nat")
    assert "-A MY_POSTRT -m owner --socket-exists -p tcp -m set --match-set p6 dst -j SNAT --to-source fd00::9" in (
        render_iptables_host_restore(6, cfg))
    text = render_nft_host_text(7, cfg)
    assert "inet my-nat" in text and "@p4 counter snat to 169.254.9.9" in text and "@p6" in text
    batch = nft_install_batch(7, cfg)["nftables"]
    assert {c["add"]["set"]["name"] for c in batch if "set" in c.get("add", {})} == {"p4", "p6"}
    rules = [c["add"]["rule"] for c in batch if "rule" in c.get("add", {})]
    assert [r["expr"][-1]["snat"]["addr"] for r in rules] == ["169.254.9.9", "fd00::9"]


def test_nft_json_mirrors_the_spec_rule() -> None:
    rule = nft_host_rule(6, 42, HostProbeConfig(ipv6=True))["add"]["rule"]
    assert rule["table"] == "istio-ambient-nat" and rule["chain"] == "postrouting"
    keys = [next(iter(e)) for e in rule["expr"]]
    assert keys == ["match", "match", "match", "counter", "snat"]
    assert rule["expr"][1]["match"]["right"] == 42
    assert rule["expr"][2]["match"]["left"] == {"payload": {"protocol": "ip6", "field": "daddr"}}
    assert rule["expr"][2]["match"]["right"] == "@istio-inpod-probes-v6"


def test_nft_install_never_flushes_sets_and_replaces_the_chain() -> None:
    cmds = nft_install_batch(0)["nftables"]
    verbs = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in cmds]
    assert ("flush", "table") not in verbs and ("flush", "set") not in verbs and ("delete", "set") not in verbs
    assert verbs[:5] == [("add", "table"), ("add", "chain"), ("flush", "chain"), ("delete", "chain"), ("add", "chain")]


def test_nft_upsert_is_add_delete_add_with_comment() -> None:
    cmds = nft_upsert_batch(4, "10.0.0.1", "uid-1")["nftables"]
    assert [next(iter(c)) for c in cmds] == ["add", "delete", "add"]
    assert cmds[2]["add"]["element"]["elem"] == [{"elem": {"val": "10.0.0.1", "comment": "uid-1"}}]
    assert cmds[2]["add"]["element"]["name"] == "istio-inpod-probes-v4"


def test_parse_nft_set_listing() -> None:
    doc = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"set": {"family": "inet", "name": "istio-inpod-probes-v6", "type": "ipv6_addr",
                 "elem": [{"elem": {"val": "fd00::1", "comment": "u1"}}, "fd00:0::2",
                          {"prefix": {"addr": "fd00::", "len": 64}}]}},
    ]}
    assert parse_nft_set_elements(doc) == {"fd00::1": "u1", "fd00::2": ""}
    assert parse_nft_set_elements({"nftables": [{"set": {"name": "x"}}]}) == {}


# --- addresses and uids ------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("10.1.2.3", (4, "10.1.2.3")),
    (" 10.1.2.3 ", (4, "10.1.2.3")),
    ("::ffff:10.1.2.3", (4, "10.1.2.3")),
    ("FD00:0:0::0001", (6, "fd00::1")),
])
def test_normalize_ip(raw: str, expected: tuple[int, str]) -> None:
    assert normalize_ip(raw) == expected


@pytest.mark.parametrize("bad", ["", "10.1.2", "10.0.0.0/24", "pod", "fd00::1%eth0x"])
def test_normalize_ip_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_ip(bad)


def test_check_uid() -> None:
    assert check_uid("0b4c7e8e-1f2a-4b9d-8c3e-5d6f7a8b9c0d") == "0b4c7e8e-1f2a-4b9d-8c3e-5d6f7a8b9c0d"
    for bad in ("", "a\nb", "x" * 129):
        with pytest.raises(ValueError):
            check_uid(bad)


def test_plan_sync() -> None:
    current = {"10.0.0.1": "a", "10.0.0.2": "old", "10.0.0.9": "gone"}
    wanted = {"10.0.0.1": "a", "10.0.0.2": "b", "10.0.0.3": "c"}
    assert plan_sync(current, wanted, prune=True) == ({"10.0.0.2": "b", "10.0.0.3": "c"}, ["10.0.0.9"])
    assert plan_sync(current, wanted, prune=False) == ({"10.0.0.2": "b", "10.0.0.3": "c"}, [])
    assert plan_sync({}, {}, prune=True) == ({}, [])


# --- semantics on an in-memory store (the kernel backends share this layer) ----------------------------


class _Direct:
    def call_host(self, fn: Callable[[], T]) -> T:
        return fn()

    async def run_host(self, fn: Callable[[], T]) -> T:
        return fn()


class _MemoryProbe(_ProbeBase):
    name = "memory"

    def __init__(self, config: HostProbeConfig | None = None) -> None:
        super().__init__(_Direct(), config or HostProbeConfig())
        self.sets: dict[int, dict[str, str]] = {4: {}, 6: {}}
        self.installs = 0
        self.fail_installs = 0

    def _k_install(self) -> None:
        self.installs += 1
        if self.installs <= self.fail_installs:
            raise OSError("kernel says no")

    def _k_uninstall(self) -> None:
        self.sets = {4: {}, 6: {}}

    def _k_read(self, family: int) -> dict[str, str]:
        return dict(self.sets[family])

    def _k_put(self, family: int, ip: str, uid: str) -> None:
        self.sets[family][ip] = uid

    def _k_delete(self, family: int, ip: str) -> None:
        del self.sets[family][ip]


def test_upsert_replaces_and_unmaps() -> None:
    p = _MemoryProbe(HostProbeConfig(ipv6=True))
    p.upsert("10.0.0.1", "a")
    p.upsert("::ffff:10.0.0.1", "b")  # same IP, last writer wins
    p.upsert("fd00::1", "c")
    assert p.entries() == {"10.0.0.1": "b", "fd00::1": "c"}
    assert p.sets[4] == {"10.0.0.1": "b"}


def test_ipv6_entries_ignored_when_ipv6_disabled() -> None:
    p = _MemoryProbe(HostProbeConfig(ipv6=False))
    p.upsert("fd00::1", "c")
    assert p.entries() == {} and p.sets[6] == {}
    p.sync({"fd00::1": "c", "10.0.0.1": "a"}, prune=True)
    assert p.entries() == {"10.0.0.1": "a"}


def test_remove_only_when_uid_matches() -> None:
    p = _MemoryProbe()
    p.upsert("10.0.0.1", "new-pod")
    with capture_logs() as logs:
        assert p.remove("10.0.0.1", "old-pod") is False
    assert p.entries() == {"10.0.0.1": "new-pod"}
    assert any(e["log_level"] == "warning" and e.get("owner") == "new-pod" for e in logs)
    assert p.remove("10.0.0.1", "new-pod") is True
    assert p.remove("10.0.0.1", "new-pod") is False  # absent
    assert p.entries() == {}


def test_sync_adds_prunes_and_can_skip_prune() -> None:
    p = _MemoryProbe()
    p.upsert("10.0.0.1", "a")
    p.upsert("10.0.0.2", "stale")
    p.upsert("10.0.0.9", "gone")
    report = p.sync({"10.0.0.1": "a", "10.0.0.2": "b", "10.0.0.3": "c"}, prune=False)
    assert p.entries() == {"10.0.0.1": "a", "10.0.0.2": "b", "10.0.0.3": "c", "10.0.0.9": "gone"}
    assert sorted(report.upserted) == ["10.0.0.2", "10.0.0.3"] and report.pruned == () and report.prune_skipped
    report = p.sync({"10.0.0.1": "a", "10.0.0.2": "b", "10.0.0.3": "c"}, prune=True)
    assert p.entries() == {"10.0.0.1": "a", "10.0.0.2": "b", "10.0.0.3": "c"}
    assert report.upserted == () and report.pruned == ("10.0.0.9",)


def test_sync_validates_before_touching_anything() -> None:
    p = _MemoryProbe()
    p.upsert("10.0.0.1", "a")
    with pytest.raises(ValueError):
        p.sync({"10.0.0.2": "b", "not-an-ip": "c"}, prune=True)
    assert p.entries() == {"10.0.0.1": "a"}


def test_install_retries_then_gives_up() -> None:
    p = _MemoryProbe()
    p.fail_installs = 2
    p.install(retries=3, retry_delay=0)
    assert p.installs == 3
    q = _MemoryProbe()
    q.fail_installs = 5
    with pytest.raises(OSError, match="kernel says no"):
        q.install(retries=2, retry_delay=0)
    assert q.installs == 2


def test_make_host_probe() -> None:
    runner = _Direct()
    assert isinstance(make_host_probe(BACKEND_IPTABLES, runner), IptablesHostProbe)
    assert isinstance(make_host_probe(BACKEND_NFTABLES, runner), NftHostProbe)
    disabled = make_host_probe(BACKEND_NFTABLES, runner, HostProbeConfig(enabled=False))
    assert isinstance(disabled, DisabledHostProbe)
    disabled.install()
    disabled.upsert("10.0.0.1", "a")
    assert disabled.entries() == {} and disabled.remove("10.0.0.1", "a") is False
    with pytest.raises(ValueError, match="unknown rules backend"):
        make_host_probe("iptables-nft", runner)


# --- kubelet uid discovery -------------------------------------------------------------------------


def test_parse_status_and_cmdline() -> None:
    status = "Name:\tkubelet\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1001\t0\t0\t0\nGid:\t0\t0\t0\t0\n"
    assert parse_status_uid(status) == 1001
    assert parse_status_uid("Name:\tx\n") is None
    assert parse_cmdline(b"/usr/bin/kubelet\0--config=/var/lib/kubelet/config.yaml\0") == (
        "/usr/bin/kubelet", "--config=/var/lib/kubelet/config.yaml")
    assert parse_cmdline(b"") == ()


@pytest.mark.parametrize(("comm", "argv", "expected"), [
    ("kubelet", (), True),
    ("kubelite", ("/snap/microk8s/current/kubelite",), True),
    ("k3s", (), True),
    ("k3s-server", ("/usr/local/bin/k3s", "server"), True),
    ("hyperkube", ("/hyperkube", "KUBELET", "--v=2"), True),
    ("bash", ("bash", "-c", "sleep 1"), False),
    ("containerd", ("/usr/bin/containerd",), False),
])
def test_is_kubelet(comm: str, argv: tuple[str, ...], expected: bool) -> None:
    assert is_kubelet(ProcInfo(1, comm, argv, 0)) is expected


def test_pick_kubelet_uid_takes_the_lowest_pid() -> None:
    procs = [ProcInfo(900, "kubelet", (), 2000), ProcInfo(50, "sh", (), 0), ProcInfo(300, "k3s-agent", (), 3000)]
    assert pick_kubelet_uid(procs) == 3000
    assert pick_kubelet_uid([ProcInfo(1, "init", ("/sbin/init",), 0)]) is None


def _fake_proc(root: Path, pid: int, comm: str, argv: list[str], uid: int | None) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    if uid is not None:
        (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")


def test_discover_from_a_fake_proc_tree(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 1, "systemd", ["/sbin/init"], 0)
    _fake_proc(tmp_path, 12, "kthreadd", [], 0)
    _fake_proc(tmp_path, 77, "kubelet", ["/usr/bin/kubelet"], None)  # vanished mid-scan: no status
    _fake_proc(tmp_path, 150, "kubelet", ["/usr/bin/kubelet", "--config=/etc/k.yaml"], 1234)
    _fake_proc(tmp_path, 2000, "journalctl", ["journalctl", "-u", "kubelet"], 0)
    (tmp_path / "self").mkdir()  # non-numeric entries are not processes
    (tmp_path / "uptime").write_text("1 1\n")
    assert [p.pid for p in scan_proc(str(tmp_path))] == [1, 12, 150, 2000]
    assert discover_kubelet_uid(str(tmp_path)) == 1234


def test_discover_without_kubelet_and_the_nft_fallback(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 1, "systemd", ["/sbin/init"], 0)
    assert discover_kubelet_uid(str(tmp_path)) is None
    assert discover_kubelet_uid(str(tmp_path / "missing")) is None
    probe = NftHostProbe(_Direct(), HostProbeConfig(proc_root=str(tmp_path)))
    with capture_logs() as logs:
        probe._prepare()
    assert probe.kubelet_uid == 0
    assert any(e["log_level"] == "warning" and "no kubelet" in e["event"] for e in logs)
    pinned = NftHostProbe(_Direct(), HostProbeConfig(proc_root=str(tmp_path), kubelet_uid=4242))
    pinned._prepare()
    assert pinned.kubelet_uid == 4242


def test_discover_on_this_machine_does_not_crash() -> None:
    uid = discover_kubelet_uid("/proc")
    assert uid is None or uid >= 0
    assert os.path.isdir("/proc/1")


def test_async_variants_share_the_sync_semantics() -> None:
    """The agent calls the async forms from the event loop; validation and the UID guard are the same."""
    import asyncio

    p = _MemoryProbe(HostProbeConfig(ipv6=False))

    async def scenario() -> tuple[bool, bool]:
        await p.upsert_async("10.0.0.1", "a")
        await p.upsert_async("fd00::1", "b")  # IPv6 off: not added
        with pytest.raises(ValueError):
            await p.upsert_async("not-an-ip", "c")
        kept = await p.remove_async("10.0.0.1", "someone-else")
        removed = await p.remove_async("10.0.0.1", "a")
        return kept, removed

    kept, removed = asyncio.run(scenario())
    assert (kept, removed) == (False, True)
    assert p.entries() == {}


def test_kept_netfilter_socket_survives_enoent_and_is_replaced_after_any_other_error() -> None:
    """A read that failed half-way may leave replies queued: only the kernel's "no such set" keeps
    the socket; anything else (even a parser bug) replaces it, and sequence numbers move on."""
    import errno as _errno

    from cni_agent.redirect.hostprobe import _KeptNetfilterSocket

    kept = _KeptNetfilterSocket()
    seen: list[tuple[object, int]] = []

    def fail(exc: BaseException) -> Callable[[_KeptNetfilterSocket], dict[str, str]]:
        def read(k: _KeptNetfilterSocket) -> dict[str, str]:
            seen.append(k.socket_and_seq())
            raise exc
        return read

    with pytest.raises(OSError):
        kept.read(fail(OSError(_errno.ENOENT, "no such set")))
    with pytest.raises(KeyError):
        kept.read(fail(KeyError("parser surprise")))
    with pytest.raises(OSError):
        kept.read(fail(OSError(_errno.EBADF, "x")))
    sock_a, seq_a = seen[0]
    sock_b, seq_b = seen[1]
    sock_c, _ = seen[2]
    assert sock_a is sock_b and seq_b == seq_a + 1  # ENOENT kept the socket
    assert sock_c is not sock_b  # the KeyError dropped it
    assert kept._sock is None  # and the EBADF too
    kept.close()


def test_dump_parsers_skip_what_is_not_a_plain_address() -> None:
    """Interval ends and foreign key sizes in an nft set are not entries; a v4-mapped key read from
    a v6 set stays a v6 key (unmapping it would make a later delete name the wrong set)."""
    import socket as _socket
    import struct as _struct

    from cni_agent.redirect.hostprobe import parse_nft_setelems

    def nla(kind: int, payload: bytes) -> bytes:
        ln = 4 + len(payload)
        return _struct.pack("=HH", ln, kind) + payload + b"\0" * (-ln % 4)

    def elem(key: bytes, flags: int = 0, comment: str = "") -> bytes:
        attrs = nla(1 | 0x8000, nla(1, key))
        if flags:
            attrs += nla(3, _struct.pack(">I", flags))
        if comment:
            raw = comment.encode() + b"\0"
            attrs += nla(6, bytes([0, len(raw)]) + raw)
        return nla(1 | 0x8000, attrs)

    v4 = _socket.inet_pton(_socket.AF_INET, "10.0.0.1")
    mapped = _socket.inet_pton(_socket.AF_INET6, "::ffff:10.0.0.2")
    body = nla(3 | 0x8000, elem(v4, comment="uid-1") + elem(v4[:3] + b"\x09", flags=1)
               + elem(b"\x01\x02") + elem(mapped, comment="m"))
    import ipaddress as _ipaddress

    mapped_text = str(_ipaddress.IPv6Address("::ffff:10.0.0.2"))  # Python's own spelling, version-proof
    assert parse_nft_setelems(body, 0, len(body)) == {"10.0.0.1": "uid-1", mapped_text: "m"}
