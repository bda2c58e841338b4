"""nftables backend against the real kernel: spec text loaded by `nft -f` is the reference.

Every comparison is between our backend's result in one netns and the stock `nft` CLI loading the
spec's text (Block F, or `render_nft` for other variants, which unit tests pin to Blocks G-J) in a
sibling netns, as `nft -j list ruleset` with handles and counters dropped.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from typing import Any

import pytest

from cni_agent.redirect import nft as nft_mod
from cni_agent.redirect.dataplane import KernelDataplane
from cni_agent.redirect.netns import NetnsWorker
from cni_agent.redirect.nft import NftablesBackend
from cni_agent.redirect.rules import (
    RuleSet,
    RuleSettings,
    build_ruleset,
    nft_json,
    render_iptables_restore,
    render_nft,
)
from cni_agent.testing.capture import CaptureListeners
from cni_agent.testing.netns import NetnsFactory, TestNetns
from cni_agent.testing.redirectcheck import check_pod_redirection, socket_in
from cni_agent.testing.specblocks import BLOCK_F

pytestmark = pytest.mark.root

OUR_TABLES = ("istio-ambient-nat", "istio-ambient-mangle", "istio-ambient-raw")


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ({"packets": 0, "bytes": 0} if k == "counter" else _strip(v))
                for k, v in obj.items() if k != "handle"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def listing(ns: TestNetns) -> list[Any]:
    """`nft -j list ruleset` minus metainfo, handles and counter values."""
    out = ns.exec(["nft", "-j", "list", "ruleset"], check=True).stdout
    return [_strip(o) for o in json.loads(out)["nftables"] if "metainfo" not in o]


def per_table(objs: list[Any]) -> dict[tuple[str, str], list[Any]]:
    tables: dict[tuple[str, str], list[Any]] = {}
    for o in objs:
        kind, body = next(iter(o.items()))
        key = (body["family"], body["name"] if kind == "table" else body["table"])
        tables.setdefault(key, []).append(o)
    return tables


def nft_load(ns: TestNetns, text: str, *, as_json: bool = False) -> None:
    ns.exec(["nft", *(["-j"] if as_json else []), "-f", "-"], input=text, check=True)


def apply(worker: NetnsWorker, ns: TestNetns, rulesets: list[RuleSet], *, precompiled: bool = True) -> None:
    worker.call(ns.open(), lambda: NftablesBackend(precompiled=precompiled).apply(rulesets))


# The repair paths exist twice: the precompiled delete-and-recreate batch (default) and libnftables'
# JSON transaction (variants the compiler refuses); both must be one transaction with the same result.
REPAIR_PATHS = pytest.mark.parametrize("precompiled,tx_name", [(True, "batch"), (False, "apply")],
                                       ids=["batch", "libnftables"])


def matches(worker: NetnsWorker, ns: TestNetns, rulesets: list[RuleSet]) -> bool:
    return worker.call(ns.open(), lambda: NftablesBackend().matches(rulesets))


def host_nft() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout


def assert_host_has_no_pod_rules() -> None:
    """Pod chains never appear on the host (a host probe table of another component may exist)."""
    host = host_nft()
    assert "istio-prerouting" not in host and "istio-output" not in host
    assert "redirect to :15001" not in host
    legacy = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True).stdout
    assert "ISTIO_PRERT" not in legacy and "ISTIO_OUTPUT" not in legacy


def rs_for(settings: RuleSettings, families: tuple[int, ...]) -> list[RuleSet]:
    return [build_ruleset(settings, f) for f in families]


# --- backend vs the spec text loaded by nft -f ------------------------------------------------------


def test_block_f_backend_equals_spec_text(worker: NetnsWorker, new_ns: NetnsFactory) -> None:
    ours, ref, via_json = new_ns(), new_ns(), new_ns()
    rulesets = rs_for(RuleSettings(), (4,))
    apply(worker, ours, rulesets)
    nft_load(ref, BLOCK_F)
    nft_load(via_json, json.dumps(nft_json(rulesets)), as_json=True)
    want = per_table(listing(ref))
    assert set(want) == {("inet", t) for t in OUR_TABLES}
    assert per_table(listing(ours)) == want
    assert per_table(listing(via_json)) == want  # the JSON we build == the text form, once loaded
    assert matches(worker, ours, rulesets) and matches(worker, ref, rulesets)


VARIANTS = [
    RuleSettings(),
    RuleSettings(dns_capture=False),
    RuleSettings(dns_capture=False, bypass_inbound=True),
    RuleSettings(dns_capture=True, bypass_inbound=True, reroute_interfaces=("net1", "net2")),
]


@pytest.mark.parametrize("families", [(4,), (4, 6)], ids=["v4", "v4v6"])
@pytest.mark.parametrize("settings", VARIANTS, ids=["default", "dns-off", "bypass", "bypass+dns+ifaces"])
def test_variants_equal_text_form(
    worker: NetnsWorker, new_ns: NetnsFactory, settings: RuleSettings, families: tuple[int, ...]
) -> None:
    ours, ref = new_ns(), new_ns()
    rulesets = rs_for(settings, families)
    apply(worker, ours, rulesets)
    nft_load(ref, render_nft(rulesets))
    assert per_table(listing(ours)) == per_table(listing(ref))
    assert ("inet", "istio-ambient-raw") in per_table(listing(ours)) or not settings.dns_capture
    assert matches(worker, ours, rulesets)
    other = rs_for(RuleSettings(dns_capture=not settings.dns_capture), families)
    assert not matches(worker, ours, other)


# --- idempotence, drift, leftovers, remove ----------------------------------------------------------


class _TxCounter:
    """Counts write transactions sent by the backend: libnftables runs (`_Nft.run`, by their name) and
    precompiled fresh-pod batches (`_Nfnl.commit`, as "batch")."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        real = nft_mod._Nft.run
        real_commit = nft_mod._Nfnl.commit

        def run(inner: Any, doc: dict[str, Any], what: str) -> str:
            self.calls.append(what)
            return real(inner, doc, what)

        def commit(inner: Any, batch: Any) -> None:
            self.calls.append("batch")
            real_commit(inner, batch)

        monkeypatch.setattr(nft_mod._Nft, "run", run)
        monkeypatch.setattr(nft_mod._Nfnl, "commit", commit)


def _rule_handles(ns: TestNetns, table: str, chain: str) -> list[tuple[int, str]]:
    out = ns.exec(["nft", "-a", "list", "chain", "inet", table, chain], check=True).stdout
    found = []
    for line in out.splitlines():
        if "# handle" in line and "type " not in line:
            text, handle = line.rsplit("# handle", 1)
            found.append((int(handle), text.strip()))
    return found


@REPAIR_PATHS
def test_idempotent_drift_repair_atomic(
    worker: NetnsWorker, new_ns: NetnsFactory, monkeypatch: pytest.MonkeyPatch,
    precompiled: bool, tx_name: str,
) -> None:
    ours, ref = new_ns(), new_ns()
    rulesets = rs_for(RuleSettings(), (4, 6))
    nft_load(ref, render_nft(rulesets))
    want = per_table(listing(ref))
    tx = _TxCounter(monkeypatch)

    apply(worker, ours, rulesets, precompiled=precompiled)  # fresh pod
    apply(worker, ours, rulesets, precompiled=precompiled)  # second apply: exact match → no write at all
    assert tx.calls == [tx_name]
    assert per_table(listing(ours)) == want
    assert sum(len(v) for v in want.values()) == len(listing(ours))  # one copy of everything

    # Drift: delete one of our rules, add a stray one, by hand.
    handles = _rule_handles(ours, "istio-ambient-nat", "istio-output")
    victim = next(h for h, text in handles if "0x00000111" in text)
    ours.exec(["nft", "delete", "rule", "inet", "istio-ambient-nat", "istio-output", "handle", str(victim)],
              check=True)
    ours.exec(["nft", "add", "rule", "inet", "istio-ambient-nat", "istio-output", "tcp", "dport", "9999",
               "accept"], check=True)
    assert per_table(listing(ours)) != want
    assert not matches(worker, ours, rulesets)
    tx.calls.clear()
    apply(worker, ours, rulesets, precompiled=precompiled)
    assert tx.calls == [tx_name]  # ONE transaction replaced the rules
    assert per_table(listing(ours)) == want
    assert matches(worker, ours, rulesets)


@REPAIR_PATHS
def test_shape_drift_is_replaced_in_one_transaction(
    worker: NetnsWorker, new_ns: NetnsFactory, monkeypatch: pytest.MonkeyPatch,
    precompiled: bool, tx_name: str,
) -> None:
    ours, ref = new_ns(), new_ns()
    rulesets = rs_for(RuleSettings(), (4,))
    nft_load(ref, render_nft(rulesets))
    apply(worker, ours, rulesets)
    # A stray chain `flush table` would keep, and a base chain re-hooked at another priority.
    ours.exec(["nft", "add", "chain", "inet", "istio-ambient-nat", "stray"], check=True)
    ours.exec(["nft", "delete", "chain", "inet", "istio-ambient-mangle", "output"], check=True)
    ours.exec(["nft", "add chain inet istio-ambient-mangle output { type route hook output priority 10 ; }"],
              check=True)
    ours.exec(["nft", "add", "set", "inet", "istio-ambient-raw", "s", "{ type ipv4_addr ; }"], check=True)
    assert not matches(worker, ours, rulesets)
    tx = _TxCounter(monkeypatch)
    apply(worker, ours, rulesets, precompiled=precompiled)
    assert tx.calls == [tx_name]
    assert per_table(listing(ours)) == per_table(listing(ref))


def test_dns_off_removes_leftover_raw_and_foreign_tables_survive(
    worker: NetnsWorker, new_ns: NetnsFactory
) -> None:
    ours = new_ns()
    foreign = ("table inet foreign {\n chain c {\n type filter hook output priority 0 ;\n"
               " tcp dport 7777 accept\n }\n}\n"
               "table ip istio-ambient-nat {\n chain x {\n udp dport 7 drop\n }\n}\n")
    nft_load(ours, foreign)
    before = per_table(listing(ours))
    apply(worker, ours, rs_for(RuleSettings(), (4,)))
    assert ("inet", "istio-ambient-raw") in per_table(listing(ours))
    dns_off = rs_for(RuleSettings(dns_capture=False), (4,))
    apply(worker, ours, dns_off)
    now = per_table(listing(ours))
    assert ("inet", "istio-ambient-raw") not in now
    assert matches(worker, ours, dns_off)
    for key in before:
        assert now[key] == before[key]

    worker.call(ours.open(), lambda: NftablesBackend().remove((4, 6)))
    worker.call(ours.open(), lambda: NftablesBackend().remove((4, 6)))  # idempotent
    assert per_table(listing(ours)) == before  # none of ours, all foreign intact
    assert not matches(worker, ours, dns_off)
    assert_host_has_no_pod_rules()


def test_table_check_sees_only_inet_tables(worker: NetnsWorker, new_ns: NetnsFactory) -> None:
    """The raw netlink table dump (the per-pod "anything of ours?" check) agrees with nft itself."""
    ns = new_ns()
    fd = ns.open()
    assert worker.call(fd, nft_mod.inet_table_names) == set()
    assert worker.call(fd, lambda: NftablesBackend().present()) is False
    nft_load(ns, "add table ip istio-ambient-nat\nadd table inet foreign\n")  # ip family: not ours
    assert worker.call(fd, nft_mod.inet_table_names) == {"foreign"}
    assert worker.call(fd, lambda: NftablesBackend().present()) is False
    rulesets = rs_for(RuleSettings(), (4,))
    apply(worker, ns, rulesets)
    assert worker.call(fd, nft_mod.inet_table_names) == {"foreign", *OUR_TABLES}
    assert worker.call(fd, lambda: NftablesBackend().present()) is True
    assert worker.call(fd, nft_mod.inet_table_names) == {
        o["table"]["name"] for o in listing(ns) if "table" in o and o["table"]["family"] == "inet"}


# --- dataplane: routes + rules, migration between backends ------------------------------------------


def legacy_save(ns: TestNetns, family: int = 4) -> str:
    tool = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    return ns.exec([tool], check=True).stdout


def test_dataplane_nft_install_verify_uninstall(worker: NetnsWorker, new_ns: NetnsFactory) -> None:
    ns = new_ns()
    fd = ns.open()
    dp = KernelDataplane(worker, backend="nftables", ipv6=True)
    assert dp.backend_name == "nftables"

    async def scenario() -> tuple[bool, bool]:
        before = await dp.verify(fd, RuleSettings())
        await dp.install(fd, RuleSettings())
        await dp.install(fd, RuleSettings())
        return before, await dp.verify(fd, RuleSettings())

    assert asyncio.run(scenario()) == (False, True)
    assert "32764:\tfrom all fwmark 0x111/0xfff lookup 100" in ns.exec(["ip", "rule"], check=True).stdout
    assert "ip6 daddr != ::1" in ns.exec(["nft", "list", "ruleset"], check=True).stdout
    assert legacy_save(ns) == ""  # nft backend never instantiates legacy tables in the pod
    asyncio.run(dp.uninstall(fd))
    assert ns.exec(["nft", "list", "ruleset"], check=True).stdout.strip() == ""
    assert "32764" not in ns.exec(["ip", "rule"], check=True).stdout


def test_nft_dataplane_with_ipv6_off_covers_ipv6_leftovers(
    worker: NetnsWorker, new_ns: NetnsFactory
) -> None:
    """A pod enrolled with IPv6 on, handled with IPv6 off: uninstall deletes the IPv6 ip rule and
    route too, verify sees them as drift, and install removes them (and the ip6 nft rules)."""
    ns = new_ns()
    fd = ns.open()
    dp6 = KernelDataplane(worker, backend="nftables", ipv6=True)
    dp4 = KernelDataplane(worker, backend="nftables", ipv6=False)
    s = RuleSettings()

    def v6_state() -> tuple[bool, bool, bool]:
        return ("32764:" in ns.exec(["ip", "-6", "rule"], check=True).stdout,
                "local default" in ns.exec(["ip", "-6", "route", "show", "table", "100"]).stdout,
                "ip6 daddr" in ns.exec(["nft", "list", "ruleset"], check=True).stdout)

    asyncio.run(dp6.install(fd, s))
    assert v6_state() == (True, True, True)
    assert asyncio.run(dp4.verify(fd, s)) is False
    asyncio.run(dp4.uninstall(fd))
    assert v6_state() == (False, False, False)
    assert ns.exec(["nft", "list", "ruleset"], check=True).stdout.strip() == ""

    asyncio.run(dp6.install(fd, s))
    asyncio.run(dp4.install(fd, s))
    assert v6_state() == (False, False, False)
    assert asyncio.run(dp4.verify(fd, s)) is True
    assert legacy_save(ns, 6) == ""  # the IPv6 cleanup did not instantiate legacy tables
    asyncio.run(dp4.uninstall(fd))


def test_migration_between_backends(worker: NetnsWorker, new_ns: NetnsFactory) -> None:
    ns = new_ns()
    fd = ns.open()
    legacy = KernelDataplane(worker, backend="iptables-legacy")
    nft = KernelDataplane(worker, backend="nftables")
    s = RuleSettings()

    asyncio.run(legacy.install(fd, s))
    assert "ISTIO_OUTPUT" in legacy_save(ns)
    assert asyncio.run(nft.verify(fd, s)) is False
    asyncio.run(nft.install(fd, s))  # enrolled under legacy → cleaned there
    assert "ISTIO" not in legacy_save(ns)
    assert "istio-ambient-nat" in ns.exec(["nft", "list", "tables"], check=True).stdout
    assert asyncio.run(nft.verify(fd, s)) is True
    assert asyncio.run(legacy.verify(fd, s)) is False  # nft leftovers make the legacy view unhealthy

    asyncio.run(legacy.install(fd, s))  # and back
    assert ns.exec(["nft", "list", "tables"], check=True).stdout.strip() == ""
    assert "ISTIO_OUTPUT" in legacy_save(ns)
    assert asyncio.run(legacy.verify(fd, s)) is True


# --- real traffic ------------------------------------------------------------------------------------


def test_real_traffic_through_nft_backend(worker: NetnsWorker, new_ns: NetnsFactory) -> None:
    pod, peer = new_ns(), new_ns()
    pod.veth(peer, "10.241.9.1/24", "10.241.9.2/24")
    pod_fd, peer_fd = pod.open(), peer.open()
    dp = KernelDataplane(worker, backend="nftables")
    asyncio.run(dp.install(pod_fd, RuleSettings()))
    assert legacy_save(pod) == ""  # whatever happens below is nft's doing

    plain = worker.call(peer_fd, lambda: socket.create_server(("10.241.9.2", 8081)))
    with CaptureListeners(pod_fd, worker=worker) as cap, plain:
        check_pod_redirection(worker, cap, plain, pod_fd, peer_fd, "10.241.9.1", "10.241.9.2")
    argv = ["nft", "list", "chain", "inet", "istio-ambient-nat", "istio-output"]
    counters = pod.exec(argv, check=True).stdout
    assert "packets 0 bytes 0 redirect to :15001" not in counters  # the 15001 rule really counted

    asyncio.run(dp.uninstall(pod_fd))
    with socket_in(worker, pod_fd) as c, pytest.raises(ConnectionRefusedError):
        c.connect(("10.241.9.2", 8080))


# --- 64 concurrent installs, each backend -----------------------------------------------------------

CONCURRENT = 64
CONC_VARIANTS = [
    RuleSettings(),
    RuleSettings(dns_capture=False),
    RuleSettings(bypass_inbound=True),
    RuleSettings(dns_capture=False, reroute_interfaces=("vifX",)),
]


def _settings_for(i: int) -> RuleSettings:
    v = CONC_VARIANTS[i % len(CONC_VARIANTS)]
    return RuleSettings(v.dns_capture, v.bypass_inbound, (f"vif{i}",)) if v.reroute_interfaces else v


def _pod_state(backend: str, ns: TestNetns) -> str:
    if backend == "nftables":
        return json.dumps(listing(ns), sort_keys=True)
    return "\n".join(
        line.rsplit(" [", 1)[0] if line.startswith(":") else line
        for table in ("filter", "mangle", "nat", "raw")
        for line in ns.exec(["iptables-legacy-save", "-t", table], check=True).stdout.splitlines()
        if not line.startswith("#")
    )


def _reference(backend: str, ns: TestNetns, settings: RuleSettings) -> None:
    rs = build_ruleset(settings, 4)
    if backend == "nftables":
        nft_load(ns, render_nft([rs]))
    else:
        ns.exec(["iptables-legacy-restore", "--noflush", "-v"], input=render_iptables_restore(rs), check=True)


@pytest.mark.parametrize("backend", ["nftables", "iptables-legacy"])
def test_64_concurrent_installs(worker: NetnsWorker, new_ns: NetnsFactory, backend: str) -> None:
    pods = [new_ns() for _ in range(CONCURRENT)]
    dp = KernelDataplane(worker, backend=backend)

    async def install_all() -> None:
        await asyncio.gather(*(dp.install(p.open(), _settings_for(i)) for i, p in enumerate(pods)))

    asyncio.run(install_all())
    refs: dict[int, str] = {}
    for i, p in enumerate(pods):
        ref = new_ns()
        _reference(backend, ref, _settings_for(i))
        refs[i] = _pod_state(backend, ref)
        ref.cleanup()
        assert _pod_state(backend, p) == refs[i], (backend, i)
    assert len(set(refs.values())) == 3 + CONCURRENT // len(CONC_VARIANTS)  # vif<i> pods are all distinct
    assert_host_has_no_pod_rules()
