"""The in-pod dataplane the orchestrator depends on: routes + redirect rules inside a pod netns.

A small Protocol keeps the orchestrator independent of the backend (python-iptables or nftables)
and lets tests substitute a fake. `KernelDataplane` composes the NetnsWorker (where), the rules
backend (what) and the routes (how replies get home), in the order spec §6 requires: routes first,
then rules, so no captured reply is ever routed out of the pod.

Backend migration (spec §10 requirement 3): a pod enrolled while the node used the other backend
still holds that backend's rules. `install` removes them right AFTER applying ours, in the same
worker job: never a moment without capture, and the brief overlap is harmless (a connection is
NATed once; the mangle marks are identical). Both checks are cheap when there is nothing
to clean: the legacy side reads `/proc/thread-self/net/ip{,6}_tables_names` (no libiptc handle is
opened unless a legacy table exists in the pod), the nft side is one raw netlink dump of the `inet`
table names (~0.05 ms; a libnftables context + `list tables` was ~0.4 ms, most of an
iptables-backend pod's budget after the rules themselves).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from pyroute2 import NetlinkError

from cni_agent.redirect.iptc import (
    IptablesLegacyBackend,
    RulesError,
    iptc_session,
    legacy_tables_present,
    our_tables_here,
)
from cni_agent.redirect.netns import NetnsError, NetnsWorker, netns_identity
from cni_agent.redirect.nft import NftablesBackend, NftRulesError
from cni_agent.redirect.routes import RoutesError, apply_routes, remove_routes, routes_present
from cni_agent.redirect.rules import (
    OUR_CHAINS,
    RuleSet,
    RuleSettings,
    cached_ruleset,
    check_probe_snat,
)

T = TypeVar("T")


class DataplaneError(Exception):
    """Permanent failure programming a pod netns; `step` says what failed, `netns` which namespace."""

    def __init__(self, step: str, detail: str, netns: tuple[int, int] | None = None) -> None:
        where = f" in netns {netns[0]}:{netns[1]}" if netns else ""
        super().__init__(f"{step} failed{where}: {detail}")
        self.step = step
        self.detail = detail
        self.netns = netns


class Dataplane(Protocol):
    """What the orchestrator needs from the in-pod dataplane."""

    async def install(self, netns_fd: int, settings: RuleSettings) -> None: ...

    async def uninstall(self, netns_fd: int) -> None: ...

    async def verify(self, netns_fd: int, settings: RuleSettings) -> bool: ...


_EXPECTED = (RulesError, NftRulesError, RoutesError, NetlinkError, OSError)


class RulesBackend(Protocol):
    """What both rule backends offer; called on the worker inside the pod netns."""

    name: str

    def apply(self, rulesets: Sequence[RuleSet]) -> None: ...

    def matches(self, rulesets: Sequence[RuleSet]) -> bool: ...

    def remove(self, families: Sequence[int]) -> None: ...


BACKEND_NAMES: tuple[str, ...] = (IptablesLegacyBackend.name, NftablesBackend.name)


def make_backend(name: str) -> RulesBackend:
    if name == IptablesLegacyBackend.name:
        return IptablesLegacyBackend()
    if name == NftablesBackend.name:
        return NftablesBackend()
    raise ValueError(f"unknown rules backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")


def _legacy_tables_present() -> bool:
    """Any legacy x_tables table (either family) in the current thread's netns."""
    return legacy_tables_present(4) or legacy_tables_present(6)


def _nft_tables_present() -> bool:
    """Our nft tables here; a node without usable nftables cannot have any."""
    try:
        return NftablesBackend().present()
    except NftRulesError:
        return False


def clean_other_backend(backend_name: str) -> None:
    """Remove the rules the OTHER backend may have left in this netns (spec §10 requirement 3).

    Both families: the pod may have been enrolled while IPv6 was on.
    """
    if backend_name == NftablesBackend.name:
        if _legacy_tables_present():
            IptablesLegacyBackend().remove((4, 6))
    elif _nft_tables_present():
        NftablesBackend().remove((4, 6))


def _other_present(backend_name: str) -> bool:
    """Whether the other backend's rules are in this netns (they would redirect a second time)."""
    if backend_name != NftablesBackend.name:
        return _nft_tables_present()
    if not _legacy_tables_present():
        return False
    for family in (4, 6):  # a legacy table exists; ours only if one of our chains is in it
        here = our_tables_here(family)
        if not here:
            continue
        try:
            with iptc_session(family, here) as tables:
                if any(t.is_chain(c) for t in tables.values() for c in OUR_CHAINS):
                    return True
        except RulesError:
            continue
    return False


def remove_ipv6_leftovers(backend: RulesBackend) -> None:
    """IPv6 is off: drop the IPv6 rules of ours left from a time it was on (verify requires that).

    Only the iptables backend keeps per-family state; the nft apply rewrites the whole `inet`
    tables, and the other backend's leftovers of both families are `clean_other_backend`'s job.
    Costs one /proc read when the pod has no IPv6 legacy table (the common case).
    """
    if backend.name == IptablesLegacyBackend.name:
        backend.remove((6,))


def install_steps(backend: RulesBackend, rulesets: Sequence[RuleSet],
                  ipv6: bool) -> tuple[tuple[str, Callable[[], None]], ...]:
    """The per-pod install as named steps, in order (spec §6: routes before rules), for the worker.

    `KernelDataplane.install` runs exactly these; the benchmark times them one by one, so what it
    reports is what a pod costs. With IPv6 off, `apply_routes` also deletes our IPv6 rule/route.
    """
    steps: tuple[tuple[str, Callable[[], None]], ...] = (
        ("routes", lambda: apply_routes(ipv6)),
        ("rules", lambda: backend.apply(rulesets)),
        ("clean other backend", lambda: clean_other_backend(backend.name)),
    )
    if not ipv6:
        steps += (("remove IPv6 leftovers", lambda: remove_ipv6_leftovers(backend)),)
    return steps


class KernelDataplane:
    """Real kernel implementation: every step runs on the NetnsWorker inside the pod netns."""

    def __init__(self, worker: NetnsWorker, *, backend: str = IptablesLegacyBackend.name,
                 ipv6: bool = False, probe_snat: Mapping[int, str] | None = None) -> None:
        """`probe_snat`: the node's probe SNAT source per family ({4: ..., 6: ...}); the spec's
        addresses where missing. Pods accept connections from it (spec §4 rows 9-10)."""
        self._worker = worker
        self._ipv6 = ipv6
        self._backend = make_backend(backend)
        self._probe_snat = {f: check_probe_snat(a, f) for f, a in (probe_snat or {}).items()}

    @property
    def backend_name(self) -> str:
        return self._backend.name

    def _families(self) -> tuple[int, ...]:
        return (4, 6) if self._ipv6 else (4,)

    def rulesets(self, settings: RuleSettings) -> list[RuleSet]:
        """The rule sets this dataplane installs for a pod (v4, plus v6 when enabled)."""
        return [cached_ruleset(settings, family, self._probe_snat.get(family)) for family in self._families()]

    async def install(self, netns_fd: int, settings: RuleSettings) -> None:
        steps = install_steps(self._backend, self.rulesets(settings), self._ipv6)

        def work() -> None:
            for step, fn in steps:
                _step(step, fn)

        await self._run(netns_fd, work)

    async def uninstall(self, netns_fd: int) -> None:
        """Spec §8, for BOTH families whatever the IPv6 setting: the pod may have been enrolled while
        IPv6 was on, and leftover IPv6 redirects would break the un-enrolled pod's IPv6 traffic."""

        def work() -> None:
            _step("remove rules", lambda: self._backend.remove((4, 6)))
            _step("remove other backend's rules", lambda: clean_other_backend(self._backend.name))
            _step("remove routes", remove_routes)

        await self._run(netns_fd, work)

    async def verify(self, netns_fd: int, settings: RuleSettings) -> bool:
        """Exactly our state; with IPv6 off that includes no IPv6 rule, route or chain of ours
        (`routes_present` and the backend's `matches` check those)."""
        rulesets = self.rulesets(settings)
        ipv6 = self._ipv6

        def work() -> bool:
            return (
                _step("verify routes", lambda: routes_present(ipv6))
                and _step("verify rules", lambda: self._backend.matches(rulesets))
                and not _step("verify other backend", lambda: _other_present(self._backend.name))
            )

        return await self._run(netns_fd, work)

    async def _run(self, netns_fd: int, work: Callable[[], T]) -> T:
        try:
            identity: tuple[int, int] | None = netns_identity(netns_fd)
        except OSError:
            identity = None
        try:
            return await self._worker.run(netns_fd, work)
        except DataplaneError as exc:
            raise DataplaneError(exc.step, exc.detail, identity) from exc.__cause__
        except NetnsError as exc:
            raise DataplaneError("enter netns", str(exc), identity) from exc


def _step(step: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except _EXPECTED as exc:
        raise DataplaneError(step, str(exc)) from exc
