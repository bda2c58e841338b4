"""The in-pod dataplane the orchestrator depends on: routes + redirect rules inside a pod netns.

A small Protocol keeps the orchestrator independent of the backend (python-iptables now, nftables
next) and lets tests substitute a fake. `KernelDataplane` composes the NetnsWorker (where), the
rules backend (what) and the routes (how replies get home), in the order spec §6 requires: routes
first, then rules, so no captured reply is ever routed out of the pod.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from pyroute2 import NetlinkError

from cni_agent.redirect.iptc import IptablesLegacyBackend, RulesError
from cni_agent.redirect.netns import NetnsError, NetnsWorker, netns_identity
from cni_agent.redirect.routes import RoutesError, apply_routes, remove_routes, routes_present
from cni_agent.redirect.rules import RuleSet, RuleSettings, build_ruleset

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


_EXPECTED = (RulesError, RoutesError, NetlinkError, OSError)


class KernelDataplane:
    """Real kernel implementation: every step runs on the NetnsWorker inside the pod netns."""

    def __init__(self, worker: NetnsWorker, *, ipv6: bool = False) -> None:
        self._worker = worker
        self._ipv6 = ipv6
        self._backend = IptablesLegacyBackend()

    @property
    def backend_name(self) -> str:
        return self._backend.name

    def rulesets(self, settings: RuleSettings) -> list[RuleSet]:
        """The rule sets this dataplane installs for a pod (v4, plus v6 when enabled)."""
        families = (4, 6) if self._ipv6 else (4,)
        return [build_ruleset(settings, family) for family in families]

    async def install(self, netns_fd: int, settings: RuleSettings) -> None:
        rulesets = self.rulesets(settings)
        ipv6 = self._ipv6

        def work() -> None:
            _step("routes", lambda: apply_routes(ipv6))
            _step("rules", lambda: self._backend.apply(rulesets))

        await self._run(netns_fd, work)

    async def uninstall(self, netns_fd: int) -> None:
        families = (4, 6) if self._ipv6 else (4,)
        ipv6 = self._ipv6

        def work() -> None:
            _step("remove rules", lambda: self._backend.remove(families))
            _step("remove routes", lambda: remove_routes(ipv6))

        await self._run(netns_fd, work)

    async def verify(self, netns_fd: int, settings: RuleSettings) -> bool:
        rulesets = self.rulesets(settings)
        ipv6 = self._ipv6

        def work() -> bool:
            return _step("verify routes", lambda: routes_present(ipv6)) and _step(
                "verify rules", lambda: self._backend.matches(rulesets)
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
