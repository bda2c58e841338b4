"""The orchestrator's order of operations, with recording fakes for the dataplane and ztunnel.

Snapshots are what a (re)connecting ztunnel receives, so the invariants are stated against
`Agent.snapshot()` at the moment each side effect happens:
- a pod is never in a snapshot before its rules are installed (zds.md §8.12);
- a removed pod is out of the snapshot before its Del goes out (else a ztunnel connecting during
  the Del would get it back and keep it).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cni_agent.agent import Agent
from cni_agent.cni.request import CniError, CniRequest, PluginSettings
from cni_agent.config import Settings
from cni_agent.local.registry import LocalRegistry
from cni_agent.redirect.dataplane import DataplaneError
from cni_agent.redirect.rules import RuleSettings
from cni_agent.zds.protocol import WorkloadInfo, ZdsError


class Recorder:
    def __init__(self) -> None:
        self.agent: Agent | None = None
        self.events: list[tuple[str, set[str]]] = []
        self.fail_install = False

    def seen(self, what: str) -> None:
        assert self.agent is not None
        self.events.append((what, {e.uid for e in self.agent.snapshot()}))

    # Dataplane
    async def install(self, netns_fd: int, settings: RuleSettings) -> None:
        self.seen("install")
        if self.fail_install:
            raise DataplaneError("rules", "rejected by the kernel", "netns")

    async def uninstall(self, netns_fd: int) -> None:
        self.seen("uninstall")

    async def verify(self, netns_fd: int, settings: RuleSettings) -> bool:
        return True

    # Ztunnels
    async def add_workload(self, uid: str, info: WorkloadInfo, netns_fd: int) -> None:
        self.seen("add")

    async def del_workload(self, uid: str) -> None:
        self.seen("del")

    @property
    def connected(self) -> int:
        return 1


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    netns_file = tmp_path / "netns"
    netns_file.write_text("")
    rec = Recorder()
    ag = Agent(
        Settings(run_dir=tmp_path / "run"),
        dataplane=rec,
        ztunnels=rec,
        registry=LocalRegistry(tmp_path / "run" / "local-pods.json"),
        open_netns=lambda _path: os.open(netns_file, os.O_RDONLY | os.O_CLOEXEC),
    )
    rec.agent = ag
    return ag


def request(command: str) -> CniRequest:
    return CniRequest(
        command=command,
        cni_version="1.0.0",
        container_id="c1",
        netns="/var/run/netns/pod-1",
        ifname="eth0",
        pod_namespace="demo",
        pod_name="web",
        pod_uid="u1",
        ips=("10.0.0.5",),
        settings=PluginSettings(),
    )


def rec_of(agent: Agent) -> Recorder:
    assert isinstance(agent.dataplane, Recorder)
    return agent.dataplane


def test_add_installs_rules_before_the_pod_can_be_in_a_snapshot(agent: Agent) -> None:
    asyncio.run(agent.cni_add(request("ADD")))
    assert rec_of(agent).events == [("install", set()), ("add", {"u1"})]


def test_failed_install_never_exposes_the_pod(agent: Agent) -> None:
    rec_of(agent).fail_install = True
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(CniError) as err:
        asyncio.run(agent.cni_add(request("ADD")))
    assert err.value.code == 7
    assert agent.snapshot() == [] and rec_of(agent).events == [("install", set())]
    assert len(os.listdir("/proc/self/fd")) == before  # the netns fd was closed


def test_remove_takes_the_pod_out_of_snapshots_before_the_del(agent: Agent) -> None:
    asyncio.run(agent.cni_add(request("ADD")))
    rec_of(agent).events.clear()
    asyncio.run(agent.cni_del(request("DEL")))
    assert rec_of(agent).events == [("del", set())]


def test_non_retryable_ztunnel_refusal_forgets_the_pod(agent: Agent) -> None:
    async def refuse(uid: str, info: WorkloadInfo, netns_fd: int) -> None:
        raise ZdsError("pod name is 254 characters, over the 253-character limit", retryable=False)

    rec_of(agent).add_workload = refuse  # type: ignore[method-assign]
    with pytest.raises(CniError) as err:
        asyncio.run(agent.cni_add(request("ADD")))
    assert err.value.code == 7
    assert agent.snapshot() == []
