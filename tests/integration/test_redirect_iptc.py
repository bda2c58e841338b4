"""In-pod redirection against the real kernel: libiptc backend, routes, NetnsWorker, real traffic.

The reference for "correct rules" is the spec text applied by the stock `iptables-legacy-restore`
in a sibling netns; our backend must produce an identical `iptables-legacy-save`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import subprocess
import threading

import iptc
import pytest

from cni_agent.redirect import routes
from cni_agent.redirect.dataplane import KernelDataplane
from cni_agent.redirect.iptc import IptablesLegacyBackend, RulesError, wanted_rule
from cni_agent.redirect.netns import (
    NetnsError,
    NetnsWorker,
    NetnsWorkerBroken,
    current_netns_identity,
    netns_identity,
    open_netns,
)
from cni_agent.redirect.rules import RuleSet, RuleSettings, build_ruleset, render_iptables_restore
from cni_agent.testing.capture import CaptureListeners
from cni_agent.testing.netns import NetnsFactory, TestNetns
from cni_agent.testing.redirectcheck import check_pod_redirection, socket_in

pytestmark = pytest.mark.root

TABLES = ("filter", "mangle", "nat", "raw")


def _normalise(save_output: str) -> str:
    """Drop comments and counters: what remains is the rule state."""
    lines = []
    for line in save_output.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(":"):
            line = line.rsplit(" [", 1)[0]
        lines.append(line)
    return "\n".join(lines)


def save(ns: TestNetns, table: str, family: int = 4) -> str:
    tool = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    return _normalise(ns.exec([tool, "-t", table], check=True).stdout)


def restore(ns: TestNetns, rs: RuleSet) -> None:
    tool = "iptables-legacy-restore" if rs.family == 4 else "ip6tables-legacy-restore"
    ns.exec([tool, "--noflush", "-v"], input=render_iptables_restore(rs), check=True)


def host_save() -> str:
    """Host legacy state, read-only (no `-t`, which would instantiate tables on the host)."""
    out = []
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        res = subprocess.run([tool], capture_output=True, text=True, check=True)
        out.append(_normalise(res.stdout))
    return "\n".join(out)


def apply(worker: NetnsWorker, ns: TestNetns, *rulesets: RuleSet) -> None:
    fd = ns.open()
    worker.call(fd, lambda: IptablesLegacyBackend().apply(rulesets))


def matches(worker: NetnsWorker, ns: TestNetns, *rulesets: RuleSet) -> bool:
    return worker.call(ns.open(), lambda: IptablesLegacyBackend().matches(rulesets))


VARIANTS = [
    RuleSettings(),
    RuleSettings(dns_capture=False, bypass_inbound=True, reroute_interfaces=("net1", "net2")),
    RuleSettings(dns_capture=True, bypass_inbound=True),
]


# --- NetnsWorker -----------------------------------------------------------------------------------


def test_open_netns_rejects_non_netns(tmp_path: object) -> None:
    with pytest.raises(NetnsError, match="not a network namespace"):
        open_netns("/proc/self/ns/uts")
    with pytest.raises(NetnsError, match="not a namespace file"):
        open_netns("/etc/hostname")
    with pytest.raises(NetnsError, match="cannot open"):
        open_netns("/var/run/netns/does-not-exist-acni")


def test_worker_enters_and_always_returns(worker: NetnsWorker, new_ns: NetnsFactory) -> None:
    ns = new_ns()
    fd = ns.open()
    host = current_netns_identity()
    assert worker.host_identity == host
    assert worker.call(fd, current_netns_identity) == netns_identity(fd) != host

    def boom() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        worker.call(fd, boom)
    assert worker.call_host(current_netns_identity) == host  # returned home despite the exception
    with pytest.raises(NetnsError):
        worker.call(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC), current_netns_identity)
    assert asyncio.run(worker.run(fd, current_netns_identity)) == netns_identity(fd)
    assert worker.broken is None


def test_worker_refuses_work_when_it_cannot_return(new_ns: NetnsFactory) -> None:
    ns = new_ns()
    fd = ns.open()
    w = NetnsWorker(name="doomed")
    real_host_fd = w._host_fd
    w._host_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)  # setns back will fail
    try:
        ran = threading.Event()
        with pytest.raises(NetnsWorkerBroken):
            w.call(fd, ran.set)
        assert ran.is_set()
        assert w.broken is not None
        with pytest.raises(NetnsWorkerBroken):
            w.call_host(current_netns_identity)
    finally:
        w.close()
        os.close(real_host_fd)


# --- backend vs iptables-legacy-restore ------------------------------------------------------------


@pytest.mark.parametrize("settings", VARIANTS, ids=["blockA", "bypass+ifaces", "bypass+dns"])
def test_backend_equals_iptables_restore(
    worker: NetnsWorker, new_ns: NetnsFactory, settings: RuleSettings
) -> None:
    ours, ref = new_ns(), new_ns()
    rulesets = [build_ruleset(settings, 4), build_ruleset(settings, 6)]
    apply(worker, ours, *rulesets)
    for rs in rulesets:
        restore(ref, rs)
    for family in (4, 6):
        for table in TABLES:
            assert save(ours, table, family) == save(ref, table, family), (family, table)
    assert "ISTIO_PRERT" in save(ours, "mangle")  # the comparison is not vacuous
    assert matches(worker, ours, *rulesets)


def test_idempotent_drift_repair_foreign_rules_and_remove(
    worker: NetnsWorker, new_ns: NetnsFactory
) -> None:
    host_before = host_save()
    ours, ref = new_ns(), new_ns()
    rs = build_ruleset(RuleSettings(), 4)
    restore(ref, rs)
    expected = {t: save(ref, t) for t in TABLES}

    # A foreign chain and foreign rules in builtin chains must survive everything we do.
    for cmd in (["-t", "nat", "-N", "FOREIGN"], ["-t", "nat", "-A", "FOREIGN", "-j", "RETURN"],
                ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "7777", "-j", "FOREIGN"]):
        ours.exec(["iptables-legacy", *cmd], check=True)
        ref.exec(["iptables-legacy", *cmd], check=True)
    # ref got the foreign rules after ours; put ours' in the same order by applying after them.
    ref_expected_nat = save(ref, "nat")

    apply(worker, ours, rs)
    apply(worker, ours, rs)
    nat = save(ours, "nat")
    assert nat.count("-A OUTPUT -j ISTIO_OUTPUT") == 1
    assert "-A FOREIGN -j RETURN" in nat and "--dport 7777 -j FOREIGN" in nat
    assert sorted(nat.splitlines()) == sorted(ref_expected_nat.splitlines())
    for t in ("filter", "mangle", "raw"):
        assert save(ours, t) == expected[t]
    assert matches(worker, ours, rs)

    # Drift: one of our rules deleted, a stray one added, a duplicate jump added.
    ours.exec(["iptables-legacy", "-t", "nat", "-D", "ISTIO_OUTPUT", "-p", "tcp", "-m", "mark", "--mark",
               "0x111/0xfff", "-j", "ACCEPT"], check=True)
    ours.exec(["iptables-legacy", "-t", "nat", "-A", "ISTIO_OUTPUT", "-p", "tcp", "--dport", "9999", "-j",
               "ACCEPT"], check=True)
    ours.exec(["iptables-legacy", "-t", "mangle", "-A", "OUTPUT", "-j", "ISTIO_OUTPUT"], check=True)
    assert not matches(worker, ours, rs)
    apply(worker, ours, rs)
    assert matches(worker, ours, rs)
    assert sorted(save(ours, "nat").splitlines()) == sorted(ref_expected_nat.splitlines())
    assert save(ours, "mangle") == expected["mangle"]

    # Variant switch: DNS off removes the raw chains and the DNS redirects.
    dns_off = build_ruleset(RuleSettings(dns_capture=False), 4)
    apply(worker, ours, dns_off)
    assert matches(worker, ours, dns_off) and not matches(worker, ours, rs)
    assert "ISTIO" not in save(ours, "raw")
    assert "15053" not in save(ours, "nat")

    # Remove: none of ours left, foreign rules intact, and removing again is fine.
    worker.call(ours.open(), lambda: IptablesLegacyBackend().remove((4, 6)))
    worker.call(ours.open(), lambda: IptablesLegacyBackend().remove((4, 6)))
    for t in TABLES:
        assert "ISTIO" not in save(ours, t)
    assert "-A FOREIGN -j RETURN" in save(ours, "nat")
    assert "--dport 7777 -j FOREIGN" in save(ours, "nat")
    assert host_save() == host_before


# --- routes ----------------------------------------------------------------------------------------


def test_install_routes_verify_uninstall(worker: NetnsWorker, new_ns: NetnsFactory) -> None:
    ns = new_ns()
    fd = ns.open()
    dp = KernelDataplane(worker, ipv6=True)
    settings = RuleSettings()

    async def scenario() -> tuple[bool, bool, bool]:
        before = await dp.verify(fd, settings)
        await dp.install(fd, settings)
        await dp.install(fd, settings)  # idempotent, EEXIST on the rule is fine
        after = await dp.verify(fd, settings)
        other = await dp.verify(fd, RuleSettings(dns_capture=False))
        return before, after, other

    before, after, other = asyncio.run(scenario())
    assert (before, after, other) == (False, True, False)
    rules4 = ns.exec(["ip", "rule"], check=True).stdout
    rules6 = ns.exec(["ip", "-6", "rule"], check=True).stdout
    assert rules4.count("32764:\tfrom all fwmark 0x111/0xfff lookup 100") == 1
    assert rules6.count("32764:\tfrom all fwmark 0x111/0xfff lookup 100") == 1
    assert "local default dev lo" in ns.exec(["ip", "route", "show", "table", "100"], check=True).stdout
    assert "local default dev lo" in ns.exec(["ip", "-6", "route", "show", "table", "100"], check=True).stdout
    assert "ISTIO_OUTPUT" in save(ns, "nat", 6)

    asyncio.run(dp.uninstall(fd))
    asyncio.run(dp.uninstall(fd))  # not-found is success
    assert "32764" not in ns.exec(["ip", "rule"], check=True).stdout
    assert "32764" not in ns.exec(["ip", "-6", "rule"], check=True).stdout
    assert ns.exec(["ip", "route", "show", "table", "100"]).stdout.strip() == ""
    for family in (4, 6):
        for t in TABLES:
            assert "ISTIO" not in save(ns, t, family)
    assert asyncio.run(dp.verify(fd, settings)) is False


def test_route_errors_carry_the_kernel_reason(worker: NetnsWorker, new_ns: NetnsFactory) -> None:
    """The batched requests are acked one by one: a failing one is reported with its errno."""
    ns = new_ns()
    bogus_lo = 999_999  # no such ifindex: RTM_NEWROUTE fails with ENODEV
    with pytest.raises(routes.RoutesError) as info:
        worker.call(ns.open(), lambda: routes._transact(routes._apply_requests(False, False, bogus_lo)))
    assert info.value.code == errno.ENODEV
    assert "route replace local 0.0.0.0/0 dev lo table 100" in str(info.value)
    assert ns.exec(["ip", "route", "show", "table", "100"]).stdout.strip() == ""
    worker.call(ns.open(), lambda: routes.apply_routes(False))  # the real lo works
    assert "local default dev lo" in ns.exec(["ip", "route", "show", "table", "100"], check=True).stdout


def test_v6_rule_without_lo_ipv6(worker: NetnsWorker, new_ns: NetnsFactory) -> None:
    """Spec §6.2: no IPv6 on lo -> the v6 rule only; verify still passes, apply stays idempotent."""
    ns = new_ns()
    ns.exec(["sysctl", "-w", "net.ipv6.conf.lo.disable_ipv6=1"], check=True)
    fd = ns.open()
    assert worker.call(fd, routes.lo_has_ipv6) is False
    worker.call(fd, lambda: routes.apply_routes(True))
    worker.call(fd, lambda: routes.apply_routes(True))
    assert ns.exec(["ip", "-6", "rule"], check=True).stdout.count("32764:") == 1
    assert ns.exec(["ip", "-6", "route", "show", "table", "100"]).stdout.strip() == ""
    assert "local default dev lo" in ns.exec(["ip", "route", "show", "table", "100"], check=True).stdout
    assert worker.call(fd, lambda: routes.routes_present(True)) is True
    worker.call(fd, lambda: routes.remove_routes())
    assert worker.call(fd, lambda: routes.routes_present(True)) is False


def _v6_leftovers(ns: TestNetns) -> dict[str, bool]:
    """Which of our IPv6 pieces are in `ns`, read with the stock tools."""
    return {
        "chains": any("ISTIO" in save(ns, t, 6) for t in TABLES),
        "rule": "32764:" in ns.exec(["ip", "-6", "rule"], check=True).stdout,
        "route": "local default dev lo" in ns.exec(["ip", "-6", "route", "show", "table", "100"]).stdout,
    }


def test_ipv6_off_uninstall_verify_and_install_cover_ipv6_leftovers(
    worker: NetnsWorker, new_ns: NetnsFactory
) -> None:
    """A pod enrolled while IPv6 was on, handled by an agent with IPv6 off (spec §8: deletion is
    idempotent and complete): uninstall removes the IPv6 chains, rule and route too, verify
    reports them as drift, and a re-install removes them."""
    settings = RuleSettings()
    dp6 = KernelDataplane(worker, ipv6=True)
    dp4 = KernelDataplane(worker, ipv6=False)
    ns = new_ns()
    fd = ns.open()
    asyncio.run(dp6.install(fd, settings))
    assert _v6_leftovers(ns) == {"chains": True, "rule": True, "route": True}  # not vacuous
    assert asyncio.run(dp4.verify(fd, settings)) is False

    asyncio.run(dp4.uninstall(fd))
    assert _v6_leftovers(ns) == {"chains": False, "rule": False, "route": False}
    assert not any("ISTIO" in save(ns, t, 4) for t in TABLES)
    asyncio.run(dp4.uninstall(fd))  # idempotent

    asyncio.run(dp6.install(fd, settings))
    asyncio.run(dp4.install(fd, settings))
    assert _v6_leftovers(ns) == {"chains": False, "rule": False, "route": False}
    assert "ISTIO_OUTPUT" in save(ns, "nat", 4)
    assert asyncio.run(dp4.verify(fd, settings)) is True

    # Each leftover alone is drift: the rules (via `matches`) and the ip rule (via `routes_present`).
    restore(ns, build_ruleset(settings, 6))
    assert asyncio.run(dp4.verify(fd, settings)) is False
    asyncio.run(dp4.install(fd, settings))
    assert asyncio.run(dp4.verify(fd, settings)) is True
    ns.exec(["ip", "-6", "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100"],
            check=True)
    assert asyncio.run(dp4.verify(fd, settings)) is False
    asyncio.run(dp4.install(fd, settings))
    assert asyncio.run(dp4.verify(fd, settings)) is True
    asyncio.run(dp4.uninstall(fd))


def test_variant_switch_with_a_foreign_jump_to_a_dropped_chain(
    worker: NetnsWorker, new_ns: NetnsFactory
) -> None:
    """DNS capture off drops raw ISTIO_OUTPUT, but a foreign chain still jumps to it: the foreign
    rule is left alone, our chain stays empty, and the switch completes in every table."""
    ns = new_ns()
    fd = ns.open()
    dp = KernelDataplane(worker)
    asyncio.run(dp.install(fd, RuleSettings(dns_capture=True)))
    ns.exec(["iptables-legacy", "-t", "raw", "-N", "FOO"], check=True)
    ns.exec(["iptables-legacy", "-t", "raw", "-A", "FOO", "-j", "ISTIO_OUTPUT"], check=True)
    dns_off = RuleSettings(dns_capture=False)
    asyncio.run(dp.install(fd, dns_off))
    assert "15053" not in save(ns, "nat")
    raw = save(ns, "raw")
    assert "-A FOO -j ISTIO_OUTPUT" in raw
    assert "-A ISTIO_OUTPUT" not in raw and "-j ISTIO_PRERT" not in raw and "OUTPUT -j ISTIO" not in raw
    assert asyncio.run(dp.verify(fd, dns_off)) is True
    asyncio.run(dp.install(fd, dns_off))  # again: still fine
    ns.exec(["iptables-legacy", "-t", "raw", "-A", "ISTIO_OUTPUT", "-j", "ACCEPT"], check=True)
    assert asyncio.run(dp.verify(fd, dns_off)) is False  # a rule in the left-over chain is drift


class _FailsOnRaw(IptablesLegacyBackend):
    """Planning the raw table fails (as an undeletable chain did): nothing may be committed."""

    def _sync_table(self, table: object, rs: RuleSet, tname: str) -> bool:
        changed = super()._sync_table(table, rs, tname)
        if tname == "raw":
            raise iptc.IPTCError("planning failed")
        return changed


def test_failed_planning_commits_no_table(worker: NetnsWorker, new_ns: NetnsFactory) -> None:
    ns = new_ns()
    apply(worker, ns, build_ruleset(RuleSettings(dns_capture=True), 4))
    before = {t: save(ns, t) for t in TABLES}
    dns_off = build_ruleset(RuleSettings(dns_capture=False), 4)
    with pytest.raises(RulesError, match="raw"):
        worker.call(ns.open(), lambda: _FailsOnRaw().apply([dns_off]))
    assert {t: save(ns, t) for t in TABLES} == before
    assert "15053" in before["nat"]  # not vacuous: the new variant would have dropped it


def test_cached_rules_outlive_the_netns_they_were_built_in(
    worker: NetnsWorker, new_ns: NetnsFactory
) -> None:
    """Rules are built once (`wanted_rule`) and reused: after their first netns is gone, a second pod
    still gets exactly the reference rule set, IPv4 and IPv6, without rebuilding."""
    settings = RuleSettings(reroute_interfaces=("cache0",))
    rulesets = [build_ruleset(settings, 4), build_ruleset(settings, 6)]
    wanted_rule.cache_clear()
    first = new_ns()
    apply(worker, first, *rulesets)
    built = wanted_rule.cache_info().misses
    # one build per distinct (family, spec): `-j ISTIO_PRERT` serves mangle, nat and raw alike
    assert built == len({(rs.family, r.spec) for rs in rulesets for r in rs.rules})
    first.cleanup()

    ours, ref = new_ns(), new_ns()
    apply(worker, ours, *rulesets)
    assert wanted_rule.cache_info().misses == built  # nothing rebuilt
    for rs in rulesets:
        restore(ref, rs)
    for family in (4, 6):
        for table in ("mangle", "nat", "raw"):
            assert save(ours, table, family) == save(ref, table, family), (family, table)
    assert "-i cache0" in save(ours, "nat", 6)
    assert matches(worker, ours, *rulesets)


# --- real traffic ----------------------------------------------------------------------------------


def test_real_traffic_is_redirected(worker: NetnsWorker, new_ns: NetnsFactory) -> None:
    pod, peer = new_ns(), new_ns()
    pod.veth(peer, "10.241.7.1/24", "10.241.7.2/24")
    pod_fd, peer_fd = pod.open(), peer.open()
    asyncio.run(KernelDataplane(worker).install(pod_fd, RuleSettings()))

    plain = worker.call(peer_fd, lambda: socket.create_server(("10.241.7.2", 8081)))
    with CaptureListeners(pod_fd, worker=worker) as cap, plain:
        check_pod_redirection(worker, cap, plain, pod_fd, peer_fd, "10.241.7.1", "10.241.7.2")

    # Without our rules the same outbound connection is refused by the peer: the redirect did it.
    asyncio.run(KernelDataplane(worker).uninstall(pod_fd))
    with socket_in(worker, pod_fd) as c, pytest.raises(ConnectionRefusedError):
        c.connect(("10.241.7.2", 8080))


# --- concurrency -----------------------------------------------------------------------------------


def test_concurrent_installs_land_in_their_own_netns(
    worker: NetnsWorker, new_ns: NetnsFactory
) -> None:
    host_before = host_save()
    variants = [
        RuleSettings(),
        RuleSettings(dns_capture=False),
        RuleSettings(bypass_inbound=True),
        RuleSettings(dns_capture=False, reroute_interfaces=("vifX",)),
    ]
    refs = []
    for v in variants:
        ref = new_ns()
        restore(ref, build_ruleset(v, 4))
        refs.append({t: save(ref, t) for t in TABLES})

    pods = [new_ns() for _ in range(16)]

    def settings_for(i: int) -> RuleSettings:
        v = variants[i % 4]
        return RuleSettings(v.dns_capture, v.bypass_inbound, (f"vif{i}",)) if v.reroute_interfaces else v

    dp = KernelDataplane(worker)

    async def install_all() -> None:
        await asyncio.gather(*(dp.install(p.open(), settings_for(i)) for i, p in enumerate(pods)))

    asyncio.run(install_all())
    for i, p in enumerate(pods):
        for t in TABLES:
            assert save(p, t) == refs[i % 4][t].replace("vifX", f"vif{i}"), (i, t)
    assert host_save() == host_before
    assert "ISTIO" not in host_save()


def test_capture_listeners_bind_in_the_target_netns(
    worker: NetnsWorker, new_ns: NetnsFactory
) -> None:
    ns = new_ns()
    fd = ns.open()
    with CaptureListeners(fd, worker=worker, ports=(15001,)):
        listening = ns.exec(["ss", "-Hltn", "sport", "= :15001"], check=True).stdout
        assert "15001" in listening
        with contextlib.closing(socket.socket()) as s:  # not in the host netns
            s.settimeout(1)
            assert s.connect_ex(("127.0.0.1", 15001)) != 0


def test_dataplane_error_names_the_failed_step(worker: NetnsWorker) -> None:
    from cni_agent.redirect.dataplane import DataplaneError

    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(DataplaneError) as info:
            asyncio.run(KernelDataplane(worker).install(fd, RuleSettings()))
        assert info.value.step == "enter netns"
        assert "setns" in str(info.value)
    finally:
        os.close(fd)
    assert worker.broken is None


# --- no tables the pod did not need ---------------------------------------------------------------


def _table_names(ns: TestNetns) -> dict[int, set[str]]:
    script = "echo v4; cat /proc/net/ip_tables_names; echo v6; cat /proc/net/ip6_tables_names"
    out = ns.exec(["sh", "-c", script], check=True).stdout.split()
    split = out.index("v6")
    return {4: set(out[1:split]), 6: set(out[split + 1:])}


def test_only_the_tables_the_rules_need_are_created(worker: NetnsWorker, new_ns: NetnsFactory) -> None:
    """Opening a legacy table instantiates it: a pod must not get filter/security hooks from us, nor
    raw with DNS capture off; verify and remove on a pod without tables must create none."""
    backend = IptablesLegacyBackend()
    dns_on, dns_off, untouched = new_ns(), new_ns(), new_ns()
    both = (4, 6)
    worker.call(dns_on.open(), lambda: backend.apply([build_ruleset(RuleSettings(), f) for f in both]))
    assert _table_names(dns_on) == {4: {"mangle", "nat", "raw"}, 6: {"mangle", "nat", "raw"}}
    off = [build_ruleset(RuleSettings(dns_capture=False), f) for f in both]
    worker.call(dns_off.open(), lambda: backend.apply(off))
    assert _table_names(dns_off) == {4: {"mangle", "nat"}, 6: {"mangle", "nat"}}
    # decoding rules right after a session that had raw open must not touch raw's stale handle
    assert worker.call(dns_off.open(), lambda: backend.matches(off))

    assert not worker.call(untouched.open(), lambda: backend.matches(off))
    worker.call(untouched.open(), lambda: backend.remove(both))
    assert _table_names(untouched) == {4: set(), 6: set()}

    # DNS capture switched off on a pod that had it: raw is ours to clean, so it is opened and emptied
    worker.call(dns_on.open(), lambda: backend.apply(off))
    assert worker.call(dns_on.open(), lambda: backend.matches(off))
    assert "ISTIO" not in save(dns_on, "raw")
